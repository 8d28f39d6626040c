"""Evaluate a trained pDDPM run on held-out patients: the evaluation protocol.

    python evaluate.py --checkpoint runs/scratch/best_model.pt                # test split
    python evaluate.py --checkpoint runs/scratch/best_model.pt --split val --eval_samples all
    python evaluate.py --checkpoint runs/ctich_cv --fold_checkpoint best_model_loss.pt   # a CV run, out of fold
    python evaluate.py --checkpoint runs/ctich_cv --split all --data_dir OTHER            # an external test set

The run is opened as one object (trained.open_run: a checkpoint, or a CV run folder and its fold models) and every
slice is scored by scoring.score_split, the path train.py's per-epoch validation runs too, with the run's scoring
settings unless flags say otherwise. The metrics are metrics.py's, the figures plots.py's.

The protocol: splits are by patient (no patient in two splits); confidence intervals come from a bootstrap that
resamples patients, because slices of one head are strongly correlated. Slice, scan ("does this head CT contain a
bleed?") and per-subtype ROC-AUC; sensitivity at fixed specificity; and, where ground-truth bleed masks exist, pixel
AUPRC / ROC-AUC inside the brain mask and Dice at a threshold chosen on the validation split (an external set: none,
the oracle only; a CV run's ensemble map: the run's reference threshold, docs/method.md "Cross-validation"). A CV run is scored out of
fold: every patient by the fold model that never saw it, the folds' scores put on one scale (cv.py).
"""
import argparse
import csv
import io
import os
import sys

import numpy as np

