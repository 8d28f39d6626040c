"""Evaluate a trained pDDPM checkpoint on held-out patients: the evaluation protocol.

    python evaluate.py --checkpoint runs/scratch/best_model.pt                # test split
    python evaluate.py --checkpoint runs/scratch/best_model.pt --split val --eval_samples all

Every slice of the split is scored by scoring.score_split, the function train.py's per-epoch
validation runs too, with the training run's scoring settings unless flags say otherwise. This
file holds the metrics (train.py and sweep.py use them as well), the plots and the command line.

The protocol (issue 7): splits are by patient (no patient in two splits); confidence intervals
come from a bootstrap that resamples patients, because slices of one head are strongly
correlated and a slice bootstrap would give intervals that are too narrow. Slice, scan
("does this head CT contain a bleed?") and per-subtype ROC-AUC; sensitivity at fixed
specificity; and, where ground-truth bleed masks exist (the phantom), pixel AUPRC / ROC-AUC
inside the brain mask and Dice at a threshold chosen on the validation split.

Memory stays bounded on large splits: scores are streamed into arrays, only a few maps are kept
for the overlay figure, and pixel statistics are accumulated as fixed-bin histograms.
"""
import argparse
import csv
import dataclasses
import io
import os
import sys

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import cohort
import config
import cv
import data
import inputs
import readers
import runfiles
import models
import scoring

# ---------------------------------------------------------------------------------------------
# metrics

def roc_auc(labels, scores):
    """Slice ROC-AUC, or None when only one class is present."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def _sensitivity_at_specificity(labels, scores, specificity):
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= 1 - specificity + 1e-12].max())


def slice_metrics(labels, scores, patients, n_boot=1000, seed=0):
    """ROC-AUC and AUPRC with 95 % CIs from a bootstrap over patients, sensitivity at 90/95 % specificity.

    A bootstrap sample draws patients with replacement and takes all their slices (a patient drawn
    twice counts twice, via sample weights). Samples that hold one class only are skipped and counted.
    """
    labels, scores, patients = np.asarray(labels).astype(int), np.asarray(scores, np.float64), np.asarray(patients)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    patient_codes = np.unique(patients, return_inverse=True)[1].reshape(-1)
    n_patients = int(patient_codes.max()) + 1 if len(patient_codes) else 0
    out = {"roc_auc": None, "roc_auc_ci": None, "auprc": None, "auprc_ci": None,
           "auprc_chance": n_pos / max(n_pos + n_neg, 1), "sens_at_90spec": None, "sens_at_95spec": None,
           "n_pos": n_pos, "n_neg": n_neg, "n_patients": n_patients, "n_boot": n_boot, "n_boot_skipped": 0}
    if n_pos == 0 or n_neg == 0:
        out["note"] = f"only one class present (n_pos={n_pos}, n_neg={n_neg}): ROC-AUC and AUPRC undefined"
        return out
    out["roc_auc"] = float(roc_auc_score(labels, scores))
    out["auprc"] = float(average_precision_score(labels, scores))
    out["sens_at_90spec"] = _sensitivity_at_specificity(labels, scores, 0.90)
    out["sens_at_95spec"] = _sensitivity_at_specificity(labels, scores, 0.95)

    rng = np.random.default_rng(seed)
    aucs, auprcs = [], []
    for _ in range(n_boot):
        weight = _bootstrap_weights(patient_codes, n_patients, rng)
        keep = weight > 0
        y, s, w = labels[keep], scores[keep], weight[keep]
        if y.min() == y.max():
            out["n_boot_skipped"] += 1
            continue
        aucs.append(roc_auc_score(y, s, sample_weight=w))
        auprcs.append(average_precision_score(y, s, sample_weight=w))
    if aucs:
        out["roc_auc_ci"] = [float(v) for v in np.percentile(aucs, [2.5, 97.5])]
        out["auprc_ci"] = [float(v) for v in np.percentile(auprcs, [2.5, 97.5])]
    if out["n_boot_skipped"]:
        out["note"] = f"{out['n_boot_skipped']} of {n_boot} bootstrap samples held one class only and were skipped"
    return out


def scan_scores(scans, labels, scores, reduce="max", patients=None):
    """One score per scan (max, or mean of the top 3 slice scores), label = any bleed slice in the scan.
    -> (scan labels, scan scores, scan patients), scans in sorted order (patients=None: each scan its own patient)."""
    scans, labels, scores = np.asarray(scans), np.asarray(labels).astype(int), np.asarray(scores, np.float64)
    patients = scans if patients is None else np.asarray(patients)
    names, scan_of_slice = np.unique(scans, return_inverse=True)
    scan_of_slice = scan_of_slice.reshape(-1)
    scan_labels = np.zeros(len(names), int)
    np.maximum.at(scan_labels, scan_of_slice, labels)
    order = np.lexsort((-scores, scan_of_slice))  # by scan, then score descending
    starts = np.searchsorted(scan_of_slice[order], np.arange(len(names)))
    if reduce == "max":
        reduced = scores[order][starts]
    elif reduce == "top3":
        ends = np.append(starts[1:], len(order))
        reduced = np.array([scores[order][a:min(b, a + 3)].mean() for a, b in zip(starts, ends)])
    else:
        raise ValueError(f"reduce must be 'max' or 'top3', got {reduce!r}")
    return scan_labels, reduced, patients[order][starts]


def scan_metrics(scans, labels, scores, reduce="max", patients=None, n_boot=1000, seed=0):
    """Scan-level slice_metrics on scan_scores ("does this head CT contain a bleed?").

    Only the slices given are used: with a per-class slice sample (--eval_samples N) a scan's label and
    score come from its sampled slices; use --eval_samples all for the clinical question. The bootstrap
    resamples patients (patients=None: each scan is its own patient).
    """
    scan_labels, reduced, scan_patients = scan_scores(scans, labels, scores, reduce, patients)
    out = slice_metrics(scan_labels, reduced, scan_patients, n_boot=n_boot, seed=seed)
    out["reduce"] = reduce
    out["n_scans"] = len(scan_labels)
    return out


def _bootstrap_weights(patient_codes, n_patients, rng):
    """Sample weights of one patient-bootstrap sample: how often each slice's patient was drawn."""
    return np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)[patient_codes]


