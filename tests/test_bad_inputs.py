"""Bad inputs (issue 5): each one gives a counted skip with a summary line, or a one-line error that
names the file and the problem; never a traceback, and never a run that dies on one bad slice.

Cases covered elsewhere and not repeated here: hu_from_dicom on the phantom's truncated-pixel file,
no PixelData, MR, text file (tests/test_data.py::test_bad_dicom_files_raise_badfile_with_a_reason);
the RSNA 12-bit quirk HU values (test_12bit_quirk_*); CSV header/subtype parsing
(test_rsna_csv_parsing_and_errors); empty / missing / unknown data dir (test_detect_dataset_and_clear_messages);
CT-ICH corrupt / truncated JPG, missing bone JPG, missing CSV columns (test_ctich_reader);
load_checkpoint on a pickled object, a truncated file, another architecture, a missing file
(tests/test_models.py::test_load_checkpoint_refuses_bad_files); an output dir from a previous run and a
missing --data_dir (tests/test_scripts.py); SIGKILL + resume (test_sigkill_and_resume_matches_uninterrupted).
"""
import contextlib
import csv
import errno
import io
import json
import os
import re
import signal
import socket
import warnings
import shutil
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
import torch

import cohort
import data
import inputs
import readers
import runfiles
import phantom
from conftest import edit_dicom
import evaluate
import models
import predict
import train

DICOM_1 = inputs.native_input_hu("rsna", 1)  # the brain window, as a DICOM-trained model has it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATIENT = "ID_corpus"  # every corpus slice belongs to this one healthy patient


def head_hu(rows=32, columns=32):
    """Integer HU: a brain disc (30) in a skull ring (1000) and scalp (40), in air (-1000)."""
    row, col = np.mgrid[0:rows, 0:columns]
    radius = np.hypot(row - (rows - 1) / 2, col - (columns - 1) / 2) / (min(rows, columns) / 2)
    hu = np.full((rows, columns), -1000.0, np.float32)
    hu[radius < 0.92] = 40.0
    hu[radius < 0.83] = 1000.0
    hu[radius < 0.73] = 30.0
    return hu




def ct_file(path, hu=None, *, instance, quirk12=False, slope=1.0, **changes):
    """A CT DICOM of the corpus patient (as the phantom writes them), then header changes (None deletes)."""
    phantom.write_ct_dicom(str(path), head_hu() if hu is None else hu, patient_id=PATIENT, study_uid="1.2.826.0.1.5",
                        series_uid="1.2.826.0.1.5.1", instance=instance, z=5.0 * instance, spacing=0.75, slope=slope,
                        intercept=-1024.0, quirk12=quirk12)
    if changes:
        edit_dicom(path, **changes)


def cut(path, keep):
    """Keep the first `keep` bytes (negative: drop the last -keep)."""
    content = open(path, "rb").read()
    open(path, "wb").write(content[:keep])
















# Bad slices: (image id, writer, where it is caught, the reason the summary counts it under).
# "index": left out of the index (header read); "decode": in the index, left out of the slice cache.
# Odd but good slices: must be decoded, not skipped.














# ---- labels and data folders: one-line errors ------------------------------------------------------

@pytest.mark.parametrize("csv_text,problem", [
    ("ID,Probability\nID_aa_any,1\n", "expected the columns ID,Label"),
    ("ID,Label\nID_aa_any,1\nID_aa_headache,0\n", ":3: cannot parse 'ID_aa_headache,0'"),
    ("ID,Label\nID_aa_any,2\n", ":2: cannot parse 'ID_aa_any,2'"),
    ("ID,Label\nID_aa_any,yes\n", ":2: cannot parse 'ID_aa_any,yes'"),
], ids=["missing_columns", "unknown_subtype", "label_2", "label_yes"])
def test_bad_csv_is_a_one_line_error_naming_the_line(tmp_path, csv_text, problem):
    (tmp_path / "stage_2_train").mkdir()
    (tmp_path / "stage_2_train.csv").write_text(csv_text)
    with pytest.raises(SystemExit) as e:
        data.main(["index", "--data_dir", str(tmp_path), "--num_workers", "1"])
    message = str(e.value)
    assert message.startswith(f"error: {tmp_path / 'stage_2_train.csv'}") and problem in message and "\n" not in message


def test_csv_matching_no_file_is_a_one_line_error(tmp_path):
    (tmp_path / "stage_2_train").mkdir()
    ct_file(tmp_path / "stage_2_train" / "ID_only.dcm", instance=1)
    (tmp_path / "stage_2_train.csv").write_text("ID,Label\n" + "".join(f"ID_other_{n},0\n" for n in cohort.LABELS))
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
        cohort.load_index(str(tmp_path), num_workers=1)
    assert str(e.value).startswith(f"error: {tmp_path}: no usable slices (all 2 skipped): 1 of them: ")
    assert "skipped 2 file(s): 1 no row in stage_2_train.csv, 1 in stage_2_train.csv but file missing" in out.getvalue()


