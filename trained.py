"""A trained run as one object: `open_run(path)` reads a checkpoint, or a cross-validation run folder (train.py --folds),
into a TrainedRun that holds the run's configuration, its scoring settings, the scoring noise seed and its fold models
(a single checkpoint is a run of one fold). evaluate.py, predict.py and sweep.py open a run here and nowhere else.

    trained = open_run("runs/ctich_cv", flags, fold_checkpoint="best_model_loss.pt", device=device)
    rd = trained.fold_data(fold, ("val", "test"))          # the fold's own data, with its saved patient splits
    result, val = trained.score(fold, rd, "test")          # scoring.score_split, the one scoring path
    pooled, by_fold = trained.out_of_fold(keep_examples=6) # every patient scored by the fold model that never saw it
    result, index, counts = trained.ensemble_external(other_dir, None, 6)  # a CV run on an external set: its ensemble

Scores of several fold models are put on one scale by each model's reference statistics (cv.py: the healthy
validation slices of the fold, read or scored once and saved next to its checkpoint), then combined by
cv.ensemble_results (scores and maps) or pooled by cv.pool_out_of_fold; on an external set, a CV run's pixel metrics
and overlays are of the ensemble map, streamed in chunks of whole scans (ensemble_external).
"""
import dataclasses
import functools
import os

import numpy as np
import torch

import cohort
import config
import cv
import data
import inputs
import models
import readers
import scoring


@dataclasses.dataclass
class Fold:
    """One model of a trained run: its checkpoint file, the network and schedule (models.Diffusion), the checkpoint's
    plain data (saved args, splits), and the run's configuration and scoring as read back for it."""
    number: int
    path: str
    diffusion: models.Diffusion
    checkpoint: dict
    run: config.RunConfig
    settings: scoring.ScoringSettings
    seed: int


