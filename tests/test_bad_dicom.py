"""Bad DICOM files (issue 5, 15, 21): each one a counted skip with a reason in one summary line, never a traceback and
never a run that dies on one bad slice; odd but good files decoded. One corpus (the phantom plus every case) is
indexed and decoded once, then trained on.

Covered elsewhere: hu_from_dicom on the phantom's truncated file, no PixelData, MR, text (test_data.py); compressed
files, missing preambles, transfer syntaxes without a decoder (test_formats.py); label files (test_bad_labels.py)."""
import contextlib
import io
import os
import shutil
import warnings

import numpy as np
import pydicom
import pytest
import torch

import cohort
import data
import inputs
import readers
import train
from helpers import CORPUS_PATIENT, ct_file, cut, head_hu, quiet, tiny_train_args

DICOM_1 = inputs.native_input_hu("rsna", 1)  # the brain window, as a DICOM-trained model has it


def padded_head_hu(padding):
    """head_hu with the corners outside the round field of view set to a scanner's padding value (21 % of pixels)."""
    hu = head_hu()
    row, col = np.mgrid[0:32, 0:32]
    hu[np.hypot(row - 15.5, col - 15.5) > 16] = padding
    return hu


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


def write_acr_nema(path, k):
    """An ACR-NEMA-era CT file: no preamble, no file meta, implicit VR, no PhotometricInterpretation."""
    ct_file(path, instance=k)
    ds = pydicom.dcmread(path)
    del ds.PhotometricInterpretation
    del ds.file_meta
    ds.preamble = None
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)


def write_nan(path, k):
    with warnings.catch_warnings():  # pydicom writes it, warning that "nan" is no valid DS
        warnings.simplefilter("ignore")
        ct_file(path, instance=k, RescaleIntercept="nan")


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
    # issue 15: headers that decode into garbage
    ("ID_c_slope0", lambda p, k: ct_file(p, instance=k, RescaleSlope=0), "decode", "implausible RescaleSlope: 0"),
    ("ID_c_hu1024", lambda p, k: ct_file(p, instance=k, RescaleSlope=None, RescaleIntercept=None), "decode",
     "implausible HU values: no air around the head"),
    ("ID_c_unsigned", lambda p, k: ct_file(p, padded_head_hu(-2000), instance=k, PixelRepresentation=0), "decode",
     "implausible HU values: 21% of pixels above 3000 HU"),
    # issue 21: stored as HU + 1024 without Rescale tags, its padding outside the field of view (raw -2000) like air
    ("ID_c_hu1024padded", lambda p, k: ct_file(p, padded_head_hu(-3024), instance=k, RescaleSlope=None, RescaleIntercept=None),
     "decode", "implausible HU values: soft tissue at +1024 HU"),
    ("ID_c_columns", lambda p, k: ct_file(p, instance=k, Columns=31), "decode",
     "pixel data length does not match the header: 2048 bytes, but Rows x Columns x BitsAllocated (32 x 31 x 16 bit) "
     "make 1984"),
]


GOOD_SLICES = [
    ("ID_c_quirk12", lambda p, k: ct_file(p, instance=k, quirk12=True)),  # RSNA 12-bit storage
    ("ID_c_quirk12twin", lambda p, k: ct_file(p, instance=k)),  # the same HU stored normally
    ("ID_c_1024x700", lambda p, k: ct_file(p, head_hu(1024, 700), instance=k)),
    ("ID_c_padding3024", lambda p, k: ct_file(p, padded_head_hu(-3024), instance=k)),  # scanner padding outside the FOV
    ("ID_c_acrnema", write_acr_nema),  # legacy: read as MONOCHROME2 (single-sample), the picture of its twin
]


@pytest.fixture(scope="module")
def corpus(phantom_dir, tmp_path_factory):
    """A copy of the phantom plus every bad slice (of CORPUS_PATIENT, healthy), a file with no CSV row, a CSV image with no file and an image
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
            f.write("".join(f"{image_id}_{name},0\n" for name in cohort.LABELS))
        f.write("ID_c_somelabels_any,0\n")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        data.main(["index", "--data_dir", root, "--num_workers", "1"])
        index = cohort.load_index(root, num_workers=1)  # from the cache just written
        cache = data.prepare_slices(root, index, np.arange(len(index["id"])), 32, DICOM_1, num_workers=1)
    return {"dir": root, "index": index, "cache": cache, "output": output.getvalue()}


def summary(corpus, what):
    lines = [line for line in corpus["output"].splitlines() if line.startswith(f"{what}: skipped")]
    assert len(lines) == 1, corpus["output"]  # reported once, as one line
    return lines[0]


@pytest.mark.parametrize("image_id,write,stage,reason", BAD_SLICES, ids=[case[0][5:] for case in BAD_SLICES])
def test_bad_slice_is_a_counted_skip(corpus, image_id, write, stage, reason):
    index, cache = corpus["index"], corpus["cache"]
    path = os.path.join(corpus["dir"], "stage_2_train", f"{image_id}.dcm")
    read = readers.read_header if stage == "index" else lambda p: inputs.load_slice(p, DICOM_1, 32)
    ok, message = readers._skip_bad(read, path)  # what the worker reports for this file
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
    # the legacy file without preamble or PhotometricInterpretation decodes to the HU of the same slice stored today
    with open(os.path.join(corpus["dir"], "stage_2_train", "ID_c_acrnema.dcm"), "rb") as f:
        assert f.read(132)[128:] != b"DICM"
    assert np.array_equal(cache.images[row["ID_c_acrnema"]], cache.images[row["ID_c_quirk12twin"]])


def test_an_unforeseen_error_in_one_file_is_a_skip_not_a_crash():
    def broken_reader(path):
        return {}["no such key"]
    ok, reason = readers._skip_bad(broken_reader, "ID_x.dcm")
    assert not ok and reason == "unexpected error: KeyError: 'no such key'"
    results = list(readers.parallel_map(broken_reader, ["a", "b"], num_workers=1, desc="test"))
    assert [ok for ok, _ in results] == [False, False]


def test_the_phantom_and_its_quirk_files_still_decode(phantom_dir):
    index, _ = quiet(cohort.load_index, phantom_dir, num_workers=1)
    results = [readers._skip_bad(lambda p: inputs.load_slice(p, DICOM_1, 32), os.path.join(phantom_dir, path)) for path in index["path"]]
    bad = [reason for ok, reason in results if not ok]
    assert len(bad) == 1 and bad[0].startswith("truncated or undecodable pixel data")  # the phantom's one truncated file


def test_training_on_the_corpus_survives_every_bad_file(corpus, tmp_path, no_figures):
    # A split seed that puts the corpus patient (all the bad slices) in the training split, so train.py decodes them;
    # two reader processes and two DataLoader workers, as on a real machine.
    index = corpus["index"]
    seed = next(s for s in range(100) if CORPUS_PATIENT in cohort.split_patients(index, s)["train"])
    _, printed = quiet(train.main, tiny_train_args(corpus["dir"], tmp_path / "run", "--num_workers", 2, "--num_samples", 1000,
                                                   "--cache_dir", tmp_path / "cache", "--seed", seed))
    lines = printed.splitlines()
    assert any(line.startswith("note: train healthy slices: only ") for line in lines)
    assert summary(corpus, "index") in lines  # the index of the same files: the same skips, in the same one line
    (decoded,) = [line for line in lines if line.startswith("slices: skipped")]
    for _, _, stage, reason in BAD_SLICES:
        if stage == "decode":
            assert reason.split(":")[0] in decoded, reason
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
