"""A trained run as one object: `open_run(path)` reads a checkpoint, or a cross-validation run folder (train.py --folds),
into a TrainedRun that holds the run's configuration, its scoring settings, the scoring noise seed and its fold models
(a single checkpoint is a run of one fold). evaluate.py, predict.py and sweep.py open a run here and nowhere else.

    trained = open_run("runs/ctich_cv", flags, fold_checkpoint="best_model_loss.pt", device=device)
    rd = trained.fold_data(fold, ("val", "test"))          # the fold's own data, with its saved patient splits
    result, val = trained.score(fold, rd, "test")          # scoring.score_split, the one scoring path
    pooled, by_fold = trained.out_of_fold(keep_examples=6) # every patient scored by the fold model that never saw it

Scores of several fold models are put on one scale by each model's reference statistics (cv.py: the healthy
validation slices of the fold, read or scored once and saved next to its checkpoint), then combined by
cv.ensemble_results (scores and maps) or pooled by cv.pool_out_of_fold.
"""
import dataclasses
import os

import numpy as np

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
                                                 keep_maps=True) for f in self.folds])

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
    unusable_masks = {}  # position -> why

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
    common = dict(seed=fold.seed, workers=scoring.Workers(run.num_workers, rank, world),
                  gt_masks_fn=gt_masks_fn if has_masks else None)
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
    cache = data.prepare_slices(data_dir, index, rows, run.image_size, fold.diffusion.input_hu,
                                num_workers=max(run.num_workers, 1), verify_cache=run.verify_cache)
    patients = {"all": np.unique(index["patient"][rows])}
    return data.RunData(index, {"all": rows}, cache, patients), {"training_patients_left_out": len(overlap),
                                                               "checked_against_training_patients": trained_on is not None}
