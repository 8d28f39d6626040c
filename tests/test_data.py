"""readers.py, cohort.py, inputs.py and data.py: DICOM and JPG decoding, labels, the index, splits, masks, the slice
cache, the phantom, the CLI."""
import glob
import os
import pickle
import re

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

import cohort
import data
import inputs
import readers
import phantom
from helpers import edit_dicom, head_and_radius, write_ctich, write_ctich_with_masks

DICOM_1, DICOM_3 = inputs.native_input_hu("rsna", 1), inputs.native_input_hu("rsna", 3)
CTICH_1, CTICH_3 = inputs.native_input_hu("ctich", 1), inputs.native_input_hu("ctich", 3)


@pytest.fixture(scope="module")
def index(phantom_dir):
    return cohort.load_index(phantom_dir, num_workers=1)


@pytest.fixture(scope="module")
def phantom_128(tmp_path_factory):
    """A slightly larger phantom (10 patients x 8 slices at 128 px) for anatomy and bleed checks."""
    out = phantom.write_phantom(str(tmp_path_factory.mktemp("phantom128")), patients=10, slices=8, size=128, seed=1)
    return out, cohort.load_index(out, num_workers=1)


def dicom_files(phantom_dir):
    return sorted(glob.glob(os.path.join(phantom_dir, "stage_2_train", "*.dcm")))


def write_test_dicom(path, hu, **changes):
    phantom.write_ct_dicom(str(path), hu, patient_id="ID_test", study_uid="1.2.3", series_uid="1.2.3.4", instance=1, z=0.0,
                        spacing=0.5, slope=changes.pop("slope", 1.0), intercept=changes.pop("intercept", -1024.0),
                        quirk12=changes.pop("quirk12", False))
    if changes:
        edit_dicom(path, **changes)
    return str(path)


# ---------------------------------------------------------------------------------------------
# the phantom

def test_phantom_files_are_real_ct_dicom_in_the_rsna_layout(phantom_dir):
    files = dicom_files(phantom_dir)
    assert len(files) == 8 * 6
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}\.dcm", os.path.basename(f)) for f in files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    normal = [ds for ds in headers if ds.BitsStored == 16]
    assert len(normal) == 7 * 6  # one patient carries the 12-bit quirk
    ds = pydicom.dcmread(normal[0].filename)
    assert ds.Modality == "CT" and ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
    assert ds.Rows == ds.Columns == 64 and len(ds.PixelSpacing) == 2 and len(ds.ImagePositionPatient) == 3
    assert float(ds.RescaleSlope) in (0.5, 1.0) and float(ds.RescaleIntercept) in (-1024.0, -1000.0)
    assert ds.PatientID.startswith("ID_") and ds.StudyInstanceUID and ds.SeriesInstanceUID
    assert len({ds.PatientID for ds in headers}) == 8
    lines = open(os.path.join(phantom_dir, "stage_2_train.csv")).read().split()
    assert lines[0] == "ID,Label" and len(lines) == 1 + 48 * 6 + 3  # 6 rows per image, 3 duplicated rows
    assert lines[-3:] == lines[1:4] and sum(line.split(",")[0].endswith("_any") for line in lines) == 48


def test_phantom_patients_subtypes_bleeds_and_masks(phantom_128):
    out, index = phantom_128
    patients, inverse = np.unique(index["patient"], return_inverse=True)
    sick = np.bincount(inverse, weights=index["any"]) > 0
    assert sick.sum() == 5 and (~sick).sum() == 5  # half the patients are healthy on every slice
    for name in cohort.SUBTYPES:
        assert index[name].sum() > 0, f"no {name} slice"
    spans = []
    for p in np.flatnonzero(sick):
        positive = index["any"][inverse == p]
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, positive, 0])))[::2]
        spans.append(runs.max())
    assert sum(span >= 2 for span in spans) >= 4, spans  # bleeds reach neighbouring slices
    bleed_hu = []
    for position in range(len(index["id"])):
        truth = inputs.load_gt_mask(out, index["id"][position], None)
        assert (truth is not None) == bool(index["any"][position])
        if truth is not None:
            hu = readers.hu_from_dicom(os.path.join(out, index["path"][position]))
            bleed_hu.append(np.median(hu[truth]))
    assert 50 <= np.median(bleed_hu) <= 90, bleed_hu