@dataclasses.dataclass
class TrainedRun:
    path: str
    folds: list
    is_cv: bool
    _references: list = None
    _normatives: dict = dataclasses.field(default_factory=dict)

    @property
    def run(self):
        return self.folds[0].run

    @property
    def settings(self):
        return self.folds[0].settings

    @property
    def seed(self):
        return self.folds[0].seed

    @property
    def needs_reference(self):
        """Whether scores go through reference statistics: a CV run's folds (one scale), or --level_norm."""
        return self.is_cv or self.settings.level_norm != "none"

    def fold_data(self, fold, decode, rank=0, world=1):
        """The fold's training data set with its saved patient splits (--data_dir given now replaces the folder), the
        splits named in `decode` in a slice cache of the model's input representation."""
        return data.open_run_data(fold.run, fold.diffusion.input_hu, decode, rank=rank, world=world,
                                  saved_splits=cohort.saved_splits(fold.checkpoint, fold.path, rank))

    def score(self, fold, rd, split, keep_examples=0, rank=0, world=1, with_val=True):
        """Score a split of rd with the fold's model (scoring.score_split); pixel histograms where the data set has
        bleed masks, and then, on test (with_val), the validation split too: the Dice threshold is chosen there.
        -> (result, validation result or None)."""
        return score_split(fold, rd, split, keep_examples, rank, world, with_val)

    def references(self):
        """Each fold model's reference statistics (cv.fold_reference: saved, or scored now on the training data), read
        once per TrainedRun; None where scores need no reference."""
        if not self.needs_reference:
            return None
        if self._references is None:
            self._references = [cv.fold_reference(f) for f in self.folds]
        return self._references

    def normative(self, fold):
        """The fold model's normative map (cv.fold_normative), read once per TrainedRun: predict.py scores scan after
        scan with it."""
        if fold.number not in self._normatives:
            self._normatives[fold.number] = cv.fold_normative(fold)
        return self._normatives[fold.number]

    def combine(self, results):
        """The folds' results on the same data set as one: scores (and maps, where kept) on one scale and averaged
        (cv.ensemble_results); a run without references has one fold, whose result is returned as it is."""
        if not self.needs_reference:
            return results[0]
        return cv.ensemble_results(results, self.references(), self.settings.score)

    def map_threshold(self):
        """The map value above which predict.py's DICOM Segmentation marks a pixel: the brightest 1 % of a healthy
        slice's brain (the brain_p99 score) of the run's reference slices, mean + 2 standard deviations, so that
        about one healthy slice in 40 reaches it at all; in the units of the combined map (a CV run's: each fold's map
        over its spread, as TrainedRun.combine averages them). None, with a note, where no reference can be had (not
        saved, and the training data not at hand)."""
        try:
            statistics = self.references() or [cv.fold_reference(f) for f in self.folds]
        except SystemExit as refused:
            print(f"note: no DICOM Segmentation: {str(refused.code).removeprefix('error: ')}")
            return None
        bounds = []
        for stats in statistics:
            mean, std = np.asarray(stats["brain_p99"], np.float64).reshape(-1, 2).mean(axis=0)
            bounds.append((mean + 2 * std) / (cv.spread(stats, self.settings.score) if self.needs_reference else 1.0))
        return float(np.mean(bounds))

    def score_dataset(self, dataset):
        """Every fold model on one in-memory dataset (data.ArrayDataset: predict.py's scan), maps kept, combined.
        -> a score_split-like result (maps and scores in position order)."""
        return self.combine([scoring.score_split(f.diffusion, dataset, self.settings, seed=self.seed, keep_examples=0,
                                                 keep_maps=True, normative=self.normative(f)) for f in self.folds])

    def out_of_fold(self, keep_examples):
        """A CV run's out-of-fold scores: fold k's model on fold k's patients (its test split); its reference
        statistics (cv.fold_reference: saved, or scored on its reference slices) put its scores on the pooled scale.
        -> (pooled result, [each fold's result], [each fold's statistics], the index)."""
        results, statistics = [], []
        for fold in self.folds:
            rd = self.fold_data(fold, ("test",))  # the reference reads (or decodes) its own, whole validation split
            results.append(self.score(fold, rd, "test", keep_examples, with_val=False)[0])
            statistics.append(cv.fold_reference(fold, fold.run.data_dir))
        self._references = statistics
        pooled = cv.pool_out_of_fold(results, statistics, self.settings.score, keep_examples)
        return pooled, results, statistics, rd.index

    def score_external(self, data_dir, eval_samples, keep_examples, rank=0, world=1):
        """--split all: every patient of data_dir (a data set the run did not train on) scored by each fold model.
        -> ([each fold's result], the index, counts of training patients left out); TrainedRun.combine joins them."""
        results = []
        for fold in self.folds:
            sampled = dataclasses.replace(fold, run=dataclasses.replace(fold.run, eval_samples=eval_samples or "all"))
            rd, counts = data.in_turn(lambda: external_data(sampled, data_dir, eval_samples), rank, world)
            results.append(self.score(sampled, rd, "all", keep_examples, rank, world)[0])
        return results, rd.index, counts

    def ensemble_external(self, data_dir, eval_samples, keep_examples, chunk_bytes=None):
        """--split all of a CV run (one process): every fold model on every patient of data_dir, combined, with the
        pixel metrics and overlays of the ensemble map (ensemble_external). -> (result, the index, counts)."""
        return ensemble_external(self, data_dir, eval_samples, keep_examples, chunk_bytes or ENSEMBLE_CHUNK_BYTES)


def add_run_flags(p, checkpoint_help):
    """The flags of every script that opens a trained run (evaluate.py, predict.py, sweep.py): which run, and what may
    be set now on top of the run's own values (config.READ_BACK_FLAGS, the scoring noise seed, the device)."""
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--fold_checkpoint", default="best_model.pt",
                   help="with --checkpoint a CV run folder (train.py --folds): which checkpoint of each fold to use")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the scoring noise (default: the training seed); patient splits always use the "
                        "training seed, so that no training patient can land in a test split")
    p.add_argument("--min_brain_fraction", type=float, default=None,
                   help="score only slices with at least this much intracranial area (default: the training run's value)")
    p.add_argument("--image_window", type=cohort.window_flag, default=None,
                   help="level,width in HU that the 2-D images of --data_dir were exported in (the images layout; "
                        "default: the run's, else the folder's window.txt, else 40,80)")
    config.add_device_flags(p, from_checkpoint=True)


