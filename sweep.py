"""Choose the scoring settings on the VALIDATION split: slice score x median filter x t x window x smoothing x residual.

    python sweep.py --checkpoint runs/ctich/best_model.pt --eval_t 100 150 250 400 500 \
        --windows 32:16 48:24 --median_sizes 0 5 --output_dir runs/ctich/sweep_val

For every window, residual and t, the anomaly maps of the validation slices are made once by the one scoring path
(scoring.score_split, as evaluate.py and training score) and kept in memory; every slice score, median filter and
slice smoothing width is then read off the same maps with the steps score_split ends with (scoring.slice_scores,
scoring.finish_scores), so a row is the number evaluate.py --split val gives for that setting. The average over
several t ("multi-t", as in cDDPM) is the mean of the per-t maps, which is what the map of several t is, unless an
option acts on the map itself (--hyperdensity_prior): then it is scored apart. Every
other scoring flag (noise, ...) is the training run's unless given, and holds for every row. The test
split is never touched here: test figures are reported once, by evaluate.py, for the setting chosen on validation.
"""
import argparse
import collections
import dataclasses
import os
import sys

import numpy as np

import cohort
import config
import cv
import data
import metrics
import midline
import models
import runfiles
import scoring
import trained

D = scoring.DEFAULTS  # every default grid below holds the default setting, so the table shows where it stands


GRID = ("eval_t", "patch_size", "stride", "residual", "median_size", "smooth_slices", "score", "scored_region", "bone_margin",
        "level_norm", "anomaly_map", "asymmetry", "hyperdensity_prior", "normative")  # made by the grid flags


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    trained.add_run_flags(p, "a .pt written by train.py (its validation split), or a CV run folder (train.py --folds): "
                             "the out-of-fold scores of every patient, as evaluate.py pools them")
    p.add_argument("--data_dir", default=None, help="default: the training run's --data_dir")
    p.add_argument("--eval_samples", type=cohort.parse_eval_samples, default="all",
                   help="validation slices per class, or 'all'")
    p.add_argument("--eval_t", type=int, nargs="+", default=sorted({100, 150, 250, 400, 500} | set(D.eval_t)))
    p.add_argument("--multi_t", type=int, nargs="*", default=[150, 250, 400],
                   help="also score the average map over these t (each must be in --eval_t)")
    p.add_argument("--windows", nargs="+", default=None,
                   help="patch:stride pairs (default: the training run's patch_size:stride)")
    p.add_argument("--median_sizes", type=int, nargs="+", default=sorted({0, D.median_size}))
    p.add_argument("--smooth_slices", type=int, nargs="+", default=sorted({0, 1, D.smooth_slices}),
                   help="neighbouring-slice averaging widths (evaluate.py --smooth_slices); needs --eval_samples all "
                        "to have neighbours")
    p.add_argument("--residuals", nargs="+", default=list(scoring.RESIDUALS), choices=list(scoring.RESIDUALS),
                   help="error maps to try (evaluate.py --residual); each costs a full set of maps")
    p.add_argument("--scored_regions", nargs="+", default=None,
                   help="scored regions to try: intracranial or no_bone_3d:N (--scored_region no_bone_3d --bone_margin "
                        "N); default: the run's")
    p.add_argument("--level_norms", nargs="+", default=None, choices=list(scoring.LEVEL_NORMS),
                   help="slice-score normalisations to try (evaluate.py --level_norm); default: the run's")
    p.add_argument("--anomaly_maps", nargs="+", default=None, choices=list(scoring.ANOMALY_MAPS),
                   help="maps to try: the model's, and/or the no-learning blood_band baseline; default: the run's")
    p.add_argument("--asymmetries", nargs="+", default=None, choices=list(scoring.ASYMMETRIES),
                   help="map less its mirror image about the head's midline to try (evaluate.py --asymmetry); read off "
                        "the same maps; default: the run's")
    p.add_argument("--hyperdensity_priors", nargs="+", default=None, choices=["off", "on"],
                   help="the map weighted by acute-blood band membership (evaluate.py --hyperdensity_prior) to try; "
                        "read off the same maps; default: the run's")
    p.add_argument("--normatives", nargs="+", default=None, choices=list(scoring.NORMATIVES),
                   help="the normative map to try (evaluate.py --normative), read off the same maps: fitted on the "
                        "reference's healthy slices (a fold's validation patients, or a validation split's own healthy "
                        "slices); default: the run's")
    p.add_argument("--write_scores", action="store_true",
                   help="also write each row's slice scores as scores/<row>/scores.csv (evaluate.py's columns), for "
                        "compare.py --scores and scripts/detection_study.py")
    # every other scoring flag, as evaluate.py has it: the training run's value unless given (every row uses it)
    scoring.add_scoring_flags(p.add_argument_group("scoring of every row (default: the training run's values)"),
                              from_checkpoint=True, leave_out=GRID)
    config.add_verify_cache_flag(p, from_checkpoint=True)
    p.add_argument("--n_boot", type=int, default=1000)
    p.add_argument("--output_dir", default=None, help="default: <checkpoint dir>/sweep_<checkpoint name>_val")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in the output dir")
    return p.parse_args(argv)