def test_phantom_looks_like_head_ct_in_hounsfield_units(phantom_128):
    out, index = phantom_128
    sick = np.isin(index["patient"], index["patient"][index["any"] == 1])
    position = np.flatnonzero(~sick)[4]  # a mid-level slice of a healthy patient
    hu = readers.hu_from_dicom(os.path.join(out, index["path"][position]))
    brain = inputs.brain_mask_from_hu(hu)
    assert np.percentile(hu, 5) <= -950  # air (or -2000 outside the reconstruction circle)
    assert 20 <= np.median(hu[brain]) <= 45  # grey/white matter
    assert np.mean((hu[brain] > -5) & (hu[brain] < 18)) > 0.01  # CSF: sulci, ventricles
    assert 700 <= np.percentile(hu[hu > 300], 90) <= 1900  # the skull
    assert 0.1 < brain.mean() < 0.6


def test_write_phantom_cli_refuses_to_overwrite(tmp_path, capsys):
    out = str(tmp_path / "p")
    phantom.main(["--out", out, "--patients", "2", "--slices", "2", "--size", "32"])
    assert len(dicom_files(out)) == 4 and "phantom: 2 patients" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds"):
        phantom.main(["--out", out])


# ---------------------------------------------------------------------------------------------
# DICOM -> HU

def test_12bit_quirk_files_read_as_proper_hu(phantom_dir):
    quirky = [f for f in dicom_files(phantom_dir) if pydicom.dcmread(f, stop_before_pixels=True).BitsStored == 12]
    assert len(quirky) == 6
    ds = pydicom.dcmread(quirky[2])
    assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100
    naive = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.median(naive[:4, :4]) > 3000  # what a reader without the fix sees as "air"
    hu = readers.hu_from_dicom(quirky[2])
    assert abs(np.median(hu[:4, :4]) + 1000) < 10
    assert 20 <= np.median(hu[inputs.brain_mask_from_hu(hu)]) <= 45


def test_12bit_quirk_round_trip_slope_intercept_multivalue_and_non_square(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 3000, (48, 80)).astype(np.float32)
    quirk = write_test_dicom(tmp_path / "q.dcm", hu, quirk12=True)
    assert np.array_equal(readers.hu_from_dicom(quirk), hu)
    scaled = write_test_dicom(tmp_path / "s.dcm", hu, slope=0.5, intercept=-1024.0)
    assert np.abs(readers.hu_from_dicom(scaled) - hu).max() <= 0.5
    multi = write_test_dicom(tmp_path / "m.dcm", hu, RescaleSlope=[1, 2], RescaleIntercept=[-1024, 0])
    assert np.array_equal(readers.hu_from_dicom(multi), hu)  # multi-valued fields: the first value counts
    image = inputs.make_input(readers.hu_from_dicom(multi), DICOM_1, 40)
    assert image.shape == (1, 40, 40)
    assert np.allclose(image[0, :7], -1) and np.allclose(image[0, -7:], -1)  # 48 x 80 padded with air to 80 x 80


def test_bad_dicom_files_raise_badfile_with_a_reason(phantom_dir, tmp_path):
    reasons = []
    for path in dicom_files(phantom_dir):
        try:
            readers.hu_from_dicom(path)
        except readers.BadFile as error:
            reasons.append(str(error))
            assert readers.read_header(path)[0].startswith("ID_")  # the header of the truncated file still reads
    assert len(reasons) == 1 and reasons[0].startswith("truncated or undecodable pixel data")
    hu, _ = head_and_radius(32)
    no_pixels = write_test_dicom(tmp_path / "nopix.dcm", hu, PixelData=None)
    mr = write_test_dicom(tmp_path / "mr.dcm", hu, Modality="MR")
    text = tmp_path / "text.dcm"
    text.write_text("not a dicom file")
    with pytest.raises(readers.BadFile, match="no pixel data"):
        readers.hu_from_dicom(no_pixels)
    for read in (readers.hu_from_dicom, readers.read_header):
        with pytest.raises(readers.BadFile, match="modality MR, not CT"):
            read(mr)
        with pytest.raises(readers.BadFile, match="unreadable DICOM"):
            read(str(text))


