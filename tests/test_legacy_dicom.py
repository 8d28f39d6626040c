"""ACR-NEMA-era DICOM as it really is: no preamble, no file meta, implicit VR, and any element of the Image Pixel
module the old standard did not require left out (readers.complete_pixel_module fills it from what the file implies),
numbers in older forms ("-01.024000E+03"); a file that implies nothing certain is refused in one line."""
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

import readers

PIXEL_MODULE = ("SamplesPerPixel", "PhotometricInterpretation", "PixelRepresentation", "BitsStored", "HighBit",
                "BitsAllocated")


def head_hu(size=64):
    hu = np.full((size, size), -1000, np.int16)
    hu[8:56, 8:56] = 1200  # skull
    hu[12:52, 12:52] = 35  # brain
    hu[30:34, 20:40] = 70  # a bleed
    return hu


def write_legacy(path, hu, *, signed, drop=(), intercept="-01.024000E+03", pixel_bytes=None):
    """A file as an old archive holds it: the data set alone (no preamble, no file meta), implicit VR little endian.
    signed: 16-bit signed HU (padding -2000 in the corners); else 12-bit unsigned HU + 1024 with `intercept`."""
    ds = Dataset()
    ds.Modality, ds.PatientID, ds.Rows, ds.Columns = "CT", "LEGACY", hu.shape[0], hu.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (16, 15, 1) if signed else (12, 11, 0)
    ds.RescaleIntercept, ds.RescaleSlope = ("0" if signed else intercept), "1.000000E+00"
    ds.ImagePositionPatient = [0, 0, 0]
    stored = hu.astype(np.int16).tobytes() if signed else (hu + 1024).astype(np.uint16).tobytes()
    ds.add(DataElement(0x7FE00010, "OW", stored if pixel_bytes is None else pixel_bytes))
    for name in drop:
        delattr(ds, name)
    ds.save_as(path, implicit_vr=True, little_endian=True)  # no file meta: written without preamble or meta
    return path


@pytest.mark.parametrize("signed", [False, True], ids=["12-bit unsigned", "16-bit signed"])
@pytest.mark.parametrize("drop", [(), *[(name,) for name in PIXEL_MODULE], PIXEL_MODULE[:5], PIXEL_MODULE],
                         ids=["complete", *PIXEL_MODULE, "all but BitsAllocated", "the whole module"])
def test_a_legacy_file_missing_pixel_elements_decodes_to_its_hu(tmp_path, signed, drop):
    hu = head_hu()
    if signed:
        hu[:6, :6] = hu[-6:, -6:] = -2000  # padding outside the field of view: the sign bit set
    path = write_legacy(str(tmp_path / "legacy.dcm"), hu, signed=signed, drop=drop)
    assert not open(path, "rb").read(132)[128:132] == b"DICM"  # no preamble
    np.testing.assert_array_equal(readers.hu_from_dicom(path), hu.astype(np.float32))
    assert readers.read_header(path)[0] == "LEGACY"


@pytest.mark.parametrize("intercept", ["-01.024000E+03", "-1024", "-1024.", " -1.024E3", "-0001024.0000"])
def test_old_number_forms_of_the_intercept(tmp_path, intercept):
    hu = head_hu()
    path = write_legacy(str(tmp_path / "old.dcm"), hu, signed=False, intercept=intercept,
                        drop=("SamplesPerPixel", "PhotometricInterpretation"))
    np.testing.assert_array_equal(readers.hu_from_dicom(path), hu.astype(np.float32))


def test_pixel_data_that_fits_no_single_sample_slice_is_refused_in_one_line(tmp_path):
    hu = head_hu()
    rgb_like = np.repeat((hu + 1024).astype(np.uint16).tobytes(), 3)[:3 * hu.size]  # 3 bytes a pixel: no CT slice
    path = write_legacy(str(tmp_path / "odd.dcm"), hu, signed=False, drop=("SamplesPerPixel", "BitsAllocated"),
                        pixel_bytes=bytes(rgb_like))
    with pytest.raises(readers.BadFile) as error:
        readers.hu_from_dicom(path)
    message = str(error.value)
    assert "\n" not in message and "no BitsAllocated or SamplesPerPixel" in message and "64 x 64" in message


def test_a_complete_modern_file_is_read_as_before(tmp_path):
    """Filling in only touches elements that are missing: a file with all of them keeps its own values."""
    hu = head_hu()
    path = write_legacy(str(tmp_path / "full.dcm"), hu, signed=False)
    ds = pydicom.dcmread(path, force=True)
    before = {name: ds[name].value for name in PIXEL_MODULE}
    readers.complete_pixel_module(ds)
    assert {name: ds[name].value for name in PIXEL_MODULE} == before
