"""A CV run on an external set with bleed masks (evaluate.py --checkpoint RUN --split all --data_dir OTHER): pixel
metrics and overlays of the ensemble map (trained.ensemble_external). Fold models are untrained tiny networks
(fake_runs.write_cv_run): what is tested is how their maps are put on one scale, streamed and counted."""
import json

import numpy as np
import pytest

import cohort
import cv
import evaluate
import phantom
import trained
from fake_runs import write_cv_run
from helpers import quiet


@pytest.fixture(scope="module")
def fake_cv(phantom_dir, tmp_path_factory):
    """(a 2-fold CV run of untrained tiny models on the phantom, an external phantom with masks: 3 patients x 3
    slices at 64 px, another seed)."""
    root = tmp_path_factory.mktemp("cv_pixels")
    write_cv_run(root / "run", cohort.load_index(phantom_dir, num_workers=1), phantom_dir, seed=1)
    other = phantom.write_phantom(str(root / "other"), patients=4, slices=3, size=64, seed=9)
    return root / "run", other


def test_maps_that_differ_by_their_models_spread_are_one_map():
    """Fold 1's maps and reference spread are 3x fold 0's: each map over its spread is the same map, so the ensemble
    map (cv.ensemble_map, cv.map_weights) is that map times the mean spread, and ensemble_results' (predict.py's) is
    that map; one model's ensemble map is its own map, exactly."""
    rng = np.random.default_rng(0)
    m = rng.random((3, 4, 4)).astype(np.float32)
    s0 = {"level_edges": [], "brain_p99": [[0.5, 0.02]]}
    s1 = {"level_edges": [], "brain_p99": [[1.5, 0.06]]}
    weights = cv.map_weights([s0, s1], "brain_p99")
    assert cv.map_scale([s0, s1], "brain_p99") == pytest.approx(0.04)
    np.testing.assert_allclose(cv.ensemble_map([m, 3 * m], weights), 0.04 * m / 0.02, rtol=1e-6)
    np.testing.assert_allclose(cv.ensemble_map([m, 3 * m], weights), cv.ensemble_map([m, m], [0.5, 0.5]) * 2, rtol=1e-6)
    result = lambda maps: {"positions": np.arange(3), "labels": np.zeros(3), "patients": np.zeros(3), "scans": np.zeros(3),
                           "levels": np.zeros(3), "scores": {"brain_p99": np.zeros(3)}, "maps": maps, "seconds": 0.0}
    np.testing.assert_allclose(cv.ensemble_results([result(m), result(3 * m)], [s0, s1], "brain_p99")["maps"], m / 0.02,
                               rtol=1e-6)
    assert cv.map_weights([s1], "brain_p99").tolist() == [1.0]
    assert np.array_equal(cv.ensemble_map([m], cv.map_weights([s1], "brain_p99")), m)


def test_chunks_hold_whole_scans():
    scans = np.array(["a", "a", "b", "b", "b", "c"])
    assert trained.scan_chunks(scans, 2) == [(0, 2), (2, 5), (5, 6)]  # scan b alone is longer than 2: one chunk
    assert trained.scan_chunks(scans, 5) == [(0, 5), (5, 6)]
    assert trained.scan_chunks(scans, 1) == [(0, 2), (2, 5), (5, 6)]
    assert trained.scan_chunks(scans, 100) == [(0, 6)]
    assert trained.scan_chunks(np.array([], str), 3) == []


