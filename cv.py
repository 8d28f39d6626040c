"""Patient-level cross-validation: the fold assignment (folds.json), each fold's patient splits, the CV run folder, and
the K fold models scored as one.

A CV run is a folder RUN holding folds.json (the frozen assignment of every patient to one of K folds) and
RUN/fold_<k>/, an ordinary train.py run whose splits are fold_patients(): test = fold k's patients, train and val
drawn from the patients outside fold k. So fold k's test split is scored only by the model that never saw it, and
evaluate.py / sweep.py pool those test splits into out-of-fold scores of every patient.

Scores of different fold models are put on one scale before they are pooled or averaged: each model's slice scores
are z-scored against that model's scores of its reference slices, the slices of the healthy patients of its own validation split
(patients outside its fold that it never trained on). See docs/method.md, "Cross-validation".
"""
import dataclasses
import hashlib
import json
import os

import numpy as np

import cohort
import data
import metrics
import runfiles
import scoring

FOLDS_FILE = "folds.json"
REFERENCE_FILE = "reference_{stem}.json"  # a fold model's reference statistics, next to its checkpoint


def fold_dir(run_dir, fold):
    return os.path.join(run_dir, f"fold_{fold}")


def hash_order(seed, patients):
    """The patients in a seeded order in which no patient's place depends on which other patients there are."""
    return sorted(map(str, patients), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())


# ---------------------------------------------------------------------------------------------
# folds

def assign_folds(index, k, seed, saved=None):
    """{"k", "seed", "folds": {patient: fold}}. Patients in `saved` (an earlier assignment) keep their fold; every
    other patient goes, in the seeded hash order of its stratum (bleed / no bleed), to the fold that holds the fewest
    patients of that stratum (the lowest on a tie). From nothing this deals each stratum out in turn (stratified,
    sizes within one); patients added later fill the folds in without moving anyone."""
    folds = {str(p): int(f) for p, f in (saved or {}).get("folds", {}).items()}
    patients, sick = cohort.patients_with_bleed(index)
    for stratum in (True, False):
        members = [str(p) for p in patients[sick == stratum]]
        counts = np.bincount([folds[p] for p in members if p in folds], minlength=k)
        for patient in hash_order(seed, [p for p in members if p not in folds]):
            folds[patient] = int(np.argmin(counts))
            counts[folds[patient]] += 1
    return {"k": int(k), "seed": int(seed), "folds": dict(sorted(folds.items()))}


def fold_patients(index, record, fold):
    """{"train", "val", "test"} -> sorted patient lists of fold `fold`. test: the fold's patients. val: every
    hemorrhage patient outside the fold and one fold's worth of the healthy patients outside it (half of them at
    K = 2), drawn by a hash of (seed, fold, patient). train: the other healthy patients outside the fold. Patients
    the record does not hold (added since) are in no split."""
    k, folds = record["k"], record["folds"]
    patients, sick = cohort.patients_with_bleed(index)
    inside = [(str(p), s) for p, s in zip(patients, sick) if str(p) in folds]
    outside = [(p, s) for p, s in inside if folds[p] != fold]
    healthy = hash_order(f"{record['seed']}:{fold}", [p for p, s in outside if not s])
    bleeds = hash_order(f"{record['seed']}:{fold}", [p for p, s in outside if s])
    n_val = min(len(healthy) - 1, max(1, round(len(healthy) / max(k - 1, 2))))
    return {"train": sorted(healthy[n_val:]), "val": sorted(healthy[:n_val] + bleeds),
            "test": sorted(p for p, _ in inside if folds[p] == fold)}


def fold_splits_record(index, record, fold, *, data_dir, dataset):
    """Fold `fold`'s splits as cohort.splits_record writes them (splits.json, every checkpoint), with the CV
    assignment they come from under "cv"."""
    patients = fold_patients(index, record, fold)
    return cohort.splits_record(patients, seed=record["seed"], data_dir=data_dir, dataset=dataset) | {
        "cv": {"fold": int(fold), "folds": record}}


# ---------------------------------------------------------------------------------------------
# the CV run folder

def load_folds(run_dir):
    """RUN/folds.json, or None where there is none; a damaged one is a one-line error."""
    path = os.path.join(run_dir, FOLDS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not (isinstance(record["k"], int) and record["k"] >= 2 and isinstance(record["folds"], dict)):
            raise ValueError("no k or folds")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"error: {path}: cannot read the run's fold assignment ({cohort.one_line(error)})")
    return record