def tiny_train_args(data_dir, out, *extra):
    """train.py flags for a run of seconds; later flags in `extra` win."""
    return ["--data_dir", str(data_dir), "--output_dir", str(out), "--image_size", "32", "--patch_size", "8", "--stride", "8",
            "--base_channels", "8", "--num_samples", "12", "--eval_samples", "all", "--batch_size", "8", "--epochs", "1",
            "--num_workers", "0", "--eval_batch_size", "64", "--seed", "1", *extra]


def test_empty_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(tmp_path / "data", tmp_path / "run"))
    assert str(e.value).startswith(f"error: {tmp_path / 'data'}: folder is empty; get the RSNA data")


def test_data_dir_without_healthy_patients(phantom_dir, tmp_path):
    root = tmp_path / "all_sick"
    shutil.copytree(phantom_dir, root, ignore=shutil.ignore_patterns(".ctpddpm_cache"))
    csv_path = root / "stage_2_train.csv"
    csv_path.write_text(csv_path.read_text().replace("_any,0", "_any,1"))
    with pytest.raises(SystemExit) as e, pytest.warns(UserWarning, match="train healthy slices: only 0 slices available"):
        train.main(tiny_train_args(root, tmp_path / "run"))
    assert str(e.value) == (f"error: {root}: no usable healthy training slices "
                            "(no patient without a hemorrhage slice to train on)")


# ---- runs, checkpoints, output folders -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(phantom_dir, tmp_path_factory):
    """A finished 1-epoch run (in-process), shared by the checkpoint cases: copy it before changing it."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_train_args(phantom_dir, out))
    return out


def copy_run(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


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


def test_evaluate_refuses_a_file_that_is_not_a_checkpoint(tiny_run, tmp_path):
    torch.save(torch.load(tiny_run / "best_model.pt", weights_only=True)["model"], tmp_path / "weights_only.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "weights_only.pt")])
    assert str(e.value) == f"error: {tmp_path / 'weights_only.pt'}: not a ct-pddpm checkpoint (no 'model' and 'config' entries)"


def test_unwritable_output_dirs(tiny_run, phantom_dir, tmp_path):
    # We run as root, for whom permission bits do not stop writes: a path below a regular file fails for anyone.
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "afile" / "sub"))
    assert str(e.value) == f"error: {tmp_path / 'afile' / 'sub'}: cannot write output dir (Not a directory)"
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "afile"))  # --output_dir is a file
    assert str(e.value) == f"error: {tmp_path / 'afile'}: cannot write output dir (File exists)"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tiny_run / "best_model.pt"), "--output_dir", str(tmp_path / "afile" / "sub")])
    assert str(e.value) == f"error: {tmp_path / 'afile' / 'sub'}: cannot create output dir (Not a directory)"


def test_eval_samples_larger_than_available(tiny_run, tmp_path):
    with pytest.warns(UserWarning) as caught, contextlib.redirect_stdout(io.StringIO()):
        evaluate.main(["--checkpoint", str(tiny_run / "best_model.pt"), "--eval_samples", "100000", "--n_boot", "10",
                       "--keep_examples", "1", "--output_dir", str(tmp_path / "ev")])
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 4 and all(re.fullmatch(r"(test|val) (healthy|hemorrhage) slices: only \d+ slices available, "
                                                   r"100000 asked for; using all", m) for m in messages)
    counts = json.loads((tmp_path / "ev" / "metrics.json").read_text())["counts"]
    assert counts["slices"] == int(re.search(r"only (\d+)", messages[0])[1]) + int(re.search(r"only (\d+)", messages[1])[1])


def test_eval_samples_zero_is_a_usage_error(tiny_run, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tiny_run / "best_model.pt"), "--eval_samples", "0"])
    assert e.value.code == 2 and "argument --eval_samples: expected a positive integer or 'all', got '0'" in capsys.readouterr().err


# ---- non-finite loss --------------------------------------------------------------------------------

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


# ---- what the user sees from the command line -------------------------------------------------------

def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)




def test_cli_evaluate_refuses_a_pickled_checkpoint_in_one_line(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "best_model.pt", weights_only=True)
    torch.save(checkpoint | {"note": Payload()}, tmp_path / "downloaded.pt")
    proc = run_cli("evaluate.py", "--checkpoint", str(tmp_path / "downloaded.pt"))
    assert proc.returncode == 1 and "pwned" not in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'downloaded.pt'}: refused to load, it holds a pickled posix.system, not only tensors and plain "
        "data (checkpoints are loaded with weights_only=True)"]


# ==== issue 15: stale cache, leaking splits, garbage headers, overwritten results, unchecked flags ====

def small_data(tmp_path, name="data", patients=4, seed=3):
    """A fresh phantom of its own (tests below change files in it), 32 px."""
    return phantom.write_phantom(str(tmp_path / name), patients=patients, slices=3, size=32, seed=seed)


def quiet(fn, *args, **kwargs):
    """fn(...) with its stdout captured -> (result, stdout)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def rewrite_pixels(path, hu):
    """Give an existing DICOM other pixels (same header, ids and size), as a re-export or a second site would."""
    ds = pydicom.dcmread(path)
    ds.PixelData = np.clip(np.round(hu + 1024), -32768, 32767).astype(np.int16).tobytes()
    ds.save_as(path)


