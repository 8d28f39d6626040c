"""Real-world inputs (issue 14): compressed DICOM, files without a DICOM preamble, a transfer syntax no installed
decoder reads, NIfTI volumes with masks (any orientation) through index, splits, training and evaluation with
pixel metrics, and predict.py on unlabelled DICOM series and NIfTI volumes. Every file is written here (the one
JPEG Lossless slice pydicom cannot encode is committed: tests/fixtures/make_jpeg_lossless.py made it)."""
import contextlib
import io
import json
import os
import shutil

import nibabel
import numpy as np
import pydicom
import pytest
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from pydicom.errors import InvalidDicomError
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLosslessSV1, RLELossless

import cohort
import data
import evaluate
import inputs
import phantom
import predict
import readers
import train
from helpers import ct_file, edit_dicom, quiet, read_csv, stand_in_figures, tiny_train_args

DICOM_1 = inputs.native_input_hu("rsna", 1)  # the brain window, as a DICOM-trained model has it

HERE = os.path.dirname(os.path.abspath(__file__))


def reference_hu(size=64):
    """Integer HU of a head-like slice with texture, from arithmetic only (tests/fixtures/ct_jpeg_lossless.dcm holds it)."""
    row, col = np.mgrid[0:size, 0:size]
    radius = np.hypot(row - (size - 1) / 2, col - (size - 1) / 2) / (size / 2)
    hu = np.full((size, size), -1000.0)
    hu[radius < 0.92] = 40.0
    hu[radius < 0.83] = 1000.0
    hu[radius < 0.73] = 30.0
    hu += (row * 7 + col * 13) % 37 - 18  # texture, so that the codecs have something to encode
    return hu.astype(np.float32)


def write_slice(path, hu=None, instance=1, patient="ID_formats", series="1.2.826.0.1.14.1"):
    phantom.write_ct_dicom(str(path), reference_hu() if hu is None else hu, patient_id=patient, study_uid="1.2.826.0.1.14",
                           series_uid=series, instance=instance, z=5.0 * instance, spacing=0.5, slope=1.0, intercept=-1024.0)
    return str(path)


def compressed_copy(src, dst, syntax, **options):
    ds = pydicom.dcmread(src)
    ds.compress(syntax, **options)  # pydicom's own RLE encoder; JPEG 2000 through pylibjpeg-openjpeg
    ds.save_as(dst, enforce_file_format=True)
    return str(dst)


# ---------------------------------------------------------------------------------------------
# DICOM

@pytest.mark.parametrize("syntax,options", [(RLELossless, {}), (JPEG2000Lossless, {}), (JPEG2000, {"j2k_cr": [1]})],
                         ids=["rle", "j2k-lossless", "j2k-ratio1"])
def test_compressed_slice_decodes_to_the_same_hu(tmp_path, syntax, options):
    plain = write_slice(tmp_path / "plain.dcm")
    packed = compressed_copy(plain, tmp_path / "packed.dcm", syntax, **options)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    assert os.path.getsize(packed) < os.path.getsize(plain)
    assert readers.read_header(packed) == readers.read_header(plain)
    np.testing.assert_array_equal(readers.hu_from_dicom(packed), readers.hu_from_dicom(plain))  # lossless: exact
    np.testing.assert_array_equal(readers.hu_from_dicom(plain), reference_hu())


def test_jpeg_lossless_slice_decodes_to_the_same_hu(tmp_path):
    """1.2.840.10008.1.2.4.70, the common CT compression that issue 14 saw skipped, through pylibjpeg-libjpeg."""
    packed = os.path.join(HERE, "fixtures", "ct_jpeg_lossless.dcm")
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert readers.decoder_problem(pydicom.dcmread(packed, stop_before_pixels=True)) is None
    np.testing.assert_array_equal(readers.hu_from_dicom(packed), readers.hu_from_dicom(write_slice(tmp_path / "plain.dcm")))


