"""evaluate.py end to end on an untrained checkpoint of the phantom (its metrics recomputed from its scores.csv), the
plots, and compare.py (training curves; paired differences of scorings of the same slices)."""
import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import cohort
import compare
import config
import evaluate
import metrics
import models
import phantom
import plots
import scoring
from helpers import PNG, read_csv, stand_in_figures, write_ctich_with_masks


# ---- plots ---------------------------------------------------------------------------------------

def fake_examples(size=32, with_gt=True):
    """score_split-like overlay examples: two of each kind, a disc of brain with a brighter blob in the map."""
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:size, :size]
    brain = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.42 * size) ** 2
    out = {}
    for k, kind in enumerate(scoring.EXAMPLE_KINDS):
        out[kind] = []
        for j in range(2):
            gt = ((yy - 12 - j) ** 2 + (xx - 14 - k) ** 2) < 16
            error = (rng.gamma(2.0, 0.02, (size, size)) + 0.1 * gt).astype(np.float32)
            out[kind].append({"kind": kind, "position": 10 * k + j, "id": f"ID_{k}{j}", "label": int(kind != "false positive"),
                              "score": float(error.mean()), "image": np.where(brain, 0.2, -1.0).astype(np.float32),
                              "map": error, "brain_mask": brain, "gt_mask": gt if with_gt else None})
    return out


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 50 + [1] * 30)
    plots.plot_scores(tmp_path / "scores.png", labels, rng.random(80) + labels * 0.5, title="test split, score 'mean'")
    plots.plot_scores(tmp_path / "one_class.png", np.zeros(5), rng.random(5), title="one class only")
    assert plots.plot_overlays(tmp_path / "overlays.png", fake_examples()) is True
    assert plots.plot_overlays(tmp_path / "overlays_no_gt.png", fake_examples(with_gt=False)) is True
    assert plots.plot_overlays(tmp_path / "none.png", {kind: [] for kind in scoring.EXAMPLE_KINDS}) is False
    assert not (tmp_path / "none.png").exists()  # no examples: no figure, and the caller lists no file
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
    return history


def test_compare_two_runs_writes_png(tmp_path, capsys):
    history = write_run(tmp_path / "scratch", {"pretrained": False, "channels": 1, "base_channels": 16}, [0.6, 0.8, 0.75])
    write_run(tmp_path / "standin", {"pretrained": True, "channels": 3, "hf_model": "x/standin_unet2d",
                                     "run_label": "stand-in UNet2DModel (random init)"}, [0.55, 0.6, 0.7])
    assert plots.best_epoch(history, "val_roc_auc", "max") == (2, 0.8)
    assert plots.best_epoch(history, "val_loss", "min") == (3, pytest.approx(0.2))  # epoch 2 has no val_loss
    assert plots.best_epoch([{"epoch": 1, "val_roc_auc": None}], "val_roc_auc", "max") == (None, None)
    out = tmp_path / "cmp.png"
    compare.main(["--scratch_dir", str(tmp_path / "scratch"), "--pretrained_dir", str(tmp_path / "standin"), "--output", str(out)])
    assert out.read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "scratch bc16 1ch" in printed and "best val ROC-AUC 0.800 at epoch 2" in printed
    assert "stand-in UNet2DModel (random init)" in printed and "0.700 at epoch 3" in printed

    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path / "scratch"), str(tmp_path / "nothing"), "--output", str(out)])
    assert str(e.value) == (f"error: {tmp_path / 'nothing'}: no training_history.json (not a train.py output dir, or no "
                            "epoch finished yet)")


# ---- evaluate.py end to end on the phantom ---------------------------------------------------------

def tiny_checkpoint(path, data_dir, **overrides):
    """An untrained 8-channel model saved as a train.py checkpoint of a run on data_dir (16 px windows, brain_mean)."""
    d = config.DEFAULTS
    network = models.model_config(pretrained=False, in_channels=1, image_size=32, base_channels=8,
                                  channel_mults=d.channel_mults, dropout=d.dropout, hf_model=d.hf_model)
    torch.manual_seed(0)
    train_args = {"data_dir": str(data_dir), "image_size": 32, "channels": 1, "seed": 1, "num_samples": 12,
                  "eval_samples": "all", "patch_size": 16, "stride": 16, "eval_t": [150], "score": "brain_mean",
                  "median_size": 0, "eval_batch_size": 64, "num_workers": 0, "precision": "fp32"} | overrides
    diffusion_config = models.diffusion_config(network, patch_size=16, input_hu=[[0.0, 80.0]], precision="fp32")
    models.save_checkpoint(str(path), models.build_diffusion(diffusion_config), args=train_args, epoch=1)
    return path


