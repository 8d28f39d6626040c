"""Evaluate a trained pDDPM checkpoint on held-out patients: the evaluation protocol.

    python evaluate.py --checkpoint runs/scratch/best_model.pt                # test split
    python evaluate.py --checkpoint runs/scratch/best_model.pt --split val --eval_samples all

Every slice of the split is scored by the same sliding-window function training uses
(models.anomaly_maps + models.slice_scores); train.py imports score_split from here, so the
per-epoch validation ROC-AUC and the final test figures come from one piece of code.

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
import heapq
import json
import os
import time

import numpy as np
import scipy.ndimage
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from tqdm import tqdm

import data
import models

SCORES = ("mean", "brain_mean", "brain_p99")  # the names models.slice_scores returns
# Keyword arguments of models.anomaly_maps that a settings dict may carry (see map_settings).
MAP_KEYS = ("patch_size", "stride", "timesteps", "eval_batch_size", "skip_outside_mask", "context",
            "autocast_dtype", "channels_last", "pack_gap", "residual")
# Pixel histogram bins: error maps are |x - x0_hat| (or its positive part) with x in [-1, 1], so values lie in [0, 2]
# (larger values go to the last bin). Log-spaced edges keep ~0.25 % relative resolution from 1e-4 up,
# enough for pixel ROC-AUC / AUPRC / Dice within ~1e-3 of the exact values, in 32 KB per class.
PIXEL_EDGES = np.concatenate([[0.0], np.geomspace(1e-4, 2.0, 4095)])
EXAMPLE_KINDS = ("true positive", "false positive", "miss")
RESIDUAL_LABELS = {"abs": "reconstruction error |x - x0_hat|", "positive": "brighter than rebuilt: max(x - x0_hat, 0)"}


# ---------------------------------------------------------------------------------------------
# command-line pieces shared with train.py

def parse_eval_samples(text):
    """'all' or a positive number of slices per class."""
    if str(text) == "all":
        return "all"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return n


def add_scoring_args(group):
    """The anomaly-scoring flags; train.py and evaluate.py both take them. Returns their dest names."""
    actions = [
        group.add_argument("--patch_size", type=int, default=64, help="side of the noised square window"),
        group.add_argument("--stride", type=int, default=32, help="step between sliding windows at test time"),
        # Defaults chosen on the CT-ICH validation split with sweep.py (README, "Choosing the scoring
        # settings"); the spec's scoring is --score mean --eval_t 150 --median_size 0 --residual abs --smooth_slices 0.
        group.add_argument("--eval_t", type=int, nargs="+", default=[250],
                           help="noise timestep(s) at test time; several are averaged (spec: 150)"),
        group.add_argument("--eval_batch_size", type=int, default=64, help="windows per forward pass when scoring"),
        group.add_argument("--score", default="brain_p99", choices=SCORES,
                           help="slice score: mean of the error map (the spec's), its mean inside the brain mask, "
                                "or its 99th percentile there"),
        group.add_argument("--median_size", type=int, default=5,
                           help="median filter (pixels) on the error map before scoring (0 = off, the spec)"),
        group.add_argument("--residual", default="positive", choices=["abs", "positive"],
                           help="error map: |x - rebuilt| (the spec) or only where x is brighter than rebuilt "
                                "(acute blood is hyperdense; spec: abs)"),
        group.add_argument("--smooth_slices", type=int, default=2,
                           help="average each slice score with those of the scored slices up to N slices above and "
                                "below in the same scan (bleeds span several slices, edge noise does not; 0 = off, the spec)"),
        group.add_argument("--skip_outside_mask", action="store_true",
                           help="do not run windows that contain no brain (faster; their error counts as 0)"),
        group.add_argument("--context", type=int, default=None,
                           help="feed the model a context x context crop around each window instead of the whole slice "
                                "(faster, but it changed the slice ranking completely in bench.py: not recommended)"),
        # bench.py (README, "Speed"): 49 windows in 9 passes at 128^2, 9-11x naive with bf16 + channels_last; slice
        # ROC-AUC moved by up to 0.02 against one window per pass on the phantom (<= 0.008 on CT-ICH), rho >= 0.976.
        group.add_argument("--pack_windows", action=argparse.BooleanOptionalAction, default=True,
                           help="noise several windows at least patch_size/2 apart in one forward pass (49 windows in 9 "
                                "passes); --no-pack_windows runs one window per pass, as the spec"),
        # bench.py: 1.3x at 128^2 with bf16 on this CPU (slightly slower at 64^2); the same map up to bf16 rounding.
        group.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                           help="score in NHWC memory layout (weights converted for the call and back)"),
    ]
    return [a.dest for a in actions]


def map_settings(args):
    """Keyword arguments for models.anomaly_maps from parsed flags."""
    return dict(patch_size=args.patch_size, stride=args.stride, timesteps=list(args.eval_t),
                eval_batch_size=args.eval_batch_size, skip_outside_mask=bool(args.skip_outside_mask),
                context=args.context,  # a context crop holds one window: nothing to pack
                pack_gap=args.patch_size // 2 if args.pack_windows and args.context is None else None,
                channels_last=bool(args.channels_last), residual=args.residual)


def setup_distributed(device_name="auto"):
    """-> (rank, world, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run is rank 0 of 1.
    Each process drives the GPU of its local rank (backend nccl), or the CPU (backend gloo)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = models.pick_device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def in_turn(build, rank, world):
    """build() on every process, but one group after the other, with a barrier between: first rank 0, then local
    rank 0 of each other node, then the rest. build() fills the index and slice caches, and two processes creating
    the same cache files at once would replace each other's files; going in turn, the later ones find them built
    (on a node-local cache dir, each node builds its own copy once)."""
    if world == 1:
        return build()
    turn = 0 if rank == 0 else 1 if int(os.environ.get("LOCAL_RANK", rank)) == 0 else 2
    result = None
    for t in range(3):
        if t == turn:
            result = build()
        torch.distributed.barrier()
    return result


# ---------------------------------------------------------------------------------------------
# scoring a split

def new_pixel_accumulator():
    """Histograms of error-map values inside the brain mask, for bleed and non-bleed pixels."""
    return {"edges": PIXEL_EDGES, "pos": np.zeros(len(PIXEL_EDGES), np.int64),
            "neg": np.zeros(len(PIXEL_EDGES), np.int64), "slices": 0, "positive_slices_without_mask": 0}


def accumulate_pixels(acc, error_map, brain_mask, gt_mask):
    """Add one slice. Only pixels inside the brain mask count (the protocol scores the intracranial space)."""
    values = np.asarray(error_map, np.float64)[brain_mask]
    bleed = np.asarray(gt_mask, bool)[brain_mask]
    bins = np.searchsorted(acc["edges"], values, side="right") - 1  # bin i holds [edges[i], edges[i+1])
    acc["pos"] += np.bincount(bins[bleed], minlength=len(acc["edges"]))
    acc["neg"] += np.bincount(bins[~bleed], minlength=len(acc["edges"]))
    acc["slices"] += 1


def _median_filtered(error_map, median_size):
    """The same filter models.slice_scores applies before scoring."""
    if median_size and median_size > 1:
        return scipy.ndimage.median_filter(error_map, size=median_size)
    return error_map


def _keep(heap, k, key, make_example, counter):
    """Keep the k items with the largest key; build the (copied) example only when it is kept."""
    if k <= 0:
        return
    if len(heap) < k:
        heapq.heappush(heap, (key, counter, make_example()))
    elif key > heap[0][0]:
        heapq.heapreplace(heap, (key, counter, make_example()))


def score_split(model, dataset, scheduler, settings, device, seed=0, keep_examples=8, gt_masks_fn=None,
                rank=0, world=1):
    """Score every slice of `dataset` with the sliding-window anomaly map.

    dataset: items dict(image, mask, label, position), plus aligned arrays .positions, .patients and
    .scans (as data.SliceDataset has), reported with the scores for the patient bootstrap and scan metrics.

    settings: anomaly_maps keyword arguments (map_settings) plus optional "median_size" (slice-score
    median filter), "score" (which score ranks the kept examples, default "mean"), "autocast_dtype",
    "num_workers" (DataLoader workers). Noise of slice `position` depends only on
    (seed, position), so results do not depend on batch size, order or `world`.
    gt_masks_fn(position) -> bool [S,S] bleed mask or None; when given, pixel histograms are accumulated
    (a hemorrhage slice without a mask is counted and left out; a healthy slice without one has no bleed).
    With world > 1 (torch.distributed initialised) each rank scores every world-th slice and all ranks
    return the merged result.
    Returns a dict: positions, labels, patients, scans, scores {name: float64 [N]}, examples
    {kind: [example dicts]}, pixel (accumulator or None), seconds.
    """
    map_kwargs = {k: settings[k] for k in MAP_KEYS if k in settings}
    median_size = settings.get("median_size", 0)
    rank_by = settings.get("score", "mean")
    passes = 1  # forward passes per slice
    if len(dataset):
        windows = [(k, top, left) for k, (top, left) in enumerate(models.window_grid(
            dataset[0]["image"].shape[-1], settings["patch_size"], settings["stride"]))]
        passes = len(windows) if map_kwargs.get("pack_gap") is None else len(
            models.pack_windows(windows, settings["patch_size"], settings["stride"], map_kwargs["pack_gap"]))
    # Enough slices per loader batch to fill a few forward passes of eval_batch_size windows.
    slices_per_batch = max(8, -(-4 * settings.get("eval_batch_size", 64) // passes))
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(shard, batch_size=slices_per_batch, shuffle=False,
                                         num_workers=settings.get("num_workers", 0))
    positions, labels, scores = [], [], {}
    heaps = {kind: [] for kind in EXAMPLE_KINDS}
    pixel = new_pixel_accumulator() if gt_masks_fn is not None else None
    model.eval()
    t0 = time.time()
    for batch in tqdm(loader, desc="scoring slices", unit="batch", leave=False, disable=rank != 0):
        images = batch["image"].to(device)
        masks = batch["mask"].to(device)
        batch_positions = batch["position"].numpy().astype(np.int64)
        batch_labels = batch["label"].numpy().astype(np.int8)
        seeds = [seed * 1_000_003 + int(p) for p in batch_positions]
        maps = models.anomaly_maps(model, images, scheduler, seeds=seeds, brain_masks=masks, **map_kwargs).float()
        batch_scores = models.slice_scores(maps, masks, median_size=median_size)
        maps, masks = maps.cpu().numpy(), masks.cpu().numpy()
        positions.append(batch_positions)
        labels.append(batch_labels)
        for name, values in batch_scores.items():
            scores.setdefault(name, []).append(np.asarray(values, np.float64))

        for i, (pos, label) in enumerate(zip(batch_positions, batch_labels)):
            # Pixel metrics and overlays see the map the slice score saw (median-filtered if asked);
            # filtering is slow on CPU, so it is done only for slices that need it.
            error_map = _median_filtered(maps[i], median_size) if pixel is not None else None
            gt = None
            if pixel is not None:
                gt = gt_masks_fn(int(pos))
                if gt is None and label == 1:
                    pixel["positive_slices_without_mask"] += 1
                else:
                    gt = np.zeros(masks[i].shape, bool) if gt is None else np.asarray(gt, bool)
                    accumulate_pixels(pixel, error_map, masks[i], gt)
            score = float(batch_scores[rank_by][i])

            def example(kind, i=i, pos=pos, label=label, score=score, error_map=error_map, gt=gt):
                shown = _median_filtered(maps[i], median_size) if error_map is None else error_map
                return {"kind": kind, "position": int(pos), "label": int(label), "score": score,
                        "image": batch["image"][i, 0].numpy().copy(), "map": np.array(shown, np.float32),
                        "brain_mask": masks[i].copy(), "gt_mask": gt}
            if label == 1:
                _keep(heaps["true positive"], keep_examples, score, lambda: example("true positive"), int(pos))
                _keep(heaps["miss"], keep_examples, -score, lambda: example("miss"), int(pos))
            else:
                _keep(heaps["false positive"], keep_examples, score, lambda: example("false positive"), int(pos))

    result = {"positions": np.concatenate(positions) if positions else np.zeros(0, np.int64),
              "labels": np.concatenate(labels) if labels else np.zeros(0, np.int8),
              "scores": {name: np.concatenate(v) for name, v in scores.items()},
              "heaps": heaps, "pixel": pixel}
    if world > 1:
        result = _merge_ranks(result, keep_examples)
    order = np.argsort(result["positions"], kind="stable")  # one order whatever the sharding
    examples = {kind: [ex for _, _, ex in sorted(result["heaps"][kind], reverse=True)] for kind in EXAMPLE_KINDS}
    positions = result["positions"][order]
    pixel = result["pixel"]
    if pixel is not None and pixel["pos"].sum() == 0:
        pixel = None  # masks were looked up but none of the slices had one: no pixel metrics
    scans = _lookup(dataset.positions, dataset.scans, positions)
    # The overlays above rank slices by their own score; the smoothing is applied to the reported scores only.
    scores = {name: smooth_along_scans(positions, scans, v[order], settings.get("smooth_slices", 0))
              for name, v in result["scores"].items()}
    return {"positions": positions, "labels": result["labels"][order],
            "patients": _lookup(dataset.positions, dataset.patients, positions), "scans": scans,
            "scores": scores, "examples": examples, "pixel": pixel, "seconds": time.time() - t0}


def smooth_along_scans(positions, scans, scores, width):
    """Mean of each slice's score and the scores of the slices up to `width` index rows above and below it
    in the same scan, where those were scored too. Index rows of a scan are consecutive and ordered by z
    (data.load_index), so row p +- 1 is the next slice up or down; slices left out (bad file, too little
    brain, not sampled) simply do not count. Scores only: the maps are untouched."""
    positions, scans, scores = np.asarray(positions), np.asarray(scans), np.asarray(scores, np.float64)
    if width <= 0 or len(positions) == 0:
        return scores
    order = np.argsort(positions, kind="stable")
    sorted_positions = positions[order]
    total, count = scores.copy(), np.ones(len(scores))
    for offset in range(-width, width + 1):
        if offset == 0:
            continue
        at = np.clip(np.searchsorted(sorted_positions, positions + offset), 0, len(positions) - 1)
        other = order[at]
        found = (positions[other] == positions + offset) & (scans[other] == scans)
        total[found] += scores[other[found]]
        count[found] += 1
    return total / count


def smoothing_note(smooth_slices, eval_samples):
    """A one-line warning when --smooth_slices has few neighbours to average: a per-class sample of
    slices (--eval_samples N) leaves most slices without their scored neighbours."""
    if smooth_slices and eval_samples != "all":
        return (f"note: --smooth_slices {smooth_slices} averages a slice's score with its scored neighbours; with "
                f"--eval_samples {eval_samples} most slices have none, so use --eval_samples all for reported figures")
    return None


def _lookup(keys, values, wanted):
    """values[k] for each wanted key k (keys unique), vectorised: a dict would cost ~100 MB on all of RSNA."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    return np.asarray(values)[order][np.searchsorted(keys[order], wanted)]


def _merge_ranks(result, keep_examples):
    """Gather the shards of every rank (small: scores, a few examples, two histograms)."""
    import torch.distributed as dist
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, result)
    merged = {"positions": np.concatenate([p["positions"] for p in parts]),
              "labels": np.concatenate([p["labels"] for p in parts]),
              # a rank with an empty shard (fewer slices than processes) has no score arrays at all
              "scores": {name: np.concatenate([p["scores"].get(name, np.zeros(0)) for p in parts]) for name in parts[0]["scores"]},
              "heaps": {kind: heapq.nlargest(keep_examples, [item for p in parts for item in p["heaps"][kind]])
                        for kind in EXAMPLE_KINDS},
              "pixel": None}
    if parts[0]["pixel"] is not None:
        merged["pixel"] = new_pixel_accumulator()
        for p in parts:
            for key in ("pos", "neg", "slices", "positive_slices_without_mask"):
                merged["pixel"][key] += p["pixel"][key]
    return merged


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
        times_drawn = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)
        weight = times_drawn[patient_codes]
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


def scan_metrics(scans, labels, scores, reduce="max", patients=None, n_boot=1000, seed=0):
    """One score per scan (max, or mean of the top 3 slice scores), label = any bleed slice in the scan.

    Only the slices given are used: with a per-class slice sample (--eval_samples N) a scan's label and
    score come from its sampled slices; use --eval_samples all for the clinical question. The bootstrap
    resamples patients (patients=None: each scan is its own patient).
    """
    scans, labels, scores = np.asarray(scans), np.asarray(labels).astype(int), np.asarray(scores, np.float64)
    patients = scans if patients is None else np.asarray(patients)
    names, scan_of_slice = np.unique(scans, return_inverse=True)
    scan_of_slice = scan_of_slice.reshape(-1)
    scan_labels = np.zeros(len(names), int)
    np.maximum.at(scan_labels, scan_of_slice, labels)
    order = np.lexsort((-scores, scan_of_slice))  # by scan, then score descending
    starts = np.searchsorted(scan_of_slice[order], np.arange(len(names)))
    if reduce == "max":
        scan_scores = scores[order][starts]
    elif reduce == "top3":
        ends = np.append(starts[1:], len(order))
        scan_scores = np.array([scores[order][a:min(b, a + 3)].mean() for a, b in zip(starts, ends)])
    else:
        raise ValueError(f"reduce must be 'max' or 'top3', got {reduce!r}")
    scan_patients = patients[order][starts]
    out = slice_metrics(scan_labels, scan_scores, scan_patients, n_boot=n_boot, seed=seed)
    out["reduce"] = reduce
    out["n_scans"] = len(names)
    return out


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
           "positive_slices_without_mask": int(acc["positive_slices_without_mask"])}
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
        i = int(np.searchsorted(acc["edges"], threshold, side="left"))  # first bin at or above the threshold
        tp_at = int(acc["pos"][i:].sum())
        out["dice"] = float(2 * tp_at / (tp_at + int(acc["neg"][i:].sum()) + n_pos))
    return out


# ---------------------------------------------------------------------------------------------
# plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_scores(path, labels, scores, title):
    """Histogram of slice scores by class, and the ROC curve with its AUC."""
    plt = _pyplot()
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
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_overlays(path, examples, title="Error maps over the brain window", residual="abs"):
    """One row per kind (true positive / false positive / miss): error heat-map over the input slice.

    examples: {kind: [dict(image, map, brain_mask, gt_mask or None, score, and "id" or "position")]}
    (score_split's "examples"). One colour scale for all panels, so colours compare across slices.
    """
    plt = _pyplot()
    rows = [(kind, examples.get(kind, [])) for kind in EXAMPLE_KINDS if examples.get(kind)]
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
    fig.colorbar(heat, ax=axes, shrink=0.6, aspect=30).set_label(RESIDUAL_LABELS[residual], fontsize=8)
    fig.suptitle(f"{title}\n"
                 "true positive = highest-scoring hemorrhage slices; false positive = highest-scoring healthy slices;\n"
                 "miss = lowest-scoring hemorrhage slices. Cyan outline = ground-truth bleed (where known), "
                 "dashed white = brain mask", fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a .pt written by train.py (best_model.pt, ...)")
    p.add_argument("--data_dir", default=None, help="default: the training run's --data_dir")
    p.add_argument("--output_dir", default=None, help="default: <checkpoint dir>/eval_<split>")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--eval_samples", type=parse_eval_samples, default=None,
                   help="slices per class, or 'all' (default: the training run's value)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num_workers", type=int, default=None, help="default: the training run's value")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the scoring noise (default: the training seed). The splits always use the training "
                        "seed, so that no training patient can land in the test split")
    p.add_argument("--min_brain_fraction", type=float, default=None,
                   help="score only slices with at least this much intracranial area (default: the training run's value)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="autocast for scoring (default: the training run's value)")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap samples for the confidence intervals")
    p.add_argument("--keep_examples", type=int, default=6, help="overlay panels per kind")
    g = p.add_argument_group("anomaly scoring (default: the training run's values)")
    p.set_defaults(**{dest: None for dest in add_scoring_args(g)})  # None = take it from the checkpoint
    return p.parse_args(argv)


def resolve_settings(args, train_args, config):
    """Flags given on the command line win; everything else comes from the training run."""
    def pick(name, fallback=None):
        value = getattr(args, name, None)
        return value if value is not None else train_args.get(name, fallback)
    s = {"data_dir": pick("data_dir"), "dataset": train_args.get("dataset", "auto"), "cache_dir": train_args.get("cache_dir"),
         "image_size": config.get("image_size", train_args.get("image_size")),
         "channels": config.get("in_channels", train_args.get("channels")),
         "split_seed": train_args.get("seed", 42), "num_samples": train_args.get("num_samples", 2000),
         "eval_samples": pick("eval_samples", 50), "seed": pick("seed", 42), "num_workers": pick("num_workers", 0),
         "patch_size": pick("patch_size", 64), "stride": pick("stride", 32), "eval_t": list(pick("eval_t", [150])),
         "eval_batch_size": pick("eval_batch_size", 64), "score": pick("score", "mean"), "median_size": pick("median_size", 0),
         "smooth_slices": pick("smooth_slices", 0), "residual": pick("residual", "abs"),
         "skip_outside_mask": bool(pick("skip_outside_mask", False)), "context": pick("context"),
         "pack_windows": bool(pick("pack_windows", True)), "channels_last": bool(pick("channels_last", True)),
         "precision": pick("precision", "auto"), "min_brain_fraction": pick("min_brain_fraction", 0.0)}
    if s["data_dir"] is None:
        raise SystemExit(f"error: {args.checkpoint}: checkpoint does not record a data dir; pass --data_dir")
    return s


def main(argv=None):
    args = get_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: {args.checkpoint}: checkpoint not found")
    # Under torchrun every process scores every world-th slice; rank 0 gathers the scores and alone writes the files.
    rank, world, device = setup_distributed(args.device)
    model, config, checkpoint = models.load_checkpoint(args.checkpoint, device="cpu")
    model = model.to(device).eval()
    s = resolve_settings(args, checkpoint.get("args") or {}, config)
    output_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval_{args.split}")

    # ---- the same patient-level splits as training ------------------------------------------
    def build():
        if rank == 0:
            try:
                os.makedirs(output_dir, exist_ok=True)
            except OSError as e:
                raise SystemExit(f"error: {output_dir}: cannot create output dir ({e.strerror})")
            if not os.access(output_dir, os.W_OK):
                raise SystemExit(f"error: {output_dir}: output dir is not writable")
        index = data.load_index(s["data_dir"], dataset=None if s["dataset"] == "auto" else s["dataset"],
                                cache_dir=s["cache_dir"], num_workers=s["num_workers"])
        splits = data.make_splits(index, s["split_seed"], s["num_samples"], s["eval_samples"])
        # Dice on the test split needs a threshold chosen on val, so val is decoded too (cheap; cached).
        needed = np.concatenate([splits["val"], splits["test"]]) if args.split == "test" else splits["val"]
        cache = data.prepare_slices(s["data_dir"], index, needed, s["image_size"], s["channels"],
                                    cache_dir=s["cache_dir"], num_workers=s["num_workers"])
        return index, splits, cache
    index, splits, cache = in_turn(build, rank, world)
    positions = cache.ok(splits[args.split], s["min_brain_fraction"])
    if len(positions) == 0:
        raise SystemExit(f"error: {s['data_dir']}: the {args.split} split has no usable slices")

    def gt_masks_fn(position):
        return data.load_gt_mask(s["data_dir"], index["id"][position], s["image_size"])
    # Pixel metrics only where the data set has bleed masks (the phantom); RSNA and this CT-ICH copy have none.
    has_masks = any(gt_masks_fn(p) is not None for p in positions[index["any"][positions] == 1])

    amp = models.autocast_dtype(s["precision"], device)
    # the resolved flags go through the same map_settings as train.py's
    settings = map_settings(argparse.Namespace(**s)) | {"autocast_dtype": amp, "median_size": s["median_size"],
                                                        "smooth_slices": s["smooth_slices"], "score": s["score"],
                                                        "num_workers": s["num_workers"]}
    scheduler = models.make_scheduler()
    dataset = data.SliceDataset(cache, index, positions)
    if rank == 0:
        print(f"scoring the {args.split} split: {len(positions)} slices on {device}" + (f" x{world} processes" if world > 1 else ""))
        if smoothing_note(s["smooth_slices"], s["eval_samples"]):
            print(smoothing_note(s["smooth_slices"], s["eval_samples"]))
    result = score_split(model, dataset, scheduler, settings, device, seed=s["seed"], keep_examples=args.keep_examples,
                         gt_masks_fn=gt_masks_fn if has_masks else None, rank=rank, world=world)
    val = None
    if result["pixel"] is not None and args.split == "test":  # every rank sees the gathered result: same decision
        val_positions = cache.ok(splits["val"], s["min_brain_fraction"])
        if rank == 0:
            print(f"choosing the Dice threshold on the val split ({len(val_positions)} slices)")
        val = score_split(model, data.SliceDataset(cache, index, val_positions), scheduler, settings, device,
                          seed=s["seed"], keep_examples=0, gt_masks_fn=gt_masks_fn, rank=rank, world=world)
    if world > 1:
        torch.distributed.barrier()  # leave together (see the end of train.py)
        torch.distributed.destroy_process_group()
    if rank != 0:
        return

    # ---- metrics ------------------------------------------------------------------------------
    rows = result["positions"]
    labels, patients, scans = result["labels"], result["patients"], result["scans"]
    primary = result["scores"][s["score"]]
    metrics = {"checkpoint": os.path.abspath(args.checkpoint), "split": args.split, "score": s["score"],
               "counts": {"slices": len(rows), "hemorrhage_slices": int(labels.sum()), "healthy_slices": int((labels == 0).sum()),
                          "patients": len(np.unique(patients)), "scans": len(np.unique(scans)),
                          "skipped_slices": int(len(splits[args.split]) - len(positions))},
               "slice": {name: slice_metrics(labels, v, patients, n_boot=args.n_boot, seed=s["seed"])
                         for name, v in result["scores"].items()},
               "scan": {reduce: scan_metrics(scans, labels, primary, reduce, patients, n_boot=args.n_boot, seed=s["seed"])
                        for reduce in ("max", "top3")},
               "subtype": subtype_metrics({name: index[name][rows] for name in data.SUBTYPES}, labels, primary, patients,
                                          n_boot=args.n_boot, seed=s["seed"]),
               "pixel": None,
               "seconds": result["seconds"],
               "settings": s}
    if result["pixel"] is not None:
        if args.split == "test":
            threshold, chosen_on = (choose_dice_threshold(val["pixel"]), "val") if val["pixel"] is not None else (None, None)
        else:
            threshold, chosen_on = choose_dice_threshold(result["pixel"]), "val (the reported split itself: equals the oracle)"
        metrics["pixel"] = pixel_metrics(result["pixel"], threshold) | {"dice_threshold_chosen_on": chosen_on}

    # ---- files ---------------------------------------------------------------------------------
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(output_dir, "scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        names = list(result["scores"])
        writer.writerow(["id", "patient", "scan", "any", *data.SUBTYPES, *names])
        for i, row in enumerate(rows):
            writer.writerow([index["id"][row], index["patient"][row], index["scan"][row], int(index["any"][row]),
                             *[int(index[t][row]) for t in data.SUBTYPES], *[f"{result['scores'][n][i]:.6g}" for n in names]])
    for name, values in result["scores"].items():
        plot_scores(os.path.join(output_dir, f"scores_{name}.png"), labels, values,
                    title=f"{args.split} split, score '{name}': {len(rows)} slices from {metrics['counts']['patients']} patients")
    for exs in result["examples"].values():
        for ex in exs:
            ex["id"] = str(index["id"][ex["position"]])
    plot_overlays(os.path.join(output_dir, "overlays.png"), result["examples"],
                  title=f"{args.split} split, ranked by score '{s['score']}'", residual=s["residual"])

    # ---- table ---------------------------------------------------------------------------------
    def fmt(m, key):
        value, ci = m.get(key), m.get(key + "_ci")
        if value is None:
            return "n/a"
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"
    c = metrics["counts"]
    print(f"\n{args.split} split: {c['slices']} slices ({c['hemorrhage_slices']} hemorrhage, {c['healthy_slices']} healthy), "
          f"{c['patients']} patients, {c['scans']} scans; 95% CIs from {args.n_boot} patient-bootstrap samples")
    print(f"{'slice score':14s} {'ROC-AUC [95% CI]':24s} {'AUPRC [95% CI]':24s} {'sens@90%spec':>12s} {'sens@95%spec':>12s}")
    for name, m in metrics["slice"].items():
        sens = [f"{m[k]:.3f}" if m[k] is not None else "n/a" for k in ("sens_at_90spec", "sens_at_95spec")]
        mark = " *" if name == s["score"] else ""
        print(f"{name + mark:14s} {fmt(m, 'roc_auc'):24s} {fmt(m, 'auprc'):24s} {sens[0]:>12s} {sens[1]:>12s}")
    for reduce, m in metrics["scan"].items():
        print(f"scan ({reduce} of '{s['score']}'): ROC-AUC {fmt(m, 'roc_auc')}, {m['n_scans']} scans ({m['n_pos']} with a bleed)")
    print("subtype ROC-AUC: " + ", ".join(f"{t} {fmt(m, 'roc_auc')} (n={m['n_pos']})"
                                         for t, m in metrics["subtype"].items() if m["n_pos"]))
    if metrics["pixel"]:
        m = metrics["pixel"]
        dice = "n/a" if m["dice"] is None else f"{m['dice']:.3f} (threshold {m['dice_threshold']:.4g} from {m['dice_threshold_chosen_on']})"
        print(f"pixel (inside brain mask): AUPRC {m['pixel_auprc']:.3f}, ROC-AUC {m['pixel_roc_auc']:.3f}, "
              f"Dice {dice}, oracle best Dice {m['oracle_best_dice']:.3f}")
    print(f"* = the run's score '{s['score']}'. wrote {output_dir}/metrics.json, scores.csv, scores_*.png, overlays.png")


if __name__ == "__main__":
    main()