def test_files_without_a_preamble_read(tmp_path):
    plain = write_slice(tmp_path / "plain.dcm")
    variants = {}
    ds = pydicom.dcmread(plain)  # file meta, but no 128-byte preamble and no "DICM"
    ds.preamble = None
    ds.save_as(tmp_path / "no_preamble.dcm")
    variants["no_preamble"] = tmp_path / "no_preamble.dcm"
    ds = pydicom.dcmread(plain)  # the bare data set, implicit VR, as old archives store it: no file meta at all
    ds.preamble = None
    del ds.file_meta
    ds.save_as(tmp_path / "bare.dcm", implicit_vr=True, little_endian=True)
    variants["bare"] = tmp_path / "bare.dcm"
    ds = pydicom.dcmread(compressed_copy(plain, tmp_path / "rle.dcm", RLELossless))
    ds.preamble = None
    ds.save_as(tmp_path / "rle_no_preamble.dcm")
    variants["rle_no_preamble"] = tmp_path / "rle_no_preamble.dcm"
    for name, path in variants.items():
        assert open(path, "rb").read(132)[128:] != b"DICM", name
        with pytest.raises(InvalidDicomError):
            pydicom.dcmread(path)
        assert readers.read_header(str(path)) == readers.read_header(plain), name
        np.testing.assert_array_equal(readers.hu_from_dicom(str(path)), reference_hu(), err_msg=name)
    text = tmp_path / "notes.dcm"  # force=True reads anything: without an image header it stays a skip
    text.write_text("PatientID,Rows\nnot,a dicom\n")
    for read in (readers.read_header, readers.hu_from_dicom):
        with pytest.raises(readers.BadFile, match="no DICOM preamble, and no image header"):
            read(str(text))


def rsna_folder(root, write, n=3):
    """An RSNA-layout folder of n slices (write(path, k) makes slice k) with their label rows."""
    image_dir = os.path.join(root, "stage_2_train")
    os.makedirs(image_dir)
    rows = ["ID,Label"]
    for k in range(n):
        write(os.path.join(image_dir, f"ID_fmt{k}.dcm"), k)
        rows += [f"ID_fmt{k}_{name},0" for name in cohort.LABELS]
    with open(os.path.join(root, "stage_2_train.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return image_dir


class Unavailable:
    """What pydicom's decoder registry says of a transfer syntax whose decoder plugins are not installed."""
    is_available = False
    missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]


def test_folder_without_its_decoder_stops_with_one_line(tmp_path, monkeypatch):
    root = str(tmp_path / "j2k")
    image_dir = rsna_folder(root, lambda path, k: compressed_copy(write_slice(path + ".plain", instance=k + 1), path,
                                                                  JPEG2000Lossless))
    real = readers.get_decoder  # pydicom's, patched where decoder_problem and installed_decoders look it up
    monkeypatch.setattr(readers, "get_decoder", lambda syntax: Unavailable() if syntax == JPEG2000Lossless else real(syntax))
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        cohort.load_index(root, num_workers=1)
    message = str(e.value)
    assert message.startswith(f"error: {root}: no usable slices (all 3 skipped): no decoder installed for JPEG 2000 "
                              "Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90): pip install pylibjpeg "
                              "pylibjpeg-openjpeg (e.g. ID_fmt0.dcm)")
    assert "\n" not in message
    with pytest.raises(readers.BadFile, match=r"^no decoder installed for JPEG 2000 .*: pip install pylibjpeg pylibjpeg-openjpeg$"):
        readers.hu_from_dicom(os.path.join(image_dir, "ID_fmt0.dcm"))
    monkeypatch.undo()  # the decoder "installed": the index is built again, not served from its cache
    with contextlib.redirect_stdout(io.StringIO()):
        assert len(cohort.load_index(root, num_workers=1)["id"]) == 3


def test_unsupported_transfer_syntax_is_a_counted_skip(tmp_path):
    def write(path, k):
        write_slice(path, instance=k + 1)
        content = open(path, "rb").read()  # the same length as Explicit VR Little Endian's UID, so the file stays valid
        open(path, "wb").write(content.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.99999.1.2.1\x00", 1))
    root = str(tmp_path / "odd")
    rsna_folder(root, lambda path, k: write_slice(path, instance=k + 1) if k else write(path, k))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        index = cohort.load_index(root, num_workers=1)
    assert list(index["id"]) == ["ID_fmt1", "ID_fmt2"]
    assert "1 unsupported transfer syntax 1.2.840.99999.1.2.1" in out.getvalue()


# ---------------------------------------------------------------------------------------------
# NIfTI

def canonical_volume(slices):
    """RAS+ voxel array [X, Y, Z] of slices [Z, rows, columns] in DICOM's display layout (rows anterior -> posterior,
    columns patient's right -> left), i.e. what readers.axial_slices must give back."""
    return np.flip(np.asarray(slices).transpose(2, 1, 0), (0, 1))


def save_nifti(path, canonical, axcodes, spacing=0.75, z0=-20.0, hu=True):
    """Save a RAS+ array in another stored orientation (axcodes), with the affine that says so. -> the affine."""
    affine = np.diag([spacing, spacing, 5.0, 1.0])
    affine[:3, 3] = [-20.0, -25.0, z0]
    to_stored = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes))
    stored = apply_orientation(canonical, to_stored)
    stored_affine = affine @ inv_ornt_aff(to_stored, canonical.shape)
    assert aff2axcodes(stored_affine) == tuple(axcodes)
    if hu:  # int16 + scl_slope / scl_inter, as CT volumes are stored
        image = nibabel.Nifti1Image(np.round(stored + 1024).astype(np.int16), stored_affine)
        image.header.set_slope_inter(1.0, -1024.0)
    else:
        image = nibabel.Nifti1Image(stored.astype(np.uint8), stored_affine)
    nibabel.save(image, path)
    return stored_affine