import cohort
import config
import cv
import metrics
import models
import plots
import runfiles
import scoring
import trained

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    trained.add_run_flags(p, "a .pt written by train.py (best_model.pt, ...), or a CV run folder (train.py --folds): its "
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
    config.add_verify_cache_flag(p, from_checkpoint=True)
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap samples for the confidence intervals")
    p.add_argument("--keep_examples", type=int, default=6, help="overlay panels per kind")
    scoring.add_scoring_flags(p.add_argument_group("anomaly scoring (default: the training run's values)"), from_checkpoint=True)
    args = p.parse_args(argv)
    models.check_flag(args.n_boot >= 0, "n_boot", args.n_boot, "must be 0 (no confidence intervals) or more")
    models.check_flag(args.keep_examples >= 0, "keep_examples", args.keep_examples, "must be 0 or more")
    return args

def write_results(output_dir, report, result, index, split, settings):
    """scores.csv (one row per slice), metrics.json, scores_<name>.png and overlays.png (where there are examples).
    -> the names of the files written."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    names, folds = list(result["scores"]), result.get("fold")  # a CV run's out-of-fold scores: which model scored it
    writer.writerow(["id", "patient", "scan", "any", *cohort.SUBTYPES, *names, *(["fold"] if folds is not None else [])])
    for i, row in enumerate(result["positions"]):
        writer.writerow([index["id"][row], index["patient"][row], index["scan"][row], int(index["any"][row]),
                         *[int(index[t][row]) for t in cohort.SUBTYPES], *[f"{result['scores'][n][i]:.6g}" for n in names],
                         *([int(folds[i])] if folds is not None else [])])
    runfiles.write_atomically(os.path.join(output_dir, "scores.csv"), lambda f: f.write(text.getvalue().encode()))
    runfiles.write_json(os.path.join(output_dir, "metrics.json"), report)  # last: a metrics.json means the rest is there
    written = ["metrics.json", "scores.csv"]
    for name, values in result["scores"].items():
        plots.plot_scores(os.path.join(output_dir, f"scores_{name}.png"), result["labels"], values,
                          title=f"{split} split, score '{name}': {len(result['positions'])} slices from "
                                f"{report['counts']['patients']} patients")
        written.append(f"scores_{name}.png")
    for exs in result["examples"].values():
        for ex in exs:
            ex["id"] = str(index["id"][ex["position"]])
    title = f"{split} split, ranked by score '{settings.score}'"
    if "map_scale" in result:  # a CV run's ensemble (trained.ensemble_external)
        title = f"{split}: the fold models' ensemble map, ranked by the ensemble's score '{settings.score}' (z)"
    if plots.plot_overlays(os.path.join(output_dir, "overlays.png"), result["examples"], title=title,
                           label=scoring.map_label(settings)):
        written.append("overlays.png")
    return written


def print_table(report, n_boot):
    def fmt(m, key):
        value, ci = m.get(key), m.get(key + "_ci")
        if value is None:
            return "n/a"
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"
    c, score = report["counts"], report["score"]
    print(f"\n{report['split']} split: {c['slices']} slices ({c['hemorrhage_slices']} hemorrhage, {c['healthy_slices']} healthy), "
          f"{c['patients']} patients, {c['scans']} scans; 95% CIs from {n_boot} patient-bootstrap samples")
    print(f"{'slice score':14s} {'ROC-AUC [95% CI]':24s} {'AUPRC [95% CI]':24s} {'sens@90%spec':>12s} {'sens@95%spec':>12s}")
    for name, m in report["slice"].items():
        sens = [f"{m[k]:.3f}" if m[k] is not None else "n/a" for k in ("sens_at_90spec", "sens_at_95spec")]
        mark = " *" if name == score else ""
        print(f"{name + mark:14s} {fmt(m, 'roc_auc'):24s} {fmt(m, 'auprc'):24s} {sens[0]:>12s} {sens[1]:>12s}")
    for reduce, m in report["scan"].items():
        print(f"scan ({reduce} of '{score}'): ROC-AUC {fmt(m, 'roc_auc')}, {m['n_scans']} scans ({m['n_pos']} with a bleed)")
    print("subtype ROC-AUC: " + ", ".join(f"{t} {fmt(m, 'roc_auc')} (n={m['n_pos']})"
                                         for t, m in report["subtype"].items() if m["n_pos"]))
    if report["pixel"]:
        m = report["pixel"]
        threshold = "thresholds" if m["dice_threshold"] is None else f"threshold {m['dice_threshold']:.4g}"
        dice = "n/a" if m["dice"] is None else f"{m['dice']:.3f} ({threshold} from {m['dice_threshold_chosen_on']})"
        print(f"pixel (inside brain mask): AUPRC {m['pixel_auprc']:.3f}, ROC-AUC {m['pixel_roc_auc']:.3f}, "
              f"Dice {dice}, oracle best Dice {m['oracle_best_dice']:.3f}; {m['positive_slices_without_mask']} hemorrhage "
              f"slice(s) without a usable mask left out ({m['unusable_masks']} of them: mask did not fit the slice)")

def default_output_dir(args, is_cv):
    """<checkpoint dir>/eval_<checkpoint name>_<split> (best_model.pt and best_model_loss.pt never share a folder); for
    a CV run, RUN/eval_cv_<fold checkpoint name>_<oof|all>."""
    if args.output_dir:
        return args.output_dir
    if is_cv:
        stem = os.path.splitext(args.fold_checkpoint)[0]
        return os.path.join(args.checkpoint, f"eval_cv_{stem}_{'oof' if args.split == 'test' else 'all'}")
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    return os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval_{stem}_{args.split}")


def subtypes_of(index, result):
    return {name: index[name][result["positions"]] for name in cohort.SUBTYPES}


def run_settings(run, settings, seed, input_hu):
    """metrics.json's settings block: the run's configuration, the scoring noise seed, the input representation and
    the scoring settings, the same in every evaluation."""
    return run.as_dict() | {"noise_seed": seed, "input_hu": input_hu} | settings.as_dict()


def evaluate_split(args, run, rank, world):
    """--split val / test of one checkpoint (torchrun: every process scores every world-th slice; rank 0 gathers)."""
    fold = run.folds[0]
    rd = run.fold_data(fold, ("val", "test") if args.split == "test" else ("val",), rank, world)
    result, val = run.score(fold, rd, args.split, args.keep_examples, rank, world)
    models.teardown_distributed(world)
    if rank != 0:
        return None
    result = run.combine([result])  # --level_norm: the scores against the reference (healthy validation slices)
    return metrics.compute_metrics(result, val, subtypes_of(rd.index, result), args.split, run.settings.score,
                                   args.n_boot, run.seed), result, rd.index


def evaluate_external(args, run, rank, world):
    """--split all: every patient of --data_dir scored by the run's model(s), combined (a CV run: the mean of the fold
    models' z-scored scores, and pixel metrics and overlays of their ensemble map, trained.ensemble_external)."""
    if run.is_cv:  # one process (main refuses torchrun)
        result, index, counts = run.ensemble_external(args.data_dir, args.eval_samples, args.keep_examples)
    else:
        results, index, counts = run.score_external(args.data_dir, args.eval_samples, args.keep_examples, rank, world)
        models.teardown_distributed(world)
        if rank != 0:
            return None
        result = run.combine(results)
    out = metrics.compute_metrics(result, None, subtypes_of(index, result), "all", run.settings.score, args.n_boot, run.seed)
    out["counts"] |= counts
    if run.is_cv:
        out["ensemble"] = {"models": [os.path.abspath(f.path) for f in run.folds], "references": run.references(),
                           "combined": "mean of the fold models' slice scores, each z-scored against its reference",
                           "map": "mean of the fold models' maps, each divided by its reference spread of the run's "
                                  f"score, times the mean spread ({result['map_scale']:.4g}): pixel metrics and overlays"}
        if out["pixel"] is not None:
            out["pixel"] = reference_dice(run, result, out["pixel"])
    return out, result, index


def reference_dice(run, result, pixel):
    """A CV run's Dice on an external set, at a threshold that never looked at the set's masks: the run's map
    threshold (TrainedRun.map_threshold: the brain_p99 score of each fold's healthy reference slices, mean + 2
    standard deviations, over its spread, averaged; predict.py's segmentation threshold) in the ensemble map's units."""
    threshold = run.map_threshold()
    if threshold is None:
        return pixel
    threshold *= result["map_scale"]
    return pixel | {"dice": metrics.pixel_metrics(result["pixel"], threshold)["dice"], "dice_threshold": threshold,
                    "dice_threshold_chosen_on": "the run's reference slices (each fold's healthy validation patients): "
                                                "brain_p99 mean + 2 sd, predict.py's segmentation threshold"}


def evaluate_out_of_fold(args, run):
    """--split test of a CV run: every fold's model on its own fold, pooled (cv.pool_out_of_fold), the metrics over
    every patient; Dice with each fold at the threshold chosen on the other folds' out-of-fold pixels."""
    pooled, results, statistics, index = run.out_of_fold(args.keep_examples)
    out = metrics.compute_metrics(pooled, None, subtypes_of(index, pooled), "test", run.settings.score, args.n_boot, run.seed)
    if out["pixel"] is not None:
        dice, thresholds = cv.out_of_fold_dice([r["pixel"] for r in results])
        out["pixel"] |= {"dice": dice, "dice_threshold": None, "dice_thresholds_by_fold": thresholds,
                         "dice_threshold_chosen_on": "the other folds' out-of-fold pixels (patients outside the fold)"}
    out["split"] = "out-of-fold (each patient scored by the fold model that never saw it)"
    out["folds"] = [{"fold": f.number, "checkpoint": os.path.abspath(f.path), "patients": int(len(np.unique(r["patients"]))),
                     "slice_roc_auc": metrics.roc_auc(r["labels"], r["scores"][run.settings.score]), "reference": stats}
                    for f, r, stats in zip(run.folds, results, statistics)]
    return out, pooled, index


def main(argv=None):
    args = get_args(argv)
    # Under torchrun (one checkpoint) every process scores every world-th slice; rank 0 alone writes the files.
    rank, world, device = models.setup_distributed(args.device)
    run = trained.open_run(args.checkpoint, args, args.fold_checkpoint, device, args.precision)
    if run.is_cv and world > 1:
        raise SystemExit("error: a CV run is scored in one process (its fold models one after the other); run it "
                         "without torchrun")
    if run.is_cv and args.split == "val":
        raise SystemExit("error: --split val: a CV run has no one validation split; --split test gives its out-of-fold "
                         "scores (sweep.py chooses settings on them)")
    if run.run.data_dir is None:
        raise SystemExit(f"error: {args.checkpoint}: checkpoint does not record a data dir; pass --data_dir")
    output_dir = default_output_dir(args, run.is_cv)
    lock = runfiles.claim_output_dir(output_dir, "evaluate.py", overwrite=args.overwrite, finished="metrics.json") if rank == 0 else None
    try:
        if args.split == "all":
            done = evaluate_external(args, run, rank, world)
        elif run.is_cv:
            done = evaluate_out_of_fold(args, run)
        else:
            done = evaluate_split(args, run, rank, world)
        if done is None:  # not rank 0
            return
        out, result, index = done
        out = {"checkpoint": os.path.abspath(args.checkpoint)} | out | {
            "settings": run_settings(run.run, run.settings, run.seed, run.folds[0].diffusion.input_hu)}
        written = write_results(output_dir, out, result, index, args.split, run.settings)
        print_table(out, args.n_boot)
        print(f"* = the run's score '{run.settings.score}'. wrote {output_dir}/: {', '.join(written)}")
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted: nothing was written to {output_dir}; run the same command again", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if lock:
            runfiles.release_output_dir(lock)


if __name__ == "__main__":
    models.run_script(main)