# ---- 1. the slice cache serves only what is on disk now ----------------------------------------

def test_a_cached_file_replaced_by_a_zero_byte_file_is_a_counted_skip(tmp_path):
    root = small_data(tmp_path)
    cache_dir = str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    victim = int(np.flatnonzero(index["path"] != "")[1])
    open(os.path.join(root, index["path"][victim]), "wb").close()  # 0 bytes, in place: the folder's mtime stays
    cache, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert cache.state[victim] == 2 and victim not in cache.ok(rows)
    assert "(1 decoded again: their file changed since it was cached)" in out
    assert f"slices: skipped 1 file(s): 1 unreadable DICOM. First: {index['path'][victim]}" in out
    # the index checks folders by default (a rewrite in place leaves the folder's time alone: issue 21, RSNA-size
    # start-up); with check_files (--verify_cache) it notices the changed file too and reads the headers again
    _, out = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    assert "changed since the index was built" not in out
    again, out = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1, check_files=True)
    assert f"index: 1 file(s) changed since the index was built (first: {index['path'][victim]})" in out
    assert index["id"][victim] not in again["id"] and "1 unreadable DICOM header" in out


def test_a_cached_file_rewritten_with_other_pixels_is_decoded_again(tmp_path):
    root = small_data(tmp_path)
    cache_dir = str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    before, _ = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    old_image = np.array(before.images[2])
    path = os.path.join(root, index["path"][2])
    rewrite_pixels(path, head_hu())
    after, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert "1 decoded again" in out and not np.array_equal(np.array(after.images[2]), old_image)
    expected, _ = inputs.load_slice(path, DICOM_1, 32)
    assert np.array_equal(np.array(after.images[2]), expected)


def test_two_data_folders_with_the_same_ids_share_no_cache_rows(tmp_path):
    first = small_data(tmp_path, "site_a")
    second = small_data(tmp_path, "site_b")  # the same seed: the same ids, patients and file names
    index, _ = quiet(cohort.load_index, first, cache_dir=str(tmp_path / "shared"), num_workers=1)
    for path in index["path"]:  # every image of the second site differs
        if os.path.getsize(os.path.join(second, path)) > 1000:
            rewrite_pixels(os.path.join(second, path), head_hu())
    shutil.rmtree(os.path.join(second, "masks"))
    caches = {}
    for root in (first, second):
        index_here, _ = quiet(cohort.load_index, root, cache_dir=str(tmp_path / "shared"), num_workers=1)
        assert np.array_equal(index_here["id"], index["id"])
        caches[root], _ = quiet(data.prepare_slices, root, index_here, np.arange(len(index["id"])), 32, DICOM_1,
                                cache_dir=str(tmp_path / "shared"), num_workers=1)
    assert caches[first].prefix != caches[second].prefix
    ok = caches[first].ok(np.arange(len(index["id"])))
    assert all(not np.array_equal(caches[first].images[k], caches[second].images[k]) for k in ok)


# ---- 2. frozen splits -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A 1-epoch run on a phantom of its own (the tests add and remove patients): copy both before changing them."""
    base = tmp_path_factory.mktemp("own")
    root = phantom.write_phantom(str(base / "data"), patients=8, slices=6, size=64, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_train_args(root, base / "run"))
    return base


def add_healthy_patient(root, patient_id, n=3):
    with open(os.path.join(root, "stage_2_train.csv"), "a") as f:
        for k in range(n):
            image_id = f"ID_{patient_id}_{k}"
            phantom.write_ct_dicom(os.path.join(root, "stage_2_train", f"{image_id}.dcm"), head_hu(64, 64),
                                   patient_id=patient_id, study_uid=f"1.2.9.{k}", series_uid=f"1.2.9.{k}.1", instance=k + 1,
                                   z=5.0 * k, spacing=0.75, slope=1.0, intercept=-1024.0)
            f.write("".join(f"{image_id}_{name},0\n" for name in cohort.LABELS))


def test_splits_are_saved_in_splits_json_and_every_checkpoint(own_run):
    saved = json.loads((own_run / "run" / "splits.json").read_text())
    assert saved["seed"] == 1 and saved["data_dir"] == str(own_run / "data")
    lists = saved["patients"]
    assert lists["train"] and not set(lists["train"]) & (set(lists["val"]) | set(lists["test"]))
    for name in ("last.pt", "best_model.pt", "best_model_loss.pt"):
        assert torch.load(own_run / "run" / name, weights_only=True)["splits"] == saved