# (volume, stored orientation, bleed subtype or None)
VOLUMES = [("healthy_a", "RAS", None), ("healthy_b", "LPS", None), ("bleed_c", "PIL", "intraparenchymal"),
           ("bleed_d", "RAS", "intraventricular")]


def write_nifti_set(root, size=64, n_slices=6, seed=3):
    """images/<v>.nii.gz + labels/<v>.nii.gz (BHSD-style: mask value = subtype number) of phantom heads.
    -> {volume: (slices HU [Z, H, W], mask values [Z, H, W], stored affine)}."""
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "labels"))
    rng = np.random.default_rng(seed)
    written = {}
    for name, axcodes, kind in VOLUMES:
        head = phantom.random_head(rng, size)
        levels = np.linspace(head["z_low"], head["z_high"], n_slices)
        bleeds = [phantom.random_bleed(rng, kind, levels)] if kind else []
        slices, masks = [], []
        for k, level in enumerate(levels):
            hu, bleed = phantom.draw_slice(rng, head, level, k, bleeds, size)
            slices.append(np.round(hu))
            value = cohort.SUBTYPES.index(kind) + 1 if kind else 0
            masks.append(np.where(bleed.get(kind, np.zeros((size, size), bool)), value, 0) if kind else np.zeros((size, size)))
        slices, masks = np.array(slices, np.float32), np.array(masks, np.uint8)
        affine = save_nifti(os.path.join(root, "images", f"{name}.nii.gz"), canonical_volume(slices), axcodes)
        save_nifti(os.path.join(root, "labels", f"{name}.nii.gz"), canonical_volume(masks), axcodes, hu=False)
        written[name] = (slices, masks, affine)
    return written


@pytest.fixture(scope="module")
def nifti_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nifti") / "bhsd")
    return root, write_nifti_set(root)


def test_nifti_index_slices_are_axial_and_unflipped(nifti_set):
    root, written = nifti_set
    assert cohort.detect_dataset(root) == "nifti"
    with contextlib.redirect_stdout(io.StringIO()):
        index = cohort.load_index(root, num_workers=1)
    for name, axcodes, kind in VOLUMES:
        slices, masks, affine = written[name]
        rows = np.flatnonzero(index["scan"] == name)
        assert [index["id"][r] for r in rows] == [f"{name}#{k}" for k in range(len(slices))]
        assert set(index["patient"][rows]) == {name} and set(index["path"][rows]) == {f"images/{name}.nii.gz"}
        np.testing.assert_allclose(index["z"][rows], -20.0 + 5.0 * np.arange(len(slices)))  # mm, feet to head
        path = os.path.join(root, "images", f"{name}.nii.gz")
        np.testing.assert_array_equal(readers.read_nifti_slices(path, list(range(len(slices)))), slices, err_msg=axcodes)
        assert index["any"][rows].tolist() == masks.any(axis=(1, 2)).astype(int).tolist()
        for subtype in cohort.SUBTYPES:
            expected = masks.any(axis=(1, 2)) if subtype == kind else np.zeros(len(masks), bool)
            assert index[subtype][rows].tolist() == expected.astype(int).tolist(), (name, subtype)
        for k in range(len(slices)):  # the pixel-metric mask is the written one, on the same pixels
            truth = inputs.load_gt_mask(root, cohort.slice_id(name, k), None)
            np.testing.assert_array_equal(truth, masks[k] > 0)
    assert index["any"].sum() > 0
    # the slice cache reads each volume once and holds what make_input makes of the written slices
    with contextlib.redirect_stdout(io.StringIO()):
        cache = data.prepare_slices(root, index, np.arange(len(index["id"])), 32, DICOM_1, num_workers=1)
    for row in range(len(index["id"])):
        name, k = cohort.split_slice_id(index["id"][row])
        expected = inputs.make_input(written[name][0][k], DICOM_1, 32).astype(np.float16)
        assert cache.state[row] == 1
        np.testing.assert_array_equal(cache.images[row], expected)
    # a volume's stored orientation is undone exactly by nifti_volume (what predict.py saves maps with)
    slices, _, affine = written["bleed_c"]
    stored = nibabel.load(os.path.join(root, "images", "bleed_c.nii.gz")).get_fdata()
    np.testing.assert_array_equal(readers.nifti_volume(slices, affine), stored)