def scores_table(folder):
    """scores.csv of an evaluate.py output folder as arrays: labels, patients, scans and every score column."""
    rows = read_csv(folder / "scores.csv")
    table = {name: np.array([row[name] for row in rows]) for name in ("id", "patient", "scan")}
    table["any"] = np.array([int(row["any"]) for row in rows])
    for name in scoring.SCORES:
        table[name] = np.array([float(row[name]) for row in rows])
    return table


def test_main_writes_metrics_scores_and_plots(phantom_dir, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "run" / "best_model.pt", phantom_dir)
    evaluate.main(["--checkpoint", str(ckpt), "--n_boot", "50", "--keep_examples", "3"])
    out = tmp_path / "run" / "eval_best_model_test"  # named after the checkpoint and the split
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) >= {"split", "score", "counts", "slice", "scan", "subtype", "pixel", "settings"}
    assert report["split"] == "test" and report["score"] == "brain_mean"
    assert set(report["slice"]) == set(scoring.SCORES) and set(report["scan"]) == {"max", "top3"}
    assert set(report["subtype"]) == set(cohort.SUBTYPES)
    # the figures are those of the slices in scores.csv: counts, and every ROC-AUC recomputed from the file
    table = scores_table(out)
    c = report["counts"]
    assert (c["slices"], c["hemorrhage_slices"], c["patients"], c["scans"]) == (
        len(table["id"]), int(table["any"].sum()), len(set(table["patient"])), len(set(table["scan"])))
    assert 0 < c["hemorrhage_slices"] < c["slices"] and c["healthy_slices"] == c["slices"] - c["hemorrhage_slices"]
    # the checkpoint saved no splits: the test split is drawn again from the training seed, all of its patients
    test_patients = cohort.split_patients(cohort.load_index(phantom_dir, num_workers=1), seed=1)["test"]
    assert set(table["patient"]) == set(map(str, test_patients))
    for name in scoring.SCORES:
        m = report["slice"][name]
        assert m["roc_auc"] == pytest.approx(roc_auc_score(table["any"], table[name]), abs=1e-6), name
        assert m["n_patients"] == c["patients"] and m["n_boot"] == 50 and len(m["roc_auc_ci"]) == 2
    scan_labels, scan_scores, _ = metrics.scan_scores(table["scan"], table["any"], table["brain_mean"], "max")
    assert report["scan"]["max"]["roc_auc"] == pytest.approx(metrics.roc_auc(scan_labels, scan_scores), abs=1e-6)
    pixel = report["pixel"]  # the phantom has bleed masks: every test slice with one (healthy: none) is in the pixels
    assert pixel["dice_threshold_chosen_on"] == "val" and pixel["dice_threshold"] is not None
    assert pixel["n_slices"] == c["slices"] - pixel["positive_slices_without_mask"] and pixel["n_pixels_bleed"] > 0
    assert pixel["dice"] <= pixel["oracle_best_dice"] + 1e-12  # the oracle picks its threshold on these very pixels
    assert pixel["pixel_roc_auc"] is not None and pixel["pixel_auprc"] is not None
    for name in ["overlays.png"] + [f"scores_{s}.png" for s in scoring.SCORES]:
        assert (out / name).read_bytes()[:8] == PNG, name
    printed = capsys.readouterr().out
    assert f"brain_mean *{' ' * 2}" in printed and f"{report['slice']['brain_mean']['roc_auc']:.3f} [" in printed
    assert "scan (max of 'brain_mean')" in printed and "pixel (inside brain mask)" in printed

    # The split comes from the training seed whatever --seed says: no training patient in the test split; the seed
    # of the scoring noise is the one given.
    with pytest.MonkeyPatch.context() as patch:
        stand_in_figures(patch)
        evaluate.main(["--checkpoint", str(ckpt), "--n_boot", "0", "--seed", "7", "--output_dir", str(tmp_path / "other_seed")])
    other = scores_table(tmp_path / "other_seed")
    assert list(other["id"]) == list(table["id"])
    assert not np.allclose(other["brain_mean"], table["brain_mean"])
    assert json.loads((tmp_path / "other_seed" / "metrics.json").read_text())["settings"]["noise_seed"] == 7


