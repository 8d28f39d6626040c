"""Patient-level cross-validation (cv.py, train.py --folds, evaluate.py / sweep.py / predict.py on a CV run folder):
the fold assignment, what each fold's model may see, the out-of-fold scores, resuming, and the fold models as one."""
import contextlib
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest

import cohort
import cv
import data
import evaluate
import models
import phantom
import predict
import sweep
import train
from test_bad_inputs import tiny_train_args

K = 2


def without_patients(index, patients):
    keep = ~np.isin(index["patient"], list(patients))
    return {name: values[keep] for name, values in index.items()}


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


# ---- the fold assignment ----------------------------------------------------------------------------

def test_folds_are_a_stratified_partition_of_the_patients(phantom_dir):
    index = quiet(cohort.load_index, phantom_dir)
    patients, sick = cohort.patients_with_bleed(index)
    for k in (2, 3):
        folds = cv.assign_folds(index, k, seed=4)["folds"]
        assert sorted(folds) == sorted(map(str, patients))  # every patient in exactly one fold (a dict: no patient twice)
        for stratum in (True, False):
            sizes = np.bincount([folds[str(p)] for p in patients[sick == stratum]], minlength=k)
            assert sizes.max() - sizes.min() <= 1


def test_adding_patients_later_moves_no_one(phantom_dir):
    index = quiet(cohort.load_index, phantom_dir)
    patients, sick = cohort.patients_with_bleed(index)
    late = [patients[sick][0], patients[~sick][0]]
    before = cv.assign_folds(without_patients(index, late), 3, seed=4)
    after = cv.assign_folds(index, 3, seed=4, saved=json.loads(json.dumps(before)))  # as read back from folds.json
    assert {p: after["folds"][p] for p in before["folds"]} == before["folds"]
    assert set(after["folds"]) - set(before["folds"]) == set(map(str, late))


def test_a_folds_splits_keep_its_patients_out_of_training_and_validation(phantom_dir):
    index = quiet(cohort.load_index, phantom_dir)
    patients, sick = cohort.patients_with_bleed(index)
    record = cv.assign_folds(index, K, seed=4)
    sick = set(map(str, patients[sick]))
    tested = []
    for fold in range(K):
        split = cv.fold_patients(index, record, fold)
        assert split["test"] == sorted(p for p, f in record["folds"].items() if f == fold)
        assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
        assert not set(split["train"]) & set(split["val"]) and not set(split["train"]) & sick  # bleeds never train
        assert set(split["val"]) - sick  # a healthy validation patient: the validation loss and checkpoint choice
        tested += split["test"]
    assert sorted(tested) == sorted(map(str, patients))


def test_k_identical_models_combine_to_one():
    rng = np.random.default_rng(0)
    scores = {"brain_p99": rng.random(20), "mean": rng.random(20)}
    stats = {"brain_p99": [0.3, 0.2], "mean": [0.5, 0.1]}
    combined = cv.mean_normalised([scores] * 3, [stats] * 3)
    for name in scores:
        assert np.allclose(combined[name], cv.normalised(scores, stats)[name])
        assert (np.argsort(combined[name]) == np.argsort(scores[name])).all()


# ---- a CV run of seconds ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cv_run(phantom_dir, tmp_path_factory):
    """A 2-fold CV run trained in two goes: fold 0 alone, then --resume of the whole run (fold 0 is kept as it was,
    fold 1 is trained). -> (run folder, fold 0's last.pt bytes after the first go)."""
    out = tmp_path_factory.mktemp("cv") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_train_args(phantom_dir, out, "--folds", str(K), "--fold", "0", "--num_samples", "4"))
        first = (out / "fold_0" / "last.pt").read_bytes()
        assert not (out / "fold_1").exists()
        train.main(tiny_train_args(phantom_dir, out, "--folds", str(K), "--resume", "--num_samples", "4"))
    return out, first


