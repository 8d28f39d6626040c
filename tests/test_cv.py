"""Patient-level cross-validation (cv.py, train.py --folds, evaluate.py / sweep.py / predict.py on a CV run folder):
the fold assignment, what each fold's model may see, the out-of-fold scores, resuming, and the fold models as one."""
import csv
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import cohort
import config
import cv
import data
import evaluate
import metrics
import models
import phantom
import predict
import scoring
import sweep
import train
import trained
from helpers import ROOT, one_scan_folder, quiet, stand_in_figures, tiny_train_args

K = 2


def without_patients(index, patients):
    keep = ~np.isin(index["patient"], list(patients))
    return {name: values[keep] for name, values in index.items()}


def load_index(data_dir):
    return quiet(cohort.load_index, data_dir)[0]


# ---- the fold assignment ----------------------------------------------------------------------------

def test_folds_are_a_stratified_partition_of_the_patients(phantom_dir):
    index = load_index(phantom_dir)
    patients, sick = cohort.patients_with_bleed(index)
    for k in (2, 3):
        folds = cv.assign_folds(index, k, seed=4)["folds"]
        assert sorted(folds) == sorted(map(str, patients))  # every patient in exactly one fold (a dict: no patient twice)
        for stratum in (True, False):
            sizes = np.bincount([folds[str(p)] for p in patients[sick == stratum]], minlength=k)
            assert sizes.max() - sizes.min() <= 1


def test_adding_patients_later_moves_no_one(phantom_dir):
    index = load_index(phantom_dir)
    patients, sick = cohort.patients_with_bleed(index)
    late = [patients[sick][0], patients[~sick][0]]
    before = cv.assign_folds(without_patients(index, late), 3, seed=4)
    after = cv.assign_folds(index, 3, seed=4, saved=json.loads(json.dumps(before)))  # as read back from folds.json
    assert {p: after["folds"][p] for p in before["folds"]} == before["folds"]
    assert set(after["folds"]) - set(before["folds"]) == set(map(str, late))


def test_a_folds_splits_keep_its_patients_out_of_training_and_validation(phantom_dir):
    index = load_index(phantom_dir)
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


def fold_result(positions, brain_p99, mean, levels, maps, seconds=1.0):
    """A score_split-like result of one fold model (positions sorted), with its own pixel histogram and examples."""
    pixel = scoring.new_pixel_accumulator()
    scoring.accumulate_pixels(pixel, np.full((2, 2), 0.5), np.ones((2, 2), bool), np.eye(2, dtype=bool))
    return {"positions": np.array(positions), "labels": np.array(positions) % 2, "patients": np.array([f"P{p // 4}" for p in positions]),
            "scans": np.array([f"S{p // 4}" for p in positions]), "levels": np.array(levels, np.float64),
            "scores": {"brain_p99": np.array(brain_p99, np.float64), "mean": np.array(mean, np.float64)},
            "maps": np.array(maps, np.float32), "pixel": pixel, "skipped_slices": 1,
            "examples": {"true positive": [{"position": positions[0], "score": brain_p99[0]}]}, "seconds": seconds}