def test_split_all_scores_every_patient_of_another_data_set(phantom_dir, tmp_path, capsys, no_figures):
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "run" / "best_model.pt", phantom_dir)
    other = phantom.write_phantom(str(tmp_path / "other"), patients=4, slices=4, size=32, seed=5)
    evaluate.main(["--checkpoint", str(ckpt), "--split", "all", "--data_dir", other, "--n_boot", "20",
                   "--output_dir", str(tmp_path / "ext")])
    report = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    counts = report["counts"]  # 4 patients x 4 slices, one of them the phantom's truncated file
    assert report["split"] == "all" and (counts["patients"], counts["slices"], counts["skipped_slices"]) == (4, 15, 1)
    assert counts["training_patients_left_out"] == 0 and counts["checked_against_training_patients"]
    assert report["pixel"]["dice"] is None and report["pixel"]["oracle_best_dice"] is not None  # no val split there
    table = scores_table(tmp_path / "ext")
    assert report["slice"]["brain_mean"]["roc_auc"] == pytest.approx(roc_auc_score(table["any"], table["brain_mean"]), abs=1e-6)
    assert no_figures[-1] == str(tmp_path / "ext" / "overlays.png")  # one model: its overlays
    # the run's own data dir is refused; a copy of it holds the training patients, which are left out and counted
    with pytest.raises(SystemExit, match="training run's own data dir"):
        evaluate.main(["--checkpoint", str(ckpt), "--split", "all", "--data_dir", phantom_dir])
    copy = shutil.copytree(phantom_dir, tmp_path / "copy", ignore=shutil.ignore_patterns(".ctpddpm_cache"))
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(ckpt), "--split", "all", "--data_dir", str(copy), "--n_boot", "0",
                   "--output_dir", str(tmp_path / "copy_eval")])
    train = cohort.split_patients(cohort.load_index(phantom_dir, num_workers=1), seed=1)["train"]
    assert f"WARNING: {len(train)} patient(s)" in capsys.readouterr().out
    report = json.loads((tmp_path / "copy_eval" / "metrics.json").read_text())
    assert report["counts"]["training_patients_left_out"] == len(train) > 0
    scored = {r.split(",")[1] for r in (tmp_path / "copy_eval" / "scores.csv").read_text().splitlines()[1:]}
    assert scored and not scored & set(map(str, train))


def test_split_all_on_ctich_reads_its_masks_and_counts_the_unusable(phantom_dir, tmp_path, capsys, no_figures):
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


def test_score_with_the_issue13_options(phantom_dir, tmp_path, no_figures):
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "run" / "best_model.pt", phantom_dir)
    evaluate.main(["--checkpoint", str(ckpt), "--split", "val", "--n_boot", "10", "--output_dir", str(tmp_path / "ev"),
                   "--hyperdensity_prior", "--noise", "simplex"])
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    s = report["settings"]
    assert (s["hyperdensity_prior"], s["noise"]) == (True, "simplex")
    assert s["input_hu"] == [[0.0, 80.0]]  # the model's input: the brain window of DICOM
    table = scores_table(tmp_path / "ev")
    assert report["slice"]["brain_mean"]["roc_auc"] == pytest.approx(roc_auc_score(table["any"], table["brain_mean"]), abs=1e-6)
    # the options change the scores: the same split scored without them gives other numbers
    evaluate.main(["--checkpoint", str(ckpt), "--split", "val", "--n_boot", "0", "--output_dir", str(tmp_path / "plain")])
    assert not np.allclose(scores_table(tmp_path / "plain")["brain_mean"], table["brain_mean"])


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
    rng = np.random.default_rng(0)
    rows = [(f"s{p}_{k}", f"p{p}", f"scan{p}", int(p < 6 and k in (2, 3))) for p in range(12) for k in range(6)]
    labels = np.array([r[3] for r in rows])
    noise = rng.standard_normal(len(rows))
    for name, values in (("a", labels * 0.5 + noise), ("b", labels * 3.0 + noise), ("same", labels * 0.5 + noise)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "scores.csv", "w") as f:
            f.write("id,patient,scan,any,brain_p99\n" + "".join(f"{i},{p},{s},{y},{v:.6g}\n" for (i, p, s, y), v in zip(rows, values)))
    out = compare.main(["--scores", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "same"), "--n_boot", "100"])
    a, b = (np.array([float(row["brain_p99"]) for row in read_csv(tmp_path / name / "scores.csv")]) for name in "ab")
    assert out[0]["slice"] == pytest.approx(roc_auc_score(labels, a)) and out[1]["slice"] == pytest.approx(roc_auc_score(labels, b))
    assert out[0]["delta"]["delta"] == 0 and out[0]["delta"]["ci"] == [0, 0] and out[2]["delta"]["delta"] == pytest.approx(0)
    assert out[1]["delta"]["delta"] == pytest.approx(out[1]["slice"] - out[0]["slice"]) and out[1]["delta"]["delta"] > 0.1
    assert out[1]["delta"]["excludes_zero"] and out[1]["delta"]["ci"][0] > 0
    assert "Δ slice" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no scores.csv"):
        compare.main(["--scores", str(tmp_path)])


def test_the_colour_bar_says_what_the_map_is():
    plain = scoring.map_label(scoring.ScoringSettings())
    assert plain == scoring.RESIDUAL_LABELS["positive"]
    recipe = scoring.map_label(scoring.ScoringSettings(normative="z", asymmetry="mirror"))
    assert "z-scored" in recipe and "mirror" in recipe
    assert "no model" in scoring.map_label(scoring.ScoringSettings(anomaly_map="blood_band"))