def test_resume_continues_the_cv_run_where_it_stopped(cv_run):
    out, first = cv_run
    assert (out / "fold_0" / "last.pt").read_bytes() == first  # finished fold: nothing trained again
    for fold in range(K):
        assert len(json.loads((out / f"fold_{fold}" / "training_history.json").read_text())) == 1
    data_dir = json.loads((out / "fold_0" / "splits.json").read_text())["data_dir"]
    with pytest.raises(SystemExit, match="output dir is not empty; use --resume"):
        train.main(tiny_train_args(data_dir, out, "--folds", str(K)))


def test_a_folds_model_never_sees_its_fold(cv_run):
    out, _ = cv_run
    folds = json.loads((out / cv.FOLDS_FILE).read_text())["folds"]
    for fold in range(K):
        diffusion, checkpoint = models.load_checkpoint(str(out / f"fold_{fold}" / "best_model.pt"))
        record = checkpoint["splits"]
        assert record["cv"]["folds"]["folds"] == folds and record["cv"]["fold"] == fold
        mine = {p for p, f in folds.items() if f == fold}
        assert set(record["patients"]["test"]) == mine
        rd = quiet(lambda: data.open_run_data(record["data_dir"], image_size=32, input_hu=diffusion.input_hu, split_seed=1,
                                              num_samples=4, eval_samples="all", decode=("train", "val"), num_workers=0,
                                              saved_splits=record))
        for split in ("train", "val"):  # training positions and validation (loss, ROC-AUC, checkpoint choice)
            assert not set(rd.index["patient"][rd.splits[split]]) & mine


def test_out_of_fold_scores_every_patient_once_by_its_folds_model(cv_run):
    out, _ = cv_run
    quiet(evaluate.main, ["--checkpoint", str(out), "--eval_samples", "all", "--n_boot", "20"])
    folder = out / "eval_cv_best_model_oof"
    rows = list(csv.DictReader((folder / "scores.csv").open()))
    folds = json.loads((out / cv.FOLDS_FILE).read_text())["folds"]
    fold_of = {}
    for row in rows:
        assert int(row["fold"]) == folds[row["patient"]]  # scored by the model that never saw it
        assert fold_of.setdefault(row["patient"], row["fold"]) == row["fold"]
    assert len({row["id"] for row in rows}) == len(rows)  # each slice once
    assert set(fold_of) == set(folds)  # every patient
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["counts"]["patients"] == len(folds) and len(metrics["folds"]) == K
    assert metrics["slice"]["brain_p99"]["roc_auc_ci"] is not None
    assert all(os.path.exists(cv.reference_path(str(out / f"fold_{k}" / "best_model.pt"))) for k in range(K))
    # sweep.py reads the same pooled scores: its default row is evaluate.py's number
    quiet(sweep.main, ["--checkpoint", str(out), "--eval_t", "250", "--multi_t", "--residuals", "positive",
                       "--median_sizes", "5", "--smooth_slices", "2", "--n_boot", "0"])
    table = json.loads((out / "sweep_cv_best_model_oof" / "sweep.json").read_text())
    default = [r for r in table["rows"] if r["delta_roc_auc"] == 0 and r["score"] == metrics["score"]]
    assert default and default[0]["roc_auc"] == pytest.approx(metrics["slice"][metrics["score"]]["roc_auc"])


