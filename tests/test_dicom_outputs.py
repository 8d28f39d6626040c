"""predict.py writes DICOM objects a viewer opens for DICOM input (dicom_outputs, highdicom): a Parametric Map of the
anomaly map and a Segmentation of the map above the run's threshold, referencing the source series, each frame at
its source slice's position, for a gantry-tilted series too."""
import contextlib
import io
import os

import numpy as np
import pydicom
import pytest

import cohort
import phantom
import predict
from fake_runs import write_cv_run


@pytest.fixture(scope="module")
def run_dir(phantom_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_outputs")
    write_cv_run(str(root / "run"), cohort.load_index(phantom_dir, num_workers=1), phantom_dir, seed=1)
    return str(root / "run")


def one_series(folder, tilt_mm=0.0):
    """A 5-slice phantom series; tilt_mm shifts each slice's position along y by that much per slice (gantry tilt)."""
    phantom.write_phantom(folder, patients=1, slices=5, size=32, seed=3)
    paths = sorted(os.path.join(folder, "stage_2_train", name) for name in os.listdir(os.path.join(folder, "stage_2_train")))
    for path in paths:
        ds = pydicom.dcmread(path)
        position = [float(v) for v in ds.ImagePositionPatient]
        position[1] += tilt_mm * (ds.InstanceNumber - 1)
        ds.ImagePositionPatient = position
        ds.save_as(path)
    return os.path.join(folder, "stage_2_train")


@pytest.mark.parametrize("tilt_mm", [0.0, 1.5], ids=["straight", "tilted"])
def test_parametric_map_and_seg_match_the_maps_and_their_sources(run_dir, tmp_path, tilt_mm):
    scans = one_series(str(tmp_path / "data"), tilt_mm)
    out = tmp_path / "pred"
    with contextlib.redirect_stdout(io.StringIO()):
        predict.main(["--checkpoint", run_dir, "--data_dir", scans, "--output_dir", str(out), "--num_workers", "0"])
    names = os.listdir(out / "maps")
    stem = [name[:-len("_map.dcm")] for name in names if name.endswith("_map.dcm")][0]
    maps = np.load(out / "maps" / f"{stem}.npy")
    sources = {}
    for name in os.listdir(scans):
        ds = pydicom.dcmread(os.path.join(scans, name), stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
    order = sorted(sources, key=lambda uid: float(sources[uid].ImagePositionPatient[2]))  # the .npy: lowest slice first
    pm = pydicom.dcmread(out / "maps" / f"{stem}_map.dcm")
    seg = pydicom.dcmread(out / "maps" / f"{stem}_seg.dcm")
    assert pm.SOPClassUID.name == "Parametric Map Storage" and seg.SOPClassUID.name == "Segmentation Storage"
    series_uid = next(iter(sources.values())).SeriesInstanceUID
    for derived in (pm, seg):
        assert derived.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        assert derived.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    frame_of_reference = pm.FrameOfReferenceUID
    assert seg.FrameOfReferenceUID == frame_of_reference
    pixels, mask = pm.pixel_array, seg.pixel_array.astype(bool)
    threshold = float(seg.SegmentSequence[0].SegmentLabel.split()[-1])
    seen = set()
    for k, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        seen.add(uid)
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in sources[uid].ImagePositionPatient])
        np.testing.assert_array_equal(pixels[k], maps[order.index(uid)])
    assert len(seen) == pm.NumberOfFrames == len(sources) - 1  # the phantom's truncated slice has no map to show
    assert seg.NumberOfFrames == pm.NumberOfFrames and mask.sum() == int((pixels > threshold).sum())