def test_patients_added_or_removed_after_training_move_no_training_patient(own_run, tmp_path):
    root, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(own_run / "data", root, ignore=shutil.ignore_patterns(".ctpddpm_cache"))
    shutil.copytree(own_run / "run", run)
    saved = json.loads((run / "splits.json").read_text())["patients"]
    for k in range(3):
        add_healthy_patient(str(root), f"ID_added{k}")
    gone = saved["val"][0]
    index, _ = quiet(cohort.load_index, str(root), num_workers=1)
    for path in index["path"][index["patient"] == gone]:
        os.remove(root / path)
    # drawn again from the seed, the splits would now differ from the saved ones (what issue 15 found)
    index, _ = quiet(cohort.load_index, str(root), num_workers=1)
    redrawn = cohort.split_patients(index, 1)
    assert set(map(str, redrawn["test"])) | set(map(str, redrawn["val"])) != set(saved["test"]) | set(saved["val"]) - {gone}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        evaluate.main(["--checkpoint", str(run / "best_model.pt"), "--data_dir", str(root), "--n_boot", "10",
                       "--keep_examples", "1"])
    lines = out.getvalue().splitlines()
    assert ("splits: 3 patient(s) not in the run's saved splits are left out (added since training): "
            "ID_added0, ID_added1, ID_added2") in lines
    assert "splits: 1 patient(s) of the run's saved splits are no longer in the data (train 0, val 1, test 0)" in lines
    scored = {row.split(",")[1] for row in (run / "eval_best_model_test" / "scores.csv").read_text().splitlines()[1:]}
    assert scored and scored <= set(saved["test"])


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