# One set of slices scored by one model: the validation split of a checkpoint, or a fold of a CV run (its test split,
# the fold's patients, with its model's validation split: `reference` marks those, scored but not reported; their
# healthy slices put the fold's scores on the pooled scale, as in evaluate.py).
# healthy: the slices --level_norm z fits its statistics on where a part has no reference slices (a validation split:
# its healthy patients, cv.reference_positions).
# blood: each slice's acute-blood band membership (scoring.blood_weight), what --hyperdensity_prior weights maps by.
# found: what is worked out once per part when first needed (the slices' midlines for --asymmetries).
Part = collections.namedtuple("Part", "diffusion dataset masks anatomy levels reference healthy columns blood found")


def dataset_part(diffusion, rd, positions, reference_positions, healthy_positions=()):
    """A Part of the rows `positions` (and reference_positions) of the run data rd, with its brain masks."""
    dataset = data.SliceDataset(rd.cache, rd.index, np.sort(np.concatenate([positions, reference_positions])))
    items = [dataset[i] for i in range(len(dataset))]
    masks = np.stack([it["mask"].numpy() for it in items]) if items else None
    anatomy = np.stack([it["anatomy"].numpy() for it in items]) if items else None
    columns = {name: np.asarray(rd.index[name])[dataset.positions] for name in ("id", "any", *cohort.SUBTYPES)}
    blood = np.stack([scoring.blood_weight(it["image"].numpy(), diffusion.input_hu[0]) for it in items]).astype(np.float32) if items else None
    return Part(diffusion, dataset, masks, anatomy, scoring.slice_levels(anatomy, masks) if items else None,
                np.isin(dataset.positions, reference_positions), np.isin(dataset.positions, healthy_positions), columns, blood, {})


def open_parts(run):
    """A checkpoint's validation split as the one Part; or a CV run's folds, each fold's model on its own fold's
    patients with its validation split, whose healthy slices put its scores on the pooled scale (as evaluate.py's
    out-of-fold scores)."""
    if not run.is_cv:
        fold = run.folds[0]
        rd = run.fold_data(fold, ("val",))
        positions = rd.cache.ok(rd.splits["val"], fold.run.min_brain_fraction)
        return [dataset_part(fold.diffusion, rd, positions, np.zeros(0, np.int64),
                             healthy_positions=cv.reference_positions(rd, fold.run))]
    parts = []
    for fold in run.folds:
        test = run.fold_data(fold, ("test",))
        rd, reference = cv.reference_slices(fold)  # the fold's whole healthy validation, as evaluate.py's reference
        parts.append(dataset_part(fold.diffusion, rd, test.cache.ok(test.splits["test"], fold.run.min_brain_fraction),
                                  reference))
    return parts


def pooled_view(parts):
    """labels, patients, scans (and the label table's columns: id, any, subtypes) of the reported slices of every
    part, joined in part order (score_rows' order)."""
    joined = {name: np.concatenate([getattr(p.dataset, name)[~p.reference] for p in parts])
              for name in ("labels", "patients", "scans")}
    joined["columns"] = {name: np.concatenate([p.columns[name][~p.reference] for p in parts]) for name in parts[0].columns}
    return argparse.Namespace(**joined)


