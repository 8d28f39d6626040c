"""Frozen splits (issue 15): a run's patient splits are saved with it and used again as saved, so patients added to or
removed from the data folder since training never move a training patient into validation or test."""
import contextlib
import io
import json
import os
import shutil

import cohort
import evaluate
import phantom
from helpers import copy_run, head_hu, quiet


def add_healthy_patient(root, patient_id, n=3):
    with open(os.path.join(root, "stage_2_train.csv"), "a") as f:
        for k in range(n):
            image_id = f"ID_{patient_id}_{k}"
            phantom.write_ct_dicom(os.path.join(root, "stage_2_train", f"{image_id}.dcm"), head_hu(64, 64),
                                   patient_id=patient_id, study_uid=f"1.2.9.{k}", series_uid=f"1.2.9.{k}.1", instance=k + 1,
                                   z=5.0 * k, spacing=0.75, slope=1.0, intercept=-1024.0)
            f.write("".join(f"{image_id}_{name},0\n" for name in cohort.LABELS))


def test_splits_are_patient_lists_saved_with_the_run(tiny_run, phantom_dir):
    """splits.json (and every checkpoint: test_scripts.py) holds the run's patients of each split: every patient of the
    data once, and no hemorrhage patient in training."""
    saved = json.loads((tiny_run / "splits.json").read_text())
    assert saved["seed"] == 1 and saved["data_dir"] == phantom_dir
    lists = {name: set(saved["patients"][name]) for name in ("train", "val", "test")}
    index, _ = quiet(cohort.load_index, phantom_dir, num_workers=1)
    patients, sick = cohort.patients_with_bleed(index)
    assert sorted(lists["train"] | lists["val"] | lists["test"]) == sorted(map(str, patients))
    assert sum(map(len, lists.values())) == len(patients)  # no patient in two splits
    assert lists["train"] and not lists["train"] & set(map(str, patients[sick]))


def test_patients_added_or_removed_after_training_move_no_training_patient(tiny_run, phantom_dir, tmp_path, no_figures):
    root, run = tmp_path / "data", copy_run(tiny_run, tmp_path)
    shutil.copytree(phantom_dir, root, ignore=shutil.ignore_patterns(".ctpddpm_cache"))
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
        evaluate.main(["--checkpoint", str(run / "best_model.pt"), "--data_dir", str(root), "--n_boot", "0",
                       "--keep_examples", "1"])
    lines = out.getvalue().splitlines()
    assert ("splits: 3 patient(s) not in the run's saved splits are left out (added since training): "
            "ID_added0, ID_added1, ID_added2") in lines
    assert "splits: 1 patient(s) of the run's saved splits are no longer in the data (train 0, val 1, test 0)" in lines
    scored = {row.split(",")[1] for row in (run / "eval_best_model_test" / "scores.csv").read_text().splitlines()[1:]}
    assert scored == set(saved["test"])  # the saved test patients, all of them and only them
