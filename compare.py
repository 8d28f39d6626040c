"""Compare training runs: loss and validation ROC-AUC curves side by side; or scorings of the same slices, paired.

    python compare.py --scratch_dir runs/scratch --pretrained_dir runs/pretrained --output comparison.png
    python compare.py runs/a runs/b runs/c --output comparison.png
    python compare.py --scores runs/cv/eval_default runs/cv/eval_option_a runs/cv/eval_option_b

--scores: evaluate.py output folders (scores.csv) of the same slices under different settings or models; each is
compared with the first by the paired patient bootstrap (metrics.paired_auc_difference: slice and scan ROC-AUC
differences with 95 % CIs, the same resampled patients for both).

Each run dir holds training_history.json (one dict per epoch, written by train.py) and
args.json (its flags); the legend label is args["run_label"], or is built from the flags.
"""
import argparse
import csv
import json
import os

import numpy as np

import metrics
import plots
import runfiles


def run_label(args):
    """args['run_label'] if the run has one, else a short description of the model."""
    if args.get("run_label"):
        return args["run_label"]
    if args.get("pretrained"):
        kind = f"UNet2DModel from {os.path.basename(os.path.normpath(str(args.get('hf_model', '?'))))}"
    else:
        kind = f"scratch bc{args.get('base_channels', '?')}"
    return f"{kind} {args.get('channels', '?')}ch"


def load_run(run_dir):
    """(history, label) of one run dir; one-line error if it is not a training run."""
    path = os.path.join(run_dir, "training_history.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {run_dir}: no training_history.json (not a train.py output dir, or no epoch finished yet)")
    try:
        with open(path) as f:
            history = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: cannot read ({e})")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise SystemExit(f"error: {path}: expected a list of per-epoch records")
    args = {}
    args_path = os.path.join(run_dir, "args.json")
    if os.path.isfile(args_path):
        try:
            with open(args_path) as f:
                args = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: {args_path}: cannot read ({e})")
    label = run_label(args) if args else os.path.basename(os.path.normpath(run_dir))
    return history, label


def read_scores(folder):
    """{slice id: row} of an evaluate.py output folder's scores.csv; one-line error where there is none."""
    path = os.path.join(folder, "scores.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {folder}: no scores.csv (not an evaluate.py output folder)")
    with open(path, newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def compare_scores(folders, score, n_boot, reduce="max"):
    """Print (and return) each folder's slice and scan ROC-AUC and its paired difference to the first folder's, on
    the slices all of them scored."""
    tables = [read_scores(folder) for folder in folders]
    ids = sorted(set.intersection(*(set(t) for t in tables)))
    if not ids:
        raise SystemExit(f"error: {', '.join(folders)}: no slice is in every scores.csv")
    if any(score not in next(iter(t.values())) for t in tables):
        raise SystemExit(f"error: --score {score}: not a column of every scores.csv")
    first = tables[0]
    labels = np.array([int(first[i]["any"]) for i in ids])
    patients, scans = np.array([first[i]["patient"] for i in ids]), np.array([first[i]["scan"] for i in ids])
    values = [np.array([float(t[i][score]) for i in ids]) for t in tables]
    print(f"{len(ids)} slices ({int(labels.sum())} hemorrhage), {len(set(patients))} patients, score {score}, scan = {reduce}")
    out = []
    for folder, v in zip(folders, values):
        slice_m = metrics.slice_metrics(labels, v, patients, n_boot=n_boot)
        scan_m = metrics.scan_metrics(scans, labels, v, reduce, patients, n_boot=n_boot)
        d = metrics.paired_auc_difference(labels, values[0], v, patients, n_boot=n_boot)
        ds = metrics.paired_scan_auc_difference(scans, labels, values[0], v, patients, reduce=reduce, n_boot=n_boot)
        out.append({"folder": folder, "slice": slice_m["roc_auc"], "scan": scan_m["roc_auc"], "delta": d, "delta_scan": ds})
        print(f"  {folder}: slice {slice_m['roc_auc']:.3f}, scan {scan_m['roc_auc']:.3f} | Δ slice {d['delta']:+.3f} "
              f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]{' *' if d['excludes_zero'] else ''}, Δ scan {ds['delta']:+.3f} "
              f"[{ds['ci'][0]:+.3f}, {ds['ci'][1]:+.3f}]{' *' if ds['excludes_zero'] else ''}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dirs", nargs="*", help="any number of train.py output dirs")
    p.add_argument("--scratch_dir", default=None, help="from-scratch run (spec default: checkpoints_patched)")
    p.add_argument("--pretrained_dir", default=None, help="pretrained run (spec default: checkpoints_pretrained_3ch)")
    p.add_argument("--output", default="comparison.png")
    p.add_argument("--scores", nargs="+", default=None,
                   help="evaluate.py output folders of the same slices: paired differences to the first")
    p.add_argument("--score", default="brain_p99", help="with --scores: the slice score compared")
    p.add_argument("--scan_score", default="max", choices=["max", "top3"], help="with --scores: how a scan's slices combine")
    p.add_argument("--n_boot", type=int, default=1000, help="with --scores: patient-bootstrap samples")
    args = p.parse_args(argv)
    if args.scores:
        return compare_scores(args.scores, args.score, args.n_boot, args.scan_score)
    run_dirs = list(args.run_dirs) + [d for d in (args.scratch_dir, args.pretrained_dir) if d]
    if not run_dirs:  # the spec's defaults
        run_dirs = ["checkpoints_patched", "checkpoints_pretrained_3ch"]
    runs = [load_run(d) for d in run_dirs]
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise SystemExit(f"error: {args.output}: directory {out_dir} does not exist")
    runfiles.check_figure_format(args.output, "--output")
    plots.plot_runs([h for h, _ in runs], [label for _, label in runs], args.output)
    for run_dir, (history, label) in zip(run_dirs, runs):
        epoch, auc = plots.best_epoch(history, "val_roc_auc", "max")
        loss_epoch, loss = plots.best_epoch(history, "val_loss", "min")
        auc_text = "n/a" if auc is None else f"{auc:.3f} at epoch {epoch}"
        loss_text = "n/a" if loss is None else f"{loss:.4f} at epoch {loss_epoch}"
        print(f"{label} ({run_dir}): {len(history)} epochs, best val ROC-AUC {auc_text}, best val loss {loss_text}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