def open_run(path, flags, fold_checkpoint="best_model.pt", device="cpu", precision=None):
    """A checkpoint, or a CV run folder (its folds' `fold_checkpoint`), with the run's saved configuration and scoring
    and the flags given now on top (config.read_back). -> TrainedRun."""
    is_cv = cv.is_cv_run(path)
    if not is_cv and not os.path.isfile(path):
        raise SystemExit(f"error: {path}: checkpoint not found (nor a CV run folder with {cv.FOLDS_FILE})")
    paths = cv.fold_checkpoints(path, fold_checkpoint) if is_cv else [(0, path)]
    record = cv.load_folds(path) if is_cv else None
    folds = []
    for number, fold_path in paths:
        diffusion, checkpoint = models.load_checkpoint(fold_path, device, precision)
        if is_cv:  # the run knows its own parts: a fold from another CV run is refused before anything is scored
            cv.check_fold(record, number, checkpoint, fold_path)
        run, settings, seed = config.read_back(checkpoint, flags, fold_path, diffusion.config["image_size"])
        folds.append(Fold(number, fold_path, diffusion, checkpoint, run, settings, seed))
    return TrainedRun(path, folds, is_cv)


def score_split(fold, rd, split, keep_examples, rank, world, with_val):
    """TrainedRun.score: the split's usable slices through scoring.score_split, with the bleed masks where the data
    set has them (a mask that does not fit its slice is a counted skip)."""
    run = fold.run
    positions = rd.cache.ok(rd.splits[split], run.min_brain_fraction)
    if len(positions) == 0:
        raise SystemExit(f"error: {run.data_dir}: the {split} split has no usable slices")
    gt_masks_fn, unusable_masks = mask_reader(run, rd.index, rd.cache, rank)
    has_masks = has_bleed_masks(gt_masks_fn, rd.index, positions)
    common = dict(seed=fold.seed, workers=scoring.Workers(run.num_workers, rank, world),
                  gt_masks_fn=gt_masks_fn if has_masks else None, normative=cv.fold_normative(fold))
    if rank == 0:
        print(f"scoring the {split} split: {len(positions)} slices on {fold.diffusion.device}" + (f" x{world} processes" if world > 1 else ""))
        if scoring.smoothing_note(fold.settings.smooth_slices, run.eval_samples):
            print(scoring.smoothing_note(fold.settings.smooth_slices, run.eval_samples))
    result = scoring.score_split(fold.diffusion, data.SliceDataset(rd.cache, rd.index, positions), fold.settings,
                                 keep_examples=keep_examples, **common)
    result["skipped_slices"] = int(len(rd.splits[split]) - len(positions))
    if result["pixel"] is not None:
        result["pixel"]["unusable_masks"] = len(unusable_masks)
    if result["pixel"] is None or split != "test" or not with_val:  # every rank sees the gathered result: same decision
        return result, None
    val_positions = rd.cache.ok(rd.splits["val"], run.min_brain_fraction)
    if rank == 0:
        print(f"choosing the Dice threshold on the val split ({len(val_positions)} slices)")
    val = scoring.score_split(fold.diffusion, data.SliceDataset(rd.cache, rd.index, val_positions), fold.settings,
                              keep_examples=0, **common)
    return result, val


def mask_reader(run, index, cache, rank=0):
    """(gt_masks_fn(position) -> the slice's bleed mask or None, {position: why} of the masks that did not fit their
    slice): a mask that does not fit is said once and counted, and the slice is left out of the pixel metrics. Each
    mask goes through its slice's frame (cache.frame: --framing head crops and scales the slice) so that it lies on
    the map's pixels."""
    unusable_masks = {}  # position -> why

    def gt_masks_fn(position):
        try:
            return inputs.load_gt_mask(run.data_dir, index["id"][position], run.image_size, frame=cache.frame(position))
        except readers.BadFile as error:
            if position not in unusable_masks and rank == 0:
                print(f"skipped mask: {error}")
            unusable_masks[position] = str(error)
            return None
    return gt_masks_fn, unusable_masks


def has_bleed_masks(gt_masks_fn, index, positions):
    """Pixel metrics only where the data set has bleed masks (the phantom, CT-ICH's *_HGE_Seg.jpg); RSNA has none."""
    return any(gt_masks_fn(p) is not None for p in positions[index["any"][positions] == 1])


