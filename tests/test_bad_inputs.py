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





def tiny_train_args(data_dir, out, *extra):
    """train.py flags for a run of seconds; later flags in `extra` win."""
    return ["--data_dir", str(data_dir), "--output_dir", str(out), "--image_size", "32", "--patch_size", "8", "--stride", "8",
            "--base_channels", "8", "--num_samples", "12", "--eval_samples", "all", "--batch_size", "8", "--epochs", "1",
            "--num_workers", "0", "--eval_batch_size", "64", "--seed", "1", *extra]






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
















def test_evaluate_refuses_a_file_that_is_not_a_checkpoint(tiny_run, tmp_path):
    torch.save(torch.load(tiny_run / "best_model.pt", weights_only=True)["model"], tmp_path / "weights_only.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "weights_only.pt")])
    assert str(e.value) == f"error: {tmp_path / 'weights_only.pt'}: not a ct-pddpm checkpoint (no 'model' and 'config' entries)"




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



def quiet(fn, *args, **kwargs):
    """fn(...) with its stdout captured -> (result, stdout)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = fn(*args, **kwargs)
    return result, out.getvalue()




# ---- 1. the slice cache serves only what is on disk now ----------------------------------------







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












# ---- 3. headers that decode into garbage: see BAD_SLICES (slope0, hu1024, unsigned, columns) ----------



# ---- 4. outputs: one run per folder, no result replaced or truncated ------------------------------











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