def maps_of(part, setting, seed):
    """The maps of every slice of the part under `setting` before the median filter, by the one scoring path
    (scoring.score_split), in the part's order (its positions are sorted)."""
    # the intracranial region holds every scored region: its maps serve them all (part_values reads each off them)
    raw = dataclasses.replace(setting, median_size=0, smooth_slices=0, scored_region="intracranial", level_norm="none",
                              asymmetry="none", hyperdensity_prior=False, normative="none")
    return scoring.score_split(part.diffusion, part.dataset, raw, seed=seed, keep_examples=0, keep_maps=True)["maps"]


def part_values(part, maps, setting, median_size, width):
    """{score name: the reported slices' scores} of one part read off its maps (slice_scores, then finish_scores);
    a fold's scores z-scored against its reference slices (cv.normalised), as evaluate.py pools them; with
    --level_norm z by level, against the reference slices or, for a validation split, its own healthy slices."""
    region = scoring.scored_masks(part.masks, part.anatomy, setting)
    if setting.hyperdensity_prior:  # as score_split's adjust_maps: the prior, then the asymmetry
        maps = maps * part.blood
    if setting.normative == "z":  # fitted as cv.fold_normative fits it, on the same reference slices
        key = ("normative", setting.hyperdensity_prior)
        if key not in part.found:
            fitted_on = part.reference if part.reference.any() else part.healthy
            part.found[key] = scoring.fit_normative(maps[fitted_on], part.masks[fitted_on], part.levels[fitted_on])
        maps = scoring.normative_maps(maps, part.levels, part.found[key])
    if setting.asymmetry != "none" and "midlines" not in part.found:
        part.found["midlines"] = [midline.find_midline(m) for m in part.masks]
    maps = scoring.asymmetric_maps(maps, part.masks, setting, part.found.get("midlines"))
    raw = scoring.slice_scores(maps, region, median_size=median_size)
    d = part.dataset
    values = {name: scoring.finish_scores(d.positions, d.scans, v, dataclasses.replace(setting, smooth_slices=width))
              for name, v in raw.items()}
    reference = part.reference if part.reference.any() else (part.healthy if setting.level_norm != "none" else None)
    if reference is not None:
        statistics = cv.reference_statistics({n: v[reference] for n, v in values.items()}, d.labels[reference],
                                             part.levels[reference], cv.level_bins(setting))
        values = cv.normalised(values, statistics, part.levels)
    return {name: v[~part.reference] for name, v in values.items()}


def score_rows(parts, maps, setting, t_name, args):
    """Table rows for every median filter x slice score x smoothing width read off one set of maps per part: the
    scores score_split gives for that setting, pooled over the parts."""
    rows, pooled = [], pooled_view(parts)
    for median_size, width, post in [(m, w, p) for m in args.median_sizes for w in args.smooth_slices for p in post_map_settings(args, setting)]:
            post_setting = dataclasses.replace(setting, **post)
            by_part = [part_values(p, m, post_setting, median_size, width) for p, m in zip(parts, maps)]
            for score_name in by_part[0]:
                if setting.skip_outside_mask and not score_name.startswith("brain"):
                    continue
                values = np.concatenate([v[score_name] for v in by_part])
                m = metrics.slice_metrics(pooled.labels, values, pooled.patients, n_boot=args.n_boot, seed=0)
                scan = metrics.scan_metrics(pooled.scans, pooled.labels, values, "max", pooled.patients, n_boot=args.n_boot,
                                             seed=0)
                rows.append({"patch_size": setting.patch_size, "stride": setting.stride, "residual": setting.residual,
                             "anomaly_map": setting.anomaly_map, "region": region_name(post_setting),
                             "asymmetry": post_setting.asymmetry, "prior": "on" if post_setting.hyperdensity_prior else "off",
                             "normative": post_setting.normative,
                             "level_norm": post_setting.level_norm, "t": t_name, "median_size": median_size, "score": score_name, "smooth_slices": width,
                             "roc_auc": m["roc_auc"], "roc_auc_ci": m["roc_auc_ci"], "auprc": m["auprc"],
                             "scan_roc_auc": scan["roc_auc"], "scan_roc_auc_ci": scan["roc_auc_ci"], "values": values})
    return rows


