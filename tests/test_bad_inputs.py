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
import io
import json
import os
import re
import warnings
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import phantom
from conftest import edit_dicom
import evaluate
import models
import train

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


def write_truncated_header(path, k):
    ct_file(path, instance=k)
    cut(path, 400)  # past the file meta, before PatientID: pydicom reads it as a header that just stops


def write_truncated_pixels(path, k):
    ct_file(path, instance=k)
    cut(path, -300)


def write_garbled_slope(path, k):
    ct_file(path, instance=k, slope=0.125)  # pydicom will not write a bad DS, so garble the bytes
    content = open(path, "rb").read()
    assert content.count(b"0.125 ") == 1
    open(path, "wb").write(content.replace(b"0.125 ", b"abcde "))


def write_rgb(path, k):
    ct_file(path, instance=k, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
            PixelData=np.zeros((32, 32, 3), np.int16).tobytes())


def write_multiframe(path, k):
    ct_file(path, instance=k, NumberOfFrames=2, PixelData=np.zeros((2, 32, 32), np.int16).tobytes())


def write_nan(path, k):
    with warnings.catch_warnings():  # pydicom writes it, warning that "nan" is no valid DS
        warnings.simplefilter("ignore")
        ct_file(path, instance=k, RescaleIntercept="nan")


# Bad slices: (image id, writer, where it is caught, the reason the summary counts it under).
# "index": left out of the index (header read); "decode": in the index, left out of the slice cache.
BAD_SLICES = [
    ("ID_c_truncheader", write_truncated_header, "index", "truncated DICOM"),
    ("ID_c_notdicom", lambda p, k: open(p, "w").write("PatientID,Rows\nnot,a dicom\n"), "index", "unreadable DICOM header"),
    ("ID_c_mr", lambda p, k: ct_file(p, instance=k, Modality="MR"), "index", "modality MR, not CT"),
    ("ID_c_nopatient", lambda p, k: ct_file(p, instance=k, PatientID=None), "index", "no PatientID"),
    ("ID_c_noposition", lambda p, k: ct_file(p, instance=k, ImagePositionPatient=None, InstanceNumber=None), "index",
     "no slice position"),
    ("ID_c_nopixels", lambda p, k: ct_file(p, instance=k, PixelData=None), "decode", "no pixel data"),
    ("ID_c_truncpixels", write_truncated_pixels, "decode", "truncated or undecodable pixel data"),
    ("ID_c_rgb", write_rgb, "decode", "pixel array of shape (32, 32, 3), not one 2-D slice"),
    ("ID_c_multiframe", write_multiframe, "decode", "pixel array of shape (2, 32, 32), not one 2-D slice"),
    ("ID_c_nan", write_nan, "decode", "non-finite HU values"),
    ("ID_c_inf", lambda p, k: ct_file(p, instance=k, RescaleSlope=1e39), "decode", "non-finite HU values"),
    ("ID_c_absurd", lambda p, k: ct_file(p, instance=k, RescaleSlope=1000.0), "decode", "implausible HU values"),
    ("ID_c_garbledslope", write_garbled_slope, "decode", "unreadable RescaleSlope/RescaleIntercept"),
    ("ID_c_1x1", lambda p, k: ct_file(p, np.full((1, 1), 30.0, np.float32), instance=k), "decode",
     "image of 1x1 pixels, too small"),
]
# Odd but good slices: must be decoded, not skipped.
GOOD_SLICES = [
    ("ID_c_quirk12", lambda p, k: ct_file(p, instance=k, quirk12=True)),  # RSNA 12-bit storage
    ("ID_c_quirk12twin", lambda p, k: ct_file(p, instance=k)),  # the same HU stored normally
    ("ID_c_1024x700", lambda p, k: ct_file(p, head_hu(1024, 700), instance=k)),
]


@pytest.fixture(scope="module")
def corpus(phantom_dir, tmp_path_factory):
    """A copy of the phantom plus every bad slice, a file with no CSV row, a CSV image with no file and an image
    with only some of its label rows; indexed and decoded (all rows) once. -> dict with dir, index, cache, output."""
    root = str(tmp_path_factory.mktemp("corpus") / "data")
    shutil.copytree(phantom_dir, root, ignore=shutil.ignore_patterns(".ctpddpm_cache"))
    image_dir = os.path.join(root, "stage_2_train")
    for k, (image_id, write, *_) in enumerate(BAD_SLICES + GOOD_SLICES):
        write(os.path.join(image_dir, f"{image_id}.dcm"), k + 1)
    ct_file(os.path.join(image_dir, "ID_c_nocsvrow.dcm"), instance=90)
    ct_file(os.path.join(image_dir, "ID_c_somelabels.dcm"), instance=91)
    with open(os.path.join(root, "stage_2_train.csv"), "a") as f:
        for image_id, *_ in BAD_SLICES + GOOD_SLICES + [("ID_c_nofile",)]:
            f.write("".join(f"{image_id}_{name},0\n" for name in data.LABELS))
        f.write("ID_c_somelabels_any,0\n")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        data.main(["index", "--data_dir", root, "--num_workers", "1"])
        index = data.load_index(root, num_workers=1)  # from the cache just written
        cache = data.prepare_slices(root, index, np.arange(len(index["id"])), 32, 1, num_workers=1)
    return {"dir": root, "index": index, "cache": cache, "output": output.getvalue()}