def test_the_fold_ensemble_by_hand(capsys):
    """cv.ensemble_results (predict.py and --split all of a CV run): on the slices both fold models scored, each score
    the mean of the models' z-scores against their own reference statistics (one level bin for fold 0, two for
    fold 1), each map divided by its model's reference spread of the run's score and averaged."""
    maps0 = [np.full((2, 2), v) for v in (1.0, 2.0, 4.0, 6.0)]
    maps1 = [np.full((2, 2), v) for v in (5.0, 10.0, 15.0, 20.0)]
    # fold 0 scored positions 1 2 3 5; fold 1 left out position 1 (a patient it trained on) and scored 7 besides
    r0 = fold_result([1, 2, 3, 5], [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [0.1, 0.4, 0.6, 0.9], maps0)
    r1 = fold_result([2, 3, 5, 7], [5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0], [0.4, 0.6, 0.9, 0.95], maps1, seconds=2.0)
    s0 = {"level_edges": [], "brain_p99": [[1.0, 2.0]], "mean": [[0.0, 10.0]]}
    s1 = {"level_edges": [0.5], "brain_p99": [[4.0, 1.0], [6.0, 4.0]], "mean": [[1.0, 0.5], [2.0, 2.0]]}
    both = cv.ensemble_results([r0, r1], [s0, s1], "brain_p99")
    assert both["positions"].tolist() == [2, 3, 5]
    assert capsys.readouterr().out == ("ensemble: 1 slice(s) not scored by every fold model (patients some fold trained "
                                       "on) are left out\n")
    # levels 0.4 0.6 0.9: fold 1's bins 0, 1, 1
    z0 = {"brain_p99": [(2 - 1) / 2, (3 - 1) / 2, (4 - 1) / 2], "mean": [2.0, 3.0, 4.0]}
    z1 = {"brain_p99": [(5 - 4) / 1, (6 - 6) / 4, (7 - 6) / 4], "mean": [(1 - 1) / 0.5, (2 - 2) / 2, (3 - 2) / 2]}
    for name in ("brain_p99", "mean"):
        np.testing.assert_allclose(both["scores"][name], (np.array(z0[name]) + z1[name]) / 2, rtol=0, atol=1e-12)
    spread0, spread1 = 2.0, (1.0 + 4.0) / 2  # brain_p99's std over the level bins
    np.testing.assert_allclose(both["maps"], [np.full((2, 2), (m0 / spread0 + m1 / spread1) / 2)
                                              for m0, m1 in ((2.0, 5.0), (4.0, 10.0), (6.0, 15.0))], rtol=1e-6)
    assert both["maps"].dtype == np.float32
    for key in ("labels", "patients", "scans", "levels"):
        assert both[key].tolist() == r0[key][1:].tolist(), key  # fold 0's rows of the common slices
    # several models' pixel histograms and examples are of one model's maps each: left out; times add up
    assert both["pixel"] is None and both["examples"] == {} and both["seconds"] == 3.0
    assert cv.ensemble_results([r0, r1], [s0, s1], "mean")["maps"][0, 0, 0] == pytest.approx((2.0 / 10.0 + 5.0 / 1.25) / 2)
    capsys.readouterr()

    one = cv.ensemble_results([r0], [s0], "brain_p99")  # one model: its own slices, z-scores and maps, and its pixels
    assert one["positions"].tolist() == [1, 2, 3, 5] and capsys.readouterr().out == ""
    np.testing.assert_allclose(one["scores"]["brain_p99"], [0.0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(one["maps"][:, 0, 0], [0.5, 1.0, 2.0, 3.0])
    assert one["pixel"] is r0["pixel"] and one["examples"] is r0["examples"]


def pixels(values, bleed):
    """A pixel histogram (scoring.new_pixel_accumulator) of one slice: these map values, bleed where `bleed`."""
    acc = scoring.new_pixel_accumulator()
    values = np.asarray(values, np.float64)[None]
    scoring.accumulate_pixels(acc, values, np.ones(values.shape, bool), np.asarray(bleed, bool)[None])
    return acc


def test_pooled_out_of_fold_dice_by_hand():
    """Each fold's pixels at the Dice threshold chosen on the other folds' pixels, counts pooled: fold A's bleeds
    score 0.3 (over a background of 0.1), fold B's 0.5 with false positives at 0.3; a fold without masks (None) adds
    nothing. B's threshold (above its 0.3s) misses all of A's bleeds; A's (at most 0.3) takes all of B's bleeds and its
    0.3s: Dice = 2 * 4 / (4 + 4 + 8) = 0.5. Each fold at its own threshold would give 1."""
    a = pixels([0.3] * 4 + [0.1] * 10, [True] * 4 + [False] * 10)
    b = pixels([0.5] * 4 + [0.3] * 4 + [0.1] * 10, [True] * 4 + [False] * 14)
    dice, (threshold_a, threshold_b) = cv.out_of_fold_dice([a, None, b])
    assert dice == pytest.approx(0.5)
    assert 0.3 < threshold_a <= 0.5 and 0.1 < threshold_b <= 0.3  # fold A's chosen on B's pixels, B's on A's
    assert metrics.pooled_dice([(a, a), (b, b)]) == (1.0, [threshold_b, threshold_a])
    assert metrics.pooled_dice([(a, None), (None, b)]) == (None, [])  # a pair without both histograms is left out
    assert cv.out_of_fold_dice([None, None]) == (None, [])
    # three folds: fold A at the threshold of B and C's pixels together
    c = pixels([0.5] * 4 + [0.1] * 4, [True] * 4 + [False] * 4)
    dice, thresholds = cv.out_of_fold_dice([a, b, c])
    assert thresholds[0] == metrics.choose_dice_threshold(scoring.merge_pixel_accumulators([b, c]))
    assert 0.3 < thresholds[0] <= 0.5 and 0.1 < thresholds[1] <= 0.3 and 0.1 < thresholds[2] <= 0.3
    # A misses its 4 bleeds; B, at a threshold that A's bleeds at 0.3 pulled down, takes its 4 bleeds and its 4 0.3s;
    # C takes its 4 bleeds alone: 2 * (0 + 4 + 4) / ((0 + 4 + 4) + 4 + 12) = 16 / 24
    assert dice == pytest.approx(16 / 24)


# ---- a CV run of seconds ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cv_run(phantom_dir, tmp_path_factory):
    """A 2-fold CV run trained in two goes (figures stood in for): fold 0 alone, then --resume of the whole run (fold 0
    is kept as it was, fold 1 is trained). -> (run folder, fold 0's last.pt bytes after the first go)."""
    out = tmp_path_factory.mktemp("cv") / "run"
    with pytest.MonkeyPatch.context() as patch:
        stand_in_figures(patch)
        quiet(train.main, tiny_train_args(phantom_dir, out, "--folds", K, "--fold", "0", "--num_samples", "4"))
        first = (out / "fold_0" / "last.pt").read_bytes()
        assert not (out / "fold_1").exists()
        quiet(train.main, tiny_train_args(phantom_dir, out, "--folds", K, "--resume", "--num_samples", "4"))
    return out, first


def test_resume_continues_the_cv_run_where_it_stopped(cv_run):
    out, first = cv_run
    assert (out / "fold_0" / "last.pt").read_bytes() == first  # finished fold: nothing trained again
    for fold in range(K):
        assert len(json.loads((out / f"fold_{fold}" / "training_history.json").read_text())) == 1
    data_dir = json.loads((out / "fold_0" / "splits.json").read_text())["data_dir"]
    with pytest.raises(SystemExit, match="output dir is not empty; use --resume"):
        train.main(tiny_train_args(data_dir, out, "--folds", str(K)))


def test_folds_trained_in_processes_are_the_folds_trained_in_turn(phantom_dir, tmp_path, no_figures):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fold process gets 1 // 2 -> 1 thread: the same arithmetic as in turn at 1 thread
    try:
        flags = ("--folds", K, "--num_samples", "4")
        quiet(train.main, tiny_train_args(phantom_dir, tmp_path / "in_turn", *flags))
        quiet(train.main, tiny_train_args(phantom_dir, tmp_path / "side_by_side", *flags, "--fold_processes", 2))
    finally:
        torch.set_num_threads(threads)
    for fold in range(K):
        in_turn, side_by_side = (torch.load(tmp_path / run / f"fold_{fold}" / "last.pt", weights_only=True)["model"]
                                 for run in ("in_turn", "side_by_side"))
        assert all(torch.equal(in_turn[name], side_by_side[name]) for name in in_turn)
        log = (tmp_path / "side_by_side" / f"fold_{fold}.log").read_text()
        assert "epoch   1 |" in log and "done: best" in log and "\r" not in log  # no progress bars in a log file
    # a run started again over the old one writes its logs afresh (a resumed one would go on with them)
    quiet(train.main, tiny_train_args(phantom_dir, tmp_path / "side_by_side", *flags, "--fold_processes", 2, "--overwrite"))
    assert (tmp_path / "side_by_side" / "fold_0.log").read_text().count("epoch   1 |") == 1
    with pytest.raises(SystemExit, match="--fold_processes 2: needs --folds K"):
        train.main(tiny_train_args(phantom_dir, tmp_path / "plain", "--fold_processes", 2))


def test_a_fold_process_killed_from_outside_stops_the_run_in_one_line(phantom_dir, tmp_path, no_figures):
    def kill_the_first_fold_process():  # as the out-of-memory killer would, a second into its start
        for _ in range(400):
            children = multiprocessing.active_children()
            if children:
                time.sleep(1.0)
                os.kill(children[0].pid, signal.SIGKILL)
                return
            time.sleep(0.05)
    threading.Thread(target=kill_the_first_fold_process, daemon=True).start()
    with pytest.raises(SystemExit, match=r"error: fold \d's process died \(out of memory\? killed\?\); its log: .*fold_\d\.log; "
                                         "continue with --resume"):
        quiet(train.main, tiny_train_args(phantom_dir, tmp_path / "run", "--folds", K, "--num_samples", 4, "--fold_processes", 2))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists processes through /proc (Linux)")
def test_fold_processes_end_when_train_py_is_killed(phantom_dir, tmp_path):
    # train.py in its own process, killed from outside (`kill -9`, a scheduler) once its fold processes are up
    cmd = [sys.executable, "train.py", *tiny_train_args(phantom_dir, tmp_path / "run", "--folds", K, "--epochs", 50,
                                                        "--num_samples", 4, "--fold_processes", 2)]
    parent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    def children():  # the pids of running processes started by multiprocessing's spawn, from /proc
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"multiprocessing.spawn" in f.read():
                        pids.append(pid)
            except OSError:  # gone meanwhile
                pass
        return pids
    before = set(children())
    try:
        for _ in range(600):  # until both fold processes have started
            if (tmp_path / "run" / "fold_0.log").exists() and (tmp_path / "run" / "fold_1.log").exists():
                break
            time.sleep(0.05)
        folds = set(children()) - before
        assert len(folds) >= 2
    finally:
        parent.kill()
        parent.wait()
    for _ in range(600):  # each notices within a second or two (longer on a loaded machine: it may still be starting)
        if not folds & set(children()):
            break
        time.sleep(0.1)
    assert not folds & set(children()), "a fold process outlived train.py"


def test_a_folds_model_never_sees_its_fold(cv_run):
    out, _ = cv_run
    folds = json.loads((out / cv.FOLDS_FILE).read_text())["folds"]
    for fold in range(K):
        diffusion, checkpoint = models.load_checkpoint(str(out / f"fold_{fold}" / "best_model.pt"))
        record = checkpoint["splits"]
        assert record["cv"]["folds"]["folds"] == folds and record["cv"]["fold"] == fold
        mine = {p for p, f in folds.items() if f == fold}
        assert set(record["patients"]["test"]) == mine
        run = config.RunConfig(data_dir=record["data_dir"], image_size=32, seed=1, num_samples=4, eval_samples="all",
                               num_workers=0)
        rd, _ = quiet(data.open_run_data, run, diffusion.input_hu, ("train", "val"), saved_splits=record)
        for split in ("train", "val"):  # training positions and validation (loss, ROC-AUC, checkpoint choice)
            assert not set(rd.index["patient"][rd.splits[split]]) & mine


def test_out_of_fold_scores_every_patient_once_by_its_folds_model(cv_run, tmp_path, no_figures):
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
    report = json.loads((folder / "metrics.json").read_text())
    assert report["counts"]["patients"] == len(folds) and len(report["folds"]) == K
    assert report["slice"]["brain_p99"]["roc_auc_ci"] is not None
    assert all(os.path.exists(cv.reference_path(str(out / f"fold_{k}" / "best_model.pt"))) for k in range(K))
    # a slice's out-of-fold score is its fold model's own score (that checkpoint evaluated alone on its test split: the
    # same slices and noise) z-scored against that model's reference statistics
    for k, fold in enumerate(report["folds"]):
        quiet(evaluate.main, ["--checkpoint", str(out / f"fold_{k}" / "best_model.pt"), "--eval_samples", "all",
                              "--n_boot", "0", "--output_dir", str(tmp_path / f"fold_{k}")])
        own = {row["id"]: row for row in csv.DictReader((tmp_path / f"fold_{k}" / "scores.csv").open())}
        assert set(own) == {row["id"] for row in rows if row["fold"] == str(k)}
        for name in scoring.SCORES:
            (mean, std), = fold["reference"][name]  # one level bin: no --level_norm
            for row in rows:
                if row["fold"] == str(k):
                    assert float(row[name]) == pytest.approx((float(own[row["id"]][name]) - mean) / std, rel=1e-4, abs=1e-4)
    # sweep.py reads the same pooled scores: its default row is evaluate.py's number
    quiet(sweep.main, ["--checkpoint", str(out), "--eval_t", "250", "--multi_t", "--residuals", "positive",
                       "--median_sizes", "5", "--smooth_slices", "2", "--n_boot", "0"])
    table = json.loads((out / "sweep_cv_best_model_oof" / "sweep.json").read_text())
    default = [r for r in table["rows"] if r["delta_roc_auc"] == 0 and r["score"] == report["score"]]
    assert default and default[0]["roc_auc"] == pytest.approx(report["slice"][report["score"]]["roc_auc"])


def test_the_cv_run_scores_another_data_set_as_one_model(cv_run, tmp_path, no_figures):
    out, _ = cv_run
    other = phantom.write_phantom(str(tmp_path / "other"), patients=4, slices=4, size=64, seed=9)
    quiet(evaluate.main, ["--checkpoint", str(out), "--split", "all", "--data_dir", other, "--n_boot", "0",
                          "--output_dir", str(tmp_path / "ext")])
    report = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert report["counts"]["patients"] == 4 and len(report["ensemble"]["models"]) == K
    for path, statistics in zip(report["ensemble"]["models"], report["ensemble"]["references"]):
        checkpoint = models.load_checkpoint(path)[1]
        run, settings, seed = config.read_back(checkpoint, {}, path, 32)
        saved = cv.read_reference(cv.reference_path(path), cv.reference_key(settings, seed, run, checkpoint))
        assert statistics == saved is not None  # each fold model's own, as saved next to its checkpoint
    rows = list(csv.DictReader((tmp_path / "ext" / "scores.csv").open()))
    labels = [int(row["any"]) for row in rows]
    assert report["slice"]["brain_p99"]["roc_auc"] == pytest.approx(
        metrics.roc_auc(labels, [float(row["brain_p99"]) for row in rows]), abs=1e-6)


def test_predict_and_evaluate_give_a_scan_one_ensemble_score(cv_run, phantom_dir, tmp_path, no_figures):
    """The fold models of the trained CV run as one, by the two paths that combine them: predict.py on a scan's files and
    evaluate.py --split all on the same scan as a data set (a hemorrhage patient: no fold trained on it). The same
    slices, each with the same score: the same fold references put the models on one scale."""
    out, _ = cv_run
    scan = one_scan_folder(phantom_dir, tmp_path / "scan")
    quiet(predict.main, ["--checkpoint", str(out), "--data_dir", str(scan / "stage_2_train"), "--output_dir",
                         str(tmp_path / "pred"), "--top", "0"])
    quiet(evaluate.main, ["--checkpoint", str(out), "--split", "all", "--data_dir", str(scan), "--n_boot", "0",
                          "--output_dir", str(tmp_path / "ev")])
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["counts"]["training_patients_left_out"] == 0 and len(report["ensemble"]["models"]) == K
    evaluated = {row["id"]: row for row in csv.DictReader((tmp_path / "ev" / "scores.csv").open())}
    predicted = {os.path.basename(row["source"])[:-4]: row for row in csv.DictReader((tmp_path / "pred" / "slices.csv").open())
                 if row["brain_p99"]}
    assert len(evaluated) >= 4 and set(predicted) == set(evaluated)
    for image_id, row in evaluated.items():
        for name in scoring.SCORES:  # both written with 6 significant digits
            assert float(predicted[image_id][name]) == pytest.approx(float(row[name]), rel=1e-5, abs=1e-6), (image_id, name)
    # the statistics of both are those saved next to each fold's checkpoint
    for path, statistics in zip(report["ensemble"]["models"], report["ensemble"]["references"]):
        checkpoint = models.load_checkpoint(path)[1]
        run, settings, seed = config.read_back(checkpoint, {}, path, 32)
        assert cv.read_reference(cv.reference_path(path), cv.reference_key(settings, seed, run, checkpoint)) == statistics


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
    run, settings, seed = config.read_back(checkpoint, {"level_norm": "z"}, path, diffusion.config["image_size"])
    fold = trained.Fold(0, path, diffusion, checkpoint, run, settings, seed)
    with pytest.raises(SystemExit, match=r"no reference statistics .* run python evaluate.py --checkpoint .*best_model.pt"):
        cv.fold_reference(fold)
    # saved statistics are reused for the same key; once the masks or decoding change (a new cache version), never
    saved = {"level_edges": [], "brain_p99": [[0.0, 1.0]]}
    cv.write_reference(cv.reference_path(path), cv.reference_key(settings, seed, run, checkpoint), saved)
    assert cv.fold_reference(fold) == saved
    # nor for another model saved under the same name (a checkpoint rewritten by --resume or --overwrite)
    retrained = dict(checkpoint, epoch=checkpoint["epoch"] + 1)
    with pytest.raises(SystemExit, match=r"no reference statistics"):
        cv.fold_reference(dataclasses.replace(fold, checkpoint=retrained))
    monkeypatch.setattr(cohort, "CACHE_VERSION", cohort.CACHE_VERSION + 1)
    with pytest.raises(SystemExit, match=r"no reference statistics"):
        cv.fold_reference(fold)


def test_out_of_fold_scores_with_no_bone_3d_region_and_level_norm(cv_run, phantom_dir, tmp_path, no_figures):
    out, _ = cv_run
    flags = ["--scored_region", "no_bone_3d", "--level_norm", "z", "--eval_samples", "all", "--n_boot", "0"]
    quiet(evaluate.main, ["--checkpoint", str(out), "--output_dir", str(tmp_path / "oof"), *flags])
    report = json.loads((tmp_path / "oof" / "metrics.json").read_text())
    assert report["settings"]["level_norm"] == "z" and report["slice"]["brain_p99"]["roc_auc"] is not None
    assert all(len(fold["reference"]["level_edges"]) >= 1 for fold in report["folds"])
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
    assert same[0]["roc_auc"] == pytest.approx(report["slice"]["brain_p99"]["roc_auc"])
    # a single checkpoint with --level_norm: predict.py reads the reference evaluate.py saved, or scores it
    single = str(out / "fold_0" / "best_model.pt")
    healthy = one_scan_folder(phantom_dir, tmp_path / "healthy", hemorrhage=False) / "stage_2_train"
    quiet(predict.main, ["--checkpoint", single, "--data_dir", str(healthy), "--output_dir", str(tmp_path / "pred"),
                         "--level_norm", "z", "--top", "0"])
    rows = list(csv.DictReader((tmp_path / "pred" / "slices.csv").open()))
    assert any(row["brain_p99"] and float(row["brain_p99"]) < 0 for row in rows)  # z-scores: healthy ones below 0