def test_a_cv_run_reports_the_pixel_metrics_and_overlays_of_its_ensemble_map(fake_cv, tmp_path, capsys, no_figures):
    run, other = fake_cv
    evaluate.main(["--checkpoint", str(run), "--split", "all", "--data_dir", other, "--n_boot", "0",
                   "--keep_examples", "2", "--output_dir", str(tmp_path / "ext")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    pixel = report["pixel"]
    assert pixel["pixel_auprc"] is not None and pixel["pixel_roc_auc"] is not None and pixel["n_pixels_bleed"] > 0
    assert pixel["n_slices"] == report["counts"]["slices"] and pixel["oracle_best_dice"] is not None
    # Dice at the run's reference threshold (never the external masks), in the ensemble map's units
    assert pixel["dice"] is not None and "reference slices" in pixel["dice_threshold_chosen_on"]
    references = [json.load(open(cv.reference_path(p)))["entries"][0]["statistics"] for p in report["ensemble"]["models"]]
    bounds = [(np.mean(np.reshape(s["brain_p99"], (-1, 2)), 0) @ [1, 2]) / cv.spread(s, "brain_p99") for s in references]
    assert pixel["dice_threshold"] == pytest.approx(np.mean(bounds) * cv.map_scale(references, "brain_p99"))
    assert no_figures[-1] == str(tmp_path / "ext" / "overlays.png")  # written, and named on the "wrote" line
    assert "overlays.png" in out.splitlines()[-1] and "Dice" in out


def test_one_fold_ensemble_equals_the_single_checkpoint_path(fake_cv):
    """A "CV run" of one fold model: the ensemble map is the model's own map, so its pixel histograms are those of
    scoring.score_split's (the single-checkpoint path), bin for bin, and its overlays show the same slices and maps
    (no smoothing: one model's z-score ranks as its raw score)."""
    run, other = fake_cv
    flags = {"data_dir": other, "smooth_slices": 0}
    whole = trained.open_run(str(run), flags)
    one = trained.TrainedRun(whole.path, whole.folds[:1], True)
    (result, _, _), _ = quiet(one.ensemble_external, other, None, 3)
    fold = whole.folds[0]
    (rd, _), _ = quiet(trained.external_data, fold, other, None)
    (single, _), _ = quiet(trained.score_split, fold, rd, "all", 3, 0, 1, False)
    assert result["positions"].tolist() == single["positions"].tolist()
    for key in ("pos", "neg"):
        assert np.array_equal(result["pixel"][key], single["pixel"][key]), key
    for key in ("slices", "positive_slices_without_mask", "unusable_masks", "bleed_pixels_outside_region"):
        assert result["pixel"][key] == single["pixel"][key], key
    for kind, examples in single["examples"].items():
        assert [ex["position"] for ex in result["examples"][kind]] == [ex["position"] for ex in examples], kind
        for mine, theirs in zip(result["examples"][kind], examples):
            assert np.array_equal(mine["map"], theirs["map"]) and np.array_equal(mine["brain_mask"], theirs["brain_mask"])
            assert (mine["gt_mask"] is None) == (theirs["gt_mask"] is None)


def test_chunk_by_chunk_gives_what_one_pass_gives(fake_cv):
    """The same scores (smoothed along scans), pixel histograms and examples whether the slices go through in chunks
    of one scan or all at once. (With channels_last, CPU convolutions of packed windows round differently for canvases
    of other sizes, ~1e-3 on a map pixel of these untrained models: scoring's, whatever the chunks; left out here.)"""
    run, other = fake_cv
    cv_run = trained.open_run(str(run), {"data_dir": other, "channels_last": False})
    (small, _, _), printed = quiet(cv_run.ensemble_external, other, None, 2, 1)
    (large, _, _), _ = quiet(cv_run.ensemble_external, other, None, 2, 2**40)
    assert "at most 1 slices" in printed and cv_run.settings.smooth_slices > 0
    assert small["positions"].tolist() == large["positions"].tolist()
    for name, values in large["scores"].items():
        np.testing.assert_allclose(small["scores"][name], values, rtol=0, atol=1e-12)
    assert np.array_equal(small["pixel"]["pos"], large["pixel"]["pos"]) and np.array_equal(small["pixel"]["neg"], large["pixel"]["neg"])
    for kind in large["examples"]:
        assert [ex["position"] for ex in small["examples"][kind]] == [ex["position"] for ex in large["examples"][kind]]