# ---------------------------------------------------------------------------------------------
# windows, inputs, masks

def test_windows_and_channels():
    assert inputs.WINDOWS == {"brain": (40, 80), "subdural": (80, 200), "bone": (600, 2800)}
    assert inputs.hu_range("brain") == [0.0, 80.0] and inputs.hu_range("subdural") == [-20.0, 180.0]
    assert np.allclose(inputs.window_hu(np.array([-1000, 0, 40, 80, 3000]), 0, 80), [-1, -1, 0, 1, 1])
    assert np.allclose(inputs.window_hu(np.array([-20, 80, 180]), -20, 180), [-1, 0, 1])
    hu, _ = head_and_radius(64)
    one, three = inputs.make_input(hu, DICOM_1, 64), inputs.make_input(hu, DICOM_3, 64)
    assert one.shape == (1, 64, 64) and three.shape == (3, 64, 64) and one.dtype == np.float32
    assert np.allclose(three[0], one[0]) and np.allclose(three[0], inputs.window_hu(hu, 0, 80))
    assert np.allclose(three[1], inputs.window_hu(hu, -20, 180)) and np.allclose(three[2], inputs.window_hu(hu, -800, 2000))
    assert inputs.native_input_hu("ctich", 3) == [[-20.0, 100.0], [-20.0, 100.0], [-900.0, 2300.0]]
    with pytest.raises(ValueError):
        inputs.native_input_hu("rsna", 4)


def test_resize_is_antialiased():
    noise = np.random.default_rng(0).uniform(0, 80, (256, 256))  # uniform over the brain window: std 0.58
    small = inputs.make_input(noise, DICOM_1, 64)
    assert small.shape == (1, 64, 64) and small.std() < 0.2  # a 4x shrink averages ~16 pixels; sampling would keep ~0.4


def test_brain_mask_from_hu_on_a_synthetic_head():
    hu, radius = head_and_radius(96)
    hu[(radius < 6)] = 70.0  # a bleed in the middle
    hu[np.hypot(*(np.mgrid[0:96, 0:96] - np.array([30, 48])[:, None, None])) < 2] = 400.0  # a calcification
    mask = inputs.brain_mask_from_hu(hu)
    assert mask[48, 48] and mask[30, 48]  # bright islands inside are brain, not skull
    assert not mask[radius >= 35].any()  # no skull, scalp or air
    assert 0.75 < mask.sum() / (radius < 35).sum() < 1.0  # eroded a little
    broken, radius = head_and_radius(96, gap_degrees=40)  # skull not closed: the fallback must not leak into the scalp
    mask = inputs.brain_mask_from_hu(broken)
    row, col = np.mgrid[0:96, 0:96] - 47.5
    away_from_gap = np.abs(np.degrees(np.arctan2(row, col))) > 40
    assert mask[48, 48] and not mask[(radius >= 38) & away_from_gap].any() and mask.sum() > 0.5 * (radius < 35).sum()


def test_brain_mask_from_windowed_image_like_ctich():
    hu, radius = head_and_radius(96)
    brain = np.round((np.clip(hu, -20, 100) + 20) / 120 * 255) / 127.5 - 1  # the 8-bit L40/W120 JPG, in [-1, 1]
    mask = inputs.brain_mask_from_windowed(brain)
    assert mask[48, 48] and not mask[radius >= 35].any() and mask.sum() > 0.75 * (radius < 35).sum()


def test_brain_mask_contains_phantom_bleeds(phantom_128):
    out, index = phantom_128
    covered = {"intra-axial": [0, 0], "any": [0, 0]}
    intra_axial = (index["intraparenchymal"] | index["intraventricular"]) & ~(index["epidural"] | index["subdural"] | index["subarachnoid"])
    for position in np.flatnonzero(index["any"] == 1):
        hu = readers.hu_from_dicom(os.path.join(out, index["path"][position]))
        truth = inputs.load_gt_mask(out, index["id"][position], None)
        mask = inputs.brain_mask_from_hu(hu)
        assert (hu[mask] > -50).all()  # no air
        for kind in ("any", "intra-axial") if intra_axial[position] else ("any",):
            covered[kind][0] += (truth & mask).sum()
            covered[kind][1] += truth.sum()
    assert covered["intra-axial"][0] == covered["intra-axial"][1]
    # bleeds against the inner table lose their outer pixels: partial volume with bone, then the erosion
    assert covered["any"][0] / covered["any"][1] > 0.35