def training_patients(fold):
    """The patient ids of the fold's training split: the lists the run saved where it has them, otherwise the split
    drawn again from the run's data dir and seed. None when neither is at hand."""
    record = cohort.load_splits_record(fold.checkpoint, fold.path)
    if record is not None:
        return set(map(str, record["patients"]["train"]))
    train_args = fold.checkpoint.get("args") or {}
    train_dir = train_args.get("data_dir")
    if not train_dir or not os.path.isdir(train_dir):
        return None
    index = cohort.load_index(train_dir, dataset=None if train_args.get("dataset", "auto") == "auto" else train_args["dataset"],
                              cache_dir=train_args.get("cache_dir"), num_workers=train_args.get("num_workers", 0) or 1)
    return set(map(str, cohort.split_patients(index, train_args.get("seed", cohort.DEFAULT_SEED))["train"]))


def external_data(fold, data_dir, eval_samples):
    """--split all: every patient of a data set the fold model never trained on, as one split "all". Refuses the
    run's own data dir; patients whose ids are among the fold's training patients are left out, loudly, and counted.
    -> (data.RunData, counts for metrics.json)."""
    if data_dir is None:
        raise SystemExit("error: --split all needs --data_dir: a data set the model did not train on")
    train_args = fold.checkpoint.get("args") or {}
    own = {train_args.get("data_dir"), (fold.checkpoint.get("splits") or {}).get("data_dir")} - {None}
    if any(os.path.realpath(data_dir) == os.path.realpath(d) for d in own):
        raise SystemExit(f"error: {data_dir}: this is the training run's own data dir; --split all is for data the "
                         "model never saw (use --split val or test here)")
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: {data_dir}: data dir not found")
    run = fold.run
    index = cohort.load_index(data_dir, num_workers=max(run.num_workers, 1))
    trained_on = training_patients(fold)
    overlap = sorted(set(map(str, index["patient"])) & trained_on) if trained_on is not None else []
    if trained_on is None:
        print(f"WARNING: the training data dir {train_args.get('data_dir')!r} is not at hand, so patient ids could not be "
              "checked against the run's training patients")
    elif overlap:
        print(f"WARNING: {len(overlap)} patient(s) of {data_dir} have the id of a training patient of this run and are "
              f"left out: {', '.join(overlap[:10])}{' ...' if len(overlap) > 10 else ''}")
    rows = np.flatnonzero(~np.isin(index["patient"].astype(str), overlap)).astype(np.int64)
    if eval_samples is not None and eval_samples != "all":
        rng = np.random.default_rng([run.seed, 3])
        positive, negative = rows[index["any"][rows] == 1], rows[index["any"][rows] == 0]
        rows = np.sort(np.concatenate([cohort.draw_slices(rng, positive, eval_samples, "hemorrhage slices"),
                                       cohort.draw_slices(rng, negative, eval_samples, "healthy slices")]))
    reading = inputs.InputHU(fold.diffusion.input_hu, fold.diffusion.framing, run.image_window)
    cache = data.prepare_slices(data_dir, index, rows, run.image_size, reading,
                                num_workers=max(run.num_workers, 1), verify_cache=run.verify_cache)
    patients = {"all": np.unique(index["patient"][rows])}
    return data.RunData(index, {"all": rows}, cache, patients), {"training_patients_left_out": len(overlap),
                                                               "checked_against_training_patients": trained_on is not None}


# ---------------------------------------------------------------------------------------------
# a CV run on an external set: the fold models' maps as one, streamed

# How many bytes of maps one chunk of slices may hold, all fold models' together (see ensemble_external).
ENSEMBLE_CHUNK_BYTES = 256 * 2**20


class ChunkOf(torch.utils.data.Dataset):
    """Items lo..hi-1 of a data.SliceDataset, served as it serves them, with its aligned arrays cut alike."""

    def __init__(self, dataset, lo, hi):
        self.dataset, self.lo = dataset, lo
        self.positions, self.labels = dataset.positions[lo:hi], dataset.labels[lo:hi]
        self.patients, self.scans = dataset.patients[lo:hi], dataset.scans[lo:hi]

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        return self.dataset[self.lo + i]

    @property
    def context_slices(self):
        return self.dataset.context_slices

    @context_slices.setter
    def context_slices(self, value):  # score_split tells the dataset the neighbours its model reads (2.5-D)
        self.dataset.context_slices = value


