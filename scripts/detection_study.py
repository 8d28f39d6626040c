"""Decide detection candidates on saved slice scores: each against the default and against the no-learning baseline.

Reads the per-row scores that `sweep.py --write_scores` writes (or any evaluate.py output folders: a folder holding
scores.csv), all scored on the same slices, and prints for each candidate its slice and scan ROC-AUC, the paired
patient-bootstrap difference to the default and to the baseline, and the ROC-AUC per bleed subtype. A candidate may
also be a late fusion of two rows (--fuse A B: the mean of their slice scores; sweep.py's CV scores are each already
z-scored against the fold's healthy reference slices, so the mean puts the two on one scale without any label).

    python scripts/detection_study.py --scores_dir runs/ctich_cv/sweep_study/scores \\
        --default model_no_bone_3d-2_none_none_32-16_positive_t250_m5_brain_p99_s2 \\
        --baseline blood_band_no_bone_3d-2_none_none_32-16_positive_t250_m5_brain_p99_s2 \\
        --candidates model_intracranial_none_none_... --fuse model_... blood_band_... --out study.md

The decision rule (RESULTS.md, issue 29): a candidate is adopted when the paired 95 % CI of its slice ROC-AUC
difference to the default lies above 0 and its scan ROC-AUC (max) difference is not negative.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cohort  # noqa: E402
import compare  # noqa: E402
import inputs  # noqa: E402
import metrics  # noqa: E402
import runfiles  # noqa: E402

MONTAGE_HU = [[-20.0, 100.0]]  # the brain window the montage shows slices in


def load_row(scores_dir, name):
    """{slice id: row} of one candidate's scores.csv, and the name of its score column: the run's score that an
    evaluate.py folder's metrics.json names (its scores.csv holds every score and ends with `fold`), else the last
    column (sweep.py's rows hold just their own score)."""
    folder = name if os.path.isdir(name) else os.path.join(scores_dir, name)
    table = compare.read_scores(folder)
    columns = list(next(iter(table.values())))
    score, metrics_path = None, os.path.join(folder, "metrics.json")
    if os.path.isfile(metrics_path):
        try:
            with open(metrics_path) as f:
                score = json.load(f).get("score")
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: {metrics_path}: cannot read ({e})")
    score = score or [c for c in columns if c != "fold"][-1]
    if score not in columns:
        raise SystemExit(f"error: {folder}: scores.csv has no column {score!r} (the score its metrics.json names)")
    return table, score


def aligned(tables):
    """The ids every table holds, and the label columns (any, subtypes, patient, scan) read off the first."""
    ids = sorted(set.intersection(*(set(t) for t, _ in tables)))
    if not ids:
        raise SystemExit("error: no slice is in every scores.csv")
    first = tables[0][0]
    columns = {"any": np.array([int(first[i]["any"]) for i in ids]),
               "patient": np.array([first[i]["patient"] for i in ids]), "scan": np.array([first[i]["scan"] for i in ids])}
    columns["subtypes"] = {t: np.array([int(first[i][t]) for i in ids]) for t in cohort.SUBTYPES if t in first[ids[0]]}
    return ids, columns


def values_of(table, score, ids):
    return np.array([float(table[i][score]) for i in ids])


def judge(name, values, reference_values, c, n_boot):
    """A candidate's figures, and its paired differences to each reference (default, baseline)."""
    labels, patients, scans = c["any"], c["patient"], c["scan"]
    slice_m = metrics.slice_metrics(labels, values, patients, n_boot=n_boot)
    scan_m = metrics.scan_metrics(scans, labels, values, "max", patients, n_boot=n_boot)
    out = {"name": name, "slice": slice_m["roc_auc"], "slice_ci": slice_m["roc_auc_ci"], "auprc": slice_m["auprc"],
           "scan": scan_m["roc_auc"], "scan_ci": scan_m["roc_auc_ci"],
           "subtypes": {t: m["roc_auc"] for t, m in metrics.subtype_metrics(c["subtypes"], labels, values, patients,
                                                                             n_boot=0).items()}}
    for ref_name, ref in reference_values.items():
        out[f"vs_{ref_name}"] = {"slice": metrics.paired_auc_difference(labels, ref, values, patients, n_boot=n_boot),
                                 "scan": metrics.paired_scan_auc_difference(scans, labels, ref, values, patients, n_boot=n_boot)}
    d = out["vs_default"]
    out["adopt"] = bool(d["slice"]["delta"] is not None and d["slice"]["ci"] and d["slice"]["ci"][0] > 0
                        and d["scan"]["delta"] >= 0)
    return out


def delta_text(d):
    if d["delta"] is None:
        return "n/a"
    ci = f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] else ""
    return f"{d['delta']:+.3f}{ci}{' *' if d['excludes_zero'] else ''}"


