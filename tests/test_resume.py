"""--resume (issue 15): what a stopped run leaves is continued exactly (the same losses, learning rates and weights as a
run that was never stopped), Ctrl-C stops in one line, and a resume that would make it another run (another model,
seed, data, schedule) or start from a damaged or wrong checkpoint is refused in one line; a non-finite loss stops
training with the last good checkpoint untouched."""
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import models
import runfiles
import train
from helpers import ROOT, copy_run, cut, quiet, tiny_train_args


def resume_error(run, data_dir, *extra):
    """The message of `train.py --resume` on `run`, asked for a second epoch (--new_schedule: the cosine schedule is
    recomputed for 2 epochs)."""
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_train_args(data_dir, run, "--resume", "--epochs", "2", "--new_schedule", *extra))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_resume_with_another_architecture(tiny_run, phantom_dir, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    message = resume_error(run, phantom_dir, "--base_channels", "16")
    assert message == (f"error: {run / 'last.pt'}: the run was trained with another model (base_channels 8, now 16); "
                       "resume with the run's own settings (see args.json next to it)")


def test_resume_from_a_truncated_last_pt(tiny_run, phantom_dir, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    cut(run / "last.pt", (run / "last.pt").stat().st_size // 2)
    assert resume_error(run, phantom_dir).startswith(f"error: {run / 'last.pt'}: unreadable or truncated checkpoint (")


class Payload:
    """Stands for code someone hid in a checkpoint: unpickling it would run its __reduce__."""
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_resume_refuses_a_pickled_object(tiny_run, phantom_dir, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    torch.save(checkpoint | {"note": Payload()}, run / "last.pt")
    message = resume_error(run, phantom_dir)
    assert message.startswith(f"error: {run / 'last.pt'}: refused to load, it holds a pickled posix.system")


def test_resume_from_a_checkpoint_that_is_not_last_pt(tiny_run, phantom_dir, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    shutil.copy(run / "best_model.pt", run / "last.pt")
    assert resume_error(run, phantom_dir) == f"error: {run / 'last.pt'}: not a resumable checkpoint (no optimizer, lr_schedule, history)"


def test_resume_with_nothing_to_resume(tmp_path, phantom_dir):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "never_ran", "--resume"))
    assert str(e.value) == f"error: {tmp_path / 'never_ran'}: nothing to resume (no last.pt)"


def test_resume_with_another_seed_is_refused(tiny_run, phantom_dir, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    assert resume_error(run, phantom_dir, "--seed", "2") == (
        f"error: {run / 'last.pt'}: --resume would make it another run (--seed 1, now 2); resume with the run's own "
        "values (args.json next to it) or start a new run in another --output_dir")


def test_resume_with_another_data_folder_is_refused(tiny_run, phantom_dir, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    other = tmp_path / "other_data"
    shutil.copytree(phantom_dir, other, ignore=shutil.ignore_patterns(".ctpddpm_cache"))
    message = resume_error(run, other)
    assert message.startswith(f"error: {run / 'last.pt'}: --resume would make it another run (--data_dir '{phantom_dir}', "
                              f"now '{other}')")


@pytest.mark.parametrize("change", [["--lr", "0.001"], ["--epochs", "2"]], ids=["lr", "epochs"])
def test_resume_with_a_changed_schedule_needs_new_schedule(tiny_run, phantom_dir, tmp_path, change):
    run = copy_run(tiny_run, tmp_path)
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_train_args(phantom_dir, run, "--resume", *change))
    was = {"--lr": "0.0001", "--epochs": "1"}[change[0]]
    assert str(e.value) == (f"error: {run / 'last.pt'}: --resume with a changed schedule ({change[0]} {was}, now "
                            f"{change[1]}); add --new_schedule to recompute the learning-rate schedule for the new "
                            "values, or resume with the run's own")


def test_resume_with_new_schedule_follows_the_new_cosine(tiny_run, phantom_dir, tmp_path, no_figures):
    run = copy_run(tiny_run, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(tiny_train_args(phantom_dir, run, "--resume", "--epochs", "3", "--lr", "0.001", "--new_schedule",
                                   "--eval_every", "3"))
    last = torch.load(run / "last.pt", weights_only=True)
    steps = last["lr_schedule"]["last_epoch"] // 3
    assert last["epoch"] == 3 and last["lr_schedule"]["T_max"] == 3 * steps
    history = last["history"]
    expected = 0.001 * 0.5 * (1 + np.cos(np.pi * 2 * steps / (3 * steps)))  # the lr after epoch 2's steps
    assert history[1]["lr"] == pytest.approx(expected, rel=1e-6)
    assert f"--new_schedule: lr {0.001 * 0.5 * (1 + np.cos(np.pi / 3)):.3g} at step {steps} of {3 * steps}" in out.getvalue()


def test_what_resume_may_change_is_accepted(tiny_run, phantom_dir, tmp_path, no_figures):
    run = copy_run(tiny_run, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(tiny_train_args(phantom_dir, run, "--resume", "--num_workers", "1", "--eval_every", "5",
                                   "--cache_dir", str(tmp_path / "cache"), "--precision", "fp32"))
    assert f"resuming {run} after epoch 1" in out.getvalue()


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_pt(tiny_run, phantom_dir, tmp_path, monkeypatch):
    run = copy_run(tiny_run, tmp_path)
    before = (run / "last.pt").read_bytes()
    monkeypatch.setattr(models, "patch_loss", lambda *a, **k: torch.tensor(float("nan")))
    message = resume_error(run, phantom_dir)
    assert message == (f"error: non-finite loss (nan) at epoch 2, step 0; the last good checkpoint, {run / 'last.pt'}, "
                       "is untouched (train.py --resume continues from it)")
    assert (run / "last.pt").read_bytes() == before
    _, checkpoint = models.load_checkpoint(run / "last.pt")
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 1


@pytest.mark.parametrize("batch_size,caught", [
    (4, "at epoch 1, step 1;"),  # 3 steps an epoch: the second step's forward pass is already inf/NaN
    (8, "non-finite validation loss at epoch 1;"),  # 1 step an epoch: the weights it left must not be saved
])
def test_exploding_lr_stops_at_the_first_non_finite_value(phantom_dir, tmp_path, batch_size, caught):
    # --lr 1e30 for real: the first step makes the weights enormous
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", "--lr", "1e30", "--precision", "fp32",
                                   "--batch_size", str(batch_size)))
    message = str(e.value)
    assert message.startswith("error: non-finite ") and caught in message
    assert message.endswith("no epoch had finished, so no checkpoint was written")
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best_model.pt").exists()


def test_ctrl_c_stops_in_one_line_and_leaves_a_resumable_run(phantom_dir, tmp_path, no_figures):
    """The one training started as a process here: Ctrl-C (SIGINT) mid-run stops it with one line and exit code 130,
    releases the folder's lock and leaves last.pt, which --resume continues (in-process)."""
    out = tmp_path / "run"
    args = tiny_train_args(phantom_dir, out, "--epochs", "200", "--max_steps", "1", "--eval_every", "1000")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # SIGINT back to its default in the child: a test run started in the background (`cmd &` in a script) ignores
    # SIGINT, the child would inherit that, and Python installs no KeyboardInterrupt handler for an ignored signal
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600  # generous: a loaded 2-core machine takes minutes to start torch and train a step
    while not (out / "last.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    # less tqdm's bars (a slow step shows its rate as s/it, a fast one as it/s)
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "s/it" not in line]
    assert p.returncode == 130 and lines == ["interrupted: continue with --resume"], err[-3000:]
    assert not (out / runfiles.LOCK_NAME).exists()
    done = torch.load(out / "last.pt", weights_only=True)["epoch"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # in-process: no second start-up of torch
        train.main(args[:-6] + ["--epochs", str(done + 1), "--max_steps", "1", "--resume", "--new_schedule"])
    assert f"resuming {out} after epoch {done}" in printed.getvalue()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == done + 1


def test_a_stopped_run_resumed_matches_one_never_stopped(phantom_dir, tmp_path, monkeypatch, no_figures):
    """2 epochs of 3 steps with random flips (the flips are draws too: a resumed epoch must repeat them), straight;
    and stopped in epoch 2 as a killed process leaves it (last.pt of epoch 1, a half-written *.tmp, the lock of a
    process that is gone), then resumed: the same history, and the same weights in every checkpoint."""
    extra = ["--epochs", "2", "--batch_size", "4", "--hflip", "--eval_every", "2"]  # validation scoring after epoch 2
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    quiet(train.main, tiny_train_args(phantom_dir, straight, *extra))

    real_epoch = train.train_epoch

    def killed_in_epoch_2(state, train_set, args, epoch, rank, world):
        if epoch == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises; a kill stops at the same place without a word
        return real_epoch(state, train_set, args, epoch, rank, world)
    with monkeypatch.context() as patch:
        patch.setattr(train, "train_epoch", killed_in_epoch_2)
        with pytest.raises(SystemExit) as e:
            quiet(train.main, tiny_train_args(phantom_dir, stopped, *extra))
    assert e.value.code == 130 and torch.load(stopped / "last.pt", weights_only=True)["epoch"] == 1
    (stopped / "last.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")  # a kill in the middle of a write
    gone = subprocess.Popen(["true"])
    gone.wait()
    (stopped / runfiles.LOCK_NAME).write_text(f"{gone.pid} {socket.gethostname()} 2026-01-01T00:00:00 train.py\n")

    _, printed = quiet(train.main, tiny_train_args(phantom_dir, stopped, *extra, "--resume"))
    assert f"resuming {stopped} after epoch 1" in printed and "left by a run that is gone" in printed
    a = json.loads((straight / "training_history.json").read_text())
    b = json.loads((stopped / "training_history.json").read_text())
    assert [h["epoch"] for h in b] == [1, 2]
    assert a[0]["val_roc_auc"] is None and a[1]["val_roc_auc"] is not None
    for ha, hb in zip(a, b):
        for key in ["train_loss", "val_loss", "val_roc_auc", "val_auprc", "lr"]:
            assert ha[key] == (None if hb[key] is None else pytest.approx(hb[key], abs=1e-6)), key
        assert ha["val_roc_auc_by_score"] == (hb["val_roc_auc_by_score"] and pytest.approx(hb["val_roc_auc_by_score"], abs=1e-6))
    for name in ["last.pt", "best_model.pt", "best_model_loss.pt"]:
        ca, cb = (torch.load(d / name, weights_only=True) for d in (straight, stopped))
        assert ca["epoch"] == cb["epoch"], name
        for key, tensor in ca["model"].items():
            assert torch.allclose(tensor, cb["model"][key], atol=1e-6), (name, key)
    assert not list(stopped.glob("*.tmp")) and not (stopped / runfiles.LOCK_NAME).exists()


def test_resume_of_an_interrupted_first_epoch_is_refused(phantom_dir, tmp_path, monkeypatch, capsys):
    """Stopped before any epoch finished: no last.pt, so nothing to resume; the message says to start again."""
    monkeypatch.setattr(train, "train_epoch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        quiet(train.main, tiny_train_args(phantom_dir, tmp_path / "run"))
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "interrupted before the first epoch finished: nothing to resume; start again with --overwrite")
    assert not (tmp_path / "run" / runfiles.LOCK_NAME).exists()