def scan_chunks(scans, most):
    """[(lo, hi)]: consecutive runs of whole scans (a scan's slices are consecutive, in position order), each of at
    most `most` slices unless one scan alone is longer: so --smooth_slices, which averages along a scan, gives a
    chunk's slices the scores one pass over all of them gives."""
    scans = np.asarray(scans)
    bounds = [0, *(np.flatnonzero(scans[1:] != scans[:-1]) + 1).tolist(), len(scans)]
    chunks, lo = [], 0
    for start, end in zip(bounds[:-1], bounds[1:]):  # the scan of slices start..end-1
        if end - lo > most and start > lo:  # it would overfill a chunk that holds something: close that one first
            chunks.append((lo, start))
            lo = start
    if len(scans) > lo:
        chunks.append((lo, len(scans)))
    return chunks


def external_sets(run, data_dir, eval_samples):
    """Each fold model's slices of data_dir (external_data: its training patients left out) cut to the slices every
    model scores (a slice that one of them leaves out has no ensemble score), as one data.SliceDataset per model.
    -> (the datasets, the index, counts, slices skipped: bad files, too little brain)."""
    caches, usable, skipped = [], [], []
    for fold in run.folds:
        sampled = dataclasses.replace(fold, run=dataclasses.replace(fold.run, eval_samples=eval_samples or "all"))
        rd, counts = external_data(sampled, data_dir, eval_samples)
        caches.append(rd.cache)  # the index is the same for every model (data_dir's): one is kept
        usable.append(rd.cache.ok(rd.splits["all"], fold.run.min_brain_fraction))
        skipped.append(int(len(rd.splits["all"]) - len(usable[-1])))
    common = functools.reduce(np.intersect1d, usable)
    if len(common) == 0:
        raise SystemExit(f"error: {data_dir}: no usable slice that every fold model may score")
    dropped = max(len(u) for u in usable) - len(common)
    if dropped:
        print(f"ensemble: {dropped} slice(s) not scored by every fold model (patients some fold trained on) are left out")
    return [data.SliceDataset(cache, rd.index, common) for cache in caches], rd.index, counts, max(skipped)