def write_folds(run_dir, record):
    runfiles.write_json(os.path.join(run_dir, FOLDS_FILE), record)


def is_cv_run(path):
    """Whether path is a CV run folder (train.py --folds): a folder with folds.json."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, FOLDS_FILE))


def check_fold(record, fold, checkpoint, path):
    """A one-line SystemExit unless the checkpoint at `path` was trained as fold `fold` of the CV run whose assignment
    is `record` (folds.json): every checkpoint of a fold carries the assignment it was trained under (its splits
    record's "cv"). A fold folder copied from another CV run (another --seed: other folds), or from a run on other
    data, would score patients it trained on as if out of fold. A fold trained before patients were added to the run
    (its assignment a part of folds.json's) is its own."""
    own = (checkpoint.get("splits") or {}).get("cv")
    where = f"error: {path}: fold {fold} of the CV run {os.path.dirname(os.path.dirname(os.path.abspath(path)))}"
    if not isinstance(own, dict) or not isinstance(own.get("folds"), dict):
        raise SystemExit(f"{where} holds a checkpoint that records no fold assignment (not trained by train.py --folds); "
                         "train that fold again with train.py --folds K --fold k")
    if own.get("fold") != fold:
        raise SystemExit(f"{where} holds the model of fold {own.get('fold')} (folders swapped?)")
    theirs, ours = own["folds"], record
    foreign = (theirs.get("k"), theirs.get("seed")) != (ours["k"], ours["seed"]) or any(
        ours["folds"].get(p) != f for p, f in (theirs.get("folds") or {}).items())
    if foreign:
        raise SystemExit(f"{where} was trained in another CV run (fold assignment {fingerprint(theirs)}, this run's "
                         f"{FOLDS_FILE} {fingerprint(ours)}: k {theirs.get('k')}/{ours['k']}, seed {theirs.get('seed')}/"
                         f"{ours['seed']}); its out-of-fold scores would include patients it trained on. Train that fold "
                         "again in this run, or copy the whole run folder")


def fingerprint(record):
    """A short name of a fold assignment (k, seed and every patient's fold), for messages."""
    text = json.dumps({"k": record.get("k"), "seed": record.get("seed"), "folds": record.get("folds")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fold_checkpoints(run_dir, name):
    """[(fold, checkpoint path)] of every fold of the CV run; a fold without its checkpoint is a one-line error."""
    record = load_folds(run_dir)
    paths = [(k, os.path.join(fold_dir(run_dir, k), name)) for k in range(record["k"])]
    missing = [k for k, path in paths if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"error: {run_dir}: fold {missing[0]} has no {name} (of {len(missing)} fold(s) missing); "
                         f"finish the run with train.py --folds {record['k']} --output_dir {run_dir} --resume (and its flags)")
    return paths


# ---------------------------------------------------------------------------------------------
# putting fold models on one scale

def reference_statistics(scores, labels, levels=None, level_bins=1):
    """One model's scores of its healthy reference slices (labels 0: validation patients it never trained on) as
    {"level_edges": inner bin edges, score name: [[mean, std] per level bin]}. level_bins > 1 (--level_norm z):
    bins are quantiles of the reference slices' levels (scoring.slice_levels), so each holds as many slices; a bin's
    std is floored at a quarter of the std over all of them, so a bin of alike slices cannot blow its z-scores up."""
    healthy = np.asarray(labels) == 0
    if not healthy.any():
        raise SystemExit("error: the reference (a validation split's healthy slices) has no healthy slice to normalise "
                         "scores against")
    if level_bins > 1 and levels is None:
        raise ValueError("reference_statistics: level_bins > 1 needs the slices' levels")
    reference_levels = np.asarray(levels, np.float64)[healthy] if level_bins > 1 else np.zeros(int(healthy.sum()))
    edges = np.unique(np.quantile(reference_levels, np.linspace(0, 1, level_bins + 1)[1:-1])) if level_bins > 1 else []
    bins = np.digitize(reference_levels, edges)
    statistics = {"level_edges": [float(e) for e in edges]}
    for name, values in scores.items():
        v = np.asarray(values, np.float64)[healthy]
        floor = max(0.25 * np.std(v), 1e-12)
        statistics[name] = [[float(np.mean(v[bins == b])) if (bins == b).any() else float(np.mean(v)),
                             float(max(np.std(v[bins == b]) if (bins == b).sum() > 1 else 0.0, floor))]
                            for b in range(len(edges) + 1)]
    return statistics


def normalised(scores, statistics, levels=None):
    """{score name: z-scores}: each score against the reference mean and std of its level bin (reference_statistics;
    one bin unless it was fitted by level)."""
    edges = statistics.get("level_edges", [])
    if len(edges) and levels is None:
        raise ValueError("normalised: these reference statistics are by level; give the slices' levels")
    bins = np.digitize(np.asarray(levels, np.float64), edges) if len(edges) else 0
    out = {}
    for name, v in scores.items():
        table = np.asarray(statistics[name], np.float64).reshape(-1, 2)
        out[name] = (np.asarray(v, np.float64) - table[bins, 0]) / table[bins, 1]
    return out


def mean_normalised(all_scores, all_statistics, levels=None):
    """The K models' scores of the same slices as one: per score name, the mean of the models' z-scores."""
    zs = [normalised(scores, stats, levels) for scores, stats in zip(all_scores, all_statistics)]
    return {name: np.mean([z[name] for z in zs], axis=0) for name in zs[0]}


def spread(statistics, name):
    """One number for a model's spread of score `name` on its reference (the mean std over level bins): what its
    maps are divided by before the fold models' maps are averaged."""
    return float(np.mean(np.asarray(statistics[name], np.float64).reshape(-1, 2)[:, 1]))


def map_scale(statistics, score):
    """The mean of the models' spreads of `score` (spread): what turns a map in ensemble_results' units (each model's
    map over its spread) back into the units of one model's map, the residual range of the pixel histograms."""
    return float(np.mean([spread(s, score) for s in statistics]))


def map_weights(statistics, score):
    """Each model's weight in the ensemble map of the pixel metrics and overlays (ensemble_map; trained.ensemble_
    external): 1 / (K x its spread of `score`), ensemble_results' mean of the maps each over its spread, times
    map_scale. The factor is one number for all slices, so it changes no rank (pixel ROC-AUC, AUPRC, the oracle Dice)
    and no overlay; it keeps the values in the residual range that the pixel histograms resolve
    (scoring.PIXEL_EDGES: 1e-4 to 2, where a z-like map would pile up in the last bin), and one model's weight is
    exactly 1: its ensemble map is its own map. -> float64 [K]."""
    spreads = np.array([spread(s, score) for s in statistics], np.float64)
    return spreads.mean() / spreads / len(spreads)


def ensemble_map(maps, weights):
    """The models' maps of the same slices [N, H, W] each (float32) weighted and summed (map_weights), in float32."""
    out = np.zeros_like(np.asarray(maps[0], np.float32))
    for m, w in zip(maps, weights):
        out += np.float32(w) * np.asarray(m, np.float32)
    return out


def level_bins(settings):
    """Level bins of the reference statistics: scoring.LEVEL_BINS with --level_norm z, else one."""
    return scoring.LEVEL_BINS if settings.level_norm == "z" else 1


def read_reference(path, key):
    """The statistics saved at path for this key (settings, seed, ...), or None (none saved for it). The file holds
    one entry per key, so scorings with other settings never replace each other's statistics."""
    return next((entry["statistics"] for entry in _reference_entries(path) if entry.get("key") == key), None)


def write_reference(path, key, statistics):
    entries = [entry for entry in _reference_entries(path) if entry.get("key") != key]
    runfiles.write_json(path, {"entries": entries + [{"key": key, "statistics": statistics}]})


def _reference_entries(path):
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return []
    if isinstance(saved, dict) and "key" in saved:  # a file of one entry, as written before
        return [saved]
    return saved.get("entries", []) if isinstance(saved, dict) else []


def normative_settings(settings):
    """What the normative map is fitted on: the maps as --normative z receives them (after the hyperdensity prior,
    before the asymmetry, the median filter and everything read off the map)."""
    return dataclasses.replace(settings, normative="none", asymmetry="none", median_size=0, smooth_slices=0,
                               level_norm="none", scored_region="intracranial")


def normative_path(checkpoint_path, key):
    """Where a model's normative map for `key` (reference_key of normative_settings) is saved: next to its
    checkpoint, one .npz per key, named by the key's hash."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), f"normative_{stem}_{digest}.npz")


def fold_normative(fold, data_dir=None):
    """--normative z: the model's per-pixel healthy error by level (scoring.fit_normative) on its reference slices
    (every slice of the healthy patients of its validation split), from their maps scored without the options that
    act after it; saved next to the checkpoint per key and read back. None when the settings do not use it.
    fold: trained.Fold; data_dir as fold_reference's."""
    if fold.settings.normative == "none":
        return None
    settings = normative_settings(fold.settings)
    path = normative_path(fold.path, reference_key(settings, fold.seed, fold.run, fold.checkpoint))
    if os.path.isfile(path):
        with np.load(path) as saved:
            return {name: saved[name] for name in ("edges", "mean", "std")}
    trained_on = (fold.checkpoint.get("splits") or {}).get("data_dir") or (fold.checkpoint.get("args") or {}).get("data_dir")
    data_dir = data_dir or trained_on
    if not data_dir or not os.path.isdir(data_dir):
        raise SystemExit(f"error: {fold.path}: no normative map in {path}, and the training data {data_dir!r} is not "
                         "at hand to fit it on the healthy validation patients")
    rd, positions = reference_slices(fold, data_dir)
    dataset = data.SliceDataset(rd.cache, rd.index, positions)
    print(f"fitting the normative map: {len(positions)} slices of the healthy validation patients")
    val = scoring.score_split(fold.diffusion, dataset, settings, seed=fold.seed, keep_examples=0, keep_maps=True)
    row = {int(p): k for k, p in enumerate(dataset.positions)}
    masks = np.stack([dataset[row[int(p)]]["mask"].numpy() for p in val["positions"]])
    normative = scoring.fit_normative(val["maps"], masks, val["levels"])
    runfiles.write_atomically(path, lambda f: np.savez(f, **normative))
    return normative


def reference_path(checkpoint_path):
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), REFERENCE_FILE.format(stem=stem))


def pool_out_of_fold(results, statistics, score, keep_examples):
    """Each fold model's result on its own fold (score_split's) as one result over every patient: arrays joined,
    with "fold" saying which model scored a slice; every score z-scored against its model's reference statistics;
    pixel histograms summed (maps are not rescaled); the overlays' examples ranked again on the z-scored score."""
    joined = {key: np.concatenate([r[key] for r in results]) for key in ("positions", "labels", "patients", "scans", "levels")}
    joined["fold"] = np.concatenate([np.full(len(r["positions"]), k) for k, r in enumerate(results)])
    scores = [normalised(r["scores"], stats, r["levels"]) for r, stats in zip(results, statistics)]
    joined["scores"] = {name: np.concatenate([s[name] for s in scores]) for name in scores[0]}
    pixels = [r["pixel"] for r in results if r["pixel"] is not None]
    joined["pixel"] = scoring.merge_pixel_accumulators(pixels) if pixels else None
    joined["examples"] = {}
    for kind in scoring.EXAMPLE_KINDS:  # an example's z-score: its slice's, looked up by position
        z_of = {int(p): z for r, s in zip(results, scores) for p, z in zip(r["positions"], s[score])}
        examples = [ex | {"score": z_of[int(ex["position"])]} for r in results for ex in r["examples"].get(kind, [])]
        joined["examples"][kind] = sorted(examples, key=lambda ex: -ex["score"] if kind != "miss" else ex["score"])[:keep_examples]
    joined["skipped_slices"] = sum(r["skipped_slices"] for r in results)
    joined["seconds"] = sum(r["seconds"] for r in results)
    return joined


def ensemble_results(results, statistics, score):
    """The fold models' results on the same data set as one result: the slices every model scored (a model leaves out
    the patients it trained on, when ids overlap), each score the mean of the models' z-scores (mean_normalised) and,
    where the results kept their maps (predict.py), the mean of the models' maps, each divided by its reference spread
    of `score` (spread). One model keeps its pixel histograms and overlay examples; several models' are left out
    (those are of one model's maps: evaluate.py --split all streams the ensemble map's, trained.ensemble_external)."""
    common = results[0]["positions"]
    for r in results[1:]:
        common = np.intersect1d(common, r["positions"])
    picks = [np.searchsorted(r["positions"], common) for r in results]  # score_split's positions are sorted
    dropped = max(len(r["positions"]) for r in results) - len(common)
    if dropped:
        print(f"ensemble: {dropped} slice(s) not scored by every fold model (patients some fold trained on) are left out")
    first, pick = results[0], picks[0]
    one = len(results) == 1
    combined = {"positions": common, "labels": first["labels"][pick], "patients": first["patients"][pick],
                "scans": first["scans"][pick], "levels": first["levels"][pick],
                "pixel": first["pixel"] if one else None, "examples": first["examples"] if one else {},
                "scores": mean_normalised([{n: v[p] for n, v in r["scores"].items()} for r, p in zip(results, picks)],
                                          statistics, first["levels"][pick]),
                "skipped_slices": max(r.get("skipped_slices", 0) for r in results),
                "seconds": sum(r["seconds"] for r in results), "maps": None}
    if all(r.get("maps") is not None for r in results):
        combined["maps"] = np.mean([r["maps"][p] / spread(stats, score) for r, p, stats in zip(results, picks, statistics)],
                                   axis=0).astype(np.float32)
    return combined


def out_of_fold_dice(pixels):
    """Pooled Dice of a CV run's out-of-fold pixel histograms (one per fold, None where a fold had no masks): fold k at
    the threshold chosen on the other folds' out-of-fold pixels (patients outside fold k, as its validation split's;
    scoring every validation bleed slice again for it would double the cost of a CV evaluation).
    -> (Dice or None, the thresholds of the folds that had pixels)."""
    others = []
    for k in range(len(pixels)):
        rest = [p for j, p in enumerate(pixels) if j != k and p is not None]
        others.append(scoring.merge_pixel_accumulators(rest) if rest else None)
    return metrics.pooled_dice(list(zip(pixels, others)))


# ---------------------------------------------------------------------------------------------
# a model's reference: which slices, scoring them, the file next to the checkpoint

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


def reference_slices(fold, data_dir=None):
    """(the fold's data with its whole validation split decoded, its reference positions): the same slices whatever
    --eval_samples the caller samples its splits with. fold: trained.Fold; data_dir: default the fold run's."""
    run = dataclasses.replace(fold.run, data_dir=data_dir or fold.run.data_dir, eval_samples="all")
    rd = data.open_run_data(run, fold.diffusion.input_hu, ("val",), saved_splits=cohort.saved_splits(fold.checkpoint, fold.path))
    return rd, reference_positions(rd, run)


def reference_key(settings, seed, run, checkpoint):
    """What a model's reference statistics depend on: they are used again only for the same (the batch size is left
    out: a map does not depend on it; the cache version is in: it changes when decoding or the masks do; the model is
    in, by model_identity: a checkpoint rewritten in place, by --resume or --overwrite, never reads the old one's)."""
    return {"settings": settings.as_dict() | {"eval_batch_size": None}, "seed": seed,
            "min_brain_fraction": run.min_brain_fraction, "cache_version": cohort.CACHE_VERSION,
            "model": model_identity(checkpoint)}


def model_identity(checkpoint):
    """A short digest of what a saved model was (its epoch and that epoch's metrics, timings included): two trainings,
    or two epochs of one, do not share it."""
    record = {"epoch": checkpoint.get("epoch"), "metrics": checkpoint.get("metrics")}
    return hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fold_reference(fold, data_dir=None):
    """A model's reference statistics (a fold model of a CV run, or a checkpoint scored with --level_norm): the saved
    ones for these scoring settings, else scored now on its reference slices (reference_positions: every slice of the
    healthy patients of its validation split, whatever the caller samples) and saved next to its checkpoint. So
    evaluate.py, predict.py and sweep.py put a model on the same scale for the same settings. data_dir: where the
    model's training data is (default: where its checkpoint says it trained; it must then be at hand).
    fold: trained.Fold."""
    key = reference_key(fold.settings, fold.seed, fold.run, fold.checkpoint)
    statistics = read_reference(reference_path(fold.path), key)
    if statistics is not None:
        return statistics
    trained_on = (fold.checkpoint.get("splits") or {}).get("data_dir") or (fold.checkpoint.get("args") or {}).get("data_dir")
    data_dir = data_dir or trained_on
    if not data_dir or not os.path.isdir(data_dir):
        raise SystemExit(f"error: {fold.path}: no reference statistics (healthy validation slices) for these scoring "
                         f"settings in {reference_path(fold.path)}, and the training data {data_dir!r} is not at hand to "
                         f"score them: run python evaluate.py --checkpoint {fold.path} with the same scoring flags where "
                         "the training data is")
    normative = fold_normative(fold, data_dir)
    rd, positions = reference_slices(fold, data_dir)
    print(f"scoring the reference: {len(positions)} slices of the healthy validation patients")
    val = scoring.score_split(fold.diffusion, data.SliceDataset(rd.cache, rd.index, positions), fold.settings,
                              seed=fold.seed, keep_examples=0, workers=scoring.Workers(fold.run.num_workers),
                              normative=normative)
    statistics = reference_statistics(val["scores"], val["labels"], val["levels"], level_bins(fold.settings))
    write_reference(reference_path(fold.path), key, statistics)
    return statistics
