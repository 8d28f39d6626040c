"""End to end: train.py, evaluate.py and compare.py as a user runs them, on a tiny phantom."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_train_args(data_dir, out, epochs=1, extra=()):
    return [sys.executable, "train.py", "--data_dir", str(data_dir), "--output_dir", str(out),
            "--image_size", "32", "--patch_size", "8", "--stride", "8", "--base_channels", "8",
            "--num_samples", "32", "--eval_samples", "all", "--batch_size", "8", "--epochs", str(epochs),
            "--num_workers", "0", "--eval_batch_size", "32", "--seed", "1", *extra]


def run(cmd, timeout=300):
    """Run a script as a user would; on timeout kill its whole process group (torchrun's workers too, which
    would otherwise outlive the test) and fail."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_train_evaluate_compare(phantom_dir, tmp_path):
    out = tmp_path / "run"
    proc = run(tiny_train_args(phantom_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["best_model.pt", "best_model_loss.pt", "last.pt", "training_history.json", "training_curves.png",
                 "diagnostics_epoch_1.png", "eval_scores_epoch_1.png", "args.json"]:
        assert (out / name).is_file(), name
    history = json.loads((out / "training_history.json").read_text())
    assert len(history) == 1 and history[0]["epoch"] == 1
    assert 0.0 <= history[0]["val_roc_auc"] <= 1.0
    assert json.loads((out / "args.json").read_text())["image_size"] == 32
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = run([sys.executable, "evaluate.py", "--checkpoint", str(out / "best_model.pt"), "--output_dir", str(tmp_path / "ev"),
                "--smooth_slices", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "slice" in json.dumps(metrics)
    assert metrics["settings"]["smooth_slices"] == 1
    rows = (tmp_path / "ev" / "scores.csv").read_text().splitlines()
    assert len(rows) > 2 and "patient" in rows[0]

    proc = run([sys.executable, "sweep.py", "--checkpoint", str(out / "best_model.pt"), "--eval_t", "100", "300",
                "--multi_t", "100", "300", "--median_sizes", "0", "3", "--residuals", "abs", "positive", "--n_boot", "20",
                "--output_dir", str(tmp_path / "sw")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    # residual x t in {100, 300, 100+300} x median x score x smoothing {0, 1, 2} (the default grid)
    assert sweep["split"] == "val" and len(sweep["rows"]) == 2 * 3 * 2 * 3 * 3
    assert {r["residual"] for r in sweep["rows"]} == {"abs", "positive"}
    # every row carries its paired difference to the default setting (t=250 is not in this grid: scored apart)
    assert all(r["delta_roc_auc_ci"] is not None and "delta_scan_roc_auc" in r for r in sweep["rows"])
    assert (tmp_path / "sw" / "sweep.md").read_text().startswith("| map | region | level norm | window/stride")

    proc = run([sys.executable, "compare.py", "--scratch_dir", str(out), "--pretrained_dir", str(out),
                "--output", str(tmp_path / "cmp.png")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_refuses_to_overwrite_a_run(phantom_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best_model.pt").write_bytes(b"earlier result")
    proc = run(tiny_train_args(phantom_dir, out))
    assert proc.returncode != 0
    assert "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "best_model.pt").read_bytes() == b"earlier result"


def test_missing_data_dir_is_one_line_error(tmp_path):
    proc = run([sys.executable, "train.py", "--output_dir", str(tmp_path / "x")])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--data_dir" in proc.stderr


def test_sigkill_and_resume_matches_uninterrupted(phantom_dir, tmp_path):
    import torch
    # 3 epochs of 3 steps: the kill comes once epoch 1's last.pt exists, so it has all of epochs 2 and 3 to land in
    # (checked below, so a slow machine cannot turn this into a test of an uninterrupted run).
    extra = ["--batch_size", "4", "--hflip"]  # the flips are random draws too: a resumed epoch must repeat them
    straight = tmp_path / "straight"
    proc = run(tiny_train_args(phantom_dir, straight, epochs=3, extra=extra))
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(tiny_train_args(phantom_dir, killed, epochs=3, extra=extra), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "last.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL  # killed, not finished or crashed
    epoch_at_kill = torch.load(killed / "last.pt", weights_only=True)["epoch"]
    assert epoch_at_kill in (1, 2)
    proc = run(tiny_train_args(phantom_dir, killed, epochs=3, extra=extra + ["--resume"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {killed} after epoch {epoch_at_kill}" in proc.stdout

    a = json.loads((straight / "training_history.json").read_text())
    b = json.loads((killed / "training_history.json").read_text())
    assert [h["epoch"] for h in b] == [1, 2, 3]
    for ha, hb in zip(a, b):
        for key in ["train_loss", "val_loss", "val_roc_auc", "val_auprc", "lr"]:
            assert ha[key] == pytest.approx(hb[key], abs=1e-6), key
        assert ha["val_roc_auc_by_score"] == pytest.approx(hb["val_roc_auc_by_score"], abs=1e-6)
    for name in ["last.pt", "best_model.pt", "best_model_loss.pt"]:
        ca, cb = (torch.load(d / name, weights_only=True) for d in (straight, killed))
        assert ca["epoch"] == cb["epoch"], name
        for key, tensor in ca["model"].items():
            assert torch.allclose(tensor, cb["model"][key], atol=1e-6), (name, key)
    assert not list(killed.glob("*.tmp"))  # a kill mid-write leaves no temporary files behind after the resume