def test_ensemble_of_identical_fold_models_ranks_as_one(cv_run, phantom_dir, tmp_path):
    out, _ = cv_run
    twins = tmp_path / "twins"
    for fold in range(K):  # every fold holds fold 0's model (and its splits, so its reference slices)
        shutil.copytree(out / "fold_0", twins / f"fold_{fold}", ignore=shutil.ignore_patterns("eval_*", "reference_*"))
    shutil.copy(out / cv.FOLDS_FILE, twins / cv.FOLDS_FILE)
    single = out / "fold_0" / "best_model.pt"
    quiet(predict.main, ["--checkpoint", str(single), "--data_dir", phantom_dir, "--output_dir", str(tmp_path / "one")])
    quiet(predict.main, ["--checkpoint", str(twins), "--data_dir", phantom_dir, "--output_dir", str(tmp_path / "cv")])
    one = list(csv.DictReader((tmp_path / "one" / "slices.csv").open()))
    both = list(csv.DictReader((tmp_path / "cv" / "slices.csv").open()))
    stats = json.loads(open(cv.reference_path(str(twins / "fold_0" / "best_model.pt"))).read())["statistics"]
    scored = [(float(a["brain_p99"]), float(b["brain_p99"])) for a, b in zip(one, both) if a["brain_p99"]]
    a, b = np.array(scored).T
    (mean, std), = stats["brain_p99"]  # one level bin: no --level_norm
    assert np.allclose(b, (a - mean) / std, rtol=1e-4, atol=1e-4)
    assert (np.diff(b[np.argsort(a)]) >= -1e-4).all()  # the same order (up to the CSV's 6 digits)


def test_the_cv_run_scores_another_data_set_as_one_model(cv_run, tmp_path):
    out, _ = cv_run
    other = phantom.write_phantom(str(tmp_path / "other"), patients=4, slices=4, size=64, seed=9)
    quiet(evaluate.main, ["--checkpoint", str(out), "--split", "all", "--data_dir", other, "--n_boot", "20"])
    metrics = json.loads((out / "eval_cv_best_model_all" / "metrics.json").read_text())
    assert metrics["counts"]["patients"] == 4 and len(metrics["ensemble"]["models"]) == K
    assert metrics["slice"]["brain_p99"]["roc_auc"] is not None


def test_cv_flags_and_folders_refused_in_one_line(cv_run, phantom_dir, tmp_path):
    out, _ = cv_run
    for flags, message in ((["--folds", "1"], "--folds 1: must be at least 2"),
                           (["--folds", "2", "--fold", "2"], "--fold 2: needs --folds K and must be in 0..K-1"),
                           (["--fold", "0"], "--fold 0: needs --folds K")):
        with pytest.raises(SystemExit, match=message):
            train.main(tiny_train_args(phantom_dir, tmp_path / "run", *flags))
    with pytest.raises(SystemExit, match="the run's folds.json has 2 folds"):
        train.main(tiny_train_args(phantom_dir, out, "--folds", "3", "--resume"))
    with pytest.raises(SystemExit, match="--split val: a CV run has no one validation split"):
        evaluate.main(["--checkpoint", str(out), "--split", "val"])
    with pytest.raises(SystemExit, match="fold 0 has no nothing.pt"):
        evaluate.main(["--checkpoint", str(out), "--fold_checkpoint", "nothing.pt"])


# ---- level normalisation and the scored region (issue 20) ---------------------------------------------

def test_level_normalisation_centres_healthy_slices_of_every_level():
    rng = np.random.default_rng(1)
    levels = rng.random(400)
    labels = (rng.random(400) < 0.3).astype(int)
    raw = {"brain_p99": 2.0 - 1.5 * levels + 0.1 * rng.standard_normal(400)}  # skull-base slices score high
    stats = cv.reference_statistics(raw, labels, levels, level_bins=5)
    assert len(stats["level_edges"]) == 4 and len(stats["brain_p99"]) == 5
    z = cv.normalised(raw, stats, levels)["brain_p99"]
    bins = np.digitize(levels, stats["level_edges"])
    for b in range(5):
        healthy = (bins == b) & (labels == 0)
        assert healthy.sum() > 20 and abs(z[healthy].mean()) < 1e-9  # ~0 on the slices it was fitted on
    assert abs(np.corrcoef(z[labels == 0], levels[labels == 0])[0, 1]) < 0.2  # the level is gone from the score
    with pytest.raises(ValueError, match="give the slices' levels"):
        cv.normalised(raw, stats)


