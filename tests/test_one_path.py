"""One scoring path: every script that scores gives the same scores for the same slices under every scoring option.

A tiny run is trained once; then, for each scoring option, evaluate.py scores one hemorrhage scan as an external set
(--split all) and predict.py scores the same files as an unlabelled series (per-slice scores must be equal), and
sweep.py's single-setting grid must give evaluate.py's validation ROC-AUC. train.py's own validation scoring is
checked against evaluate.py in test_training_validation_scores_like_evaluate.
"""
import csv
import json

import pytest

import evaluate
import predict
import sweep
import train
from helpers import one_scan_folder, quiet, read_csv, tiny_train_args

OPTIONS = {  # every scoring flag appears in at least one of them
    "default": [],
    "spec": ["--eval_t", "150", "--residual", "abs", "--score", "mean", "--median_size", "0", "--smooth_slices", "0",
             "--no-pack_windows"],
    "two_t_skip_simplex": ["--eval_t", "100", "300", "--skip_outside_mask", "--median_size", "3", "--no-channels_last",
                           "--stride", "6", "--eval_batch_size", "7", "--noise", "simplex"],
    "prior": ["--hyperdensity_prior"],
    "asymmetry": ["--asymmetry", "mix", "--median_size", "3"],
    "normative": ["--normative", "z", "--asymmetry", "mirror"],
}
SCORES = ("mean", "brain_mean", "brain_p99")


def evaluate_scores(path):
    rows = list(csv.DictReader(open(path)))
    return {name: [float(row[name]) for row in rows] for name in SCORES}


def predict_scores(path):
    rows = [row for row in csv.DictReader(open(path)) if row["brain_mean"] != ""]
    return {name: [float(row[name]) for row in rows] for name in SCORES}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_evaluate_predict_and_sweep_give_the_same_scores(option, tiny_run, phantom_dir, tmp_path, no_figures):
    flags = OPTIONS[option]
    checkpoint = str(tiny_run / "best_model.pt")
    scan = one_scan_folder(phantom_dir, tmp_path / "scan")
    quiet(evaluate.main, ["--checkpoint", checkpoint, "--split", "all", "--data_dir", str(scan), "--n_boot", "0",
                          "--output_dir", str(tmp_path / "ev"), *flags])
    quiet(predict.main, ["--checkpoint", checkpoint, "--data_dir", str(scan / "stage_2_train"), "--output_dir",
                         str(tmp_path / "pr"), *flags])
    evaluated, predicted = evaluate_scores(tmp_path / "ev" / "scores.csv"), predict_scores(tmp_path / "pr" / "slices.csv")
    assert len(evaluated["brain_p99"]) >= 4
    for name in SCORES:
        if "--skip_outside_mask" in flags and name == "mean":
            continue
        assert predicted[name] == pytest.approx(evaluated[name], rel=1e-5, abs=1e-7), name

    # sweep.py: a one-setting grid on the validation split gives evaluate.py's validation ROC-AUC
    settings = json.loads((tmp_path / "ev" / "metrics.json").read_text())["settings"]
    t = [str(v) for v in settings["eval_t"]]
    grid = ["--eval_t", *t, "--multi_t", *(t if len(t) > 1 else []), "--windows", f"{settings['patch_size']}:{settings['stride']}",
            "--median_sizes", str(settings["median_size"]), "--smooth_slices", str(settings["smooth_slices"]),
            "--residuals", settings["residual"]]
    quiet(sweep.main, ["--checkpoint", checkpoint, "--n_boot", "0", "--output_dir", str(tmp_path / "sw"), *grid,
                       "--write_scores", *strip_grid_flags(flags)])
    quiet(evaluate.main, ["--checkpoint", checkpoint, "--split", "val", "--eval_samples", "all", "--n_boot", "0",
                          "--output_dir", str(tmp_path / "val"), *flags])
    val = json.loads((tmp_path / "val" / "metrics.json").read_text())["slice"]
    rows = [row for row in json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"] if row["t"] == "+".join(t)]
    assert rows
    evaluated_rows = {r["id"]: r for r in read_csv(tmp_path / "val" / "scores.csv")}
    for row in rows:
        assert row["roc_auc"] == pytest.approx(val[row["score"]]["roc_auc"], abs=1e-9), row["score"]
        # --write_scores: each row's slice scores, in evaluate.py's columns, are evaluate's
        written = read_csv(tmp_path / "sw" / "scores" / sweep.row_name(row) / "scores.csv")
        assert {r["id"] for r in written} == set(evaluated_rows)
        for r in written:
            assert r["any"] == evaluated_rows[r["id"]]["any"]
            assert float(r[row["score"]]) == pytest.approx(float(evaluated_rows[r["id"]][row["score"]]), rel=1e-4, abs=1e-6)


GRID_FLAGS = {"--eval_t", "--patch_size", "--stride", "--median_size", "--smooth_slices", "--residual", "--score"}


SWEEP_GRIDS = {"--asymmetry": ["--asymmetries"], "--hyperdensity_prior": ["--hyperdensity_priors", "on"],
               "--normative": ["--normatives"]}  # evaluate.py's
# flag -> sweep.py's one-value grid of it


def strip_grid_flags(flags):
    """The flags that are not sweep.py grid axes (those are given as one-value grids), and those that are grids read
    off the same maps, under their grid's name."""
    out, skip = [], False
    for flag in flags:
        if flag.startswith("--"):
            skip = flag in GRID_FLAGS
        if not skip:
            out += SWEEP_GRIDS.get(flag, [flag])
    return out


def test_training_validation_scores_like_evaluate(phantom_dir, tmp_path, no_figures):
    """train.py's per-epoch validation ROC-AUC (every score) is evaluate.py's on the same split and checkpoint, with a
    non-default scoring setting that training can honour."""
    out = tmp_path / "run"
    flags = ["--residual", "abs", "--median_size", "3", "--noise", "simplex", "--smooth_slices", "1"]
    quiet(train.main, tiny_train_args(phantom_dir, out, *flags))
    history = json.loads((out / "training_history.json").read_text())
    quiet(evaluate.main, ["--checkpoint", str(out / "best_model.pt"), "--split", "val", "--n_boot", "0",
                          "--output_dir", str(tmp_path / "val")])
    val = json.loads((tmp_path / "val" / "metrics.json").read_text())["slice"]
    for name, auc in history[0]["val_roc_auc_by_score"].items():
        assert auc == pytest.approx(val[name]["roc_auc"], abs=1e-9), name


def test_training_refuses_evaluation_only_options(phantom_dir, tmp_path):
    for flag in (["--level_norm", "z"],):
        with pytest.raises(SystemExit) as stop:
            train.main(tiny_train_args(phantom_dir, tmp_path / "run", *flag))
        assert str(stop.value).startswith(f"error: {flag[0]} {flag[1]}: evaluation only") and "\n" not in str(stop.value)
        assert not (tmp_path / "run").exists()  # refused when parsed, before any folder is made
