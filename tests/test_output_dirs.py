"""Output folders (issue 15): one run per folder at a time (a lock; two processes started together: one writes, the
other is refused in one line), an earlier run's results never replaced without --overwrite, a full disk leaves the
old file, and a folder that cannot be written is one line from every script."""
import contextlib
import errno
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import predict
import runfiles
import sweep
import train
from helpers import ROOT, copy_run, quiet, tiny_train_args


@pytest.mark.parametrize("script", ["train", "evaluate", "sweep", "predict"])
def test_unwritable_output_dirs_are_one_line(script, tiny_run, phantom_dir, tmp_path):
    """Every script's output folder goes through the one gate (runfiles.claim_output_dir): the same messages."""
    # We run as root, for whom permission bits do not stop writes: a path below a regular file fails for anyone.
    (tmp_path / "afile").write_text("x")
    checkpoint = str(tiny_run / "best_model.pt")
    argv = {"train": lambda out: tiny_train_args(phantom_dir, out),
            "evaluate": lambda out: ["--checkpoint", checkpoint, "--output_dir", str(out)],
            "sweep": lambda out: ["--checkpoint", checkpoint, "--output_dir", str(out)],
            "predict": lambda out: ["--checkpoint", checkpoint, "--data_dir", phantom_dir, "--output_dir", str(out)]}[script]
    main = {"train": train.main, "evaluate": evaluate.main, "sweep": sweep.main, "predict": predict.main}[script]
    with pytest.raises(SystemExit) as e:
        quiet(main, argv(tmp_path / "afile" / "sub"))
    assert str(e.value) == f"error: {tmp_path / 'afile' / 'sub'}: cannot create output dir (Not a directory)"
    with pytest.raises(SystemExit) as e:
        quiet(main, argv(tmp_path / "afile"))  # --output_dir is a file
    assert str(e.value) == f"error: {tmp_path / 'afile'}: output dir is a file"
    assert os.listdir(tmp_path) == ["afile"]


def test_train_refuses_a_folder_with_files_unless_resume_or_overwrite(phantom_dir, tmp_path, no_figures):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best_model.pt").write_bytes(b"earlier result")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, out))
    assert str(e.value) == (f"error: {out}: output dir is not empty; use --resume to continue that run or --overwrite to "
                            "replace it")
    assert (out / "best_model.pt").read_bytes() == b"earlier result" and not (out / runfiles.LOCK_NAME).exists()
    # --overwrite removes the previous run's files only, and says so
    _, printed = quiet(train.main, tiny_train_args(phantom_dir, out, "--overwrite"))
    assert (f"--overwrite: removed 1 file(s) of the previous run in {out}; left 1 other entries (e.g. notes.txt)"
            in printed.splitlines())
    assert (out / "notes.txt").read_text() == "mine"
    assert torch.load(out / "best_model.pt", weights_only=True)["epoch"] == 1


def test_a_second_run_into_a_busy_output_dir_is_refused(phantom_dir, tmp_path, tiny_run):
    out = tmp_path / "run"
    out.mkdir()
    busy = subprocess.Popen(["sleep", "60"])
    try:
        (out / runfiles.LOCK_NAME).write_text(f"{busy.pid} {socket.gethostname()} 2026-01-01T00:00:00 train.py\n")
        with pytest.raises(SystemExit) as e:
            train.main(tiny_train_args(phantom_dir, out))
        assert str(e.value) == (f"error: {out}: another run is using this output dir (pid {busy.pid} on this host, "
                                "started 2026-01-01T00:00:00)")
        with pytest.raises(SystemExit) as e:  # evaluate.py, sweep.py and predict.py lock their folder the same way
            evaluate.main(["--checkpoint", str(tiny_run / "best_model.pt"), "--output_dir", str(out)])
        assert str(e.value).startswith(f"error: {out}: another run is using this output dir (pid {busy.pid} on this host")
    finally:
        busy.kill()
        busy.wait()
    (out / runfiles.LOCK_NAME).write_text("1 some-other-host 2026-01-01T00:00:00 train.py\n")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, out))
    assert str(e.value) == (f"error: {out}: another run is using this output dir (pid 1 on host some-other-host; delete "
                            f"{out / runfiles.LOCK_NAME} if that run is gone, started 2026-01-01T00:00:00)")


def test_a_lock_left_by_a_crashed_run_is_taken_over(tmp_path):
    """(train.py resuming over the lock of a killed run: test_resume.py.)"""
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / runfiles.LOCK_NAME).write_text(f"{gone.pid} {socket.gethostname()} 2026-01-01T00:00:00 train.py\n")
    lock, printed = quiet(runfiles.claim_output_dir, out, "evaluate.py", finished="metrics.json")
    assert printed.splitlines() == [f"note: {out / runfiles.LOCK_NAME}: left by a run that is gone (pid {gone.pid}, started "
                                    "2026-01-01T00:00:00; its pid is free or now another process's); taking it over"]
    assert (out / runfiles.LOCK_NAME).read_text().split()[:2] == [str(os.getpid()), socket.gethostname()]
    runfiles.release_output_dir(lock)
    assert os.listdir(out) == []