def ensemble_external(run, data_dir, eval_samples, keep_examples, chunk_bytes):
    """TrainedRun.ensemble_external. Scores: cv.ensemble_results' (a slice's, the mean of the models' z-scores). The
    ensemble map of a slice: the models' maps weighted by cv.map_weights (the mean of each map over its model's
    reference spread, as ensemble_results and predict.py average them, times the mean spread: the same ranks, in the
    residual range of the pixel histograms); the pixel histograms (where data_dir has bleed masks) and the overlay
    examples (ranked by the ensemble score) are of it.
    Memory: every model's maps of a whole set would not fit (RSNA: 100k+ slices x 128^2 x 4 B = 6.5 GB a model), so
    the slices go through in chunks of whole scans (scan_chunks) of about chunk_bytes of maps, all models together:
    each model scores the chunk with its maps kept, the chunk's ensemble maps go into the histograms and the few
    examples kept, and the maps are let go. Each model still scores each slice once, as scoring model by model would.
    -> (result, with "pixel", "examples" and "map_scale": the factor from ensemble_results' map units to these)."""
    sets, index, counts, skipped = external_sets(run, data_dir, eval_samples)
    statistics, score = run.references(), run.settings.score
    # the models share one framing (their training's), so the first model's slice cache frames the masks for all
    gt_masks_fn, unusable = mask_reader(dataclasses.replace(run.run, data_dir=data_dir), index, sets[0].cache)
    stream = EnsembleStream(cv.map_weights(statistics, score), run.settings, keep_examples,
                            gt_masks_fn if has_bleed_masks(gt_masks_fn, index, sets[0].positions) else None)
    size = sets[0][0]["image"].shape[-1]
    most = max(1, chunk_bytes // ((len(run.folds) + 1) * size * size * 4))
    print(f"scoring the all split: {len(sets[0])} slices with {len(run.folds)} fold models, in chunks of whole scans "
          f"(at most {most} slices where scans allow)")
    if scoring.smoothing_note(run.settings.smooth_slices, eval_samples or "all"):
        print(scoring.smoothing_note(run.settings.smooth_slices, eval_samples or "all"))
    parts = [[] for _ in run.folds]
    normatives = [cv.fold_normative(f) for f in run.folds]
    for lo, hi in scan_chunks(sets[0].scans, most):
        results = [scoring.score_split(f.diffusion, ChunkOf(ds, lo, hi), f.settings, seed=f.seed, keep_examples=0,
                                       keep_maps=True, workers=scoring.Workers(f.run.num_workers), normative=n)
                   for f, ds, n in zip(run.folds, sets, normatives)]
        stream.add(ChunkOf(sets[0], lo, hi), results, statistics)
        for part, r in zip(parts, results):
            r["maps"] = None  # let go before the next chunk is scored
            part.append(r)
    combined = cv.ensemble_results([joined(part, skipped) for part in parts], statistics, score)
    pixel = stream.pixel if stream.pixel is not None and stream.pixel["pos"].sum() > 0 else None
    if pixel is not None:
        pixel["unusable_masks"] = len(unusable)
    return combined | {"pixel": pixel, "examples": stream.examples,
                       "map_scale": cv.map_scale(statistics, score)}, index, counts


def joined(parts, skipped):
    """A fold model's chunk results (score_split's, in position order) as one."""
    out = {key: np.concatenate([p[key] for p in parts]) for key in ("positions", "labels", "levels", "patients", "scans")}
    return out | {"scores": {name: np.concatenate([p["scores"][name] for p in parts]) for name in parts[0]["scores"]},
                  "pixel": None, "examples": {}, "maps": None, "skipped_slices": skipped,
                  "seconds": sum(p["seconds"] for p in parts)}


# Overlay examples: which slices, ranked which way by the ensemble score (as scoring.score_split ranks them)
RANKING = {"true positive": (1, -1), "false positive": (0, -1), "miss": (1, 1)}  # kind -> (label, sign of the key)


class EnsembleStream:
    """The pixel histograms and overlay examples of a CV run's ensemble map, added chunk by chunk (ensemble_external).
    gt_masks_fn None: no pixel histograms (a data set without bleed masks)."""

    def __init__(self, weights, settings, keep_examples, gt_masks_fn=None):
        self.weights, self.settings, self.keep, self.gt_masks_fn = weights, settings, keep_examples, gt_masks_fn
        self.pixel = scoring.new_pixel_accumulator() if gt_masks_fn is not None else None
        self.examples = {kind: [] for kind in scoring.EXAMPLE_KINDS}

    def add(self, chunk, results, statistics):
        """One chunk (ChunkOf) as every fold model scored it, maps kept (results, in the models' order). A slice's
        pixels are its ensemble map read as 0 outside the scored region, inside its intracranial mask, as scoring's
        pixel histograms of one model's map (scoring.add_pixels, the same function)."""
        maps = cv.ensemble_map([r["maps"] for r in results], self.weights)
        z = cv.mean_normalised([r["scores"] for r in results], statistics, results[0]["levels"])[self.settings.score]
        labels = results[0]["labels"]
        wanted = self.candidates(z, labels)
        for i in (range(len(chunk)) if self.pixel is not None else sorted(wanted)):
            item = chunk[i]
            region = scoring.scored_masks(item["mask"][None], item["anatomy"][None], self.settings)[0]
            gt = None if self.pixel is None else scoring.add_pixels(
                self.pixel, maps[i], region, item["mask"].numpy(), int(labels[i]), self.gt_masks_fn(int(item["position"])))
            for kind in wanted.get(i, ()):
                self.examples[kind].append({"kind": kind, "position": int(item["position"]), "label": int(labels[i]),
                                            "score": float(z[i]), "image": item["image"][0].numpy().copy(),
                                            "map": np.array(maps[i], np.float32), "brain_mask": region, "gt_mask": gt})
        for kind, (_, sign) in RANKING.items():
            self.examples[kind] = sorted(self.examples[kind], key=lambda ex: sign * ex["score"])[:self.keep]

    def candidates(self, z, labels):
        """{chunk row: [kinds]}: the rows that may enter the examples, each kind's keep_examples best of the chunk."""
        wanted = {}
        for kind, (label, sign) in RANKING.items():
            rows = np.flatnonzero(labels == label)
            for i in rows[np.argsort(sign * z[rows], kind="stable")][:self.keep]:
                wanted.setdefault(int(i), []).append(kind)
        return wanted
