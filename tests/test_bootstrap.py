"""The patient bootstrap computes every sample's ROC-AUC and average precision at once (metrics.weighted_roc_auc_and_ap)
instead of calling sklearn 2 x n_boot times: the same numbers as sklearn with sample weights, up to float rounding."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

import metrics


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auc_and_ap_are_sklearns(ties):
    rng = np.random.default_rng(3)
    labels = (rng.random(200) < 0.3).astype(int)
    scores = rng.random(200) + 0.4 * labels
    if ties:
        scores = np.round(scores, 1)
    weights = rng.integers(0, 3, (5, 200)).astype(float)
    auc, ap, valid = metrics.weighted_roc_auc_and_ap(labels, scores, weights)
    assert valid.all()
    for row, w in enumerate(weights):
        keep = w > 0
        assert auc[row] == pytest.approx(roc_auc_score(labels[keep], scores[keep], sample_weight=w[keep]), abs=1e-12)
        assert ap[row] == pytest.approx(average_precision_score(labels[keep], scores[keep], sample_weight=w[keep]), abs=1e-12)


def test_a_sample_of_one_class_is_invalid():
    labels, scores = np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.3, 0.1])
    _, _, valid = metrics.weighted_roc_auc_and_ap(labels, scores, np.array([[1.0, 1, 0, 0], [1, 0, 2, 0]]))
    assert valid.tolist() == [False, True]


def test_the_bootstrap_draws_what_a_loop_of_draws_would():
    """bootstrap_weights draws in chunks; a sample is the same as drawing one sample per call."""
    codes = np.array([0, 0, 1, 2, 2, 2, 3])
    chunked = np.concatenate(list(metrics.bootstrap_weights(codes, 4, 600, np.random.default_rng(9))))
    rng = np.random.default_rng(9)
    looped = np.stack([np.bincount(rng.integers(0, 4, 4), minlength=4)[codes] for _ in range(600)])
    np.testing.assert_array_equal(chunked, looped)


def test_slice_metrics_cis_are_those_of_sklearn_in_a_loop():
    rng = np.random.default_rng(5)
    labels = (rng.random(150) < 0.3).astype(int)
    patients = rng.integers(0, 12, 150)
    scores = rng.random(150) + 0.3 * labels
    m = metrics.slice_metrics(labels, scores, patients, n_boot=200, seed=1)
    codes = np.unique(patients, return_inverse=True)[1]
    aucs, skipped = [], 0
    for w in metrics.bootstrap_weights(codes, 12, 200, np.random.default_rng(1)):
        for row in w:
            keep = row > 0
            if labels[keep].min() == labels[keep].max():
                skipped += 1
                continue
            aucs.append(roc_auc_score(labels[keep], scores[keep], sample_weight=row[keep]))
    assert m["n_boot_skipped"] == skipped
    np.testing.assert_allclose(m["roc_auc_ci"], np.percentile(aucs, [2.5, 97.5]), atol=1e-12)
