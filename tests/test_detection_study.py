"""scripts/detection_study.py: candidates judged on saved scores against the default and the baseline."""
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import cohort  # noqa: E402
import detection_study  # noqa: E402


def write_scores(folder, ids, labels, subtypes, patients, scans, values, score="brain_p99"):
    os.makedirs(folder)
    with open(os.path.join(folder, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "patient", "scan", "any", *cohort.SUBTYPES, score])
        for k in range(len(ids)):
            w.writerow([ids[k], patients[k], scans[k], labels[k], *[subtypes[t][k] for t in cohort.SUBTYPES], f"{values[k]:.6g}"])


def test_a_clearly_better_candidate_is_adopted_and_fusion_is_judged(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    patients = np.repeat(np.arange(40), 10).astype(str)
    scans = patients
    labels = (rng.random(n) < 0.3).astype(int)
    subtypes = {t: np.zeros(n, int) for t in cohort.SUBTYPES}
    subtypes["subdural"] = labels
    ids = [f"s{k}" for k in range(n)]
    weak = labels * 0.3 + rng.normal(size=n)
    strong = labels * 2.0 + rng.normal(size=n)
    other = labels * 1.0 + rng.normal(size=n)
    for name, v in (("default", weak), ("baseline", other), ("better", strong), ("worse", -weak)):
        write_scores(tmp_path / name, ids, labels, subtypes, patients, scans, v)
    results = detection_study.main(["--scores_dir", str(tmp_path), "--default", "default", "--baseline", "baseline",
                                    "--candidates", "better", "worse", "--fuse", "default", "baseline",
                                    "--n_boot", "50", "--out", str(tmp_path / "study.md")])
    by_name = {r["name"]: r for r in results}
    assert by_name["better"]["adopt"] and not by_name["worse"]["adopt"] and not by_name["default"]["adopt"]
    assert by_name["default"]["vs_default"]["slice"]["delta"] == 0
    assert by_name["better"]["vs_baseline"]["slice"]["ci"][0] > 0
    fused = by_name["fuse(default, baseline)"]
    assert by_name["default"]["slice"] < fused["slice"]
    assert fused["subtypes"]["subdural"] == fused["slice"]  # every bleed is a subdural here
    assert (tmp_path / "study.md").read_text().startswith("| candidate |") and (tmp_path / "study.json").exists()


def test_the_montage_shows_top_false_positives_and_misses(phantom_dir, tmp_path):
    index = cohort.load_index(phantom_dir, num_workers=1)
    n = len(index["id"])
    labels = np.asarray(index["any"]).astype(int)
    subtypes = {t: np.asarray(index[t]).astype(int) for t in cohort.SUBTYPES}
    rng = np.random.default_rng(1)
    for name, v in (("default", labels + rng.normal(size=n)), ("baseline", rng.normal(size=n))):
        write_scores(tmp_path / name, list(index["id"]), labels, subtypes, index["patient"], index["scan"], v)
    detection_study.main(["--scores_dir", str(tmp_path), "--default", "default", "--baseline", "baseline", "--n_boot", "0",
                          "--out", str(tmp_path / "study.md"), "--montage", str(phantom_dir), "--montage_k", "3"])
    assert (tmp_path / "study_montage.png").stat().st_size > 10_000


def test_an_evaluate_folder_is_judged_on_its_own_score_not_on_the_fold_column(tmp_path):
    """evaluate.py's scores.csv holds every score and ends with `fold`: the run's score (metrics.json) is read."""
    rng = np.random.default_rng(2)
    n = 200
    patients = np.repeat(np.arange(20), 10).astype(str)
    labels = ((np.arange(n) < n // 2) & (rng.random(n) < 0.5)).astype(int)  # half the scans healthy
    folds = np.arange(n) % 4
    for name, strength in (("default", 2.0), ("baseline", 0.0)):
        folder = tmp_path / name
        os.makedirs(folder)
        with open(folder / "scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "patient", "scan", "any", *cohort.SUBTYPES, "mean", "brain_p99", "fold"])
            for k in range(n):
                subtypes = [labels[k] if t == "subdural" else 0 for t in cohort.SUBTYPES]
                w.writerow([f"s{k}", patients[k], patients[k], labels[k], *subtypes,
                            rng.normal(), labels[k] * strength + rng.normal(), folds[k]])
        (folder / "metrics.json").write_text('{"score": "brain_p99"}')
    results = detection_study.main(["--scores_dir", str(tmp_path), "--default", str(tmp_path / "default"),
                                    "--baseline", str(tmp_path / "baseline"), "--n_boot", "0",
                                    "--out", str(tmp_path / "study.md")])
    by_name = {os.path.basename(r["name"]): r for r in results}
    assert by_name["default"]["slice"] > 0.8 and abs(by_name["baseline"]["slice"] - 0.5) < 0.15
