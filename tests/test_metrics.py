"""metrics.py, torch-free: slice, scan, subtype and pixel metrics with patient-bootstrap CIs and paired differences, on
synthetic scores and pixel histograms whose answers are known."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

import metrics
import scoring


# ---- slice metrics ---------------------------------------------------------------------------

def test_perfect_separation_gives_auc_one_with_ci_one():
    labels = np.array([0] * 20 + [1] * 20)
    scores = np.concatenate([np.linspace(0, 1, 20), np.linspace(2, 3, 20)])
    patients = np.repeat(np.arange(10), 4)
    m = metrics.slice_metrics(labels, scores, patients, n_boot=200)
    assert m["roc_auc"] == 1.0 and m["auprc"] == 1.0
    assert m["roc_auc_ci"] == pytest.approx([1, 1]) and m["auprc_ci"] == pytest.approx([1, 1])
    assert m["sens_at_90spec"] == 1.0 and m["sens_at_95spec"] == 1.0
    assert (m["n_pos"], m["n_neg"], m["n_patients"]) == (20, 20, 10)


def test_random_scores_give_auc_near_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    m = metrics.slice_metrics(labels, rng.random(4000), np.arange(4000) // 10, n_boot=100)
    assert abs(m["roc_auc"] - 0.5) < 0.03
    assert m["roc_auc_ci"][0] < 0.5 < m["roc_auc_ci"][1]
    assert abs(m["auprc"] - m["auprc_chance"]) < 0.03


def test_patient_bootstrap_resamples_whole_patients():
    # 12 patients, each all healthy or all bleed, 40 slices with the patient's score: a patient
    # drawn k times must weigh exactly like one slice per patient drawn k times.
    rng = np.random.default_rng(1)
    patient_label = np.array([0, 1] * 6)
    patient_score = patient_label * 0.8 + rng.normal(0, 0.6, 12)
    m_one = metrics.slice_metrics(patient_label, patient_score, np.arange(12), n_boot=300, seed=3)
    m_all = metrics.slice_metrics(np.repeat(patient_label, 40), np.repeat(patient_score, 40),
                                   np.repeat(np.arange(12), 40), n_boot=300, seed=3)
    assert m_all["roc_auc"] == pytest.approx(m_one["roc_auc"])
    assert m_all["roc_auc_ci"] == pytest.approx(m_one["roc_auc_ci"])
    assert m_all["n_boot_skipped"] == m_one["n_boot_skipped"]


def test_patient_ci_is_wider_than_slice_ci_when_slices_cluster():
    # Scores vary mostly between patients, barely within: 10 patients carry the evidence, not 400 slices.
    rng = np.random.default_rng(2)
    patient_label = np.array([0, 1] * 5)
    patient_offset = patient_label * 0.7 + rng.normal(0, 0.7, 10)
    patients = np.repeat(np.arange(10), 40)
    labels = patient_label[patients]
    scores = patient_offset[patients] + rng.normal(0, 0.05, 400)
    by_patient = metrics.slice_metrics(labels, scores, patients, n_boot=300)
    by_slice = metrics.slice_metrics(labels, scores, np.arange(400), n_boot=300)  # every slice its own patient
    assert by_patient["roc_auc"] == by_slice["roc_auc"]
    width = lambda m: m["roc_auc_ci"][1] - m["roc_auc_ci"][0]
    assert width(by_patient) > 3 * width(by_slice)


def test_single_class_input_and_single_class_resamples():
    m = metrics.slice_metrics([0, 0, 0], [0.1, 0.2, 0.3], ["a", "b", "c"], n_boot=10)
    assert m["roc_auc"] is None and m["roc_auc_ci"] is None and "one class" in m["note"]
    assert metrics.roc_auc([1, 1], [0.3, 0.4]) is None
    # 3 patients, only one has a bleed: many resamples miss it and must be skipped, not crash
    m = metrics.slice_metrics([0, 0, 1, 1, 0, 0], [0.1, 0.2, 0.9, 0.8, 0.3, 0.2], ["a", "a", "b", "b", "c", "c"], n_boot=200)
    assert m["roc_auc"] == 1.0 and 0 < m["n_boot_skipped"] < 200 and m["roc_auc_ci"] == pytest.approx([1, 1])


def test_sensitivity_at_fixed_specificity():
    negatives = np.arange(100.0)  # thresholds at 90 / 95 let exactly 10 / 5 negatives through
    positives = np.array([99.5, 92.5, 50.0, 10.0])
    labels = np.array([0] * 100 + [1] * 4)
    m = metrics.slice_metrics(labels, np.concatenate([negatives, positives]), np.arange(104), n_boot=0)
    assert m["sens_at_90spec"] == 0.5
    assert m["sens_at_95spec"] == 0.25
    assert m["roc_auc_ci"] is None  # no bootstrap asked for


def test_scan_metrics_max_and_top3():
    scans = np.array(["s1"] * 4 + ["s2"] * 4 + ["s3"] * 4)
    labels = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.1, 0.1, 0.1, 0.9, 0.5, 0.2, 0.2, 0.2, 0.95, 0.0, 0.0, 0.0])
    m = metrics.scan_metrics(scans, labels, scores, reduce="max", n_boot=0)
    # scan scores: s1 0.9 (bleed), s2 0.5, s3 0.95 -> the bleed scan beats one of two healthy scans
    assert (m["n_scans"], m["n_pos"], m["n_neg"]) == (3, 1, 2)
    assert m["roc_auc"] == 0.5
    m = metrics.scan_metrics(scans, labels, scores, reduce="top3", n_boot=0)
    # top-3 means: s1 (0.9+0.1+0.1)/3 = 0.367, s2 0.3, s3 0.317 -> the bleed scan is highest
    assert m["roc_auc"] == 1.0 and m["reduce"] == "top3"
    with pytest.raises(ValueError):
        metrics.scan_metrics(scans, labels, scores, reduce="median")


def test_scan_bootstrap_groups_scans_by_patient():
    scans = np.array(["a1", "a2", "b1", "b2", "c1", "d1"])
    patients = np.array(["A", "A", "B", "B", "C", "D"])
    labels = np.array([1, 0, 0, 0, 1, 0])
    m = metrics.scan_metrics(scans, labels, np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.4]), patients=patients, n_boot=50)
    assert m["n_patients"] == 4 and m["n_scans"] == 6


def test_paired_difference_of_identical_scores_is_zero_with_zero_width_ci():
    rng = np.random.default_rng(1)
    labels, patients = rng.integers(0, 2, 200), np.arange(200) // 10
    scores = rng.random(200) + labels * 0.3
    d = metrics.paired_auc_difference(labels, scores, scores.copy(), patients, n_boot=200)
    assert d["delta"] == 0 and d["ci"] == [0, 0] and not d["excludes_zero"]
    scans = np.arange(200) // 5  # 4 scans per patient, every other one healthy
    labels = np.where(scans % 2 == 0, 0, labels)
    d = metrics.paired_scan_auc_difference(scans, labels, scores, scores.copy(), patients, n_boot=200)
    assert d["delta"] == 0 and d["ci"] == [0, 0]


def test_paired_difference_of_a_clearly_better_score_lies_above_zero():
    rng = np.random.default_rng(2)
    labels, patients = np.tile([0, 1], 150), np.arange(300) // 10  # 30 patients, both classes each
    weak = rng.random(300) + 0.2 * labels
    strong = weak + 0.8 * labels  # same noise (paired), far more separation
    d = metrics.paired_auc_difference(labels, weak, strong, patients, n_boot=300)
    assert d["delta"] > 0.2 and d["ci"][0] > 0 and d["excludes_zero"]
    assert d["delta"] == pytest.approx(d["auc_b"] - d["auc_a"])
    # swapped: the same difference, negative, CI below 0
    r = metrics.paired_auc_difference(labels, strong, weak, patients, n_boot=300)
    assert r["delta"] == pytest.approx(-d["delta"]) and r["ci"][1] < 0 and r["excludes_zero"]
    # the paired CI is narrower than the unpaired CI of either AUC
    single = metrics.slice_metrics(labels, weak, patients, n_boot=300)
    assert d["ci"][1] - d["ci"][0] < single["roc_auc_ci"][1] - single["roc_auc_ci"][0] + 0.05
    # healthy slices in scans of their own, so that half the scans have no bleed
    scans = np.where(labels == 0, 1000 + np.arange(300) // 6, np.arange(300) // 6)
    s = metrics.paired_scan_auc_difference(scans, labels, weak, strong, patients, n_boot=300)
    assert s["delta"] > 0 and s["ci"][0] > 0


def test_subtype_metrics_compare_one_subtype_with_all_healthy():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.25, 0.15])
    subtypes = {"epidural": np.array([0, 0, 0, 1, 0, 0]), "subdural": np.array([0, 0, 0, 0, 1, 1]),
                "subarachnoid": np.zeros(6, int)}
    m = metrics.subtype_metrics(subtypes, labels, scores, np.arange(6), n_boot=0)
    assert m["epidural"]["roc_auc"] == 1.0 and m["epidural"]["n_neg"] == 3
    assert m["subdural"]["roc_auc"] == pytest.approx((2 / 3 + 1 / 3) / 2)  # 0.25 beats 2 of 3 healthy, 0.15 beats 1
    assert m["subarachnoid"]["roc_auc"] is None and m["subarachnoid"]["n_pos"] == 0


# ---- pixel metrics from the bounded accumulator --------------------------------------------

def synthetic_pixels(seed, n=6, size=32):
    rng = np.random.default_rng(seed)
    maps = rng.gamma(2.0, 0.02, (n, size, size))
    yy, xx = np.mgrid[:size, :size]
    brain = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.42 * size) ** 2
    gts = np.zeros((n, size, size), bool)
    for i in range(n // 2):  # half the slices carry a round bleed with higher error
        cy, cx = rng.integers(10, size - 10, 2)
        gts[i] = ((yy - cy) ** 2 + (xx - cx) ** 2) < 16
        maps[i][gts[i]] += rng.gamma(2.0, 0.03, gts[i].sum())
    return maps, np.broadcast_to(brain, maps.shape), gts


def accumulate(maps, brains, gts):
    acc = scoring.new_pixel_accumulator()
    for m, b, g in zip(maps, brains, gts):
        scoring.accumulate_pixels(acc, m, b, g)
    return acc


def test_pixel_metrics_from_histograms_match_sklearn_on_all_pixels():
    maps, brains, gts = synthetic_pixels(0)
    acc = accumulate(maps, brains, gts)
    y, v = gts[brains], maps[brains]
    m = metrics.pixel_metrics(acc)
    assert m["n_pixels_bleed"] == y.sum() and m["n_pixels_no_bleed"] == (~y).sum() and m["n_slices"] == 6
    assert m["pixel_roc_auc"] == pytest.approx(roc_auc_score(y, v), abs=2e-3)
    assert m["pixel_auprc"] == pytest.approx(average_precision_score(y, v), abs=5e-3)
    # bleed pixels outside the brain mask are not scored
    gts_outside = gts.copy()
    gts_outside[:, 0, 0] = True
    assert metrics.pixel_metrics(accumulate(maps, brains, gts_outside))["n_pixels_bleed"] == y.sum()


def test_dice_threshold_chosen_on_one_split_applied_to_another():
    val_maps, brains, val_gts = synthetic_pixels(1)
    test_maps, _, test_gts = synthetic_pixels(2)
    threshold = metrics.choose_dice_threshold(accumulate(val_maps, brains, val_gts))
    val = metrics.pixel_metrics(accumulate(val_maps, brains, val_gts), threshold)
    test = metrics.pixel_metrics(accumulate(test_maps, brains, test_gts), threshold)

    def exact_dice(maps, gts, t):
        pred, y = maps[brains] >= t, gts[brains]
        return 2 * (pred & y).sum() / (pred.sum() + y.sum())
    assert val["dice"] == pytest.approx(exact_dice(val_maps, val_gts, threshold), abs=1e-9)
    assert test["dice"] == pytest.approx(exact_dice(test_maps, test_gts, threshold), abs=1e-9)
    # on its own split the chosen threshold is the oracle; no threshold on a grid does better
    assert val["dice"] == pytest.approx(val["oracle_best_dice"])
    grid = np.quantile(val_maps[brains], np.linspace(0.5, 0.999, 200))
    assert val["oracle_best_dice"] >= max(exact_dice(val_maps, val_gts, t) for t in grid) - 2e-3
    assert test["oracle_best_dice"] >= test["dice"]


def test_dice_is_one_for_separable_maps():
    maps, brains, gts = synthetic_pixels(3)
    maps = np.where(gts, 0.5, 0.1)
    acc = accumulate(maps, brains, gts)
    threshold = metrics.choose_dice_threshold(acc)
    assert 0.1 < threshold <= 0.5
    m = metrics.pixel_metrics(acc, threshold)
    assert m["dice"] == 1.0 and m["pixel_roc_auc"] == 1.0 and m["pixel_auprc"] == 1.0