def test_gt_masks(phantom_dir, index):
    for position in range(len(index["id"])):
        truth = inputs.load_gt_mask(phantom_dir, index["id"][position], 32)
        if index["any"][position]:
            assert truth.dtype == bool and truth.shape == (32, 32)
        else:
            assert truth is None


# ---------------------------------------------------------------------------------------------
# labels, layouts, the index

def test_rsna_csv_parsing_and_errors(tmp_path):
    path = tmp_path / "labels.csv"
    rows = [f"ID_aa_{name},{int(name in ('any', 'subdural'))}" for name in cohort.LABELS]
    rows += [f"ID_bb_{name},0" for name in cohort.LABELS] + rows[:2]  # duplicated rows
    path.write_text("\ufeffID,Label\n" + "\n".join(rows) + "\n")
    labels = cohort.read_rsna_labels(str(path))
    assert labels == {"ID_aa": [1, 0, 0, 0, 0, 1], "ID_bb": [0] * 6}
    path.write_text("ID,Prob\nID_aa_any,1\n")
    with pytest.raises(SystemExit, match=f"{re.escape(str(path))}: expected the columns ID,Label"):
        cohort.read_rsna_labels(str(path))
    path.write_text("ID,Label\nID_aa_any,1\nID_aa_headache,0\n")
    with pytest.raises(SystemExit, match=f"{re.escape(str(path))}:3: cannot parse"):
        cohort.read_rsna_labels(str(path))
    path.write_text("ID,Label\nID_aa_any\n")
    with pytest.raises(SystemExit, match="cannot parse"):
        cohort.read_rsna_labels(str(path))


def test_detect_dataset_and_clear_messages(tmp_path, phantom_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"folder is empty; .*python phantom.py --out DIR"):
        cohort.detect_dataset(str(empty))
    with pytest.raises(SystemExit, match="folder is empty"):
        cohort.load_index(str(empty))
    with pytest.raises(SystemExit, match="no such folder"):
        cohort.load_index(str(tmp_path / "missing"))
    (empty / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="neither the RSNA layout"):
        cohort.detect_dataset(str(empty))
    assert cohort.detect_dataset(phantom_dir) == "rsna"
    with pytest.raises(SystemExit, match="dataset ctich needs Patients_CT/"):
        cohort.load_index(phantom_dir, dataset="ctich")
    no_images = tmp_path / "no_images"
    (no_images / "stage_2_train").mkdir(parents=True)
    (no_images / "stage_2_train.csv").write_text("ID,Label\n")
    with pytest.raises(SystemExit, match="no .dcm files"):
        cohort.load_index(str(no_images), cache_dir=str(tmp_path / "c"))


def test_index_columns_order_labels_and_cache(phantom_dir, tmp_path, monkeypatch, capsys):
    cache_dir = str(tmp_path / "cache")
    index = cohort.load_index(phantom_dir, cache_dir=cache_dir, num_workers=1)
    assert set(index) == set(cohort.INDEX_COLUMNS) and all(len(v) == 48 for v in index.values())
    assert index["z"].dtype == np.float32 and index["any"].dtype == np.int8 and index["id"].dtype.kind == "U"
    keys = list(zip(index["patient"], index["scan"], index["z"]))
    assert keys == sorted(keys) and len(set(keys)) == 48
    assert all(path == f"stage_2_train/{image_id}.dcm" for path, image_id in zip(index["path"], index["id"]))
    labels = cohort.read_rsna_labels(os.path.join(phantom_dir, "stage_2_train.csv"))
    for k in range(48):
        assert [int(index[name][k]) for name in cohort.LABELS] == labels[index["id"][k]]
    assert "48 slices, 8 patients" in capsys.readouterr().out

    def must_not_be_called(path):
        raise AssertionError("headers were read again")
    monkeypatch.setattr(cohort, "read_header", must_not_be_called)  # where build_rsna_index looks it up
    again = cohort.load_index(phantom_dir, cache_dir=cache_dir, num_workers=1)
    assert all(np.array_equal(again[name], index[name]) for name in cohort.INDEX_COLUMNS)
    assert "from" in capsys.readouterr().out


