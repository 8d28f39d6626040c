"""Compare two output folders of scripts/same_outputs.sh: the largest absolute difference of every number, per file
(JSON numbers, CSV cells, .npy maps, checkpoint tensors); strings are compared with the two folders' paths taken out.

    python scripts/compare_outputs.py BEFORE AFTER

A sweep.json's rows are matched by their setting, not their order. Timings, paths and the settings block are left out.
"""
import csv
import glob
import json
import os
import sys

import numpy as np

LEFT_OUT = {"seconds", "checkpoint", "settings", "models", "eval_seconds", "train_seconds", "images_per_second"}
SETTING = ("anomaly_map", "region", "level_norm", "patch_size", "residual", "t", "median_size", "score", "smooth_slices")


def flat(value, prefix=""):
    """(key path, leaf) of every leaf of nested dicts and lists, LEFT_OUT keys left out."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in LEFT_OUT:
                yield from flat(item, f"{prefix}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from flat(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def compare_values(a, b, strip):
    """(largest numeric difference, [other differences]) of two nested values."""
    fa, fb, worst, problems = dict(flat(a)), dict(flat(b)), 0.0, []
    for key in sorted(set(fa) | set(fb)):
        if key not in fa or key not in fb:
            problems.append(f"only in {'b' if key not in fa else 'a'}: {key}")
            continue
        x, y = fa[key], fb[key]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            if not (np.isnan(x) and np.isnan(y)):
                worst = max(worst, abs(x - y))
        elif strip(x) != strip(y):
            problems.append(f"{key}: {x!r} vs {y!r}")
    return worst, problems


def read_json(path):
    with open(path) as f:
        content = json.load(f)
    if isinstance(content, dict) and "rows" in content:  # sweep.json: rows by their setting
        return {str(tuple(str(row.get(k)) for k in SETTING)): row for row in content["rows"]}
    return content


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {"header": rows[0], "rows": [[_number(cell) for cell in row] for row in rows[1:]]}


def _number(cell):
    try:
        return float(cell)
    except ValueError:
        return cell


def compare_file(pa, pb, strip):
    if pa.endswith(".json"):
        return compare_values(read_json(pa), read_json(pb), strip)
    if pa.endswith(".csv"):
        return compare_values(read_csv(pa), read_csv(pb), strip)
    if pa.endswith(".npy"):
        x, y = np.load(pa), np.load(pb)
        return (float(np.abs(x - y).max()), []) if x.shape == y.shape else (0.0, [f"shape {x.shape} vs {y.shape}"])
    import torch
    x, y = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (pa, pb))
    worst = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
    return worst, [] if set(x) == set(y) else ["other tensors"]


def main(a, b):
    strip = lambda v: v.replace(a, "").replace(b, "") if isinstance(v, str) else v  # noqa: E731
    total, differ = 0.0, 0
    for pa in sorted(glob.glob(f"{a}/**/*", recursive=True)):
        rel = os.path.relpath(pa, a)
        if rel.startswith("runs/") or not os.path.isfile(pa) or not pa.endswith((".json", ".csv", ".npy", ".pt")):
            continue
        pb = os.path.join(b, rel)
        if not os.path.exists(pb):
            print(f"MISSING in b: {rel}")
            differ += 1
            continue
        worst, problems = compare_file(pa, pb, strip)
        differ += bool(worst or problems)
        total = max(total, worst)
        print(f"{'OK ' if not (worst or problems) else 'DIFF'} {rel}: max |diff| {worst}" + (f"  {problems[:3]}" if problems else ""))
    print(f"largest difference over all files: {total}; files that differ: {differ}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