def paired_auc_difference(labels, scores_a, scores_b, patients, n_boot=1000, seed=0):
    """ROC-AUC of scores_b minus that of scores_a on the same slices, with a 95 % CI from a bootstrap over
    patients in which both are scored on the SAME resampled patients: the CI of the difference, much narrower
    than either AUC's own CI, because both settings see the same hard and easy patients.

    -> dict(delta, ci, excludes_zero (the CI lies wholly above or below 0), auc_a, auc_b, n_boot, n_boot_skipped).
    Identical score vectors give delta 0 and the CI [0, 0]."""
    labels, patients = np.asarray(labels).astype(int), np.asarray(patients)
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if not len(labels) == len(scores_a) == len(scores_b) == len(patients):
        raise ValueError("paired_auc_difference: labels, both score vectors and patients must be aligned")
    out = {"delta": None, "ci": None, "excludes_zero": False, "auc_a": roc_auc(labels, scores_a),
           "auc_b": roc_auc(labels, scores_b), "n_boot": n_boot, "n_boot_skipped": 0}
    if out["auc_a"] is None:
        return out
    out["delta"] = out["auc_b"] - out["auc_a"]
    patient_codes = np.unique(patients, return_inverse=True)[1].reshape(-1)
    n_patients = int(patient_codes.max()) + 1
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_boot):
        weight = _bootstrap_weights(patient_codes, n_patients, rng)
        keep = weight > 0
        y, w = labels[keep], weight[keep]
        if y.min() == y.max():
            out["n_boot_skipped"] += 1
            continue
        deltas.append(roc_auc_score(y, scores_b[keep], sample_weight=w) - roc_auc_score(y, scores_a[keep], sample_weight=w))
    if deltas:
        low, high = np.percentile(deltas, [2.5, 97.5])
        out["ci"] = [float(low), float(high)]
        out["excludes_zero"] = bool(low > 0 or high < 0)
    return out


def paired_scan_auc_difference(scans, labels, scores_a, scores_b, patients, reduce="max", n_boot=1000, seed=0):
    """paired_auc_difference at the scan level: each setting's slice scores reduced per scan (scan_scores),
    scans resampled by patient, the same patients for both settings."""
    scan_labels, a, scan_patients = scan_scores(scans, labels, scores_a, reduce, patients)
    _, b, _ = scan_scores(scans, labels, scores_b, reduce, patients)
    return paired_auc_difference(scan_labels, a, b, scan_patients, n_boot=n_boot, seed=seed)


def subtype_metrics(subtype_labels, labels, scores, patients, n_boot=1000, seed=0):
    """Per subtype: slices with that subtype against all healthy slices (other bleeds left out)."""
    labels = np.asarray(labels).astype(int)
    out = {}
    for name, has_subtype in subtype_labels.items():
        keep = (np.asarray(has_subtype) == 1) | (labels == 0)
        out[name] = slice_metrics(np.asarray(has_subtype)[keep], np.asarray(scores)[keep],
                                  np.asarray(patients)[keep], n_boot=n_boot, seed=seed)
    return out


def _pixel_curves(acc):
    """Counts at every threshold edges[i] (predict bleed where value >= edges[i]), highest threshold first."""
    tp = np.cumsum(acc["pos"][::-1])
    fp = np.cumsum(acc["neg"][::-1])
    thresholds = acc["edges"][::-1]
    return tp, fp, thresholds


def choose_dice_threshold(acc):
    """The threshold that maximises pooled Dice on this accumulator (call it on the validation split)."""
    tp, fp, thresholds = _pixel_curves(acc)
    dice = 2 * tp / np.maximum(tp + fp + acc["pos"].sum(), 1)
    return float(thresholds[int(np.argmax(dice))])


