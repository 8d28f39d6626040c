"""The scripts end to end as a user chains them, on the shared tiny run (conftest.tiny_run, trained by train.py in this
process): what train.py writes, evaluate.py, sweep.py and compare.py on it; and one real command line for the entry
point and its one-line errors."""
import json
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import compare
import evaluate
import scoring
import sweep
from conftest import is_reference_file
from helpers import PNG, quiet, read_csv, run_cli


def test_train_writes_the_run(tiny_run, phantom_dir):
    names = ["best_model.pt", "best_model_loss.pt", "last.pt", "training_history.json", "training_curves.png",
             "diagnostics_epoch_1.png", "eval_scores_epoch_1.png", "args.json", "splits.json"]
    # and nothing else: no lock, no *.tmp (reference_<checkpoint>.json, statistics saved by a script that scored the
    # run's reference slices, is there once another test has run predict.py on it)
    assert sorted(p.name for p in tiny_run.iterdir() if not is_reference_file(p.name)) == sorted(names)
    for png in tiny_run.glob("*.png"):
        assert png.read_bytes()[:8] == PNG, png.name
    args = json.loads((tiny_run / "args.json").read_text())
    assert args["image_size"] == 32 and args["dataset"] == "rsna"  # --dataset auto, resolved once and recorded
    assert args["world_size"] == 1 and args["global_batch_size"] == args["batch_size"] == 8
    history = json.loads((tiny_run / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    h = history[0]
    assert set(h["val_roc_auc_by_score"]) == set(scoring.SCORES)
    assert h["val_roc_auc"] == h["val_roc_auc_by_score"][args["score"]]  # the run's score is the one reported
    assert np.isfinite([h["train_loss"], h["val_loss"]]).all() and h["lr"] < args["lr"]  # the cosine has stepped
    splits = json.loads((tiny_run / "splits.json").read_text())
    assert splits["data_dir"] == phantom_dir and splits["seed"] == 1
    for name in ("best_model.pt", "best_model_loss.pt", "last.pt"):
        checkpoint = torch.load(tiny_run / name, weights_only=True)
        assert checkpoint["epoch"] == 1 and checkpoint["splits"] == splits and checkpoint["metrics"] == h, name
    assert "optimizer" in torch.load(tiny_run / "last.pt", weights_only=True)


def test_evaluate_and_sweep_on_the_run(tiny_run, tmp_path, no_figures):
    quiet(evaluate.main, ["--checkpoint", str(tiny_run / "best_model.pt"), "--output_dir", str(tmp_path / "ev"),
                          "--smooth_slices", "1", "--n_boot", "20"])
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["settings"]["smooth_slices"] == 1 and report["settings"]["dataset"] == "rsna"
    rows = read_csv(tmp_path / "ev" / "scores.csv")
    assert len(rows) == report["counts"]["slices"] > 2 and list(rows[0])[:4] == ["id", "patient", "scan", "any"]
    labels = [int(row["any"]) for row in rows]
    for name in scoring.SCORES:  # metrics.json's ROC-AUC is that of the scores written
        auc = roc_auc_score(labels, [float(row[name]) for row in rows])
        assert report["slice"][name]["roc_auc"] == pytest.approx(auc, abs=1e-6), name
    test_patients = json.loads((tiny_run / "splits.json").read_text())["patients"]["test"]
    assert {row["patient"] for row in rows} <= set(test_patients)

    quiet(sweep.main, ["--checkpoint", str(tiny_run / "best_model.pt"), "--eval_t", "100", "300", "--multi_t", "100", "300",
                       "--median_sizes", "0", "3", "--residuals", "abs", "positive", "--smooth_slices", "0", "--n_boot", "2",
                       "--normatives", "none", "z",
                       "--output_dir", str(tmp_path / "sw")])
    table = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    # residual x t in {100, 300, 100+300} x median x score
    assert table["split"] == "val" and len(table["rows"]) == 2 * 3 * 2 * 3 * 2  # x normative none, z
    assert {(r["residual"], r["t"]) for r in table["rows"]} == {(res, t) for res in ("abs", "positive")
                                                                 for t in ("100", "300", "100+300")}
    aucs = [r["roc_auc"] for r in table["rows"]]
    assert aucs == sorted(aucs, reverse=True)  # best first
    # every row carries its paired difference to the default setting (t=250 is not in this grid: scored apart)
    assert all(r["delta_roc_auc_ci"] is not None and r["delta_scan_roc_auc"] is not None for r in table["rows"])
    deltas = {r["roc_auc"] - r["delta_roc_auc"] for r in table["rows"]}  # the default's ROC-AUC, the same for every row
    assert max(deltas) - min(deltas) < 1e-9
    assert (tmp_path / "sw" / "sweep.md").read_text().startswith("| map | region | level norm | asymmetry | prior | normative | window/stride")


def test_compare_plots_the_runs_curves(tiny_run, tmp_path, capsys):
    compare.main(["--scratch_dir", str(tiny_run), "--pretrained_dir", str(tiny_run), "--output", str(tmp_path / "cmp.png")])
    assert (tmp_path / "cmp.png").read_bytes()[:8] == PNG
    history = json.loads((tiny_run / "training_history.json").read_text())
    label = json.loads((tiny_run / "args.json").read_text())["run_label"]
    line = f"{label} ({tiny_run}): 1 epochs, best val ROC-AUC {history[0]['val_roc_auc']:.3f} at epoch 1"
    assert capsys.readouterr().out.count(line) == 2


def test_the_command_line_entry_point_says_one_line(tmp_path):
    """The one script started as a process here (the others run in-process): `python train.py` without --data_dir
    exits 1 with the project's one-line error on stderr, no traceback, and creates nothing."""
    proc = run_cli([sys.executable, "train.py", "--output_dir", tmp_path / "x"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --data_dir is required: point it at the RSNA data (stage_2_train/ + stage_2_train.csv, see docs/data.md), "
        "a CT-ICH folder, or a phantom made by `python phantom.py --out DIR`"]
    assert not (tmp_path / "x").exists()
