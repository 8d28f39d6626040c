"""Fixtures shared by the test modules: the phantom and a tiny trained run, each made once per session (helpers.py holds
the shared functions)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # import data, models, ... from the repo root

import phantom  # noqa: E402
from helpers import quiet, stand_in_figures, tiny_train_args, tree  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_notes():
    """Each test starts with no note given yet: runfiles.note prints a line once per process (a script's run) and
    only counts it after that, and the tests run many scripts in one process."""
    import runfiles
    runfiles._NOTES.clear()


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Path (str) of a tiny phantom in the RSNA layout, made once per session: 8 patients (4 with hemorrhage, 4
    healthy) x 6 slices at 64 px, seed 0, including the quirk files (12-bit storage on the first hemorrhage patient,
    one truncated file of the first healthy patient). Shared: do not modify it; its index/slice caches go to
    <phantom_dir>/.ctpddpm_cache unless cache_dir is given."""
    return phantom.write_phantom(str(tmp_path_factory.mktemp("phantom")), patients=8, slices=6, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_run(phantom_dir, tmp_path_factory):
    """A finished 1-epoch run on the phantom (train.py with helpers.tiny_train_args, in this process): best_model.pt,
    best_model_loss.pt, last.pt, splits.json, history, figures. Shared by every module: copy it before changing it, and
    give evaluate.py / sweep.py an --output_dir elsewhere. Checked at the end of the session: a test that wrote into
    it fails the session. (Only the reference statistics that scripts save next to a checkpoint may appear there,
    reference_<checkpoint>.json: a cache of values that depend on nothing but the run and the scoring settings.)"""
    import train
    out = tmp_path_factory.mktemp("tiny") / "run"
    quiet(train.main, tiny_train_args(phantom_dir, out))
    before = tree(out)
    yield out
    after = {name: size for name, size in tree(out).items() if not is_reference_file(name)}
    assert after == before, "a test wrote into the shared tiny_run: copy it first (helpers.copy_run)"


def is_reference_file(name):
    import cv
    base = os.path.basename(name)
    return (base in {cv.REFERENCE_FILE.format(stem=stem) for stem in ("best_model", "best_model_loss", "last")}
            or (base.startswith("normative_") and base.endswith(".npz")))  # cv.fold_normative's, as cached


@pytest.fixture
def no_figures(monkeypatch):
    """For tests of what the scripts compute, not of their figures: plots.py's figures stood in for by empty files
    (helpers.stand_in_figures). The figures themselves are drawn by the shared tiny_run, test_evaluate.py,
    test_scripts.py and the processes that test_resume.py and test_distributed.py start. -> the paths asked for."""
    return stand_in_figures(monkeypatch)