def pixel_metrics(acc, threshold=None):
    """Pixel ROC-AUC and AUPRC inside the brain mask, pooled Dice at `threshold`, and the oracle best Dice.

    Dice is pooled over all pixels of the split (2 TP / (2 TP + FP + FN)). The oracle Dice picks its
    threshold on the very split it reports, so it is an upper bound, not a result.
    """
    n_pos, n_neg = int(acc["pos"].sum()), int(acc["neg"].sum())
    out = {"pixel_roc_auc": None, "pixel_auprc": None, "pixel_auprc_chance": n_pos / max(n_pos + n_neg, 1),
           "dice": None, "dice_threshold": threshold, "oracle_best_dice": None, "oracle_threshold": None,
           "n_pixels_bleed": n_pos, "n_pixels_no_bleed": n_neg, "n_slices": int(acc["slices"]),
           "positive_slices_without_mask": int(acc["positive_slices_without_mask"]),
           "unusable_masks": int(acc.get("unusable_masks", 0)),  # of those, slices whose mask did not fit (skipped)
           # bleed pixels inside the intracranial mask that the scored region leaves out (counted as missed, map 0)
           "bleed_pixels_outside_region": int(acc.get("bleed_pixels_outside_region", 0))}
    if n_pos == 0 or n_neg == 0:
        out["note"] = "pixel metrics need bleed and non-bleed pixels inside the brain mask"
        return out
    tp, fp, thresholds = _pixel_curves(acc)
    tpr, fpr = np.concatenate([[0], tp / n_pos]), np.concatenate([[0], fp / n_neg])
    out["pixel_roc_auc"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoid rule, as sklearn
    precision = tp / np.maximum(tp + fp, 1)
    out["pixel_auprc"] = float(np.sum(np.diff(tpr) * precision))  # sklearn's average precision
    dice = 2 * tp / (tp + fp + n_pos)
    best = int(np.argmax(dice))
    out["oracle_best_dice"], out["oracle_threshold"] = float(dice[best]), float(thresholds[best])
    if threshold is not None:
        tp_at, fp_at = _counts_at(acc, threshold)
        out["dice"] = float(2 * tp_at / (tp_at + fp_at + n_pos))
    return out


def _counts_at(acc, threshold):
    """(bleed pixels, non-bleed pixels) at or above the threshold."""
    i = int(np.searchsorted(acc["edges"], threshold, side="left"))  # first bin at or above the threshold
    return int(acc["pos"][i:].sum()), int(acc["neg"][i:].sum())


def pooled_dice(pairs):
    """Dice pooled over (accumulator, validation accumulator) pairs, each at the threshold chosen on its own
    validation accumulator: the folds of a CV run, each fold at its own model's threshold. -> (dice or None, the
    thresholds)."""
    tp = fp = n_pos = 0
    thresholds = []
    for acc, val_acc in pairs:
        if acc is None or val_acc is None:
            continue
        thresholds.append(choose_dice_threshold(val_acc))
        tp_at, fp_at = _counts_at(acc, thresholds[-1])
        tp, fp, n_pos = tp + tp_at, fp + fp_at, n_pos + int(acc["pos"].sum())
    return (float(2 * tp / (tp + fp + n_pos)) if n_pos else None), thresholds


# ---------------------------------------------------------------------------------------------
# plots

def plot_scores(path, labels, scores, title):
    """Histogram of slice scores by class, and the ROC curve with its AUC."""
    plt = runfiles.pyplot()
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, np.float64)
    fig, (ax_hist, ax_roc) = plt.subplots(1, 2, figsize=(10, 4))
    bins = np.histogram_bin_edges(scores, bins=30) if len(scores) else 10
    for value, name, color in [(0, "healthy", "tab:blue"), (1, "hemorrhage", "tab:red")]:
        s = scores[labels == value]
        if len(s):
            ax_hist.hist(s, bins=bins, alpha=0.55, color=color, label=f"{name} (n={len(s)})")
    ax_hist.set_xlabel("slice anomaly score (higher = more likely hemorrhage)")
    ax_hist.set_ylabel("number of slices")
    ax_hist.set_title("Score distribution by true class")
    ax_hist.legend()
    auc = roc_auc(labels, scores)
    if auc is None:
        ax_roc.text(0.5, 0.5, "ROC curve needs both\nhealthy and hemorrhage slices", ha="center", va="center")
    else:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax_roc.plot(fpr, tpr, color="tab:red", lw=2, label=f"model (ROC-AUC = {auc:.3f})")
    ax_roc.plot([0, 1], [0, 1], "--", color="gray", label="chance (0.5)")
    ax_roc.set_xlim(0, 1)
    ax_roc.set_ylim(0, 1.01)
    ax_roc.set_xlabel("false positive rate (1 - specificity)")
    ax_roc.set_ylabel("true positive rate (sensitivity)")
    ax_roc.set_title("ROC curve, slice level")
    ax_roc.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    runfiles.save_figure(fig, path, dpi=90)
    plt.close(fig)