def summary(corpus, what):
    lines = [line for line in corpus["output"].splitlines() if line.startswith(f"{what}: skipped")]
    assert len(lines) == 1, corpus["output"]  # reported once, as one line
    return lines[0]


@pytest.mark.parametrize("image_id,write,stage,reason", BAD_SLICES, ids=[case[0][5:] for case in BAD_SLICES])
def test_bad_slice_is_a_counted_skip(corpus, image_id, write, stage, reason):
    index, cache = corpus["index"], corpus["cache"]
    path = os.path.join(corpus["dir"], "stage_2_train", f"{image_id}.dcm")
    read = data.read_header if stage == "index" else lambda p: data.load_slice(p, 1, 32)
    ok, message = data._skip_bad(read, path)  # what the worker reports for this file
    assert not ok and message.startswith(reason) and "\n" not in message
    category = reason.split(":")[0]
    if stage == "index":
        assert image_id not in index["id"]
    else:
        row = int(np.flatnonzero(index["id"] == image_id)[0])
        assert cache.state[row] == 2  # 2 = bad file: never served
        assert row not in data.SliceDataset(cache, index, np.arange(len(index["id"]))).positions
    line = summary(corpus, "index" if stage == "index" else "slices")
    n_same = sum(1 for case in BAD_SLICES if case[2] == stage and case[3].split(":")[0] == category)
    n_same += stage == "decode" and category == "truncated or undecodable pixel data"  # the phantom's own quirk file
    assert f"{n_same} {category}" in line


def test_csv_row_and_file_mismatches_are_counted(corpus):
    line = summary(corpus, "index")
    assert "1 no row in stage_2_train.csv" in line and "ID_c_nocsvrow.dcm" in line
    assert "1 in stage_2_train.csv but file missing" in line and "ID_c_nofile.dcm" in line
    assert "1 incomplete label rows in stage_2_train.csv" in line and "ID_c_somelabels.dcm" in line
    n_index_skips = sum(case[2] == "index" for case in BAD_SLICES) + 3
    assert f"index: skipped {n_index_skips} file(s)" in line
    n_decode_skips = sum(case[2] == "decode" for case in BAD_SLICES) + 1
    assert f"slices: skipped {n_decode_skips} file(s)" in summary(corpus, "slices")


def test_quirk_and_odd_sizes_are_decoded_not_skipped(corpus):
    index, cache = corpus["index"], corpus["cache"]
    row = {image_id: int(np.flatnonzero(index["id"] == image_id)[0]) for image_id, _ in GOOD_SLICES}
    assert all(cache.state[r] == 1 for r in row.values())
    # the 12-bit quirk is corrected: the same picture as its normally stored twin
    assert np.array_equal(cache.images[row["ID_c_quirk12"]], cache.images[row["ID_c_quirk12twin"]])
    assert np.array_equal(cache.masks[row["ID_c_quirk12"]], cache.masks[row["ID_c_quirk12twin"]])
    # 1024 x 700 is padded with air to a square (left and right), not stretched
    wide = cache.images[row["ID_c_1024x700"]].astype(np.float32)
    assert wide.shape == (1, 32, 32) and np.allclose(wide[0, :, :3], -1) and wide[0, 16, 16] > -1
    assert cache.masks[row["ID_c_1024x700"]][16, 16]


def test_an_unforeseen_error_in_one_file_is_a_skip_not_a_crash():
    def broken_reader(path):
        return {}["no such key"]
    ok, reason = data._skip_bad(broken_reader, "ID_x.dcm")
    assert not ok and reason == "unexpected error: KeyError: 'no such key'"
    results = list(data.parallel_map(broken_reader, ["a", "b"], num_workers=1, desc="test"))
    assert [ok for ok, _ in results] == [False, False]


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
    (tmp_path / "stage_2_train.csv").write_text("ID,Label\n" + "".join(f"ID_other_{n},0\n" for n in data.LABELS))
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
        data.load_index(str(tmp_path), num_workers=1)
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
    """The message of `train.py --resume` on `run`, asked for a second epoch."""
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_train_args(data_dir, run, "--resume", "--epochs", "2", *extra))
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
    _, _, checkpoint = models.load_checkpoint(run / "last.pt")
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


def test_cli_training_on_the_corpus_survives_every_bad_file(corpus, tmp_path):
    # A split seed that puts the corpus patient (all the bad slices) in the training split, so train.py decodes them.
    index = corpus["index"]
    seed = next(s for s in range(100) if PATIENT in data.split_patients(index, s)["train"])
    proc = run_cli("train.py", *tiny_train_args(corpus["dir"], tmp_path / "run", "--num_workers", "2", "--num_samples", "1000",
                                                "--cache_dir", str(tmp_path / "cache"), "--seed", str(seed)))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "index: skipped" in proc.stdout and "slices: skipped" in proc.stdout
    for _, _, stage, reason in BAD_SLICES:
        if stage == "decode":
            assert reason.split(":")[0] in proc.stdout
    assert (tmp_path / "run" / "last.pt").is_file()


def test_cli_evaluate_refuses_a_pickled_checkpoint_in_one_line(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "best_model.pt", weights_only=True)
    torch.save(checkpoint | {"note": Payload()}, tmp_path / "downloaded.pt")
    proc = run_cli("evaluate.py", "--checkpoint", str(tmp_path / "downloaded.pt"))
    assert proc.returncode == 1 and "pwned" not in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'downloaded.pt'}: refused to load, it holds a pickled posix.system, not only tensors and plain "
        "data (checkpoints are loaded with weights_only=True)"]