def test_nifti_masks_binary_classes_patient_table_and_skips(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "ct_scans"))
    os.makedirs(os.path.join(root, "masks"))
    head = np.stack([reference_hu(32)] * 4)
    mask = np.zeros((4, 32, 32), np.uint8)
    mask[1, 10:14, 10:14] = 255  # CT-ICH: 0/255, a bleed of no given subtype
    mask[2, 10:14, 10:14] = 2
    for name in ("a", "b", "c", "d"):
        save_nifti(os.path.join(root, "ct_scans", f"{name}.nii"), canonical_volume(head), "RAS")
    for name in ("a", "b"):
        save_nifti(os.path.join(root, "masks", f"{name}.nii.gz"), canonical_volume(mask), "RAS", hu=False)
    save_nifti(os.path.join(root, "masks", "d.nii.gz"), canonical_volume(mask[:3]), "RAS", hu=False)  # wrong shape
    with open(os.path.join(root, "patients.csv"), "w") as f:
        f.write("scan,patient\na,P1\nb,P1\n")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        index = cohort.load_index(root, num_workers=1)
    assert sorted(set(index["scan"])) == ["a", "b"] and set(index["patient"]) == {"P1"}
    assert index["any"].tolist() == [0, 1, 1, 0] * 2 and sum(index[name].sum() for name in cohort.SUBTYPES) == 0
    assert "1 no mask of the same name" in out.getvalue() and "ct_scans/c.nii" in out.getvalue()
    assert "mask d.nii.gz of shape (32, 32, 3)" in out.getvalue()
    splits = cohort.make_splits(index, 0, "all", "all")
    assert sum(np.isin(np.flatnonzero(index["patient"] == "P1"), rows).any() for rows in splits.values()) == 1
    # a dataset.json (BHSD, nnU-Net) names the mask values
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": {"0": "background", "1": "hemorrhage", "2": "EDH"}}, f)
    with contextlib.redirect_stdout(io.StringIO()):
        index = cohort.load_index(root, num_workers=1)  # dataset.json is in the index's signature: read again
    assert index["epidural"].tolist() == [0, 0, 1, 0] * 2 and index["any"].tolist() == [0, 1, 1, 0] * 2
    assert cohort.nifti_mask_classes(root, "binary") == {2: "epidural"}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": {"background": 0, "subdural": 1}}, f)  # nnU-Net v2 spelling
    assert cohort.nifti_mask_classes(root, "binary") == {1: "subdural"}


@pytest.fixture(scope="module")
def nifti_run(nifti_set, tmp_path_factory):
    """A tiny model trained on the NIfTI set (its healthy volumes), in this process (figures stood in for)."""
    root, _ = nifti_set
    out = tmp_path_factory.mktemp("nifti_run") / "run"
    with pytest.MonkeyPatch.context() as patch:
        stand_in_figures(patch)
        quiet(train.main, tiny_train_args(root, out, "--dataset", "nifti"))
    return out


def test_nifti_trains_and_evaluates_with_pixel_metrics(nifti_run, nifti_set, tmp_path, no_figures):
    root, written = nifti_set
    _, printed = quiet(evaluate.main, ["--checkpoint", str(nifti_run / "best_model.pt"), "--output_dir", str(tmp_path / "ev"),
                                       "--n_boot", "0"])
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    pixel = report["pixel"]
    # every scored bleed slice has its mask from labels/: the bleed pixels are those of the written masks inside the
    # brain mask, so at most all of them, and most of them
    rows = read_csv(tmp_path / "ev" / "scores.csv")
    assert pixel is not None and pixel["positive_slices_without_mask"] == 0 and pixel["n_slices"] == len(rows)
    assert pixel["pixel_roc_auc"] is not None and pixel["dice_threshold_chosen_on"] == "val"
    assert report["counts"]["hemorrhage_slices"] == sum(int(row["any"]) for row in rows) > 0
    assert {row["scan"] for row in rows} <= {name for name, *_ in VOLUMES}
    assert "pixel (inside brain mask)" in printed