def test_index_parallel_workers_match_serial(phantom_dir, tmp_path, index):
    parallel = cohort.load_index(phantom_dir, cache_dir=str(tmp_path / "c"), num_workers=2)
    assert all(np.array_equal(parallel[name], index[name]) for name in cohort.INDEX_COLUMNS)


def test_index_skips_are_counted_and_reported_once(tmp_path, capsys):
    out = phantom.write_phantom(str(tmp_path / "p"), patients=2, slices=3, size=32, seed=2)
    image_dir = os.path.join(out, "stage_2_train")
    good = dicom_files(out)[0]
    hu, _ = head_and_radius(32)
    write_test_dicom(os.path.join(image_dir, "ID_00000000m.dcm"), hu, Modality="MR")
    open(os.path.join(image_dir, "ID_00000000t.dcm"), "w").write("not dicom")
    open(os.path.join(image_dir, "ID_00000000n.dcm"), "wb").write(open(good, "rb").read())  # no CSV rows
    with open(os.path.join(out, "stage_2_train.csv"), "a") as f:
        for image_id in ("ID_00000000m", "ID_00000000t", "ID_00000000x"):  # x: no file
            f.write("".join(f"{image_id}_{name},0\n" for name in cohort.LABELS))
    capsys.readouterr()
    index = cohort.load_index(out, cache_dir=str(tmp_path / "c"), num_workers=1)
    assert len(index["id"]) == 6
    lines = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(lines) == 1 and "skipped 4 file(s)" in lines[0]
    for reason in ("modality MR", "unreadable DICOM header", "no row in stage_2_train.csv", "file missing"):
        assert reason in lines[0]


# ---------------------------------------------------------------------------------------------
# splits

