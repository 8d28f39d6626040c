"""The evaluation metrics, torch-free: slice, scan, subtype and pixel metrics with patient-bootstrap 95 % CIs, and paired
differences of two scorings of the same slices. evaluate.py, train.py (per-epoch validation), sweep.py, compare.py and
bench.py all compute their figures here.

Why a patient bootstrap: slices of one head are strongly correlated, so a bootstrap over slices gives intervals that are
too narrow. A bootstrap sample draws patients with replacement and takes all their slices (sample weights count a
patient drawn twice). Pixel metrics are computed from fixed-bin histograms (scoring.new_pixel_accumulator), so memory
stays bounded on large splits.
"""
import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


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

    aucs, auprcs = [], []
    for weights in bootstrap_weights(patient_codes, n_patients, n_boot, np.random.default_rng(seed)):
        auc, ap, valid = weighted_roc_auc_and_ap(labels, scores, weights)
        aucs += list(auc[valid])
        auprcs += list(ap[valid])
        out["n_boot_skipped"] += int((~valid).sum())
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


BOOT_CHUNK = 250  # bootstrap samples evaluated together (memory: BOOT_CHUNK x slices float64)


def bootstrap_weights(patient_codes, n_patients, n_boot, rng):
    """The patient bootstrap, BOOT_CHUNK samples at a time: sample weights [samples, slices], how often each slice's
    patient was drawn (a patient drawn twice counts twice). The draws are those of n_boot calls of
    rng.integers(0, n_patients, n_patients) in turn."""
    for start in range(0, n_boot, BOOT_CHUNK):
        draws = rng.integers(0, n_patients, (min(BOOT_CHUNK, n_boot - start), n_patients))
        rows = np.arange(len(draws))[:, None] * n_patients
        counts = np.bincount((draws + rows).ravel(), minlength=len(draws) * n_patients).reshape(len(draws), n_patients)
        yield counts[:, patient_codes].astype(np.float64)


def weighted_roc_auc_and_ap(labels, scores, weights):
    """ROC-AUC and average precision of the slices under every row of sample weights [samples, slices] at once, as
    sklearn's roc_auc_score and average_precision_score give them with sample_weight (the same curves: one point per
    distinct score, ties counted half in the AUC; equal up to float rounding, ~1e-15), for the bootstrap, where
    sklearn's per-call input checks cost more than the arithmetic. -> (auc, ap, valid): valid = both classes weighted."""
    order = np.argsort(-scores, kind="mergesort")  # highest score first: thresholds going down
    ordered, positive = scores[order], labels[order] == 1
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # groups of tied scores
    w = weights[:, order]
    pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    valid = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (neg * (tp - pos + 0.5 * pos)).sum(axis=1) / (n_pos * n_neg)  # the trapezoids under the ROC curve
        ap = (pos * (tp / np.maximum(tp + fp, 1e-300))).sum(axis=1) / n_pos  # recall steps x precision
    return auc, ap, valid


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
    deltas = []
    for weights in bootstrap_weights(patient_codes, n_patients, n_boot, np.random.default_rng(seed)):
        auc_a, _, valid = weighted_roc_auc_and_ap(labels, scores_a, weights)
        auc_b, _, _ = weighted_roc_auc_and_ap(labels, scores_b, weights)
        deltas += list((auc_b - auc_a)[valid])
        out["n_boot_skipped"] += int((~valid).sum())
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


def compute_metrics(result, val, subtypes, split, score, n_boot, seed):
    """metrics.json's figures for one scored split (scoring.score_split's result, or pooled / ensembled results):
    counts, slice metrics of every score, scan metrics (max and mean of the top 3 slices) and subtype metrics of
    `score`, and pixel metrics where the result has pixel histograms. subtypes: {subtype: its 0/1 label of each
    result slice}. val: the validation split's result, whose pixels choose the Dice threshold reported on test."""
    labels, patients = result["labels"], result["patients"]
    primary = result["scores"][score]
    metrics = {"split": split, "score": score,
               "counts": {"slices": len(result["positions"]), "hemorrhage_slices": int(labels.sum()),
                          "healthy_slices": int((labels == 0).sum()), "patients": len(np.unique(patients)),
                          "scans": len(np.unique(result["scans"])), "skipped_slices": result["skipped_slices"]},
               "slice": {name: slice_metrics(labels, v, patients, n_boot=n_boot, seed=seed) for name, v in result["scores"].items()},
               "scan": {reduce: scan_metrics(result["scans"], labels, primary, reduce, patients, n_boot=n_boot, seed=seed)
                        for reduce in ("max", "top3")},
               "subtype": subtype_metrics(subtypes, labels, primary, patients, n_boot=n_boot, seed=seed),
               "pixel": None, "seconds": result["seconds"]}
    if result["pixel"] is not None:
        if split == "test":
            threshold, chosen_on = (choose_dice_threshold(val["pixel"]), "val") if val and val["pixel"] is not None else (None, None)
        elif split == "val":
            threshold, chosen_on = choose_dice_threshold(result["pixel"]), "val (the reported split itself: equals the oracle)"
        else:  # an external set has no validation split of its own: Dice at a threshold is not reported
            threshold, chosen_on = None, "none (external set: see the oracle Dice, labelled as such)"
        metrics["pixel"] = pixel_metrics(result["pixel"], threshold) | {"dice_threshold_chosen_on": chosen_on}
    return metrics