def table(results, subtypes):
    lines = ["| candidate | slice ROC-AUC [95% CI] | scan (max) | Δ slice vs default | Δ scan vs default | Δ slice vs baseline "
             "| Δ scan vs baseline | " + " | ".join(subtypes) + " | adopt |",
             "|---" * (8 + len(subtypes)) + "|"]
    for r in results:
        ci = f" [{r['slice_ci'][0]:.3f}, {r['slice_ci'][1]:.3f}]" if r["slice_ci"] else ""
        lines.append(f"| {r['name']} | {r['slice']:.3f}{ci} | {r['scan']:.3f} | {delta_text(r['vs_default']['slice'])} | "
                     f"{delta_text(r['vs_default']['scan'])} | {delta_text(r['vs_baseline']['slice'])} | "
                     f"{delta_text(r['vs_baseline']['scan'])} | "
                     + " | ".join("n/a" if r["subtypes"].get(t) is None else f"{r['subtypes'][t]:.3f}" for t in subtypes)
                     + f" | {'yes' if r['adopt'] else 'no'} |")
    return "\n".join(lines)


def montage(path, data_dir, rows, values, ids, c, k):
    """The top k false positives (healthy slices scored highest) and misses (bleed slices scored lowest) of each row,
    shown as their input slices in the brain window, with the slice id and the bleed subtypes."""
    index = cohort.load_index(data_dir, num_workers=1)
    where = {str(i): n for n, i in enumerate(index["id"])}
    plt = runfiles.pyplot()
    fig, axes = plt.subplots(2 * len(rows), k, figsize=(1.9 * k, 4.2 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        order = np.argsort(values[name])
        picks = {"false positive": [i for i in order[::-1] if c["any"][i] == 0][:k],
                 "miss": [i for i in order if c["any"][i] == 1][:k]}
        for line, (kind, chosen) in enumerate(picks.items()):
            for col in range(k):
                ax = axes[2 * r + line, col]
                ax.axis("off")
                if col >= len(chosen) or ids[chosen[col]] not in where:
                    continue
                i = chosen[col]
                image, _ = inputs.load_slice(os.path.join(data_dir, index["path"][where[ids[i]]]), MONTAGE_HU, 128)
                ax.imshow(np.asarray(image[0], np.float32), cmap="gray", vmin=-1, vmax=1)
                subtypes = ",".join(t[:4] for t, v in c["subtypes"].items() if v[i])
                ax.set_title(f"{kind if col == 0 else ''}\n{ids[i]} {subtypes}", fontsize=6)
        fig.text(0.01, 1 - r / len(rows) - 0.002, name, fontsize=7, va="top", weight="bold")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.015))
    fig.subplots_adjust(hspace=0.45)
    runfiles.save_figure(fig, path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scores_dir", default=".", help="sweep.py's scores/ folder (rows are named as its subfolders)")
    p.add_argument("--default", required=True, help="the default's row (or a folder with scores.csv)")
    p.add_argument("--baseline", required=True, help="the no-learning baseline's row")
    p.add_argument("--candidates", nargs="*", default=[], help="rows to judge")
    p.add_argument("--fuse", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="also judge the mean of rows A's and B's slice scores (repeatable)")
    p.add_argument("--n_boot", type=int, default=1000)
    p.add_argument("--out", default=None, help="write the table (.md) and the figures (.json beside it)")
    p.add_argument("--montage", default=None, metavar="DATA_DIR",
                   help="also draw the top false positives and misses of the default, the baseline and each adopted "
                        "candidate (their input slices, read from DATA_DIR) into <out>_montage.png")
    p.add_argument("--montage_k", type=int, default=6)
    args = p.parse_args(argv)
    names = list(dict.fromkeys([args.default, args.baseline, *args.candidates, *(n for pair in args.fuse for n in pair)]))
    loaded = {name: load_row(args.scores_dir, name) for name in names}
    ids, c = aligned(list(loaded.values()))
    values = {name: values_of(table_, score, ids) for name, (table_, score) in loaded.items()}
    for a, b in args.fuse:
        values[f"fuse({a}, {b})"] = (values[a] + values[b]) / 2
    references = {"default": values[args.default], "baseline": values[args.baseline]}
    order = [args.default, args.baseline, *args.candidates, *(f"fuse({a}, {b})" for a, b in args.fuse)]
    print(f"{len(ids)} slices ({int(c['any'].sum())} with a bleed), {len(set(c['patient']))} patients, "
          f"{len(set(c['scan']))} scans; {args.n_boot} paired patient-bootstrap samples")
    results = [judge(name, values[name], references, c, args.n_boot) for name in order]
    text = table(results, list(c["subtypes"]))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"slices": len(ids), "results": results}, f, indent=1, default=float)
        if args.montage:
            shown = [args.default, args.baseline] + [r["name"] for r in results[2:] if r["adopt"]]
            montage(os.path.splitext(args.out)[0] + "_montage.png", args.montage, shown, values, ids, c, args.montage_k)
    return results


if __name__ == "__main__":
    main()