def test_level_norm_refuses_without_its_statistics_in_one_line(cv_run, tmp_path, monkeypatch):
    out, _ = cv_run
    path = str(tmp_path / "best_model.pt")
    shutil.copy(out / "fold_0" / "best_model.pt", path)
    diffusion, checkpoint = models.load_checkpoint(path)
    gone = str(tmp_path / "gone")
    checkpoint = dict(checkpoint, splits=dict(checkpoint["splits"], data_dir=gone), args=dict(checkpoint["args"], data_dir=gone))
    run, settings, seed = evaluate.config.read_back(checkpoint, {"level_norm": "z"}, path, diffusion.config["image_size"])
    with pytest.raises(SystemExit, match=r"no reference statistics .* run python evaluate.py --checkpoint .*best_model.pt"):
        evaluate.fold_reference(path, checkpoint, diffusion, run, settings, seed)
    # saved statistics are reused for the same key; once the masks or decoding change (a new cache version), never
    saved = {"level_edges": [], "brain_p99": [[0.0, 1.0]]}
    cv.write_reference(cv.reference_path(path), evaluate.reference_key(settings, seed, run), saved)
    assert evaluate.fold_reference(path, checkpoint, diffusion, run, settings, seed) == saved
    monkeypatch.setattr(evaluate.data, "CACHE_VERSION", evaluate.data.CACHE_VERSION + 1)
    with pytest.raises(SystemExit, match=r"no reference statistics"):
        evaluate.fold_reference(path, checkpoint, diffusion, run, settings, seed)


def test_out_of_fold_scores_with_no_bone_3d_region_and_level_norm(cv_run, phantom_dir, tmp_path):
    out, _ = cv_run
    flags = ["--scored_region", "no_bone_3d", "--level_norm", "z", "--eval_samples", "all", "--n_boot", "20"]
    quiet(evaluate.main, ["--checkpoint", str(out), "--output_dir", str(tmp_path / "oof"), *flags])
    metrics = json.loads((tmp_path / "oof" / "metrics.json").read_text())
    assert metrics["settings"]["level_norm"] == "z" and metrics["slice"]["brain_p99"]["roc_auc"] is not None
    assert all(len(fold["reference"]["level_edges"]) >= 1 for fold in metrics["folds"])
    # sweep.py reads both off the same maps, and the no-learning baseline beside the model
    quiet(sweep.main, ["--checkpoint", str(out), "--eval_t", "250", "--multi_t", "--residuals", "positive",
                       "--median_sizes", "5", "--smooth_slices", "2", "--n_boot", "0", "--output_dir", str(tmp_path / "sw"),
                       "--scored_regions", "intracranial", "no_bone_3d:1", "no_bone_3d:2", "--level_norms", "none", "z",
                       "--anomaly_maps", "model", "blood_band"])
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"]
    assert {(r["anomaly_map"], r["region"], r["level_norm"]) for r in rows} == {
        (m, r, n) for m in ("model", "blood_band") for r in ("intracranial", "no_bone_3d:1", "no_bone_3d:2")
        for n in ("none", "z")}
    same = [r for r in rows if (r["anomaly_map"], r["region"], r["level_norm"], r["score"]) == ("model", "no_bone_3d:2", "z", "brain_p99")]
    assert same[0]["roc_auc"] == pytest.approx(metrics["slice"]["brain_p99"]["roc_auc"])
    # a single checkpoint with --level_norm: predict.py reads the reference evaluate.py saved, or scores it
    single = str(out / "fold_0" / "best_model.pt")
    quiet(predict.main, ["--checkpoint", single, "--data_dir", phantom_dir, "--output_dir", str(tmp_path / "pred"), "--level_norm", "z"])
    rows = list(csv.DictReader((tmp_path / "pred" / "slices.csv").open()))
    assert any(row["brain_p99"] and float(row["brain_p99"]) < 0 for row in rows)  # z-scores: healthy ones below 0