def post_map_settings(args, setting):
    """The settings read off one set of maps besides median and smoothing: scored region x level normalisation x
    asymmetry x hyperdensity prior x normative map."""
    regions = args.scored_regions or [region_name(setting)]
    norms = args.level_norms or [setting.level_norm]
    asymmetries = getattr(args, "asymmetries", None) or [setting.asymmetry]
    priors = [p == "on" for p in getattr(args, "hyperdensity_priors", None) or []] or [setting.hyperdensity_prior]
    out = []
    for text in regions:
        name, _, margin = text.partition(":")
        if name not in scoring.SCORED_REGIONS or (margin and not margin.isdigit()):
            raise SystemExit(f"error: --scored_regions {text}: expected intracranial or REGION:N with REGION one of "
                             f"{', '.join(scoring.SCORED_REGIONS[1:])}, e.g. no_bone_3d:2")
        out += [{"scored_region": name, "bone_margin": int(margin) if margin else setting.bone_margin, "level_norm": norm,
                 "asymmetry": asymmetry, "hyperdensity_prior": prior, "normative": normative}
                for norm in norms for asymmetry in asymmetries for prior in priors
                for normative in getattr(args, "normatives", None) or [setting.normative]]
    return out


def region_name(setting):
    return setting.scored_region if setting.scored_region == "intracranial" else f"{setting.scored_region}:{setting.bone_margin}"


def is_default(row, default):
    """Whether a table row is the scoring default (scoring.DEFAULTS at this image size)."""
    return (row["patch_size"], row["stride"], row["residual"], row["t"], row["median_size"], row["score"], row["smooth_slices"],
            row["anomaly_map"], row["region"], row["level_norm"], row["asymmetry"], row["prior"] == "on",
            row["normative"]) == (
        default.patch_size, default.stride, default.residual, "+".join(map(str, default.eval_t)), default.median_size,
        default.score, default.smooth_slices, default.anomaly_map, region_name(default), default.level_norm,
        default.asymmetry, default.hyperdensity_prior, default.normative)


def add_paired_differences(val, rows, baseline, n_boot):
    """Each row's slice and scan ROC-AUC minus the default's, with paired patient-bootstrap 95 % CIs (the same
    resampled patients for both), so that a difference can be told from noise; drops the score vectors."""
    for row in rows:
        values = row.pop("values")
        d = metrics.paired_auc_difference(val.labels, baseline, values, val.patients, n_boot=n_boot, seed=0)
        s = metrics.paired_scan_auc_difference(val.scans, val.labels, baseline, values, val.patients, n_boot=n_boot, seed=0)
        row.update({"delta_roc_auc": d["delta"], "delta_roc_auc_ci": d["ci"], "delta_excludes_zero": d["excludes_zero"],
                    "delta_scan_roc_auc": s["delta"], "delta_scan_roc_auc_ci": s["ci"],
                    "delta_scan_excludes_zero": s["excludes_zero"]})


def row_name(row):
    """A row's settings as a folder name, e.g. model_no_bone_3d-2_none_mirror_32-16_positive_t250_m5_brain_p99_s2
    (and _prior with the hyperdensity prior, _normative-z with the normative map)."""
    return "_".join(str(part) for part in (
        row["anomaly_map"], row["region"].replace(":", "-"), row["level_norm"], row["asymmetry"],
        f"{row['patch_size']}-{row['stride']}", row["residual"], f"t{row['t']}", f"m{row['median_size']}", row["score"],
        f"s{row['smooth_slices']}")) + ("_prior" if row["prior"] == "on" else "") + (
        f"_normative-{row['normative']}" if row["normative"] != "none" else "")