def plot_overlays(path, examples, title="Error maps over the brain window", residual="abs", legend=None):
    """One row per kind (true positive / false positive / miss): error heat-map over the input slice.

    examples: {kind: [dict(image, map, brain_mask, gt_mask or None, score, and "id" or "position")]}
    (score_split's "examples"; other kinds, e.g. predict.py's unlabelled slices, come after those, with their own
    `legend`). One colour scale for all panels, so colours compare across slices.
    """
    plt = runfiles.pyplot()
    kinds = [*scoring.EXAMPLE_KINDS, *[kind for kind in examples if kind not in scoring.EXAMPLE_KINDS]]
    rows = [(kind, examples.get(kind, [])) for kind in kinds if examples.get(kind)]
    if not rows:
        return
    n_cols = max(len(exs) for _, exs in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(max(2.4 * n_cols + 1.5, 7.5), 2.6 * len(rows) + 1.3),
                             squeeze=False, layout="constrained")
    all_values = np.concatenate([ex["map"][ex["brain_mask"]] for _, exs in rows for ex in exs if ex["brain_mask"].any()] or [np.zeros(1)])
    vmax = max(float(np.percentile(all_values, 99.5)), 1e-6)
    heat = None
    for r, (kind, exs) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(exs):
                continue
            ex = exs[c]
            ax.imshow(ex["image"], cmap="gray", vmin=-1, vmax=1)
            # Hide the weakest errors so the anatomy under them stays visible.
            shown = np.ma.masked_less(ex["map"], 0.15 * vmax)
            heat = ax.imshow(shown, cmap="inferno", vmin=0, vmax=vmax, alpha=0.65)
            if ex["brain_mask"].any():
                ax.contour(ex["brain_mask"], levels=[0.5], colors="white", linewidths=0.8, linestyles="dashed")
            if ex.get("gt_mask") is not None and np.any(ex["gt_mask"]):
                ax.contour(ex["gt_mask"], levels=[0.5], colors="cyan", linewidths=1.0)
            name = ex.get("id", f"row {ex['position']}")
            ax.set_title(f"{kind}\n{name}  score {ex['score']:.4g}", fontsize=7)
    fig.colorbar(heat, ax=axes, shrink=0.6, aspect=30).set_label(scoring.RESIDUAL_LABELS[residual], fontsize=8)
    legend = legend or ("true positive = highest-scoring hemorrhage slices; false positive = highest-scoring healthy "
                        "slices;\nmiss = lowest-scoring hemorrhage slices. Cyan outline = ground-truth bleed (where known), "
                        "dashed white = brain mask")
    fig.suptitle(f"{title}\n{legend}", fontsize=8)
    runfiles.save_figure(fig, path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a .pt written by train.py (best_model.pt, ...), or a CV run folder (train.py --folds): its "
                        "out-of-fold scores (--split test), or its fold models as one (--split all)")
    p.add_argument("--data_dir", default=None, help="default: the training run's --data_dir")
    p.add_argument("--output_dir", default=None,
                   help="default: <checkpoint dir>/eval_<checkpoint name>_<split>, e.g. eval_best_model_test")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in the output dir")
    p.add_argument("--split", default="test", choices=["val", "test", "all"],
                   help="all: every patient of --data_dir, a data set the model never trained on (external test)")
    p.add_argument("--eval_samples", type=cohort.parse_eval_samples, default=None,
                   help="slices per class, or 'all' (default: the training run's value)")
    p.add_argument("--num_workers", type=int, default=None, help="default: the training run's value")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the scoring noise (default: the training seed). The splits always use the training "
                        "seed, so that no training patient can land in the test split")
    p.add_argument("--min_brain_fraction", type=float, default=None,
                   help="score only slices with at least this much intracranial area (default: the training run's value)")
    config.add_verify_cache_flag(p, from_checkpoint=True)
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap samples for the confidence intervals")
    p.add_argument("--keep_examples", type=int, default=6, help="overlay panels per kind")
    cv.add_cv_flags(p)
    config.add_device_flags(p, from_checkpoint=True)
    scoring.add_scoring_flags(p.add_argument_group("anomaly scoring (default: the training run's values)"), from_checkpoint=True)
    args = p.parse_args(argv)
    models.check_flag(args.n_boot >= 0, "n_boot", args.n_boot, "must be 0 (no confidence intervals) or more")
    models.check_flag(args.keep_examples >= 0, "keep_examples", args.keep_examples, "must be 0 or more")
    return args


def default_output_dir(checkpoint_path, split):
    """<checkpoint dir>/eval_<checkpoint name>_<split>: best_model.pt and best_model_loss.pt never share a folder."""
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), f"eval_{stem}_{split}")


def make_output_dir(output_dir, overwrite, result="metrics.json"):
    """Create the folder, refuse to replace a finished result without --overwrite, and take the folder's lock
    (one run per output dir at a time). -> the lock's path."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: {output_dir}: cannot create output dir ({e.strerror})")
    if not os.access(output_dir, os.W_OK):
        raise SystemExit(f"error: {output_dir}: output dir is not writable")
    lock = runfiles.lock_output_dir(output_dir, "evaluate.py")
    if os.path.exists(os.path.join(output_dir, result)) and not overwrite:
        runfiles.release_output_dir(lock)
        raise SystemExit(f"error: {output_dir}: holds the results of an earlier run ({result}); "
                         "use --overwrite to replace them, or --output_dir to write elsewhere")
    return lock


def saved_splits(checkpoint, checkpoint_path, rank=0):
    """The run's saved splits (cohort.load_splits_record), or None with a note for a run older than saved splits."""
    record = cohort.load_splits_record(checkpoint, checkpoint_path)
    if record is None and rank == 0:
        print(f"note: {checkpoint_path} holds no saved splits (trained before they were saved); the splits are drawn "
              "from the training seed again, so patients added to the folder since could move between splits")
    return record


def training_patients(checkpoint, checkpoint_path, train_args):
    """The patient ids of the run's training split: the lists the run saved (cohort.load_splits_record) where it has
    them, otherwise the split recomputed from the run's data dir and seed (cohort.split_patients). None when neither
    is at hand."""
    record = cohort.load_splits_record(checkpoint, checkpoint_path)
    if record is not None:
        return set(map(str, record["patients"]["train"]))
    train_dir = train_args.get("data_dir")
    if not train_dir or not os.path.isdir(train_dir):
        return None
    index = cohort.load_index(train_dir, dataset=None if train_args.get("dataset", "auto") == "auto" else train_args["dataset"],
                            cache_dir=train_args.get("cache_dir"), num_workers=train_args.get("num_workers", 0) or 1)
    return set(map(str, cohort.split_patients(index, train_args.get("seed", cohort.DEFAULT_SEED))["train"]))


