"""A CV run folder is checked as a whole before anything is scored: each fold's checkpoint must be that fold of this
run's fold assignment (folds.json), wherever the folder is opened (trained.open_run: evaluate, predict, sweep) and on
train.py --resume (cv.check_fold)."""
import os
import shutil

import pytest

import cohort
import cv
import models
import trained
from fake_runs import tiny_diffusion, write_cv_run

FLAGS = {}


@pytest.fixture(scope="module")
def two_runs(phantom_dir, tmp_path_factory):
    index = cohort.load_index(phantom_dir, num_workers=1)
    root = tmp_path_factory.mktemp("cv_runs")
    a, b = str(root / "a"), str(root / "b")
    write_cv_run(a, index, phantom_dir, seed=1)
    write_cv_run(b, index, phantom_dir, seed=2)
    assert cv.load_folds(a)["folds"] != cv.load_folds(b)["folds"]  # other seeds, other folds
    return a, b


def copy_run(source, target):
    shutil.copytree(source, target)
    return target


def test_a_whole_run_opens(two_runs):
    run = trained.open_run(two_runs[0], FLAGS)
    assert run.is_cv and [f.number for f in run.folds] == [0, 1]


def test_a_fold_from_another_cv_run_is_refused(two_runs, tmp_path):
    mixed = copy_run(two_runs[0], str(tmp_path / "mixed"))
    shutil.rmtree(cv.fold_dir(mixed, 1))
    shutil.copytree(cv.fold_dir(two_runs[1], 1), cv.fold_dir(mixed, 1))
    with pytest.raises(SystemExit) as error:
        trained.open_run(mixed, FLAGS)
    message = str(error.value)
    assert message.startswith(f"error: {cv.fold_dir(mixed, 1)}/best_model.pt: fold 1 of the CV run {mixed}")
    assert "trained in another CV run" in message and "seed 2/1" in message and "\n" not in message


def test_swapped_folds_are_refused(two_runs, tmp_path):
    swapped = copy_run(two_runs[0], str(tmp_path / "swapped"))
    shutil.copy(os.path.join(cv.fold_dir(swapped, 0), "best_model.pt"), os.path.join(cv.fold_dir(swapped, 1), "best_model.pt"))
    with pytest.raises(SystemExit, match="fold 1 of the CV run .* holds the model of fold 0"):
        trained.open_run(swapped, FLAGS)


def test_a_plain_checkpoint_in_a_fold_folder_is_refused(two_runs, tmp_path):
    plain = copy_run(two_runs[0], str(tmp_path / "plain"))
    models.save_checkpoint(os.path.join(cv.fold_dir(plain, 0), "best_model.pt"), tiny_diffusion(), splits=None)
    with pytest.raises(SystemExit, match="records no fold assignment"):
        trained.open_run(plain, FLAGS)


def test_a_fold_trained_before_patients_were_added_is_its_own(two_runs, tmp_path):
    """folds.json extended with a new patient (train.py keeps every earlier patient's fold): the folds trained before
    hold a part of it, and are still this run's."""
    grown = copy_run(two_runs[0], str(tmp_path / "grown"))
    record = cv.load_folds(grown)
    record["folds"]["ID_new_patient"] = 0
    cv.write_folds(grown, record)
    assert len(trained.open_run(grown, FLAGS).folds) == 2
    record["folds"][sorted(record["folds"])[0]] = 1 - record["folds"][sorted(record["folds"])[0]]  # a patient moved
    cv.write_folds(grown, record)
    with pytest.raises(SystemExit, match="trained in another CV run"):
        trained.open_run(grown, FLAGS)


def test_resume_refuses_a_fold_from_another_cv_run(two_runs, phantom_dir):
    """train.py --folds K --resume: a fold folder whose last.pt holds another CV run's fold is refused before its data
    is opened (train.open_data, the check shared with trained.open_run)."""
    import argparse
    import train
    ours, theirs = (cv.load_folds(run) for run in two_runs)
    index = cohort.load_index(phantom_dir, num_workers=1)
    fold_splits = cv.fold_splits_record(index, ours, 1, data_dir=phantom_dir, dataset="rsna")
    foreign = cv.fold_splits_record(index, theirs, 1, data_dir=phantom_dir, dataset="rsna")
    args = argparse.Namespace(output_dir=os.path.join(two_runs[0], "fold_1"))
    with pytest.raises(SystemExit, match=r"fold_1/last.pt: fold 1 of the CV run .* was trained in another CV run"):
        train.open_data(args, {"splits": foreign}, fold_splits, None, 0, 1)
