"""No output claims a file it did not write, and every script claims its output folder before it looks inside
(runfiles.claim_output_dir): two predictions started at once into one folder never both write there."""
import contextlib
import csv
import io
import os
import threading

import pytest

import cohort
import evaluate
import phantom
import predict
from fake_runs import write_cv_run


@pytest.fixture(scope="module")
def cv_run(phantom_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("claims")
    write_cv_run(str(root / "run"), cohort.load_index(phantom_dir, num_workers=1), phantom_dir, seed=1)
    other = phantom.write_phantom(str(root / "other"), patients=4, slices=4, size=32, seed=7)
    return str(root / "run"), other


def test_the_wrote_line_lists_what_is_on_disk(cv_run, tmp_path, no_figures):
    run, other = cv_run
    out = tmp_path / "ext"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate.main(["--checkpoint", run, "--split", "all", "--data_dir", other, "--n_boot", "0", "--output_dir", str(out)])
    wrote = [line for line in printed.getvalue().splitlines() if " wrote " in line][-1]
    claimed = sorted(wrote.split(f"wrote {out}/: ")[1].split(", "))
    assert claimed == sorted(name for name in os.listdir(out) if not name.startswith("."))
    assert "overlays.png" in claimed  # a CV run's external set shows the ensemble's maps (issue 29)


def test_two_predictions_at_once_into_one_folder(cv_run, tmp_path, no_figures):
    run, other = cv_run
    out = str(tmp_path / "pred")
    outcomes = []

    def one():
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                predict.main(["--checkpoint", run, "--data_dir", os.path.join(other, "stage_2_train"), "--output_dir", out,
                              "--num_workers", "0"])
            outcomes.append("done")
        except SystemExit as stop:
            outcomes.append(str(stop.code))
    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes)[0] == "done" and len(outcomes) == 2, outcomes
    refused = [o for o in outcomes if o != "done"]
    assert len(refused) == 1 and refused[0].startswith(f"error: {out}: ")
    assert "another run is using this output dir" in refused[0] or "output dir is not empty" in refused[0]
    assert sorted(os.listdir(out)) == ["maps", "overlays", "scans.csv", "slices.csv"]


def test_predict_and_evaluate_give_a_scan_the_same_ensemble_score(cv_run, tmp_path, no_figures):
    """A CV run's fold references belong to the run: predict.py and evaluate.py --split all put the folds on one scale
    with the same statistics, so one scan gets one score (a one-patient set: its slices' noise positions agree)."""
    run, _ = cv_run
    scan = phantom.write_phantom(str(tmp_path / "one"), patients=1, slices=5, size=32, seed=11)
    with contextlib.redirect_stdout(io.StringIO()):
        predict.main(["--checkpoint", run, "--data_dir", os.path.join(scan, "stage_2_train"), "--output_dir",
                      str(tmp_path / "pred"), "--num_workers", "0"])
        evaluate.main(["--checkpoint", run, "--split", "all", "--data_dir", scan, "--n_boot", "0", "--output_dir",
                       str(tmp_path / "ev")])
    with open(tmp_path / "pred" / "slices.csv") as f:
        predicted = {os.path.basename(row["source"])[:-4]: float(row["brain_p99"]) for row in csv.DictReader(f)
                     if row["brain_p99"]}  # the phantom's truncated slice is not scored
    with open(tmp_path / "ev" / "scores.csv") as f:
        evaluated = {row["id"]: float(row["brain_p99"]) for row in csv.DictReader(f)}
    assert len(evaluated) == 4 and set(predicted) == set(evaluated)
    for image_id, score in evaluated.items():
        assert predicted[image_id] == pytest.approx(score, abs=1e-5)  # both written with 6 significant digits
