"""The evaluation protocol: metrics on synthetic scores, the pixel accumulator, plots, score_split, compare.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import evaluate
import models
import scoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


# ---- slice metrics ---------------------------------------------------------------------------

def test_perfect_separation_gives_auc_one_with_ci_one():
    labels = np.array([0] * 20 + [1] * 20)
    scores = np.concatenate([np.linspace(0, 1, 20), np.linspace(2, 3, 20)])
    patients = np.repeat(np.arange(10), 4)
    m = evaluate.slice_metrics(labels, scores, patients, n_boot=200)
    assert m["roc_auc"] == 1.0 and m["auprc"] == 1.0
    assert m["roc_auc_ci"] == pytest.approx([1, 1]) and m["auprc_ci"] == pytest.approx([1, 1])
    assert m["sens_at_90spec"] == 1.0 and m["sens_at_95spec"] == 1.0
    assert (m["n_pos"], m["n_neg"], m["n_patients"]) == (20, 20, 10)


def test_random_scores_give_auc_near_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    m = evaluate.slice_metrics(labels, rng.random(4000), np.arange(4000) // 10, n_boot=100)
    assert abs(m["roc_auc"] - 0.5) < 0.03
    assert m["roc_auc_ci"][0] < 0.5 < m["roc_auc_ci"][1]
    assert abs(m["auprc"] - m["auprc_chance"]) < 0.03


def test_patient_bootstrap_resamples_whole_patients():
    # 12 patients, each all healthy or all bleed, 40 slices with the patient's score: a patient
    # drawn k times must weigh exactly like one slice per patient drawn k times.
    rng = np.random.default_rng(1)
    patient_label = np.array([0, 1] * 6)
    patient_score = patient_label * 0.8 + rng.normal(0, 0.6, 12)
    m_one = evaluate.slice_metrics(patient_label, patient_score, np.arange(12), n_boot=300, seed=3)
    m_all = evaluate.slice_metrics(np.repeat(patient_label, 40), np.repeat(patient_score, 40),
                                   np.repeat(np.arange(12), 40), n_boot=300, seed=3)
    assert m_all["roc_auc"] == pytest.approx(m_one["roc_auc"])
    assert m_all["roc_auc_ci"] == pytest.approx(m_one["roc_auc_ci"])
    assert m_all["n_boot_skipped"] == m_one["n_boot_skipped"]


def test_patient_ci_is_wider_than_slice_ci_when_slices_cluster():
    # Scores vary mostly between patients, barely within: 10 patients carry the evidence, not 400 slices.
    rng = np.random.default_rng(2)
    patient_label = np.array([0, 1] * 5)
    patient_offset = patient_label * 0.7 + rng.normal(0, 0.7, 10)
    patients = np.repeat(np.arange(10), 40)
    labels = patient_label[patients]
    scores = patient_offset[patients] + rng.normal(0, 0.05, 400)
    by_patient = evaluate.slice_metrics(labels, scores, patients, n_boot=300)
    by_slice = evaluate.slice_metrics(labels, scores, np.arange(400), n_boot=300)  # every slice its own patient
    assert by_patient["roc_auc"] == by_slice["roc_auc"]
    width = lambda m: m["roc_auc_ci"][1] - m["roc_auc_ci"][0]
    assert width(by_patient) > 3 * width(by_slice)


def test_single_class_input_and_single_class_resamples():
    m = evaluate.slice_metrics([0, 0, 0], [0.1, 0.2, 0.3], ["a", "b", "c"], n_boot=10)
    assert m["roc_auc"] is None and m["roc_auc_ci"] is None and "one class" in m["note"]
    assert evaluate.roc_auc([1, 1], [0.3, 0.4]) is None
    # 3 patients, only one has a bleed: many resamples miss it and must be skipped, not crash
    m = evaluate.slice_metrics([0, 0, 1, 1, 0, 0], [0.1, 0.2, 0.9, 0.8, 0.3, 0.2], ["a", "a", "b", "b", "c", "c"], n_boot=200)
    assert m["roc_auc"] == 1.0 and 0 < m["n_boot_skipped"] < 200 and m["roc_auc_ci"] == pytest.approx([1, 1])


def test_sensitivity_at_fixed_specificity():
    negatives = np.arange(100.0)  # thresholds at 90 / 95 let exactly 10 / 5 negatives through
    positives = np.array([99.5, 92.5, 50.0, 10.0])
    labels = np.array([0] * 100 + [1] * 4)
    m = evaluate.slice_metrics(labels, np.concatenate([negatives, positives]), np.arange(104), n_boot=0)
    assert m["sens_at_90spec"] == 0.5
    assert m["sens_at_95spec"] == 0.25
    assert m["roc_auc_ci"] is None  # no bootstrap asked for


def test_scan_metrics_max_and_top3():
    scans = np.array(["s1"] * 4 + ["s2"] * 4 + ["s3"] * 4)
    labels = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.1, 0.1, 0.1, 0.9, 0.5, 0.2, 0.2, 0.2, 0.95, 0.0, 0.0, 0.0])
    m = evaluate.scan_metrics(scans, labels, scores, reduce="max", n_boot=0)
    # scan scores: s1 0.9 (bleed), s2 0.5, s3 0.95 -> the bleed scan beats one of two healthy scans
    assert (m["n_scans"], m["n_pos"], m["n_neg"]) == (3, 1, 2)
    assert m["roc_auc"] == 0.5
    m = evaluate.scan_metrics(scans, labels, scores, reduce="top3", n_boot=0)
    # top-3 means: s1 (0.9+0.1+0.1)/3 = 0.367, s2 0.3, s3 0.317 -> the bleed scan is highest
    assert m["roc_auc"] == 1.0 and m["reduce"] == "top3"
    with pytest.raises(ValueError):
        evaluate.scan_metrics(scans, labels, scores, reduce="median")


def test_scan_bootstrap_groups_scans_by_patient():
    scans = np.array(["a1", "a2", "b1", "b2", "c1", "d1"])
    patients = np.array(["A", "A", "B", "B", "C", "D"])
    labels = np.array([1, 0, 0, 0, 1, 0])
    m = evaluate.scan_metrics(scans, labels, np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.4]), patients=patients, n_boot=50)
    assert m["n_patients"] == 4 and m["n_scans"] == 6


def test_paired_difference_of_identical_scores_is_zero_with_zero_width_ci():
    rng = np.random.default_rng(1)
    labels, patients = rng.integers(0, 2, 200), np.arange(200) // 10
    scores = rng.random(200) + labels * 0.3
    d = evaluate.paired_auc_difference(labels, scores, scores.copy(), patients, n_boot=200)
    assert d["delta"] == 0 and d["ci"] == [0, 0] and not d["excludes_zero"]
    scans = np.arange(200) // 5  # 4 scans per patient, every other one healthy
    labels = np.where(scans % 2 == 0, 0, labels)
    d = evaluate.paired_scan_auc_difference(scans, labels, scores, scores.copy(), patients, n_boot=200)
    assert d["delta"] == 0 and d["ci"] == [0, 0]


def test_paired_difference_of_a_clearly_better_score_lies_above_zero():
    rng = np.random.default_rng(2)
    labels, patients = np.tile([0, 1], 150), np.arange(300) // 10  # 30 patients, both classes each
    weak = rng.random(300) + 0.2 * labels
    strong = weak + 0.8 * labels  # same noise (paired), far more separation
    d = evaluate.paired_auc_difference(labels, weak, strong, patients, n_boot=300)
    assert d["delta"] > 0.2 and d["ci"][0] > 0 and d["excludes_zero"]
    assert d["delta"] == pytest.approx(d["auc_b"] - d["auc_a"])
    # swapped: the same difference, negative, CI below 0
    r = evaluate.paired_auc_difference(labels, strong, weak, patients, n_boot=300)
    assert r["delta"] == pytest.approx(-d["delta"]) and r["ci"][1] < 0 and r["excludes_zero"]
    # the paired CI is narrower than the unpaired CI of either AUC
    single = evaluate.slice_metrics(labels, weak, patients, n_boot=300)
    assert d["ci"][1] - d["ci"][0] < single["roc_auc_ci"][1] - single["roc_auc_ci"][0] + 0.05
    # healthy slices in scans of their own, so that half the scans have no bleed
    scans = np.where(labels == 0, 1000 + np.arange(300) // 6, np.arange(300) // 6)
    s = evaluate.paired_scan_auc_difference(scans, labels, weak, strong, patients, n_boot=300)
    assert s["delta"] > 0 and s["ci"][0] > 0


def test_subtype_metrics_compare_one_subtype_with_all_healthy():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.25, 0.15])
    subtypes = {"epidural": np.array([0, 0, 0, 1, 0, 0]), "subdural": np.array([0, 0, 0, 0, 1, 1]),
                "subarachnoid": np.zeros(6, int)}
    m = evaluate.subtype_metrics(subtypes, labels, scores, np.arange(6), n_boot=0)
    assert m["epidural"]["roc_auc"] == 1.0 and m["epidural"]["n_neg"] == 3
    assert m["subdural"]["roc_auc"] == pytest.approx((2 / 3 + 1 / 3) / 2)  # 0.25 beats 2 of 3 healthy, 0.15 beats 1
    assert m["subarachnoid"]["roc_auc"] is None and m["subarachnoid"]["n_pos"] == 0


# ---- pixel metrics from the bounded accumulator --------------------------------------------

def synthetic_pixels(seed, n=6, size=32):
    rng = np.random.default_rng(seed)
    maps = rng.gamma(2.0, 0.02, (n, size, size))
    yy, xx = np.mgrid[:size, :size]
    brain = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.42 * size) ** 2
    gts = np.zeros((n, size, size), bool)
    for i in range(n // 2):  # half the slices carry a round bleed with higher error
        cy, cx = rng.integers(10, size - 10, 2)
        gts[i] = ((yy - cy) ** 2 + (xx - cx) ** 2) < 16
        maps[i][gts[i]] += rng.gamma(2.0, 0.03, gts[i].sum())
    return maps, np.broadcast_to(brain, maps.shape), gts


def accumulate(maps, brains, gts):
    acc = scoring.new_pixel_accumulator()
    for m, b, g in zip(maps, brains, gts):
        scoring.accumulate_pixels(acc, m, b, g)
    return acc


def test_pixel_metrics_from_histograms_match_sklearn_on_all_pixels():
    maps, brains, gts = synthetic_pixels(0)
    acc = accumulate(maps, brains, gts)
    y, v = gts[brains], maps[brains]
    m = evaluate.pixel_metrics(acc)
    assert m["n_pixels_bleed"] == y.sum() and m["n_pixels_no_bleed"] == (~y).sum() and m["n_slices"] == 6
    assert m["pixel_roc_auc"] == pytest.approx(roc_auc_score(y, v), abs=2e-3)
    assert m["pixel_auprc"] == pytest.approx(average_precision_score(y, v), abs=5e-3)
    # bleed pixels outside the brain mask are not scored
    gts_outside = gts.copy()
    gts_outside[:, 0, 0] = True
    assert evaluate.pixel_metrics(accumulate(maps, brains, gts_outside))["n_pixels_bleed"] == y.sum()


def test_dice_threshold_chosen_on_one_split_applied_to_another():
    val_maps, brains, val_gts = synthetic_pixels(1)
    test_maps, _, test_gts = synthetic_pixels(2)
    threshold = evaluate.choose_dice_threshold(accumulate(val_maps, brains, val_gts))
    val = evaluate.pixel_metrics(accumulate(val_maps, brains, val_gts), threshold)
    test = evaluate.pixel_metrics(accumulate(test_maps, brains, test_gts), threshold)

    def exact_dice(maps, gts, t):
        pred, y = maps[brains] >= t, gts[brains]
        return 2 * (pred & y).sum() / (pred.sum() + y.sum())
    assert val["dice"] == pytest.approx(exact_dice(val_maps, val_gts, threshold), abs=1e-9)
    assert test["dice"] == pytest.approx(exact_dice(test_maps, test_gts, threshold), abs=1e-9)
    # on its own split the chosen threshold is the oracle; no threshold on a grid does better
    assert val["dice"] == pytest.approx(val["oracle_best_dice"])
    grid = np.quantile(val_maps[brains], np.linspace(0.5, 0.999, 200))
    assert val["oracle_best_dice"] >= max(exact_dice(val_maps, val_gts, t) for t in grid) - 2e-3
    assert test["oracle_best_dice"] >= test["dice"]


def test_dice_is_one_for_separable_maps():
    maps, brains, gts = synthetic_pixels(3)
    maps = np.where(gts, 0.5, 0.1)
    acc = accumulate(maps, brains, gts)
    threshold = evaluate.choose_dice_threshold(acc)
    assert 0.1 < threshold <= 0.5
    m = evaluate.pixel_metrics(acc, threshold)
    assert m["dice"] == 1.0 and m["pixel_roc_auc"] == 1.0 and m["pixel_auprc"] == 1.0


# ---- plots ---------------------------------------------------------------------------------------

def fake_examples(size=32, with_gt=True):
    maps, brains, gts = synthetic_pixels(4, n=6, size=size)
    out = {}
    for k, kind in enumerate(scoring.EXAMPLE_KINDS):
        out[kind] = [{"kind": kind, "position": 10 * k + j, "id": f"ID_{k}{j}", "label": int(kind != "false positive"),
                      "score": float(maps[2 * k + j].mean()), "image": np.where(brains[0], 0.2, -1.0).astype(np.float32),
                      "map": maps[2 * k + j].astype(np.float32), "brain_mask": brains[0],
                      "gt_mask": gts[2 * k + j] if with_gt else None} for j in range(2)]
    return out


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 50 + [1] * 30)
    evaluate.plot_scores(tmp_path / "scores.png", labels, rng.random(80) + labels * 0.5, title="test split, score 'mean'")
    evaluate.plot_scores(tmp_path / "one_class.png", np.zeros(5), rng.random(5), title="one class only")
    evaluate.plot_overlays(tmp_path / "overlays.png", fake_examples())
    evaluate.plot_overlays(tmp_path / "overlays_no_gt.png", fake_examples(with_gt=False))
    for name in ["scores.png", "one_class.png", "overlays.png", "overlays_no_gt.png"]:
        assert (tmp_path / name).read_bytes()[:8] == PNG, name


# ---- compare.py --------------------------------------------------------------------------------

def write_run(run_dir, label_args, aucs):
    run_dir.mkdir()
    history = [{"epoch": e + 1, "train_loss": 0.5 / (e + 1), "val_loss": 0.6 / (e + 1), "val_roc_auc": a,
                "val_roc_auc_ci": [a - 0.1, min(a + 0.1, 1.0)]} for e, a in enumerate(aucs)]
    history[1].pop("val_loss")  # missing keys are tolerated
    (run_dir / "training_history.json").write_text(json.dumps(history))
    (run_dir / "args.json").write_text(json.dumps(label_args))


def test_compare_two_runs_writes_png(tmp_path):
    write_run(tmp_path / "scratch", {"pretrained": False, "channels": 1, "base_channels": 16}, [0.6, 0.8, 0.75])
    write_run(tmp_path / "standin", {"pretrained": True, "channels": 3, "hf_model": "x/standin_unet2d",
                                     "run_label": "stand-in UNet2DModel (random init)"}, [0.55, 0.6, 0.7])
    out = tmp_path / "cmp.png"
    proc = subprocess.run([sys.executable, "compare.py", "--scratch_dir", str(tmp_path / "scratch"),
                           "--pretrained_dir", str(tmp_path / "standin"), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == PNG
    assert "scratch bc16 1ch" in proc.stdout and "best val ROC-AUC 0.800 at epoch 2" in proc.stdout
    assert "stand-in UNet2DModel (random init)" in proc.stdout and "0.700 at epoch 3" in proc.stdout

    proc = subprocess.run([sys.executable, "compare.py", str(tmp_path / "scratch"), str(tmp_path / "nothing"),
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "training_history.json" in proc.stderr


# ---- evaluate.py end to end on the phantom ---------------------------------------------------------

def tiny_checkpoint(path, data_dir, **overrides):
    config = {"kind": "scratch", "in_channels": 1, "base_channels": 8, "image_size": 32}
    torch.manual_seed(0)
    train_args = {"data_dir": str(data_dir), "image_size": 32, "channels": 1, "seed": 1, "num_samples": 12,
                  "eval_samples": "all", "patch_size": 16, "stride": 16, "eval_t": [150], "score": "brain_mean",
                  "median_size": 0, "eval_batch_size": 64, "num_workers": 0, "precision": "fp32"} | overrides
    config = models.diffusion_config(config, patch_size=16, input_hu=[[0.0, 80.0]], precision="fp32")
    models.save_checkpoint(str(path), models.build_diffusion(config), args=train_args, epoch=1)
    return path


def test_main_writes_metrics_scores_and_plots(phantom_dir, tmp_path, capsys):
    import cohort
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "run" / "best_model.pt", phantom_dir)
    evaluate.main(["--checkpoint", str(ckpt), "--n_boot", "50", "--keep_examples", "3"])
    out = tmp_path / "run" / "eval_best_model_test"  # named after the checkpoint and the split
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"split", "score", "counts", "slice", "scan", "subtype", "pixel", "settings"}
    assert metrics["split"] == "test" and metrics["score"] == "brain_mean"
    assert set(metrics["slice"]) == set(scoring.SCORES) and set(metrics["scan"]) == {"max", "top3"}
    assert set(metrics["subtype"]) == set(cohort.SUBTYPES)
    c = metrics["counts"]
    assert c["hemorrhage_slices"] > 0 and c["healthy_slices"] > 0 and c["slices"] == c["hemorrhage_slices"] + c["healthy_slices"]
    m = metrics["slice"]["brain_mean"]
    assert 0 <= m["roc_auc"] <= 1 and m["roc_auc_ci"][0] <= m["roc_auc_ci"][1] and m["n_patients"] == c["patients"]
    pixel = metrics["pixel"]  # the phantom has bleed masks
    assert pixel["dice_threshold_chosen_on"] == "val" and 0 <= pixel["dice"] <= pixel["oracle_best_dice"] + 1e-9
    assert 0 <= pixel["pixel_roc_auc"] <= 1 and pixel["n_pixels_bleed"] > 0
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["id", "patient", "scan", "any"] and "brain_p99" in rows[0]
    assert len(rows) == 1 + c["slices"]
    for name in ["overlays.png"] + [f"scores_{s}.png" for s in scoring.SCORES]:
        assert (out / name).read_bytes()[:8] == PNG, name
    printed = capsys.readouterr().out
    assert "ROC-AUC" in printed and "scan (max" in printed and "pixel" in printed

    # The split comes from the training seed whatever --seed says: no training patient in the test split.
    evaluate.main(["--checkpoint", str(ckpt), "--n_boot", "0", "--seed", "7", "--output_dir", str(tmp_path / "other_seed")])
    ids = lambda d: sorted(r.split(",")[0] for r in (d / "scores.csv").read_text().splitlines()[1:])
    assert ids(tmp_path / "other_seed") == ids(out)


def test_split_all_scores_every_patient_of_another_data_set(phantom_dir, tmp_path, capsys):
    import shutil
    import cohort
    import phantom
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "run" / "best_model.pt", phantom_dir)
    other = phantom.write_phantom(str(tmp_path / "other"), patients=4, slices=4, size=32, seed=5)
    evaluate.main(["--checkpoint", str(ckpt), "--split", "all", "--data_dir", other, "--n_boot", "20",
                   "--output_dir", str(tmp_path / "ext")])
    metrics = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert metrics["split"] == "all" and metrics["counts"]["patients"] == 4 and metrics["counts"]["slices"] >= 15
    assert metrics["counts"]["training_patients_left_out"] == 0 and metrics["counts"]["checked_against_training_patients"]
    assert metrics["pixel"]["dice"] is None and metrics["pixel"]["oracle_best_dice"] is not None  # no val split there
    assert (tmp_path / "ext" / "overlays.png").read_bytes()[:8] == PNG
    # the run's own data dir is refused; a copy of it holds the training patients, which are left out and counted
    with pytest.raises(SystemExit, match="training run's own data dir"):
        evaluate.main(["--checkpoint", str(ckpt), "--split", "all", "--data_dir", phantom_dir])
    copy = shutil.copytree(phantom_dir, tmp_path / "copy", ignore=shutil.ignore_patterns(".ctpddpm_cache"))
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(ckpt), "--split", "all", "--data_dir", str(copy), "--n_boot", "0",
                   "--output_dir", str(tmp_path / "copy_eval")])
    train = cohort.split_patients(cohort.load_index(phantom_dir, num_workers=1), seed=1)["train"]
    assert f"WARNING: {len(train)} patient(s)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "copy_eval" / "metrics.json").read_text())
    assert metrics["counts"]["training_patients_left_out"] == len(train) > 0
    scored = {r.split(",")[1] for r in (tmp_path / "copy_eval" / "scores.csv").read_text().splitlines()[1:]}
    assert scored and not scored & set(map(str, train))


def test_split_all_on_ctich_reads_its_masks_and_counts_the_unusable(phantom_dir, tmp_path, capsys):
    from test_data import write_ctich_with_masks
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "run" / "best_model.pt", phantom_dir)
    root = str(tmp_path / "ctich")
    write_ctich_with_masks(root)
    evaluate.main(["--checkpoint", str(ckpt), "--split", "all", "--data_dir", root, "--n_boot", "0",
                   "--output_dir", str(tmp_path / "ev")])
    pixel = json.loads((tmp_path / "ev" / "metrics.json").read_text())["pixel"]
    # one usable mask; the slice without a mask and the one whose mask has the wrong size stay out, counted
    assert pixel["n_pixels_bleed"] > 0 and pixel["positive_slices_without_mask"] == 2 and pixel["unusable_masks"] == 1
    assert pixel["n_slices"] == 6 and pixel["pixel_roc_auc"] is not None
    assert "skipped mask:" in capsys.readouterr().out


def test_score_with_the_issue13_options(phantom_dir, tmp_path):
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "run" / "best_model.pt", phantom_dir)
    evaluate.main(["--checkpoint", str(ckpt), "--split", "val", "--n_boot", "10", "--output_dir", str(tmp_path / "ev"),
                   "--hyperdensity_prior", "--noise", "simplex"])
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    s = metrics["settings"]
    assert (s["hyperdensity_prior"], s["noise"]) == (True, "simplex")
    assert s["input_hu"] == [[0.0, 80.0]]  # the model's input: the brain window of DICOM
    assert metrics["slice"]["brain_mean"]["roc_auc"] is not None


def test_a_run_that_used_a_removed_option_is_read_back_or_refused_in_one_line(phantom_dir, tmp_path, capsys):
    """Old runs record options removed in ct-pddpm: a removed scoring option is scored without (a note), a removed
    scored region or --bleed_train_fraction (its splits held hemorrhage patients) is refused in one line."""
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "run" / "best_model.pt", phantom_dir)
    checkpoint = torch.load(ckpt, weights_only=True)
    old = dict(checkpoint["args"], min_height=0.3, noise_draws=1, input_norm="none")
    _, settings, _ = evaluate.config.read_back(dict(checkpoint, args=old), {}, "old.pt", 32)
    assert settings == evaluate.config.read_back(checkpoint, {}, "new.pt", 32)[1]
    assert "note: old.pt was scored with --min_height 0.3, removed in ct-pddpm" in capsys.readouterr().out
    for changed, flag in (({"scored_region": "soft_tissue"}, "--scored_region soft_tissue"),
                          ({"bleed_train_fraction": 0.25}, "--bleed_train_fraction 0.25")):
        with pytest.raises(SystemExit) as stop:
            evaluate.config.read_back(dict(checkpoint, args=dict(checkpoint["args"], **changed)), {}, "old.pt", 32)
        assert str(stop.value).startswith("error: old.pt: ") and flag in str(stop.value) and "removed" in str(stop.value)
        assert "\n" not in str(stop.value)
    # the given flag wins over the saved region
    assert evaluate.config.read_back(dict(checkpoint, args=dict(checkpoint["args"], scored_region="soft_tissue")),
                                     {"scored_region": "no_bone_3d"}, "old.pt", 32)[1].scored_region == "no_bone_3d"


def test_main_user_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "missing.pt")])
    assert "missing.pt" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "run" / "best_model.pt", tmp_path / "no_data_here")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(ckpt)])
    assert "no_data_here" in str(e.value) and "\n" not in str(e.value)


def test_compare_scores_pairs_two_scorings_of_the_same_slices(tmp_path, capsys):
    import compare
    rng = np.random.default_rng(0)
    rows = [(f"s{p}_{k}", f"p{p}", f"scan{p}", int(p < 6 and k in (2, 3))) for p in range(12) for k in range(6)]
    labels = np.array([r[3] for r in rows])
    noise = rng.standard_normal(len(rows))
    for name, values in (("a", labels * 0.5 + noise), ("b", labels * 3.0 + noise), ("same", labels * 0.5 + noise)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "scores.csv", "w") as f:
            f.write("id,patient,scan,any,brain_p99\n" + "".join(f"{i},{p},{s},{y},{v:.6g}\n" for (i, p, s, y), v in zip(rows, values)))
    out = compare.main(["--scores", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "same"), "--n_boot", "200"])
    assert out[0]["delta"]["delta"] == 0 and out[2]["delta"]["delta"] == pytest.approx(0)
    assert out[1]["delta"]["delta"] > 0.1 and out[1]["delta"]["excludes_zero"]
    assert "Δ slice" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no scores.csv"):
        compare.main(["--scores", str(tmp_path)])