def open_external(args, run, checkpoint, train_args, input_hu):
    """--split all: every patient of a data set the model never trained on, as one split "all". Refuses the run's
    own data dir; patients whose ids are among the run's training patients are left out, loudly, and counted."""
    if args.data_dir is None:
        raise SystemExit("error: --split all needs --data_dir: a data set the model did not train on")
    own = {train_args.get("data_dir"), (checkpoint.get("splits") or {}).get("data_dir")} - {None}  # the record's is absolute
    if any(os.path.realpath(args.data_dir) == os.path.realpath(d) for d in own):
        raise SystemExit(f"error: {args.data_dir}: this is the training run's own data dir; --split all is for data the "
                         "model never saw (use --split val or test here)")
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: {args.data_dir}: data dir not found")
    index = cohort.load_index(args.data_dir, num_workers=max(run.num_workers, 1))
    trained_on = training_patients(checkpoint, args.checkpoint, train_args)
    overlap = sorted(set(map(str, index["patient"])) & trained_on) if trained_on is not None else []
    if trained_on is None:
        print(f"WARNING: the training data dir {train_args.get('data_dir')!r} is not at hand, so patient ids could not be "
              "checked against the run's training patients")
    elif overlap:
        print(f"WARNING: {len(overlap)} patient(s) of {args.data_dir} have the id of a training patient of this run and are "
              f"left out: {', '.join(overlap[:10])}{' ...' if len(overlap) > 10 else ''}")
    rows = np.flatnonzero(~np.isin(index["patient"].astype(str), overlap)).astype(np.int64)
    if args.eval_samples is not None and args.eval_samples != "all":
        rng = np.random.default_rng([run.seed, 3])
        positive, negative = rows[index["any"][rows] == 1], rows[index["any"][rows] == 0]
        rows = np.sort(np.concatenate([cohort.draw_slices(rng, positive, args.eval_samples, "hemorrhage slices"),
                                       cohort.draw_slices(rng, negative, args.eval_samples, "healthy slices")]))
    cache = data.prepare_slices(args.data_dir, index, rows, run.image_size, input_hu, num_workers=max(run.num_workers, 1),
                                verify_cache=run.verify_cache)
    patients = {"all": np.unique(index["patient"][rows])}
    return data.RunData(index, {"all": rows}, cache, patients), {"training_patients_left_out": len(overlap),
                                                       "checked_against_training_patients": trained_on is not None}


def open_split_data(checkpoint_path, checkpoint, run, diffusion, decode, rank=0, world=1):
    """The run's data (its saved patient splits, its data folder unless --data_dir says otherwise) with the splits
    named in `decode` in a slice cache of the model's input representation: what evaluate.py and sweep.py score."""
    return data.open_run_data(run.data_dir, image_size=run.image_size, input_hu=diffusion.input_hu, split_seed=run.seed,
                              num_samples=run.num_samples, eval_samples=run.eval_samples, decode=decode, dataset=run.dataset,
                              cache_dir=run.cache_dir, num_workers=run.num_workers, rank=rank, world=world,
                              saved_splits=saved_splits(checkpoint, checkpoint_path, rank), verify_cache=run.verify_cache)


def score_run(diffusion, run, settings, seed, rd, split, keep_examples, rank, world, with_val=False):
    """Score the split; where the data set has bleed masks (or with_val), also the val split when reporting test
    (the Dice threshold is chosen there; a CV fold's reference slices are there). -> (result, val result or None)."""
    positions = rd.cache.ok(rd.splits[split], run.min_brain_fraction)
    if len(positions) == 0:
        raise SystemExit(f"error: {run.data_dir}: the {split} split has no usable slices")

    unusable_masks = {}  # position -> why: a mask that does not fit its slice is a counted skip

    def gt_masks_fn(position):
        try:
            return inputs.load_gt_mask(run.data_dir, rd.index["id"][position], run.image_size)
        except readers.BadFile as error:
            if position not in unusable_masks and rank == 0:
                print(f"skipped mask: {error}")
            unusable_masks[position] = str(error)
            return None
    # Pixel metrics only where the data set has bleed masks (the phantom, CT-ICH's *_HGE_Seg.jpg); RSNA has none.
    has_masks = any(gt_masks_fn(p) is not None for p in positions[rd.index["any"][positions] == 1])
    common = dict(seed=seed, num_workers=run.num_workers, rank=rank, world=world)
    if rank == 0:
        print(f"scoring the {split} split: {len(positions)} slices on {diffusion.device}" + (f" x{world} processes" if world > 1 else ""))
        if scoring.smoothing_note(settings.smooth_slices, run.eval_samples):
            print(scoring.smoothing_note(settings.smooth_slices, run.eval_samples))
    result = scoring.score_split(diffusion, data.SliceDataset(rd.cache, rd.index, positions), settings,
                                 keep_examples=keep_examples, gt_masks_fn=gt_masks_fn if has_masks else None, **common)
    result["skipped_slices"] = int(len(rd.splits[split]) - len(positions))
    if result["pixel"] is not None:
        result["pixel"]["unusable_masks"] = len(unusable_masks)
    if (result["pixel"] is None and not with_val) or split != "test":  # every rank sees the gathered result: same decision
        return result, None
    val_positions = rd.cache.ok(rd.splits["val"], run.min_brain_fraction)
    if rank == 0:
        print(f"choosing the Dice threshold on the val split ({len(val_positions)} slices)")
    val = scoring.score_split(diffusion, data.SliceDataset(rd.cache, rd.index, val_positions), settings, keep_examples=0,
                              gt_masks_fn=gt_masks_fn if has_masks else None, **common)
    return result, val


def reference_positions(rd, run):
    """A model's reference slices: every slice of the healthy patients of its validation split (patients it never
    trained on, with no bleed anywhere; the healthy slices of hemorrhage patients are left out, as slices next to a
    bleed or under its mass effect are not normal anatomy). Their scores put a model's scores on one scale (a CV
    run's folds) and, by level, give --level_norm z its statistics."""
    positions = rd.cache.ok(rd.splits["val"], run.min_brain_fraction)
    patients, sick = cohort.patients_with_bleed(rd.index)
    positions = positions[np.isin(rd.index["patient"][positions], patients[~sick])]
    if len(positions) == 0:
        raise SystemExit(f"error: {run.data_dir}: the validation split has no slice of a healthy patient to normalise "
                         "scores against")
    return positions