def test_predict_on_nifti_volumes_writes_aligned_maps(nifti_run, nifti_set, tmp_path):
    root, written = nifti_set
    out = tmp_path / "pred"
    quiet(predict.main, ["--checkpoint", str(nifti_run / "best_model.pt"), "--data_dir", root, "--output_dir", str(out),
                         "--num_workers", "1", "--top", "2"])
    scans = read_csv(out / "scans.csv")
    assert sorted(row["scan"] for row in scans) == sorted(name for name, *_ in VOLUMES)  # labels/ is not read as scans
    slices = read_csv(out / "slices.csv")
    assert len(slices) == sum(len(written[name][0]) for name in written)
    for row in scans:
        scored = [float(r["brain_p99"]) for r in slices if r["scan"] == row["scan"] and r["brain_p99"]]
        assert float(row["score_max_brain_p99"]) == pytest.approx(max(scored), rel=1e-5)
        assert (out / "overlays" / f"{row['scan']}.png").read_bytes()[:4] == b"\x89PNG"
    for name, *_ in VOLUMES:
        source = nibabel.load(os.path.join(root, "images", f"{name}.nii.gz"))
        saved = nibabel.load(out / "maps" / f"{name}.nii.gz")
        assert saved.shape == source.shape and np.allclose(saved.affine, source.affine)
        assert saved.get_data_dtype() == np.float32 and np.isfinite(saved.get_fdata()).all()
        assert saved.get_fdata().max() > 0
    with pytest.raises(SystemExit) as e:  # a second run does not mix its files with these
        predict.main(["--checkpoint", str(nifti_run / "best_model.pt"), "--data_dir", root, "--output_dir", str(out)])
    assert str(e.value) == f"error: {out}: output dir is not empty; use --overwrite to replace its files"


def test_predict_on_an_unlabelled_dicom_folder(nifti_run, phantom_dir, tmp_path, no_figures):
    """The phantom's slices with no CSV, in nested folders, one without its preamble, one without a PatientID."""
    scans_dir = tmp_path / "scans"
    shutil.copytree(os.path.join(phantom_dir, "stage_2_train"), scans_dir / "export" / "a")
    moved = sorted((scans_dir / "export" / "a").iterdir())[:5]
    (scans_dir / "export" / "b").mkdir()
    for path in moved:
        path.rename(scans_dir / "export" / "b" / path.name)
    no_preamble = scans_dir / "export" / "b" / moved[0].name
    ds = pydicom.dcmread(no_preamble)
    ds.preamble = None
    ds.save_as(no_preamble)
    edit_dicom(scans_dir / "export" / "b" / moved[1].name, PatientID=None)  # anonymised: no PatientID
    headers = {}
    for path in (scans_dir / "export").rglob("*.dcm"):
        with contextlib.suppress(readers.BadFile):
            headers[str(path)] = readers.read_header(str(path), need_patient=False)
    n_series = len({h[2] for h in headers.values()})
    out = tmp_path / "pred"
    quiet(predict.main, ["--checkpoint", str(nifti_run / "best_model.pt"), "--data_dir", str(scans_dir), "--output_dir",
                         str(out), "--num_workers", "1"])
    scans = read_csv(out / "scans.csv")
    assert len(scans) == n_series == 8  # grouped by SeriesInstanceUID, wherever the files are
    slices = read_csv(out / "slices.csv")
    assert len(slices) == len(headers)
    for scan in scans:
        rows = [r for r in slices if r["scan"] == scan["scan"]]
        assert [float(r["z"]) for r in rows] == sorted(float(r["z"]) for r in rows)  # ordered by position
        maps = np.load(out / "maps" / f"{scan['scan']}.npy")
        assert maps.shape == (len(rows), 64, 64) and maps.dtype == np.float32
    notes = [r["note"] for r in slices if r["note"]]
    assert any(note.startswith("truncated or undecodable pixel data") for note in notes)  # the phantom's cut file