def test_a_lock_whose_pid_was_reused_is_taken_over(tmp_path):
    """A lock left by a crashed run whose pid now belongs to another live process (here: this test's own)."""
    out = tmp_path / "run"
    out.mkdir()
    identity = runfiles.process_identity(os.getpid())
    if identity == "?":
        pytest.skip("no /proc here")
    other = identity.rsplit(":", 1)[0] + ":1"  # same boot, another start time: another process with this pid
    (out / runfiles.LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()} 2026-01-01T00:00:00 train.py {other}\n")
    lock, printed = quiet(runfiles.lock_output_dir, out, "test")
    assert f"left by a run that is gone (pid {os.getpid()}" in printed
    assert (out / runfiles.LOCK_NAME).read_text().split()[4] == identity
    runfiles.release_output_dir(lock)
    (out / runfiles.LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()} 2026-01-01T00:00:00 train.py {identity}\n")
    with pytest.raises(SystemExit, match="another run is using this output dir"):  # the same live process: busy
        runfiles.lock_output_dir(out, "test")


def test_the_lock_works_where_hard_links_do_not(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    lock = runfiles.lock_output_dir(tmp_path, "test")
    assert (tmp_path / runfiles.LOCK_NAME).read_text().split()[0] == str(os.getpid())
    with pytest.raises(SystemExit, match="another run is using this output dir"):
        runfiles.lock_output_dir(tmp_path, "test")
    runfiles.release_output_dir(lock)
    assert os.listdir(tmp_path) == []


# Two processes that start at the same instant and claim one folder the way train.py does (runfiles.claim_output_dir:
# lock, then check), then write into it: plain Python with runfiles alone, so a round costs milliseconds, not the
# start-up of torch twice.
RACER = """
import os, sys, time
sys.path.insert(0, os.getcwd())
import runfiles
folder, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
lock = runfiles.claim_output_dir(folder, "train.py", resumable=True)
with open(os.path.join(folder, "last.pt.%d" % os.getpid()), "w") as f:
    f.write("written")
time.sleep(0.05)
runfiles.release_output_dir(lock)
"""


def test_two_processes_started_together_into_one_dir(tmp_path):
    for round in range(3):
        out = tmp_path / f"run{round}"
        start = time.time() + 0.5  # both have started (no torch to import) and spin until then
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(out), repr(start)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
        assert sorted(code for code, _ in results) == [0, 1], results
        refused = next(err for code, err in results if code == 1).strip().splitlines()
        assert len(refused) == 1 and refused[0].startswith(f"error: {out}: "), refused
        assert ("another run is using this output dir" in refused[0] or
                refused[0].endswith("output dir is not empty; use --resume to continue that run or --overwrite to replace it"))
        winner = next(p.pid for p, (code, _) in zip(procs, results) if code == 0)
        assert os.listdir(out) == [f"last.pt.{winner}"]  # one writer; its lock released


def test_evaluate_keeps_each_checkpoints_results_and_refuses_to_replace_them(tiny_run, tmp_path, no_figures):
    run = copy_run(tiny_run, tmp_path)
    for name in ("best_model", "best_model_loss"):
        quiet(evaluate.main, ["--checkpoint", str(run / f"{name}.pt"), "--n_boot", "0", "--keep_examples", "1"])
    first = json.loads((run / "eval_best_model_test" / "metrics.json").read_text())
    second = json.loads((run / "eval_best_model_loss_test" / "metrics.json").read_text())
    assert first["checkpoint"] == str(run / "best_model.pt") and second["checkpoint"] == str(run / "best_model_loss.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(run / "best_model.pt"), "--n_boot", "0"])
    assert str(e.value) == (f"error: {run / 'eval_best_model_test'}: holds the results of an earlier run (metrics.json); "
                            "use --overwrite to replace them, or --output_dir to write elsewhere")
    quiet(evaluate.main, ["--checkpoint", str(run / "best_model.pt"), "--n_boot", "0", "--keep_examples", "1", "--overwrite"])
    assert not (run / "eval_best_model_test" / runfiles.LOCK_NAME).exists()


def test_a_full_disk_leaves_the_old_result_and_says_so_in_one_line(tiny_run, tmp_path, monkeypatch, no_figures):
    run = copy_run(tiny_run, tmp_path)
    args = ["--checkpoint", str(run / "best_model.pt"), "--n_boot", "0", "--keep_examples", "1"]
    quiet(evaluate.main, args)
    folder = run / "eval_best_model_test"
    before = {name: (folder / name).read_bytes() for name in ("metrics.json", "scores.csv")}

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        evaluate.main(args + ["--overwrite"])
    assert str(e.value) == (f"error: {folder / 'scores.csv'}: cannot write (No space left on device); "
                            "the previous file is left as it was")
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]
    with pytest.raises(SystemExit) as e:
        runfiles.write_json(tmp_path / "new.json", {"a": 1})
    assert str(e.value).endswith("cannot write (No space left on device); no file was written")
    assert not (tmp_path / "new.json").exists()