def score_reference(diffusion, run, settings, seed, rd):
    """score_split's result on the model's reference slices (reference_positions)."""
    positions = reference_positions(rd, run)
    print(f"scoring the reference: {len(positions)} slices of the healthy validation patients")
    return scoring.score_split(diffusion, data.SliceDataset(rd.cache, rd.index, positions), settings, seed=seed,
                               num_workers=run.num_workers, keep_examples=0)


def compute_metrics(result, val, index, split, settings, n_boot, seed):
    """metrics.json's content, less the settings: counts, slice / scan / subtype and pixel metrics."""
    rows, labels, patients = result["positions"], result["labels"], result["patients"]
    primary = result["scores"][settings.score]
    metrics = {"split": split, "score": settings.score,
               "counts": {"slices": len(rows), "hemorrhage_slices": int(labels.sum()), "healthy_slices": int((labels == 0).sum()),
                          "patients": len(np.unique(patients)), "scans": len(np.unique(result["scans"])),
                          "skipped_slices": result["skipped_slices"]},
               "slice": {name: slice_metrics(labels, v, patients, n_boot=n_boot, seed=seed) for name, v in result["scores"].items()},
               "scan": {reduce: scan_metrics(result["scans"], labels, primary, reduce, patients, n_boot=n_boot, seed=seed)
                        for reduce in ("max", "top3")},
               "subtype": subtype_metrics({name: index[name][rows] for name in cohort.SUBTYPES}, labels, primary, patients,
                                          n_boot=n_boot, seed=seed),
               "pixel": None, "seconds": result["seconds"]}
    if result["pixel"] is not None:
        if split == "test":
            threshold, chosen_on = (choose_dice_threshold(val["pixel"]), "val") if val["pixel"] is not None else (None, None)
        elif split == "val":
            threshold, chosen_on = choose_dice_threshold(result["pixel"]), "val (the reported split itself: equals the oracle)"
        else:  # an external set has no validation split of its own: Dice at a threshold is not reported
            threshold, chosen_on = None, "none (external set: see the oracle Dice, labelled as such)"
        metrics["pixel"] = pixel_metrics(result["pixel"], threshold) | {"dice_threshold_chosen_on": chosen_on}
    return metrics