def test_predict_maps_of_a_dicom_series_and_of_the_same_volume_as_nifti_share_the_affine(nifti_run, tmp_path):
    """A phantom series written as DICOM, and the same volume as NIfTI with the affine dcm2niix gives such a series
    (LPS -> RAS: x and y flipped): predict.py writes both maps with that affine, and the same values."""
    rng = np.random.default_rng(5)
    size, spacing, z0, n = 64, 0.75, -12.0, 6
    head = phantom.random_head(rng, size)
    slices = np.array([np.round(phantom.draw_slice(rng, head, level, k, [], size)[0])
                       for k, level in enumerate(np.linspace(head["z_low"], head["z_high"], n))], np.float32)
    (tmp_path / "dicom").mkdir()
    for k, hu in enumerate(slices):
        phantom.write_ct_dicom(str(tmp_path / "dicom" / f"s{k}.dcm"), hu, patient_id="ID_geo", study_uid="1.2.826.0.1.21",
                               series_uid="1.2.826.0.1.21.1", instance=k + 1, z=z0 + 5.0 * k, spacing=spacing, slope=1.0,
                               intercept=-1024.0)
    # the phantom's ImagePositionPatient is (-columns * spacing / 2, -rows * spacing / 2, z) in LPS
    affine = np.array([[-spacing, 0, 0, size * spacing / 2], [0, -spacing, 0, size * spacing / 2], [0, 0, 5.0, z0],
                       [0, 0, 0, 1]])
    (tmp_path / "nifti").mkdir()
    image = nibabel.Nifti1Image(np.round(slices.transpose(2, 1, 0) + 1024).astype(np.int16), affine)
    image.header.set_slope_inter(1.0, -1024.0)
    nibabel.save(image, tmp_path / "nifti" / "geo.nii.gz")
    maps = {}
    for kind in ("dicom", "nifti"):
        out = tmp_path / f"pred_{kind}"
        with contextlib.redirect_stdout(io.StringIO()):
            predict.main(["--checkpoint", str(nifti_run / "best_model.pt"), "--data_dir", str(tmp_path / kind),
                          "--output_dir", str(out), "--num_workers", "1", "--top", "0"])
        (scan,) = read_csv(out / "scans.csv")
        assert scan["note"] == "" and scan["maps"].split(";")[0].endswith(".nii.gz")
        maps[kind] = nibabel.load(scan["maps"].split(";")[0])
    assert np.allclose(maps["dicom"].affine, affine) and np.allclose(maps["nifti"].affine, affine)
    assert maps["dicom"].shape == maps["nifti"].shape == (size, size, n)
    np.testing.assert_allclose(maps["dicom"].get_fdata(), maps["nifti"].get_fdata(), atol=1e-6)
    assert maps["dicom"].get_fdata().max() > 0


def write_series(folder, positions):
    """A series of one patient's slices (helpers.ct_file) at these ImagePositionPatient values."""
    folder.mkdir()
    for k, position in enumerate(positions):
        ct_file(folder / f"s{k}.dcm", instance=k + 1, ImagePositionPatient=[float(v) for v in position])
    return [str(folder / f"s{k}.dcm") for k in range(len(positions))]


@pytest.mark.parametrize("positions,note,dicom_maps", [
    ([(-12, -12 + 5 * k * np.tan(np.radians(8.5)), 5 * k) for k in range(4)], "gantry tilt of 8.5 degrees", True),
    ([(-12, -12, z) for z in (0, 5, 15, 20)], "uneven slice spacing (5 to 10 mm: a missing or stray slice?)", True),
    ([(-12, -12, z) for z in (0, 5, 5, 10)], "its slice positions are not in one order along the slice normal", False),
], ids=["tilted", "slice_missing", "repeated"])
def test_a_series_without_one_affine_gets_a_note_and_no_nifti(nifti_run, tmp_path, positions, note, dicom_maps, no_figures):
    paths = write_series(tmp_path / "series", positions)
    affine, why_not = readers.series_affine([readers.read_geometry(path) for path in paths])
    assert affine is None and why_not.startswith(note)
    out = tmp_path / "pred"
    _, printed = quiet(predict.main, ["--checkpoint", str(nifti_run / "best_model.pt"), "--data_dir", str(tmp_path / "series"),
                                      "--output_dir", str(out), "--num_workers", "1", "--top", "0"])
    (scan,) = read_csv(out / "scans.csv")
    assert scan["note"].startswith(f"no NIfTI map: {note}") and f"note: {scan['scan']}: no NIfTI map: {note}" in printed
    # the maps on each slice's own pixels, and as DICOM objects that carry each frame's own position (not where two
    # slices share one); no NIfTI
    ends = (".npy", "_map.dcm", "_seg.dcm") if dicom_maps else (".npy",)
    assert sorted(os.listdir(out / "maps")) == [f"{scan['scan']}{end}" for end in ends]