def test_resume_with_new_schedule_follows_the_new_cosine(tiny_run, phantom_dir, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(tiny_train_args(phantom_dir, run, "--resume", "--epochs", "3", "--lr", "0.001", "--new_schedule"))
    last = torch.load(run / "last.pt", weights_only=True)
    steps = last["lr_schedule"]["last_epoch"] // 3
    assert last["epoch"] == 3 and last["lr_schedule"]["T_max"] == 3 * steps
    history = last["history"]
    expected = 0.001 * 0.5 * (1 + np.cos(np.pi * 2 * steps / (3 * steps)))  # the lr after epoch 2's steps
    assert history[1]["lr"] == pytest.approx(expected, rel=1e-6)
    assert f"--new_schedule: lr {0.001 * 0.5 * (1 + np.cos(np.pi / 3)):.3g} at step {steps} of {3 * steps}" in out.getvalue()


def test_what_resume_may_change_is_accepted(tiny_run, phantom_dir, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(tiny_train_args(phantom_dir, run, "--resume", "--num_workers", "1", "--eval_every", "5",
                                   "--cache_dir", str(tmp_path / "cache"), "--precision", "fp32"))
    assert f"resuming {run} after epoch 1" in out.getvalue()


# ---- 3. headers that decode into garbage: see BAD_SLICES (slope0, hu1024, unsigned, columns) ----------



# ---- 4. outputs: one run per folder, no result replaced or truncated ------------------------------

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
        with pytest.raises(SystemExit) as e:  # evaluate.py and sweep.py lock their folder the same way
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


def test_a_lock_left_by_a_crashed_run_is_taken_over(phantom_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / runfiles.LOCK_NAME).write_text(f"{gone.pid} {socket.gethostname()} 2026-01-01T00:00:00 train.py\n")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        train.main(tiny_train_args(phantom_dir, out))
    assert f"note: {out / runfiles.LOCK_NAME}: left by a run that is gone (pid {gone.pid}" in printed.getvalue()
    assert (out / "best_model.pt").is_file() and not (out / runfiles.LOCK_NAME).exists()  # released at the end


def test_two_trainings_started_together_into_one_dir(phantom_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = tiny_train_args(phantom_dir, tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    refused = next(err for code, err in results if code == 1).strip().splitlines()
    assert len(refused) == 1 and refused[0].startswith(f"error: {tmp_path / 'run'}: ")
    assert ("another run is using this output dir" in refused[0] or "output dir is not empty" in refused[0])


def test_evaluate_keeps_each_checkpoints_results_and_refuses_to_replace_them(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    for name in ("best_model", "best_model_loss"):
        quiet(evaluate.main, ["--checkpoint", str(run / f"{name}.pt"), "--n_boot", "10", "--keep_examples", "1"])
    first = json.loads((run / "eval_best_model_test" / "metrics.json").read_text())
    second = json.loads((run / "eval_best_model_loss_test" / "metrics.json").read_text())
    assert first["checkpoint"] == str(run / "best_model.pt") and second["checkpoint"] == str(run / "best_model_loss.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(run / "best_model.pt"), "--n_boot", "10"])
    assert str(e.value) == (f"error: {run / 'eval_best_model_test'}: holds the results of an earlier run (metrics.json); "
                            "use --overwrite to replace them, or --output_dir to write elsewhere")
    quiet(evaluate.main, ["--checkpoint", str(run / "best_model.pt"), "--n_boot", "10", "--keep_examples", "1", "--overwrite"])
    assert not (run / "eval_best_model_test" / runfiles.LOCK_NAME).exists()


def test_a_full_disk_leaves_the_old_result_and_says_so_in_one_line(tiny_run, tmp_path, monkeypatch):
    run = copy_run(tiny_run, tmp_path)
    args = ["--checkpoint", str(run / "best_model.pt"), "--n_boot", "10", "--keep_examples", "1"]
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


# ---- 5. flags checked before any work ----------------------------------------------------------------

BAD_TRAIN_FLAGS = [
    (["--stride", "0"], "--stride 0: must be at least 1"),
    (["--eval_t", "5000"], "--eval_t 5000: timesteps run from 0 to 999"),
    (["--eval_t", "-1"], "--eval_t -1: timesteps run from 0 to 999"),
    (["--eval_every", "0"], "--eval_every 0: must be at least 1"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--lr", "nan"], "--lr nan: must be a finite number above 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number above 0"),
    (["--lr", "-0.001"], "--lr -0.001: must be a finite number above 0"),
    (["--image_size", "63"], "--image_size 63: must be a multiple of 8 (the UNet halves it 3 times) and at least 8"),
    (["--patch_size", "64"], "--patch_size 64: larger than the image (32 px)"),
    (["--patch_size", "1"], "--patch_size 1: must be at least 2 pixels"),
    (["--median_size", "-1"], "--median_size -1: must be 0 (off) or more"),
    (["--eval_batch_size", "0"], "--eval_batch_size 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--num_workers", "-2"], "--num_workers -2: must be 0 or more"),
    (["--min_brain_fraction", "1.5"], "--min_brain_fraction 1.5: must be in [0, 1)"),
    (["--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
    (["--device", "tpu9"], "--device tpu9: not a device name (auto, cpu, cuda, cuda:N, mps)"),
    (["--new_schedule"], "--new_schedule : only means something with --resume"),
]


@pytest.mark.parametrize("flags,message", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_bad_train_flags_are_one_line_errors_before_any_work(phantom_dir, tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", *flags))
    assert str(e.value) == f"error: {message}"
    assert not (tmp_path / "run").exists()  # refused before the output dir was made


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(phantom_dir, tmp_path, tiny_run):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", "--device", "cuda"))
    assert str(e.value) == "error: --device cuda: CUDA is not available here (use --device cpu or auto)"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tiny_run / "best_model.pt"), "--device", "cuda"])
    assert str(e.value) == "error: --device cuda: CUDA is not available here (use --device cpu or auto)"


def test_cache_dir_that_is_a_file(phantom_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", "--cache_dir", str(tmp_path / "afile")))
    assert str(e.value) == f"error: --cache_dir {tmp_path / 'afile'}: not a directory"


@pytest.mark.parametrize("script,flags,message", [
    ("evaluate", ["--stride", "0"], "--stride 0: must be at least 1"),
    ("evaluate", ["--eval_t", "1000"], "--eval_t 1000: timesteps run from 0 to 999"),
    ("evaluate", ["--patch_size", "33"], "--patch_size 33: larger than the image (32 px)"),
    ("evaluate", ["--keep_examples", "-1"], "--keep_examples -1: must be 0 or more"),
    ("sweep", ["--windows", "8:0"], "--stride 0: must be at least 1"),
    ("sweep", ["--windows", "8x4"], "--windows 8x4: expected patch:stride, e.g. 32:16"),
    ("sweep", ["--eval_t", "250", "2000", "--multi_t"], "--eval_t 2000: timesteps run from 0 to 999"),
], ids=["eval_stride", "eval_t", "eval_patch", "eval_keep", "sweep_stride", "sweep_window", "sweep_t"])
def test_bad_evaluate_and_sweep_flags(tiny_run, tmp_path, script, flags, message):
    import sweep
    main = {"evaluate": evaluate.main, "sweep": sweep.main}[script]
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tiny_run / "best_model.pt"), "--output_dir", str(tmp_path / "out"), *flags])
    assert str(e.value) == f"error: {message}" and not (tmp_path / "out").exists()


def test_compare_output_that_matplotlib_cannot_write(tiny_run, tmp_path):
    import compare
    with pytest.raises(SystemExit) as e:
        compare.main([str(tiny_run), "--output", str(tmp_path / "curves.txt")])
    assert str(e.value).startswith(f"error: --output {tmp_path / 'curves.txt'}: matplotlib cannot write .txt files (use one of ")
    assert not (tmp_path / "curves.txt").exists()


def test_a_checkpoint_with_nan_weights_is_refused_when_loaded(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "best_model.pt", weights_only=True)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = torch.full_like(checkpoint["model"][name], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "nan.pt"), "--output_dir", str(tmp_path / "out")])
    assert str(e.value) == f"error: {tmp_path / 'nan.pt'}: non-finite weights (NaN or inf) in {name}; the checkpoint is unusable"
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_whose_config_lacks_a_key_is_one_line(tiny_run, tmp_path):
    """An older or hand-edited checkpoint without a key that builds the network: one line naming the key and the
    format that wrote it, not KeyError: 'base_channels'."""
    checkpoint = torch.load(tiny_run / "best_model.pt", weights_only=True)
    del checkpoint["config"]["base_channels"]
    checkpoint["config"].pop("format", None)
    torch.save(checkpoint, tmp_path / "old.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "old.pt"), "--output_dir", str(tmp_path / "out")])
    message = str(e.value)
    assert message.startswith(f"error: {tmp_path / 'old.pt'}: its model config lacks base_channels (written by a ct-pddpm before")
    assert "\n" not in message and not (tmp_path / "out").exists()


# ---- smaller ones: labels, a data set without bleeds, Ctrl-C ---------------------------------------

CTICH_HEADER = "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,No_Hemorrhage,Fracture_Yes_No\n"


@pytest.mark.parametrize("row,problem", [
    ("49,1,0,0,0,1,0,1,0", ":3: No_Hemorrhage=1 but Epidural=1 (the row contradicts itself)"),
    ("49,1,0,0,0,0,0,0,0", ":3: No_Hemorrhage=0 but no subtype column is 1 (the row contradicts itself)"),
    ("49,1,0,2,0,0,0,0,0", ":3: Intraparenchymal=2, expected 0 or 1"),
    ("49,1,0,0,0,0,0,-1,0", ":3: No_Hemorrhage=-1, expected 0 or 1"),
], ids=["no_hemorrhage_and_epidural", "hemorrhage_without_subtype", "value_2", "value_minus_1"])
def test_ctich_labels_that_contradict_themselves(tmp_path, row, problem):
    path = tmp_path / "hemorrhage_diagnosis.csv"
    path.write_text(CTICH_HEADER + "49,2,0,0,0,0,0,1,0\n" + row + "\n")
    with pytest.raises(SystemExit) as e:
        cohort.read_ctich_labels(str(path))
    assert str(e.value) == f"error: {path}{problem}"


def test_rsna_labels_that_contradict_each_other(tmp_path):
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ID,Label\nID_aa_any,0\nID_aa_epidural,0\nID_aa_subdural,1\n")
    with pytest.raises(SystemExit) as e:
        cohort.read_rsna_labels(str(path))
    assert str(e.value) == f"error: {path}:4: ID_aa has any=0 but subdural=1 (its label rows contradict each other)"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig", "utf-32"])
def test_label_csvs_in_other_unicode_encodings_are_read(tmp_path, encoding):
    def excel_export(text):  # with one byte-order mark, as Excel's "Unicode text" and "CSV UTF-8" write them
        return ("\ufeff" + text).encode(encoding) if encoding == "utf-16-be" else text.encode(encoding)
    text = CTICH_HEADER + "49,1,0,0,0,1,0,0,0\n49,2,0,0,0,0,0,1,0\n"
    (tmp_path / "ctich.csv").write_bytes(excel_export(text))
    assert cohort.read_ctich_labels(str(tmp_path / "ctich.csv")) == {(49, 1): [1, 1, 0, 0, 0, 0], (49, 2): [0, 0, 0, 0, 0, 0]}
    rsna = "ID,Label\n" + "".join(f"ID_aa_{name},0\n" for name in cohort.LABELS)
    (tmp_path / "rsna.csv").write_bytes(excel_export(rsna))
    assert cohort.read_rsna_labels(str(tmp_path / "rsna.csv")) == {"ID_aa": [0] * 6}


@pytest.mark.parametrize("content,problem", [
    ("ID,Label\nID_aa_any,0\n".encode("cp1252") + b"\xe9\n", "not UTF-8 text (byte 0xe9 at offset 21); save it as CSV UTF-8"),
    ("ID,Label\n".encode("utf-16-le"), "holds NUL characters (UTF-16 without a byte-order mark?); save it as CSV UTF-8"),
    (b"PK\x03\x04rest of a workbook", "a zip or Excel workbook, not a CSV text file (save it as CSV)"),
], ids=["latin1", "utf16_no_bom", "xlsx"])
def test_label_csvs_that_are_not_text_are_one_line_errors(tmp_path, content, problem):
    (tmp_path / "stage_2_train").mkdir()
    (tmp_path / "stage_2_train.csv").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        data.main(["index", "--data_dir", str(tmp_path), "--num_workers", "1"])
    assert str(e.value) == f"error: {tmp_path / 'stage_2_train.csv'}: {problem}"


def test_training_without_any_hemorrhage_patient_keeps_best_model_by_loss(phantom_dir, tmp_path, capsys):
    root = tmp_path / "no_bleeds"
    shutil.copytree(phantom_dir, root, ignore=shutil.ignore_patterns(".ctpddpm_cache"))
    csv_path = root / "stage_2_train.csv"
    csv_path.write_text(re.sub(r",1$", ",0", csv_path.read_text(), flags=re.M))
    train.main(tiny_train_args(root, tmp_path / "run", "--epochs", "2"))
    captured = capsys.readouterr()
    assert ("warning: the validation split has no hemorrhage slice, so no ROC-AUC can be computed; best_model.pt is "
            "chosen by validation loss (as best_model_loss.pt)") in captured.err
    best = torch.load(tmp_path / "run" / "best_model.pt", weights_only=True)
    by_loss = torch.load(tmp_path / "run" / "best_model_loss.pt", weights_only=True)
    assert best["best_by"] == "val_loss" and best["epoch"] == by_loss["epoch"]


def test_ctrl_c_stops_in_one_line_and_leaves_a_resumable_run(phantom_dir, tmp_path):
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


def test_stride_larger_than_the_window_would_leave_pixels_unscored(phantom_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", "--stride", "12"))
    assert str(e.value) == ("error: --stride 12: larger than the window (--patch_size 8): pixels between windows would "
                            "never be scored")


def test_pretrained_model_that_cannot_be_loaded(phantom_dir, tmp_path):
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", "--pretrained", "--hf_model", str(tmp_path / "nowhere")))
    assert str(e.value).startswith(f"error: {tmp_path / 'nowhere'}: cannot load a UNet2DModel (")


@pytest.mark.parametrize("argv,message", [
    (["--patients", "0"], "error: --patients 0: must be at least 1"),
    (["--slices", "0"], "error: --slices 0: must be at least 1"),
    (["--size", "8"], "error: --size 8: must be at least 16"),
    (["--seed", "-1"], "error: --seed -1: must be at least 0"),
], ids=["patients", "slices", "size", "seed"])
def test_bad_phantom_flags(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        phantom.main(["--out", str(tmp_path / "p"), *argv])
    assert str(e.value) == message and not (tmp_path / "p").exists()


def test_bad_show_flags(phantom_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        data.main(["show", "--data_dir", phantom_dir, "--out", str(tmp_path / "grid.docx")])
    assert str(e.value).startswith(f"error: --out {tmp_path / 'grid.docx'}: matplotlib cannot write .docx files")
    with pytest.raises(SystemExit) as e:
        data.main(["show", "--data_dir", phantom_dir, "--out", str(tmp_path / "grid.png"), "--columns", "0"])
    assert str(e.value) == "error: --columns 0: must be at least 1"


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


def test_a_failing_torchrun_rank_says_one_line_not_a_traceback(tmp_path):
    """Under torchrun each failing rank prints the project's one line as `rank N: error: ...` (torchrun kills the
    other rank once one fails, so it may not get to say its own); no traceback from our code. torchrun's own report
    follows (docs/reliability.md: it cannot be silenced from the script)."""
    from test_distributed import TORCHRUN
    from test_scripts import run
    (tmp_path / "bad.pt").write_text("not a checkpoint\n")
    proc = run(TORCHRUN + ["evaluate.py", "--checkpoint", str(tmp_path / "bad.pt"), "--output_dir", str(tmp_path / "out")])
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if re.match(r"rank \d: ", line)]
    expected = f"error: {tmp_path / 'bad.pt'}: refused to load"
    assert lines and all(line[len("rank 0: "):].startswith(expected) for line in lines), proc.stderr[-3000:]
    assert len({line[:6] for line in lines}) == len(lines)  # once per rank
    assert not re.search(r'File ".*(evaluate|models|scoring|data)\.py"', proc.stderr)  # no traceback of ours


# ---- issue 21: the slice cache under concurrency, on a full disk, with copies that keep mtimes ---------

def test_a_second_run_waits_while_another_fills_the_slice_cache(tmp_path):
    """Two runs (not torchrun ranks) on the same data: the second waits for the first's lock, then finds the rows
    filled and decodes nothing."""
    import threading
    root, cache_dir = small_data(tmp_path), str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    quiet(data.prepare_slices, root, index, rows[:2], 32, DICOM_1, cache_dir=cache_dir, num_workers=1)  # makes the files
    prefix = data.slice_cache_prefix(root, "rsna", index, 32, DICOM_1, cache_dir)
    second = {}
    with runfiles.cache_lock(f"{prefix}.lock", "the slice cache"):  # "the first run", mid-fill
        thread = threading.Thread(target=lambda: second.update(out=quiet(
            data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)[1]))
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and "out" not in second  # waiting, not writing
        quiet(data._fill_cache, prefix, cache_dir, root, index, rows, 32, DICOM_1, 1, False)  # the first run fills it
    thread.join(60)
    assert f"slices: {len(rows)} requested, {len(rows)} were cached" in second["out"]


def test_a_full_disk_is_one_line_before_any_row_is_written(tmp_path, monkeypatch):
    root, cache_dir = small_data(tmp_path), str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    quiet(data.prepare_slices, root, index, rows[:3], 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SystemExit) as e:
        quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    needed = (len(rows) - 3) * data.row_bytes(1, 32)
    assert str(e.value).startswith(f"error: --cache_dir {cache_dir}: not enough free space for the slice cache: "
                                   f"{len(rows) - 3} slices need {needed} bytes")
    monkeypatch.undo()  # space again: the three rows cached before are still served, the rest decoded
    cache, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert f"{len(rows)} requested, 3 were cached" in out and len(cache.ok(rows)) > 3


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


def test_verify_cache_decodes_a_file_swapped_with_the_same_size_and_mtime(tmp_path):
    root, cache_dir = small_data(tmp_path), str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1, verify_cache=True)
    path = os.path.join(root, index["path"][2])
    stat = os.stat(path)
    rewrite_pixels(path, head_hu())  # same size; then the old modification time back, as `cp -p` or rsync -t keep it
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(path) == stat.st_size
    _, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert "decoded again" not in out  # the default check (size + mtime) cannot see it
    cache, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1,
                       verify_cache=True)
    assert "(1 decoded again: their file changed since it was cached)" in out
    assert np.array_equal(np.array(cache.images[2]), inputs.load_slice(path, DICOM_1, 32)[0])
    _, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1, verify_cache=True)
    assert f"{len(rows)} requested, {len(rows)} were cached" in out and "decoded again" not in out


# ---- issue 21: maps over a DICOM series only with an affine that is right -------------------------

def write_series(folder, positions):
    """A series of the corpus patient's slices at these ImagePositionPatient values."""
    folder.mkdir()
    for k, position in enumerate(positions):
        ct_file(folder / f"s{k}.dcm", instance=k + 1, ImagePositionPatient=[float(v) for v in position])
    return [str(folder / f"s{k}.dcm") for k in range(len(positions))]


@pytest.mark.parametrize("positions,note", [
    ([(-12, -12 + 5 * k * np.tan(np.radians(8.5)), 5 * k) for k in range(4)], "gantry tilt of 8.5 degrees"),
    ([(-12, -12, z) for z in (0, 5, 15, 20)], "uneven slice spacing (5 to 10 mm: a missing or stray slice?)"),
    ([(-12, -12, z) for z in (0, 5, 5, 10)], "its slice positions are not in one order along the slice normal"),
], ids=["tilted", "slice_missing", "repeated"])
def test_a_series_without_one_affine_gets_a_note_and_only_the_npy(tiny_run, tmp_path, positions, note):
    paths = write_series(tmp_path / "series", positions)
    affine, why_not = readers.series_affine([readers.read_geometry(path) for path in paths])
    assert affine is None and why_not.startswith(note)
    out = tmp_path / "pred"
    _, printed = quiet(predict.main, ["--checkpoint", str(tiny_run / "best_model.pt"), "--data_dir", str(tmp_path / "series"),
                                      "--output_dir", str(out), "--num_workers", "1", "--top", "0"])
    (scan,) = predict_rows(out / "scans.csv")
    assert scan["note"].startswith(f"no NIfTI map: {note}") and f"note: {scan['scan']}: no NIfTI map: {note}" in printed
    assert sorted(os.listdir(out / "maps")) == [f"{scan['scan']}.npy"]


def predict_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_index_notices_a_folder_whose_files_changed(tmp_path):
    """Start-up checks the folders of indexed files (one stat each, issue 21): a file removed (or added, or replaced
    by a rename) deep in a CT-ICH patient folder, which the layout's own signature does not see, rebuilds the index."""
    from test_data import write_ctich
    root = str(tmp_path / "ctich")
    rows = write_ctich(root)
    with open(os.path.join(root, "hemorrhage_diagnosis.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    index, _ = quiet(cohort.load_index, root, cache_dir=str(tmp_path / "cache"), num_workers=1)
    gone = next(path for path in index["path"] if path.startswith("Patients_CT/050/brain/"))
    os.remove(os.path.join(root, gone))
    again, out = quiet(cohort.load_index, root, cache_dir=str(tmp_path / "cache"), num_workers=1)
    assert "index: 1 folder(s) changed since the index was built (first: Patients_CT/050/brain); reading the headers again" in out
    assert gone not in again["path"] and len(again["path"]) == len(index["path"]) - 1