def test_patient_level_splits(index, capsys):
    splits = cohort.make_splits(index, seed=3, num_samples=10, eval_samples="all")
    assert set(splits) == {"train", "val", "test"}
    patients = {name: set(index["patient"][rows]) for name, rows in splits.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    sick = set(index["patient"][index["any"] == 1])
    assert len(sick) == 4 and not (patients["train"] & sick)  # hemorrhage patients never train
    assert len(splits["train"]) == 10 and not index["any"][splits["train"]].any()
    for name in ("val", "test"):
        rows = splits[name]
        assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
        assert set(index["any"][rows]) == {0, 1}  # both classes
        assert np.array_equal(rows, np.flatnonzero(np.isin(index["patient"], list(patients[name]))))  # "all"
    assert sick <= patients["val"] | patients["test"]
    again = cohort.make_splits(index, seed=3, num_samples=10, eval_samples="all")
    assert all(np.array_equal(splits[name], again[name]) for name in splits)
    others = [cohort.split_patients(index, seed) for seed in range(6)]
    assert len({tuple(p["train"]) for p in others}) > 1  # the seed matters
    capped = cohort.make_splits(index, seed=3, num_samples=10, eval_samples=2)
    for name in ("val", "test"):
        assert np.bincount(index["any"][capped[name]], minlength=2).tolist() == [2, 2]
        assert set(capped[name]) <= set(splits[name])
    everything = cohort.make_splits(index, seed=3, num_samples=10_000, eval_samples=2)
    assert len(everything["train"]) == 6 * len(patients["train"])
    assert (f"note: train healthy slices: only {6 * len(patients['train'])} slices available, 10000 asked for; using all"
            in capsys.readouterr().out.splitlines())


# ---------------------------------------------------------------------------------------------
# the slice cache

def test_slice_cache_decodes_once_and_serves_a_dataset(phantom_dir, tmp_path, monkeypatch, capsys):
    cache_dir = str(tmp_path / "cache")
    index = cohort.load_index(phantom_dir, cache_dir=cache_dir, num_workers=1)
    positions = np.arange(48)
    cache = data.prepare_slices(phantom_dir, index, positions[:20], 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert "slices: decoded 21" in capsys.readouterr().out  # row 20 too: the slice above row 19 in its scan
    calls = []
    real_load_slice = inputs.load_slice  # patched below in data, where load_file_slices looks it up
    monkeypatch.setattr(data, "load_slice", lambda *a, **k: calls.append(a) or real_load_slice(*a, **k))
    cache = data.prepare_slices(phantom_dir, index, positions, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert len(calls) == 27  # only the rows not decoded before
    output = capsys.readouterr().out
    assert "slices/s" in output and "truncated or undecodable pixel data" in output
    assert cache.images.shape == (48, 1, 32, 32) and cache.images.dtype == np.float16
    assert cache.masks.shape == (48, 32, 32) and cache.masks.dtype == np.uint8
    assert sorted(np.bincount(cache.state, minlength=3).tolist()) == [0, 1, 47]  # the truncated file is bad
    assert np.abs(cache.images[cache.ok(positions)].astype(np.float32)).max() <= 1
    image, mask = real_load_slice(os.path.join(phantom_dir, index["path"][5]), DICOM_1, 32)
    assert np.array_equal(cache.images[5], image) and np.array_equal(cache.masks[5], mask)

    monkeypatch.setattr(data, "load_slice", lambda *a, **k: pytest.fail("decoded again"))  # second run: memmap only
    cache = data.prepare_slices(phantom_dir, index, positions, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert "48 requested, 48 were cached, 1 bad" in capsys.readouterr().out
    dataset = data.SliceDataset(cache, index, positions)
    assert len(dataset) == 47
    item = dataset[3]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 32, 32)
    assert item["mask"].dtype == torch.bool and item["mask"].shape == (32, 32) and item["mask"].any()
    assert item["label"] == int(index["any"][item["position"]]) and isinstance(item["position"], int)
    assert np.array_equal(dataset.patients, index["patient"][dataset.positions]) and len(dataset.scans) == 47
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32)
    copy = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 1000 and np.array_equal(copy.images[7], cache.images[7])

    # min_brain_fraction keeps exactly the slices with that much intracranial area, in order
    fractions = inputs.intracranial(cache.masks[cache.ok(positions)]).reshape(47, -1).mean(1)
    threshold = float(np.median(fractions))
    kept = cache.ok(positions, min_brain_fraction=threshold)
    assert 0 < len(kept) < 47 and np.all(np.diff(kept) > 0)
    assert np.array_equal(kept, cache.ok(positions)[fractions >= threshold])
    assert len(cache.ok(positions, min_brain_fraction=1.01)) == 0


def test_slice_cache_three_channels_and_parallel_decode(phantom_dir, tmp_path, index):
    one = data.prepare_slices(phantom_dir, index, np.arange(12), 32, DICOM_1, cache_dir=str(tmp_path / "a"), num_workers=1)
    three = data.prepare_slices(phantom_dir, index, np.arange(12), 32, DICOM_3, cache_dir=str(tmp_path / "b"), num_workers=2)
    assert three.images.shape == (48, 3, 32, 32)
    ok = one.ok(np.arange(12))
    assert np.array_equal(three.ok(np.arange(12)), ok)
    assert np.array_equal(three.images[ok, 0], one.images[ok, 0]) and np.array_equal(three.masks[ok], one.masks[ok])
    assert not np.array_equal(three.images[ok, 2], three.images[ok, 0])


# ---------------------------------------------------------------------------------------------
# CT-ICH

def test_ctich_reader(tmp_path, capsys):
    root = str(tmp_path / "ctich")
    rows = write_ctich(root)
    rows.remove("52,2,0,0,0,0,0,1,0")  # a slice without a label row
    with open(os.path.join(root, "hemorrhage_diagnosis.csv"), "w", encoding="utf-8-sig", newline="") as f:
        f.write("\r\n".join(rows) + "\r\n")
    patients = os.path.join(root, "Patients_CT")
    open(os.path.join(patients, "050", "brain", "3.jpg"), "wb").write(b"\xff\xd8 broken")  # corrupt JPG
    os.remove(os.path.join(patients, "051", "bone", "3.jpg"))  # the missing bone slice
    truncated = os.path.join(patients, "052", "brain", "1.jpg")
    content = open(truncated, "rb").read()
    open(truncated, "wb").write(content[: len(content) // 2])  # header fine, pixels cut off
    assert cohort.detect_dataset(root) == "ctich"
    cache_dir = str(tmp_path / "cache")
    index = cohort.load_index(root, cache_dir=cache_dir, num_workers=1)
    summary = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(summary) == 1 and "skipped 3 file(s)" in summary[0]
    for reason in ("unreadable JPG", "bone JPG missing", "no row in hemorrhage_diagnosis.csv"):
        assert reason in summary[0]
    assert index["id"].tolist() == ["ctich_050_1", "ctich_050_2", "ctich_051_1", "ctich_051_2", "ctich_052_1"]
    assert index["patient"].tolist() == ["050", "050", "051", "051", "052"]
    assert np.array_equal(index["scan"], index["patient"]) and index["z"].tolist() == [1, 2, 1, 2, 1]
    assert index["any"].tolist() == [0, 0, 0, 1, 0] and index["intraparenchymal"].tolist() == [0, 0, 0, 1, 0]
    assert sum(index[name].sum() for name in cohort.SUBTYPES) == 1

    one = data.prepare_slices(root, index, np.arange(5), 32, CTICH_1, cache_dir=cache_dir, num_workers=1)
    assert one.state.tolist() == [1, 1, 1, 1, 2] and "unreadable JPG" in capsys.readouterr().out
    brain = np.asarray(Image.open(os.path.join(patients, "050", "brain", "1.jpg"))).astype(np.float32) / 127.5 - 1
    expected = inputs.make_input({"brain": brain}, CTICH_1, 32)
    assert np.allclose(one.images[0].astype(np.float32), expected, atol=2e-3)
    mask = inputs.intracranial(one.masks[3])
    assert mask[16, 16] and not mask[0, 0] and not mask[16, 31]
    three = data.prepare_slices(root, index, np.arange(5), 32, CTICH_3, cache_dir=cache_dir, num_workers=1)
    assert np.array_equal(three.images[:4, 0], three.images[:4, 1])  # no subdural window: brain again
    assert not np.array_equal(three.images[:4, 2], three.images[:4, 0])  # channel 3 is the bone JPG
    assert np.array_equal(three.images[:4, 0], one.images[:4, 0])

    with pytest.raises(SystemExit, match="dataset rsna needs stage_2_train/"):
        cohort.load_index(root, dataset="rsna")
    with open(os.path.join(root, "hemorrhage_diagnosis.csv"), "w") as f:
        f.write("PatientNumber,SliceNumber,Epidural\n50,1,0\n")
    with pytest.raises(SystemExit, match=r"hemorrhage_diagnosis.csv: missing column\(s\) No_Hemorrhage, Intraparenchymal"):
        cohort.load_index(root, cache_dir=str(tmp_path / "other"))


def test_splits_of_a_run_trained_with_bleed_train_fraction_are_refused_in_one_line(phantom_dir, tmp_path):
    """--bleed_train_fraction (hemorrhage patients' far slices in training) is removed: a saved splits record that says
    a run used it is refused, not read as the standard protocol."""
    index = cohort.load_index(phantom_dir, num_workers=1)
    record = cohort.splits_record(cohort.split_patients(index, seed=3), seed=3, data_dir=phantom_dir, dataset="rsna")
    assert "bleed_train_fraction" not in record
    assert {name: list(p) for name, p in cohort.apply_saved_splits(index, record).items()} == {
        name: list(p) for name, p in cohort.split_patients(index, seed=3).items()}
    old = dict(record, bleed_train_fraction=0.5)
    for read in (lambda: cohort.apply_saved_splits(index, old), lambda: cohort.load_splits_record({"splits": old}, "run/best_model.pt")):
        with pytest.raises(SystemExit) as stop:
            read()
        assert "trained with --bleed_train_fraction 0.5, an option removed in ct-pddpm" in str(stop.value)
        assert str(stop.value).startswith("error: ") and "\n" not in str(stop.value)
    assert cohort.load_splits_record({"splits": dict(record, bleed_train_fraction=0.0)}, "run/best_model.pt") is not None


def test_ctich_bleed_masks_read_when_present(tmp_path):
    root = str(tmp_path / "ctich")
    write_ctich_with_masks(root)
    index = cohort.load_index(root, cache_dir=str(tmp_path / "cache"), num_workers=1)
    assert not any("HGE" in str(p) for p in index["path"]) and len(index["id"]) == 8  # masks are not slices
    mask = inputs.load_gt_mask(root, "ctich_051_2", 32)
    _, radius = head_and_radius(32)
    assert mask.shape == (32, 32) and mask.dtype == bool
    assert mask[radius < 2].all() and not mask[radius > 9].any()  # JPEG ringing is cut at mid-grey
    assert inputs.load_gt_mask(root, "ctich_050_2", 32) is None  # no mask file: None, as for the phantom
    with pytest.raises(readers.BadFile, match=r"052/brain/1_HGE_Seg.jpg: mask of 40x64 pixels, its slice is 64x64"):
        inputs.load_gt_mask(root, "ctich_052_1", 32)


# ---------------------------------------------------------------------------------------------
# CLI

def test_cli_index_and_show(phantom_dir, tmp_path, capsys):
    data.main(["index", "--data_dir", phantom_dir, "--cache_dir", str(tmp_path / "c"), "--num_workers", "1"])
    output = capsys.readouterr().out
    assert "48 slices, 8 patients (4 with hemorrhage, 4 without)" in output and "positive slices: any" in output
    png = str(tmp_path / "grid.png")
    data.main(["show", "--data_dir", phantom_dir, "--out", png, "--cache_dir", str(tmp_path / "c"), "--columns", "4"])
    assert os.path.getsize(png) > 10_000
    by_level = str(tmp_path / "by_level.png")
    data.main(["show", "--data_dir", phantom_dir, "--out", by_level, "--cache_dir", str(tmp_path / "c"), "--columns", "2",
               "--by_level", "--scored_region", "no_bone_3d"])  # reads each shown slice's neighbours too
    assert os.path.getsize(by_level) > 10_000
    with pytest.raises(SystemExit, match="no such folder"):
        data.main(["index", "--data_dir", str(tmp_path / "nothing")])


def test_one_slice_as_dicom_and_as_ctich_jpgs_gives_the_same_model_input(tmp_path):
    """The input representation belongs to the model: the same head written once as DICOM and once as CT-ICH's two
    8-bit JPG windows gives the same input, within JPEG rounding, whichever layout the model was trained on."""
    hu, radius = head_and_radius(128)
    row, col = np.mgrid[0:128, 0:128]
    brain = radius < 35
    hu[brain] = 30 + 25 * np.sin(row[brain] / 6.0) * np.cos(col[brain] / 9.0)  # grey/white-matter-like texture, 5-55 HU
    hu[brain & (np.hypot(row - 50, col - 70) < 9)] = 75.0  # an acute-blood blob
    dicom = write_test_dicom(tmp_path / "slice.dcm", hu)
    for name, (low, high) in inputs.JPG_WINDOWS.items():  # CT-ICH: brain L40/W120, bone L700/W3200, 8 bits
        folder = tmp_path / "Patients_CT" / "001" / name
        folder.mkdir(parents=True)
        grey = np.round(np.clip((hu - low) / (high - low), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(grey).save(folder / "1.jpg", quality=95)
    jpg = str(tmp_path / "Patients_CT" / "001" / "brain" / "1.jpg")
    for input_hu in (CTICH_1, CTICH_3, DICOM_1, [[0.0, 80.0], [-800.0, 2000.0]]):
        from_dicom, dicom_mask = inputs.load_slice(dicom, input_hu, 64)
        from_jpg, jpg_mask = inputs.load_slice(jpg, input_hu, 64)
        for k, (low, high) in enumerate(input_hu):
            diff = np.abs(from_dicom[k].astype(np.float32) - from_jpg[k].astype(np.float32))
            # half a grey level of the stored window is 1 / 255 of its width; JPEG adds a little at sharp edges
            stored = 120.0 if inputs.jpg_source(low, high) == "brain" else 3200.0
            step = 2 * (stored / 255) / (high - low)  # one grey level in this channel's [-1, 1] units
            assert diff.mean() < step and np.percentile(diff, 99) < 6 * step, (input_hu, k, diff.mean(), step)
        assert (dicom_mask == jpg_mask).mean() > 0.98  # the skull is found from either
    # a DICOM-trained 3-channel model cannot be fed from them: its subdural window (-20..180 HU) saturates in the
    # brain JPG and keeps only 16 grey levels in the bone JPG
    with pytest.raises(SystemExit, match=r"input channel 1 is -20\.\.180 HU"):
        inputs.check_input_hu(DICOM_3, "ctich", str(tmp_path))
