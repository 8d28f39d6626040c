import os
import sys

import pydicom
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # import data, models, ... from the repo root

import phantom  # noqa: E402

@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Path (str) of a tiny phantom in the RSNA layout, made once per session: 8 patients (4 with
    hemorrhage, 4 healthy) x 6 slices at 64 px, seed 0, including the quirk files (12-bit storage on
    the first hemorrhage patient, one truncated file of the first healthy patient). Shared: do not
    modify it; its index/slice caches go to <phantom_dir>/.ctpddpm_cache unless cache_dir is given."""
    return phantom.write_phantom(str(tmp_path_factory.mktemp("phantom")), patients=8, slices=6, size=64, seed=0)

def edit_dicom(path, **changes):
    """Set header fields of a DICOM file in place; a value of None deletes the field."""
    ds = pydicom.dcmread(str(path))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(str(path))