def write_results(output_dir, metrics, result, index, split, settings):
    """metrics.json, scores.csv (one row per slice), scores_<name>.png and overlays.png."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    names, folds = list(result["scores"]), result.get("fold")  # a CV run's out-of-fold scores: which model scored it
    writer.writerow(["id", "patient", "scan", "any", *cohort.SUBTYPES, *names, *(["fold"] if folds is not None else [])])
    for i, row in enumerate(result["positions"]):
        writer.writerow([index["id"][row], index["patient"][row], index["scan"][row], int(index["any"][row]),
                         *[int(index[t][row]) for t in cohort.SUBTYPES], *[f"{result['scores'][n][i]:.6g}" for n in names],
                         *([int(folds[i])] if folds is not None else [])])
    runfiles.write_atomically(os.path.join(output_dir, "scores.csv"), lambda f: f.write(text.getvalue().encode()))
    runfiles.write_json(os.path.join(output_dir, "metrics.json"), metrics)  # last: a metrics.json means the rest is there
    for name, values in result["scores"].items():
        plot_scores(os.path.join(output_dir, f"scores_{name}.png"), result["labels"], values,
                    title=f"{split} split, score '{name}': {len(result['positions'])} slices from {metrics['counts']['patients']} patients")
    for exs in result["examples"].values():
        for ex in exs:
            ex["id"] = str(index["id"][ex["position"]])
    plot_overlays(os.path.join(output_dir, "overlays.png"), result["examples"],
                  title=f"{split} split, ranked by score '{settings.score}'", residual=settings.residual)


def print_table(metrics, n_boot):
    def fmt(m, key):
        value, ci = m.get(key), m.get(key + "_ci")
        if value is None:
            return "n/a"
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"
    c, score = metrics["counts"], metrics["score"]
    print(f"\n{metrics['split']} split: {c['slices']} slices ({c['hemorrhage_slices']} hemorrhage, {c['healthy_slices']} healthy), "
          f"{c['patients']} patients, {c['scans']} scans; 95% CIs from {n_boot} patient-bootstrap samples")
    print(f"{'slice score':14s} {'ROC-AUC [95% CI]':24s} {'AUPRC [95% CI]':24s} {'sens@90%spec':>12s} {'sens@95%spec':>12s}")
    for name, m in metrics["slice"].items():
        sens = [f"{m[k]:.3f}" if m[k] is not None else "n/a" for k in ("sens_at_90spec", "sens_at_95spec")]
        mark = " *" if name == score else ""
        print(f"{name + mark:14s} {fmt(m, 'roc_auc'):24s} {fmt(m, 'auprc'):24s} {sens[0]:>12s} {sens[1]:>12s}")
    for reduce, m in metrics["scan"].items():
        print(f"scan ({reduce} of '{score}'): ROC-AUC {fmt(m, 'roc_auc')}, {m['n_scans']} scans ({m['n_pos']} with a bleed)")
    print("subtype ROC-AUC: " + ", ".join(f"{t} {fmt(m, 'roc_auc')} (n={m['n_pos']})"
                                         for t, m in metrics["subtype"].items() if m["n_pos"]))
    if metrics["pixel"]:
        m = metrics["pixel"]
        threshold = "thresholds" if m["dice_threshold"] is None else f"threshold {m['dice_threshold']:.4g}"
        dice = "n/a" if m["dice"] is None else f"{m['dice']:.3f} ({threshold} from {m['dice_threshold_chosen_on']})"
        print(f"pixel (inside brain mask): AUPRC {m['pixel_auprc']:.3f}, ROC-AUC {m['pixel_roc_auc']:.3f}, "
              f"Dice {dice}, oracle best Dice {m['oracle_best_dice']:.3f}; {m['positive_slices_without_mask']} hemorrhage "
              f"slice(s) without a usable mask left out ({m['unusable_masks']} of them: mask did not fit the slice)")


def main(argv=None):
    args = get_args(argv)
    if cv.is_cv_run(args.checkpoint):
        return evaluate_cv(args)
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: {args.checkpoint}: checkpoint not found (nor a CV run folder with {cv.FOLDS_FILE})")
    # Under torchrun every process scores every world-th slice; rank 0 gathers the scores and alone writes the files.
    rank, world, device = models.setup_distributed(args.device)
    diffusion, checkpoint = models.load_checkpoint(args.checkpoint, device, args.precision)
    run, settings, seed = config.read_back(checkpoint, args, args.checkpoint, diffusion.config["image_size"])
    if run.data_dir is None:
        raise SystemExit(f"error: {args.checkpoint}: checkpoint does not record a data dir; pass --data_dir")
    output_dir = args.output_dir or default_output_dir(args.checkpoint, args.split)
    lock = make_output_dir(output_dir, args.overwrite) if rank == 0 else None
    try:
        evaluate_run(args, rank, world, diffusion, checkpoint, run, settings, seed, output_dir)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted: nothing was written to {output_dir}; run the same command again", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if lock:
            runfiles.release_output_dir(lock)


def evaluate_run(args, rank, world, diffusion, checkpoint, run, settings, seed, output_dir):
    external = {}
    if args.split == "all":  # an external set: every patient, none of the run's splits
        run = dataclasses.replace(run, eval_samples=args.eval_samples or "all")
        rd, external = data.in_turn(lambda: open_external(args, run, checkpoint, checkpoint.get("args") or {},
                                                          diffusion.input_hu), rank, world)
    else:  # the same patient-level splits as training (the training seed); Dice on test needs a threshold chosen on val
        rd = open_split_data(args.checkpoint, checkpoint, run, diffusion, ("val", "test") if args.split == "test" else ("val",),
                             rank, world)
    levels = settings.level_norm != "none"  # the reference: this run's healthy validation slices
    result, val = score_run(diffusion, run, settings, seed, rd, args.split, args.keep_examples, rank, world)
    models.teardown_distributed(world)
    if rank != 0:
        return
    if levels:
        statistics = fold_reference(args.checkpoint, checkpoint, diffusion, run, settings, seed)
        result["scores"] = cv.normalised(result["scores"], statistics, result["levels"])
    metrics = {"checkpoint": os.path.abspath(args.checkpoint)} | compute_metrics(
        result, val, rd.index, args.split, settings, args.n_boot, seed) | {
        "settings": run.as_dict() | {"noise_seed": seed, "input_hu": diffusion.input_hu} | settings.as_dict()}
    metrics["counts"] |= external
    write_results(output_dir, metrics, result, rd.index, args.split, settings)
    print_table(metrics, args.n_boot)
    print(f"* = the run's score '{settings.score}'. wrote {output_dir}/metrics.json, scores.csv, scores_*.png, overlays.png")


# ---------------------------------------------------------------------------------------------
# a CV run (train.py --folds): its out-of-fold scores, and its fold models as one

def reference_key(settings, seed, run):
    """What a fold model's reference statistics depend on: they are used again only for the same (the batch size
    is left out: a map does not depend on it; the cache version is in: it changes when decoding or the masks do)."""
    return {"settings": settings.as_dict() | {"eval_batch_size": None}, "seed": seed,
            "min_brain_fraction": run.min_brain_fraction, "cache_version": data.CACHE_VERSION}


def open_fold(args, path, device):
    """A fold model read as evaluate.py reads a run -> (diffusion, checkpoint, run, settings, seed)."""
    diffusion, checkpoint = models.load_checkpoint(path, device, args.precision)
    run, settings, seed = config.read_back(checkpoint, args, path, diffusion.config["image_size"])
    return diffusion, checkpoint, run, settings, seed


def score_own_fold(args, path, device):
    """Fold k's model on fold k's patients (its test split) and on its reference slices (reference_positions: the
    healthy patients of its validation split), which give its reference statistics (saved next to the checkpoint for
    predict.py and --split all). -> (result, reference result, reference statistics, index, run, settings, seed)."""
    diffusion, checkpoint, run, settings, seed = open_fold(args, path, device)
    rd = open_split_data(path, checkpoint, run, diffusion, ("val", "test"))
    result, _ = score_run(diffusion, run, settings, seed, rd, "test", args.keep_examples, 0, 1)
    val = score_reference(diffusion, run, settings, seed, rd)
    statistics = cv.reference_statistics(val["scores"], val["labels"], val["levels"], cv.level_bins(settings))
    cv.write_reference(cv.reference_path(path), reference_key(settings, seed, run), statistics)
    return result, val, statistics, rd.index, run, settings, seed


def fold_reference(path, checkpoint, diffusion, run, settings, seed):
    """A model's reference statistics (a fold model of a CV run, or a checkpoint scored with --level_norm): the
    saved ones for these settings, else scored now on its reference slices (reference_positions) of the training
    data (which must then be at hand); saved next to the checkpoint."""
    key = reference_key(settings, seed, run)
    statistics = cv.read_reference(cv.reference_path(path), key)
    if statistics is not None:
        return statistics
    train_dir = (checkpoint.get("splits") or {}).get("data_dir") or (checkpoint.get("args") or {}).get("data_dir")
    if not train_dir or not os.path.isdir(train_dir):
        raise SystemExit(f"error: {path}: no reference statistics (healthy validation slices) for these scoring "
                         f"settings in {cv.reference_path(path)}, and the training data {train_dir!r} is not at hand to "
                         f"score them: run python evaluate.py --checkpoint {path} with the same scoring flags where "
                         "the training data is")
    own = dataclasses.replace(run, data_dir=train_dir)
    val = score_reference(diffusion, own, settings, seed, open_split_data(path, checkpoint, own, diffusion, ("val",)))
    statistics = cv.reference_statistics(val["scores"], val["labels"], val["levels"], cv.level_bins(settings))
    cv.write_reference(cv.reference_path(path), key, statistics)
    return statistics


def score_external_fold(args, path, device):
    """One fold model on --data_dir (--split all), with its reference statistics.
    -> (result, statistics, index, external counts, run, settings, seed)."""
    diffusion, checkpoint, run, settings, seed = open_fold(args, path, device)
    statistics = fold_reference(path, checkpoint, diffusion, run, settings, seed)
    run = dataclasses.replace(run, eval_samples=args.eval_samples or "all")
    rd, external = open_external(argparse.Namespace(**vars(args) | {"checkpoint": path}), run, checkpoint,
                                 checkpoint.get("args") or {}, diffusion.input_hu)
    result, _ = score_run(diffusion, run, settings, seed, rd, "all", 0, 0, 1)
    return result, statistics, rd.index, external, run, settings, seed


def cv_metrics(args, folds):
    """--split test of a CV run: every fold's model on its own fold, pooled (cv.pool_out_of_fold), the metrics of
    compute_metrics over every patient; Dice with each fold at the threshold chosen on its own validation split.
    -> (metrics, pooled result, index, settings)."""
    scored = [score_own_fold(args, path, models.pick_device(args.device)) for _, path in folds]
    results, statistics = [s[0] for s in scored], [s[2] for s in scored]
    index, run, settings, seed = scored[0][3:]
    pooled = cv.pool_out_of_fold(results, statistics, settings.score, args.keep_examples)
    # Dice: fold k at the threshold chosen on the other folds' out-of-fold pixels (patients outside fold k, as its
    # validation split's; scoring every validation bleed slice again for it would double the cost of a CV evaluation)
    pixels = [r["pixel"] for r in results]
    others = [scoring.merge_pixel_accumulators([p for j, p in enumerate(pixels) if j != k and p is not None])
              if any(p is not None for j, p in enumerate(pixels) if j != k) else None for k in range(len(pixels))]
    metrics = compute_metrics(pooled, {"pixel": None}, index, "test", settings, args.n_boot, seed)
    if metrics["pixel"] is not None:
        dice, thresholds = pooled_dice(list(zip(pixels, others)))
        metrics["pixel"] |= {"dice": dice, "dice_threshold": None, "dice_thresholds_by_fold": thresholds,
                             "dice_threshold_chosen_on": "the other folds' out-of-fold pixels (patients outside the fold)"}
    metrics["split"] = "out-of-fold (each patient scored by the fold model that never saw it)"
    metrics["folds"] = [{"fold": k, "checkpoint": os.path.abspath(path), "patients": int(len(np.unique(r["patients"]))),
                         "slice_roc_auc": roc_auc(r["labels"], r["scores"][settings.score]), "reference": stats}
                        for (k, path), r, stats in zip(folds, results, statistics)]
    return metrics | {"settings": run.as_dict() | {"noise_seed": seed} | settings.as_dict()}, pooled, index, settings


def cv_external_metrics(args, folds):
    """--split all of a CV run: --data_dir scored by every fold model, combined (cv.ensemble_results)."""
    scored = [score_external_fold(args, path, models.pick_device(args.device)) for _, path in folds]
    result = cv.ensemble_results([s[0] for s in scored], [s[1] for s in scored])
    index, external, run, settings, seed = scored[0][2:]
    metrics = compute_metrics(result, None, index, "all", settings, args.n_boot, seed)
    metrics["counts"] |= external
    metrics["ensemble"] = {"models": [os.path.abspath(path) for _, path in folds], "references": [s[1] for s in scored],
                           "combined": "mean of the fold models' slice scores, each z-scored against its reference"}
    return metrics | {"settings": run.as_dict() | {"noise_seed": seed} | settings.as_dict()}, result, index, settings


def evaluate_cv(args):
    """--checkpoint RUN, a CV run: --split test (out-of-fold: every patient scored by the model that never saw it) or
    --split all (--data_dir scored by the fold models as one), written as for one checkpoint into
    RUN/eval_cv_<checkpoint name>_<oof|all>."""
    if args.split == "val":
        raise SystemExit("error: --split val: a CV run has no one validation split; --split test gives its out-of-fold "
                         "scores (sweep.py chooses settings on them)")
    folds = cv.fold_checkpoints(args.checkpoint, args.fold_checkpoint)
    stem = os.path.splitext(args.fold_checkpoint)[0]
    output_dir = args.output_dir or os.path.join(args.checkpoint, f"eval_cv_{stem}_{'oof' if args.split == 'test' else 'all'}")
    lock = make_output_dir(output_dir, args.overwrite)
    try:
        metrics, result, index, settings = (cv_metrics if args.split == "test" else cv_external_metrics)(args, folds)
        metrics = {"checkpoint": os.path.abspath(args.checkpoint)} | metrics
        write_results(output_dir, metrics, result, index, args.split, settings)
        print_table(metrics, args.n_boot)
        print(f"* = the run's score '{settings.score}'. wrote {output_dir}/metrics.json, scores.csv, scores_*.png, overlays.png")
    finally:
        runfiles.release_output_dir(lock)


if __name__ == "__main__":
    models.run_script(main)