def write_row_scores(output_dir, pooled, rows):
    """--write_scores: scores/<row_name>/scores.csv per row, with evaluate.py's columns (id, patient, scan, any, the
    subtypes, the row's score under its own name), so compare.py --scores pairs any two rows."""
    c = pooled.columns
    for row in rows:
        folder = os.path.join(output_dir, "scores", row_name(row))
        runfiles.make_dir(folder)
        lines = [",".join(["id", "patient", "scan", "any", *cohort.SUBTYPES, row["score"]])]
        lines += [",".join([str(c["id"][i]), str(pooled.patients[i]), str(pooled.scans[i]), str(int(c["any"][i])),
                            *[str(int(c[t][i])) for t in cohort.SUBTYPES], f"{row['values'][i]:.6g}"])
                  for i in range(len(row["values"]))]
        runfiles.write_atomically(os.path.join(folder, "scores.csv"), lambda f, text="\n".join(lines) + "\n": f.write(text.encode()))


def format_delta(row, key, mark_key):
    if row.get(key) is None:
        return "n/a"
    ci = row[key + "_ci"]
    interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    return f"{row[key]:+.3f}{interval}{' *' if row[mark_key] else ''}"


def write_table(output_dir, rows, header):
    rows.sort(key=lambda r: -(r["roc_auc"] or 0))
    runfiles.write_json(os.path.join(output_dir, "sweep.json"), header | {"rows": rows})
    lines = ["| map | region | level norm | asymmetry | prior | normative | window/stride | residual | t | median | score | smooth | slice ROC-AUC [95% CI] | Δ vs default [paired 95% CI] "
             "| AUPRC | scan ROC-AUC (max) [95% CI] | Δ scan vs default [paired 95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def with_ci(value, ci):  # no interval with --n_boot 0
        return "n/a" if value is None else f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    for r in rows:
        lines.append(f"| {r['anomaly_map']} | {r['region']} | {r['level_norm']} | {r['asymmetry']} | {r['prior']} | {r['normative']} | {r['patch_size']}/{r['stride']} | {r['residual']} | {r['t']} | {r['median_size'] or '-'} | {r['score']} | "
                     f"{('+-' + str(r['smooth_slices'])) if r['smooth_slices'] else '-'} | "
                     f"{with_ci(r['roc_auc'], r['roc_auc_ci'])} | {format_delta(r, 'delta_roc_auc', 'delta_excludes_zero')} | "
                     f"{r['auprc']:.3f} | {with_ci(r['scan_roc_auc'], r['scan_roc_auc_ci'])} | "
                     f"{format_delta(r, 'delta_scan_roc_auc', 'delta_scan_excludes_zero')} |")
    lines.append("")
    lines.append("Δ: this row's ROC-AUC minus the default grid point's (scoring.DEFAULTS at the run's window, the other settings as "
                 "every row's) on the same slices; * = the paired "
                 "patient-bootstrap 95 % CI excludes 0.")
    runfiles.write_atomically(os.path.join(output_dir, "sweep.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
    print("\n".join(lines[:12]))
    print(f"... {len(rows)} settings; full table in {os.path.join(output_dir, 'sweep.md')}")


def main(argv=None):
    args = get_args(argv)
    if not set(args.multi_t) <= set(args.eval_t):
        raise SystemExit(f"error: --multi_t {args.multi_t} must be a subset of --eval_t {args.eval_t}")
    for name in ("median_sizes", "smooth_slices"):
        for value in getattr(args, name):
            models.check_flag(value >= 0, name, value, "must be 0 (off) or more")
    models.check_flag(args.n_boot >= 0, "n_boot", args.n_boot, "must be 0 (no confidence intervals) or more")
    # the grid flags are the rows, not the base: every other scoring flag is the run's unless given
    run = trained.open_run(args.checkpoint, {k: v for k, v in vars(args).items() if k not in GRID}, args.fold_checkpoint,
                           models.pick_device(args.device), args.precision)
    image_size, base = run.folds[0].diffusion.config["image_size"], run.settings
    dataclasses.replace(base, eval_t=tuple(args.eval_t)).check(image_size)
    windows = parse_windows(args.windows, image_size, base)
    output_dir = args.output_dir or (
        os.path.join(args.checkpoint, f"sweep_cv_{os.path.splitext(args.fold_checkpoint)[0]}_oof") if run.is_cv else
        os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                     f"sweep_{os.path.splitext(os.path.basename(args.checkpoint))[0]}_val"))
    lock = runfiles.claim_output_dir(output_dir, "sweep.py", overwrite=args.overwrite, finished="sweep.json")
    try:
        sweep(args, open_parts(run), base, run.seed, windows, output_dir)
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {output_dir}; run the same command again", file=sys.stderr)
        raise SystemExit(130)
    finally:
        runfiles.release_output_dir(lock)


def parse_windows(texts, image_size, base):
    """--windows patch:stride pairs (default: the run's own window), each checked as evaluate.py checks its flags."""
    if not texts:
        return [(base.patch_size, base.stride)]
    windows = []
    for text in texts:
        try:
            patch_size, stride = (int(v) for v in text.split(":"))
        except ValueError:
            raise SystemExit(f"error: --windows {text}: expected patch:stride, e.g. 32:16")
        dataclasses.replace(base, patch_size=patch_size, stride=stride).check(image_size)
        windows.append((patch_size, stride))
    return windows


def sweep(args, parts, base, seed, windows, output_dir):
    """Every row of the grid on the parts (a checkpoint's validation split, or a CV run's folds, pooled)."""
    pooled = pooled_view(parts)
    split = "out-of-fold" if len(parts) > 1 or parts[0].reference.any() else "val"
    print(f"{split}: {len(pooled.labels)} slices ({int(pooled.labels.sum())} hemorrhage) from "
          f"{len(np.unique(pooled.patients))} patients")
    rows = []
    combos = [(w, r, m) for m in args.anomaly_maps or [base.anomaly_map] for w in windows for r in args.residuals]
    combos = [c for c in combos if c[2] == "model" or c[:2] == combos[0][:2]]  # no model: window, residual, t mean nothing
    for (patch_size, stride), residual, anomaly_map in combos:
        setting = dataclasses.replace(base, patch_size=patch_size, stride=stride, residual=residual, anomaly_map=anomaly_map)
        maps_by_t = {}
        for t in args.eval_t if anomaly_map == "model" else D.eval_t:
            maps_by_t[str(t)] = [maps_of(part, dataclasses.replace(setting, eval_t=(t,)), seed) for part in parts]
            print(f"  maps done: window {patch_size}/{stride}, t={t}, residual {residual}", flush=True)
        if len(args.multi_t) > 1 and anomaly_map == "model":
            maps_by_t["+".join(map(str, args.multi_t))] = [
                np.mean([maps_by_t[str(t)][k] for t in args.multi_t], axis=0) for k in range(len(parts))]
        for t_name, maps in maps_by_t.items():
            rows += score_rows(parts, maps, setting, t_name, args)
    # the reference of every paired difference: the default grid point (scoring.DEFAULTS) at the run's own window, with
    # this sweep's other settings
    default = dataclasses.replace(base, **{name: getattr(D, name) for name in GRID if name not in ("patch_size", "stride")})
    baseline = [r["values"] for r in rows if is_default(r, default)]
    if not baseline:  # the grid does not hold the default: score it once more
        maps = [maps_of(part, default, seed) for part in parts]
        baseline = [r["values"] for r in score_rows(parts, maps, default, "+".join(map(str, default.eval_t)),
                                                   argparse.Namespace(**vars(args) | {"median_sizes": [default.median_size],
                                                                                        "smooth_slices": [default.smooth_slices],
                                                                                        "scored_regions": None, "level_norms": None,
                                                                                        "asymmetries": None,
                                                                                        "hyperdensity_priors": None,
                                                                                        "normatives": None}))
                    if r["score"] == default.score]
    if args.write_scores:
        write_row_scores(output_dir, pooled, rows)
    add_paired_differences(pooled, rows, baseline[0], args.n_boot)
    write_table(output_dir, rows, {"checkpoint": os.path.abspath(args.checkpoint), "split": split, "slices": len(pooled.labels),
                                   "hemorrhage_slices": int(pooled.labels.sum()),
                                   "patients": int(len(np.unique(pooled.patients))), "settings": base.as_dict()})

if __name__ == "__main__":
    models.run_script(main)
