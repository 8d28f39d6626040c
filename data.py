"""What a run reads: the index and the patient-level splits (cohort.py), and the slices decoded once into a
memory-mapped slice cache (SliceCache, prepare_slices) that SliceDataset serves; open_run_data does all three.
Also a grid figure of sample slices, to look at a data set.

Below it, each importing only the ones before: runfiles.py (atomic writes, locks, figures, cache folders),
readers.py (files -> Hounsfield units), cohort.py (layouts, labels, index, splits), inputs.py (windows, masks,
model inputs). The synthetic phantom is phantom.py.

CLI:
  python data.py show --data_dir DIR --out grid.png
  python data.py index --data_dir DIR
"""
import argparse
import collections
import functools
import hashlib
import os
import shutil
import time

import numpy as np
import torch

from cohort import (CACHE_VERSION, DATASETS, LABELS, SHORT_NAMES, SUBTYPES, apply_saved_splits, check_dataset,
                    load_index, make_splits, neighbour_rows, relative_heights, slice_number, split_patients, stated_window)
from inputs import (BONE, INTRACRANIAL, NON_TISSUE, SCORED_REGIONS, STATED, WINDOWS, Frame, InputHU, add_neighbour_bone,
                    bone_in_frame, check_input_hu, framing_of, hu_range, intracranial, load_gt_mask, load_slice,
                    nifti_slice_input, read_stated_image, reframe, region_mask, tissue_classes, window_hu)
from readers import (DEFAULT_WORKERS, BadFile, hu_from_dicom, is_nifti, parallel_map, read_ctich_slice,
                     read_nifti_slices, report_skips, source_identity)
from runfiles import cache_lock, check_cache_dir, check_figure_format, default_cache_dir, pyplot, save_figure


# ---------------------------------------------------------------------------------------------
# the slice cache

def load_file_slices(item, input_hu, image_size, window=None):
    """[load_slice result with its frame, or the BadFile reason of that slice] for item = (path, slice numbers): a
    NIfTI volume is read once for all of its slices asked for; any other file is one slice. window: the stated
    window of the images layout (None for the others)."""
    path, numbers = item
    if not is_nifti(path):
        return [load_slice(path, input_hu, image_size, window=window, with_frame=True)]
    results = []
    for hu in read_nifti_slices(path, numbers):
        try:
            results.append(nifti_slice_input(hu, input_hu, image_size, with_frame=True))
        except BadFile as error:
            results.append(str(error))
    return results


def file_groups(index, positions):
    """[(path, [index rows])]: the rows of one NIfTI volume together (decoded in one read), every other row alone."""
    groups = {}
    for position in positions:
        path = str(index["path"][position])
        groups.setdefault(path if is_nifti(path) else int(position), (path, []))[1].append(int(position))
    return list(groups.values())


class SliceCache:
    """Decoded slices on disk, one row per index row: images float16 [N, C, S, S] in [-1, 1], brain
    anatomy codes uint8 [N, S, S] (inputs.anatomy_code; "masks"), frames int64 [N, 5] (inputs.Frame: the square of
    the slice's own pixels that became the input), state uint8 [N] (0 not decoded, 1 ok, 2 bad file). Memory-mapped read-only
    on first use; pickles as its file prefix only, so DataLoader workers map the files themselves."""

    def __init__(self, prefix):
        self.prefix = prefix
        self._arrays = None

    def _open(self):
        if self._arrays is None:
            self._arrays = {name: np.load(f"{self.prefix}.{name}.npy", mmap_mode="r")
                            for name in ("images", "masks", "state", "frames")}
        return self._arrays

    def frame(self, position):
        """The inputs.Frame the slice at this index row was framed with (what its ground-truth mask must go through:
        inputs.load_gt_mask(..., frame=cache.frame(position))), or None when it did not decode."""
        if self.state[position] != 1:
            return None
        return Frame(*(int(v) for v in self._open()["frames"][position]))

    @property
    def images(self):
        return self._open()["images"]

    @property
    def frames(self):
        return self._open()["frames"]

    @property
    def masks(self):
        return self._open()["masks"]

    @property
    def state(self):
        return self._open()["state"]

    def ok(self, positions, min_brain_fraction=0.0):
        """The positions that decoded fine, in the given order; with min_brain_fraction > 0, only
        those whose intracranial mask covers at least that fraction of the slice. Face, skull-base
        and vertex slices hold little brain, almost never a labelled bleed, and mostly bone edges
        that no model rebuilds exactly, so they dominate a ranking of slices by error: on CT-ICH
        at 128 px, 470 of 1,767 slices have under 5 % brain and 2 of them a bleed."""
        positions = np.asarray(positions, np.int64)
        positions = positions[self.state[positions] == 1]
        if min_brain_fraction > 0 and len(positions):
            fraction = np.array([intracranial(self.masks[p]).mean() for p in positions])
            positions = positions[fraction >= min_brain_fraction]
        return positions

    def __getstate__(self):
        return {"prefix": self.prefix, "_arrays": None}


def _create_cache_files(prefix, n, channels, image_size):
    """Create the five files, all together (with every row "not decoded") unless all are there already."""
    shapes = {"images": ((n, channels, image_size, image_size), np.float16),
              "masks": ((n, image_size, image_size), np.uint8), "source": ((n, 3), np.int64),
              "frames": ((n, len(Frame._fields)), np.int64), "state": ((n,), np.uint8)}
    try:
        if all(np.load(f"{prefix}.{name}.npy", mmap_mode="r").shape == shape for name, (shape, _) in shapes.items()):
            return
    except (OSError, ValueError):  # missing or damaged
        pass
    for name, (shape, dtype) in shapes.items():  # state last: it is what says the others are there
        temporary = f"{prefix}.{name}.{os.getpid()}.tmp"
        np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape).flush()  # sparse: zeros cost no disk
        os.replace(temporary, f"{prefix}.{name}.npy")


def slice_cache_prefix(data_dir, dataset, index, image_size, input_hu, cache_dir, window=None):
    """The slice cache's file prefix: the absolute data folder and the index's ids are in its hash, so two data
    folders with the same image ids never share rows, even in one --cache_dir; so are the input representation (a
    model trained on other windows never reads these inputs), the stated window of 2-D images (window) and the
    framing (inputs.framing_of: a row framed to the head is never served to a model that frames none)."""
    key = os.path.abspath(data_dir) + "\n" + "\n".join(index["id"].tolist())
    key_hash = hashlib.sha1(key.encode()).hexdigest()[:12]
    pairs = [[float(v) for v in pair] for pair in input_hu]
    stated = "" if window is None else repr([float(v) for v in window])
    windows = hashlib.sha1((repr(pairs) + stated).encode()).hexdigest()[:8]
    framing = framing_of(input_hu)
    return os.path.join(cache_dir, f"slices_{dataset}_{key_hash}_{image_size}px_{len(input_hu)}ch_{windows}"
                                   f"{'' if framing == 'none' else '_' + framing}_v{CACHE_VERSION}")


def _decode_rows(prefix, data_dir, index, todo, identities, decode, num_workers):
    """Decode the rows `todo` into the cache files with decode (load_file_slices with its settings); -> the skipped
    (path, reason) pairs."""
    state = np.load(f"{prefix}.state.npy", mmap_mode="r+")
    state[todo] = 0  # first: a run interrupted below never trusts a row it had begun to replace
    state.flush()
    images = np.load(f"{prefix}.images.npy", mmap_mode="r+")
    masks = np.load(f"{prefix}.masks.npy", mmap_mode="r+")
    source = np.load(f"{prefix}.source.npy", mmap_mode="r+")
    frames = np.load(f"{prefix}.frames.npy", mmap_mode="r+")
    groups = file_groups(index, todo)
    items = [(os.path.join(data_dir, path), [slice_number(index["id"][p]) for p in rows]) for path, rows in groups]
    skips, done = [], 0
    for (path, rows), (ok, results) in zip(groups, parallel_map(decode, items, num_workers, "decode")):
        for position, result in zip(rows, results if ok else [results] * len(rows)):
            source[position] = identities[position]  # stat'ed before decoding: a file changed meanwhile is decoded again
            if isinstance(result, str):  # the reason the slice (or its whole file) cannot be used
                state[position] = 2
                skips.append((path if len(rows) == 1 else str(index["id"][position]), result))
            else:
                images[position], masks[position], frames[position] = result
                state[position] = 1
            done += 1
            if done % 512 == 0:  # data before state, so an interrupted run never trusts a row it did not write
                images.flush(), masks.flush(), frames.flush(), source.flush(), state.flush()
    images.flush(), masks.flush(), frames.flush(), source.flush(), state.flush()
    return skips


def row_bytes(channels, image_size):
    """Disk bytes of one slice cache row: image (float16), mask, source identity, state."""
    return channels * image_size * image_size * 2 + image_size * image_size + 3 * 8 + 1


def check_free_space(cache_dir, n_rows, channels, image_size):
    """A one-line SystemExit, before any row is written, when the cache's disk cannot hold n_rows more rows: filling a
    memory-mapped file on a full disk ends in a bus error, not an exception. The rows already cached stay usable."""
    needed = n_rows * row_bytes(channels, image_size)
    free = shutil.disk_usage(cache_dir).free
    if needed > free:
        raise SystemExit(f"error: --cache_dir {cache_dir}: not enough free space for the slice cache: {n_rows} slices need "
                         f"{needed} bytes ({needed / 2**30:.2f} GiB), {free} bytes free; nothing was written, the cached "
                         "slices are left as they were (free some space, or point --cache_dir at a larger disk)")


def _rows_to_decode(prefix, data_dir, index, positions, verify_cache, num_workers):
    """(identities {position: source identity or None}, gone, changed, todo) of the requested positions: a row is
    decoded again when its file changed since it was cached: other size or modification time, or with verify_cache
    another content hash (a row cached without one counts as changed)."""
    paths = [os.path.join(data_dir, index["path"][p]) for p in positions]
    if verify_cache:
        hashed = parallel_map(functools.partial(source_identity, content=True), paths, num_workers, "verify cache")
        identities = {int(p): identity if ok else None for p, (ok, identity) in zip(positions, hashed)}
    else:
        identities = {int(p): source_identity(path) for p, path in zip(positions, paths)}
    gone = np.array([p for p in positions if identities[p] is None], np.int64)
    state, source = np.load(f"{prefix}.state.npy", mmap_mode="r"), np.load(f"{prefix}.source.npy", mmap_mode="r")
    current = np.array([identities[p] or (-1, -1, 0) for p in positions], np.int64).reshape(-1, 3)
    compared = [0, 2] if verify_cache else [0, 1]
    differs = (source[positions][:, compared] != current[:, compared]).any(axis=1)
    if verify_cache:
        differs |= source[positions][:, 2] == 0
    changed = positions[(state[positions] != 0) & differs & (current[:, 0] >= 0)]
    todo = np.setdiff1d(positions[state[positions] == 0], gone).astype(np.int64)
    return identities, gone, changed, np.union1d(todo, changed).astype(np.int64)


def prepare_slices(data_dir, index, positions, image_size, input_hu, cache_dir=None, num_workers=DEFAULT_WORKERS,
                   verify_cache=False):
    """Decode the given index rows once into the memory-mapped SliceCache, as model inputs in the representation
    input_hu (inputs.native_input_hu, with its framing, inputs.InputHU; a model's is in its checkpoint). 2-D images
    (the images layout) are read in their stated window (stated_window_of). A row decoded before (by an earlier
    epoch or run) is used again only if its file is the same one (size and modification time; with verify_cache a
    hash of its bytes instead of the time); a changed file is decoded again, and a file that is gone or no longer
    decodes is a counted skip. Two runs on the same cache fill it one after the other (runfiles.cache_lock).
    Prints slices/s and a summary."""
    data_dir = os.fspath(data_dir)
    dataset = check_dataset(data_dir, None)
    window = stated_window_of(data_dir, input_hu)
    check_input_hu(input_hu, dataset, data_dir, window)
    cache_dir = check_cache_dir(cache_dir) if cache_dir else default_cache_dir(data_dir)
    prefix = slice_cache_prefix(data_dir, dataset, index, image_size, input_hu, cache_dir, window)
    with cache_lock(f"{prefix}.lock", "the slice cache"):
        _fill_cache(prefix, data_dir, index, positions, image_size, input_hu, num_workers, verify_cache)
    return SliceCache(prefix)


def stated_window_of(data_dir, input_hu):
    """The stated window (low, high) HU that the 2-D images of data_dir are read in (the images layout; None for the
    others): the run's --image_window where input_hu carries one (inputs.InputHU.image_window, open_run_data), else
    the folder's window.txt, else 40,80 (cohort.stated_window)."""
    if check_dataset(data_dir, None) != "images":
        return None
    return stated_window(data_dir, getattr(input_hu, "image_window", None))


def _fill_cache(prefix, data_dir, index, positions, image_size, input_hu, num_workers, verify_cache):
    """prepare_slices' work, under the cache's lock (prefix: in the cache folder)."""
    channels, window = len(input_hu), stated_window_of(data_dir, input_hu)
    decode = functools.partial(load_file_slices, input_hu=input_hu, image_size=image_size, window=window)
    cache_dir = os.path.dirname(prefix)
    try:
        _create_cache_files(prefix, len(index["id"]), channels, image_size)
    except OSError as error:
        raise SystemExit(f"error: --cache_dir {cache_dir}: cannot write the slice cache ({error.strerror or error})")
    positions = np.asarray(positions, np.int64)
    neighbours = neighbour_rows(index, positions)  # a slice is read beside its neighbours (SliceDataset): decode them too
    positions = np.unique(np.concatenate([positions, neighbours[neighbours >= 0]]))
    identities, gone, changed, todo = _rows_to_decode(prefix, data_dir, index, positions, verify_cache, num_workers)
    check_free_space(cache_dir, len(todo), channels, image_size)
    state = np.load(f"{prefix}.state.npy", mmap_mode="r+")
    state[gone] = 2
    state.flush()
    skips = [(str(index["path"][p]), "file missing since the index was built") for p in gone]
    start = time.time()
    if len(todo):
        skips += _decode_rows(prefix, data_dir, index, todo, identities, decode, num_workers)
        seconds = time.time() - start
        print(f"slices: decoded {len(todo)} in {seconds:.1f} s ({len(todo) / max(seconds, 1e-9):.0f} slices/s) -> {prefix}.*.npy")
    report_skips("slices", skips)
    n_bad = int((state[positions] == 2).sum())
    again = f" ({len(changed)} decoded again: their file changed since it was cached)" if len(changed) else ""
    print(f"slices: {len(positions)} requested, {len(positions) - len(todo) - len(gone)} were cached{again}, "
          f"{n_bad} bad file(s) left out")


def with_context(image, below, above):
    """A slice's model input with its neighbours (2.5-D, models.CONTEXT_SLICES): the slice's own channels first (the
    ones scored and shown), then the slice below and the one above; a scan's end (or a bad file) repeats the slice."""
    return np.concatenate([image, image if below is None else below, image if above is None else above])


class SliceDataset(torch.utils.data.Dataset):
    """Items dict(image float32 [C, S, S] ([3C, S, S] with context_slices 1: with_context), mask bool [S, S]
    (intracranial), anatomy uint8 [S, S] (the cached
    inputs.anatomy_code, with the NEAR_BONE bit from the slices above and below: scoring.scored_masks reads the
    scored region off it), label int (any), position int (index row)).
    Positions whose slice did not decode (cache state != 1) are left out. .positions, .labels, .patients
    and .scans are aligned arrays over the items (for metrics that group by patient or scan)."""

    def __init__(self, cache, index, positions):
        self.cache = cache
        self.positions = cache.ok(positions)
        self.neighbours = neighbour_rows(index, self.positions)
        state = cache.state[np.maximum(self.neighbours, 0)]
        if ((self.neighbours >= 0) & (state == 0)).any():  # the anatomy of a slice would depend on what was decoded before
            raise RuntimeError(f"{cache.prefix}: a slice's neighbour is not decoded (prepare_slices decodes them)")
        self.neighbours[state != 1] = -1  # a neighbour whose file is bad is no neighbour
        # copies of the few columns needed, not the whole index: DataLoader workers stay light
        self.labels = np.asarray(index["any"])[self.positions].astype(np.int64)
        self.patients = np.asarray(index["patient"])[self.positions]
        self.scans = np.asarray(index["scan"])[self.positions]
        self.heights = relative_heights(index)[self.positions]
        self.context_slices = 0  # set by the model that reads it (train.py, scoring.score_split)

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        position = int(self.positions[i])
        frames, frame = self.cache.frames, self.cache.frames[position]  # neighbours are read in the slice's own frame
        code = add_neighbour_bone(self.cache.masks[position], [bone_in_frame(self.cache.masks[j], frames[j], frame)
                                                               for j in self.neighbours[i] if j >= 0])
        image = self.cache.images[position]
        if self.context_slices:
            image = with_context(image, *(reframe(self.cache.images[j], frames[j], frame, -1.0) if j >= 0 else None
                                          for j in self.neighbours[i]))
        return {"image": torch.from_numpy(image.astype(np.float32)),
                "mask": torch.from_numpy(intracranial(code)), "anatomy": torch.from_numpy(code),
                "label": int(self.labels[i]), "position": position}


class ArrayDataset(torch.utils.data.Dataset):
    """Slices held in memory, served as SliceDataset serves the cache (predict.py: one scan's decoded slices).
    positions: the slices' noise positions (scoring.noise_seed); labels are 0 (unknown); each scan its own patient.
    Two slices of a scan whose positions differ by one are neighbours (inputs.add_neighbour_bone), as in predict.py,
    whose positions are an offset plus the slice number. context: the neighbours' channels of each slice where the
    caller has them already (plots.py: items of a SliceDataset with context), else they are looked up by position."""

    def __init__(self, images, masks, positions, scans, heights, context=None, frames=None):
        self.images, self.masks = np.asarray(images), np.asarray(masks)
        # each slice's inputs.Frame (predict.py), so that its neighbours are read in its own frame; None: one frame
        self.frames = np.zeros((len(self.images), 5), np.int64) if frames is None else np.asarray(frames, np.int64)
        self.context, self.context_slices = context, 0
        self.positions = np.asarray(positions, np.int64)
        self.scans = self.patients = np.asarray(scans)
        self.heights = np.asarray(heights, np.float64)
        self.labels = np.zeros(len(self.positions), np.int64)
        row = {(scan, position): i for i, (scan, position) in enumerate(zip(self.scans.tolist(), self.positions.tolist()))}
        self.below_above = [[row.get(key, -1) for key in ((scan, position - 1), (scan, position + 1))]
                            for scan, position in zip(self.scans.tolist(), self.positions.tolist())]
        self.neighbours = [[j for j in pair if j >= 0] for pair in self.below_above]

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        code = np.asarray(self.masks[i]).astype(np.uint8)  # anatomy codes, or plain masks (then nothing is left out)
        frames = self.frames  # neighbours are read in the slice's own frame
        code = add_neighbour_bone(code, [bone_in_frame(np.asarray(self.masks[j]).astype(np.uint8), frames[j], frames[i])
                                         for j in self.neighbours[i]])
        image = self.images[i]
        if self.context_slices and self.context is not None:
            image = np.concatenate([image, self.context[i]])
        elif self.context_slices:
            image = with_context(image, *(reframe(self.images[j], frames[j], frames[i], -1.0) if j >= 0 else None
                                          for j in self.below_above[i]))
        return {"image": torch.from_numpy(image.astype(np.float32)), "mask": torch.from_numpy(intracranial(code)),
                "anatomy": torch.from_numpy(code), "label": 0, "position": int(self.positions[i])}


# ---------------------------------------------------------------------------------------------
# what a run reads: index, splits and the slice cache

RunData = collections.namedtuple("RunData", "index splits cache patients")  # patients: split -> patient array


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


def open_run_data(run, input_hu, decode, *, saved_splits=None, rank=0, world=1):
    """The index, the patient-level splits (make_splits) and a slice cache holding the splits named in `decode`
    (e.g. ("train", "val")), in the input representation input_hu (with its framing; 2-D images read in the run's
    --image_window where it has one), as train.py, evaluate.py, sweep.py and bench.py
    all read them. run: the run's configuration (config.RunConfig, or train.py's flags): data_dir, dataset,
    cache_dir, num_workers, verify_cache, image_size, seed (the splits), num_samples and eval_samples. saved_splits: a
    run's splits record (splits_record / load_splits_record): its patient lists are used instead of drawing them from
    the seed, so patients added to the folder since training never move a training patient into val or test.
    Under torchrun the processes build the caches in turn (in_turn), rank 0 first."""
    def build():
        index = load_index(run.data_dir, dataset=run.dataset, cache_dir=run.cache_dir, num_workers=run.num_workers,
                           check_files=run.verify_cache)
        patients = split_patients(index, run.seed) if saved_splits is None else apply_saved_splits(index, saved_splits)
        splits = make_splits(index, run.seed, run.num_samples, run.eval_samples, patients=patients)
        needed = np.concatenate([splits[name] for name in decode])
        reading = InputHU(input_hu, framing_of(input_hu), getattr(run, "image_window", None))
        cache = prepare_slices(run.data_dir, index, needed, run.image_size, reading, cache_dir=run.cache_dir,
                               num_workers=run.num_workers, verify_cache=run.verify_cache)
        return RunData(index, splits, cache, patients)
    return in_turn(build, rank, world)


# ---------------------------------------------------------------------------------------------
# looking at the data

def pick_show_slices(index, columns, seed=0):
    """Mid-level slices (never the lowest, face-level ones): up to half positives of distinct subtypes, the rest
    from healthy patients."""
    rng = np.random.default_rng(seed)
    # rows are sorted by (patient, scan, z): a scan is a run of rows, and a row's rank in its run is its level
    starts_run = np.r_[True, (index["patient"][1:] != index["patient"][:-1]) | (index["scan"][1:] != index["scan"][:-1])]
    run = np.cumsum(starts_run) - 1
    rank = np.arange(len(run)) - np.flatnonzero(starts_run)[run]
    relative = rank / np.maximum(np.bincount(run)[run] - 1, 1)
    middle = (relative >= 0.4) & (relative <= 0.8)
    positives = []
    for name in SUBTYPES:
        rows = np.flatnonzero(middle & (index[name] == 1))
        rows = rows[~np.isin(rows, positives)]
        if len(rows) and len(positives) < columns // 2:
            positives.append(int(rng.choice(rows)))
    patients, inverse = np.unique(index["patient"], return_inverse=True)
    sick_patient = np.bincount(inverse, weights=index["any"]) > 0
    healthy_rows = np.flatnonzero(middle & ~sick_patient[inverse])
    negatives = rng.choice(healthy_rows, min(columns - len(positives), len(healthy_rows)), replace=False).tolist()
    return positives + sorted(negatives)


def pick_level_slices(index, columns, seed=0):
    """Slices of columns // 4 scans drawn at random, each at four levels (relative heights 0.05: face, 0.2: skull
    base, 0.5: mid-brain, 0.9: vertex), scan by scan."""
    rng = np.random.default_rng(seed)
    heights, scans = relative_heights(index), np.unique(index["scan"])
    picks = []
    for scan in rng.choice(scans, max(1, columns // 4), replace=False):
        rows = np.flatnonzero(index["scan"] == scan)
        picks += [int(rows[np.abs(heights[rows] - level).argmin()]) for level in (0.05, 0.2, 0.5, 0.9)]
    return picks


def _show_pixels(data_dir, index, position, dataset, rows):
    """(the windows shown {name: image in [-1, 1]}, the pixels tissue_classes reads) of one index row, for show_grid."""
    path = os.path.join(data_dir, index["path"][position])
    if dataset == "ctich":
        pixels = read_ctich_slice(path)
        return pixels, pixels
    if dataset == "images":
        pixels = read_stated_image(path, stated_window(data_dir))
        return {"brain": pixels[STATED]}, pixels
    hu = read_nifti_slices(path, [slice_number(index["id"][position])])[0] if is_nifti(path) else hu_from_dicom(path)
    return {name: window_hu(hu, *hu_range(name)) for name in rows}, hu


def show_grid(data_dir, out, dataset=None, columns=8, seed=0, cache_dir=None, by_level=False, region=("no_bone_3d", 2)):
    """PNG grid: one column per slice, one row per window; intracranial mask outlined green, the scored region
    (region: --scored_region and --bone_margin) cyan, GT bleed mask red. by_level: four levels of each scan."""
    scored_region, bone_margin = region
    plt = pyplot()
    data_dir = os.fspath(data_dir)
    dataset = check_dataset(data_dir, dataset)
    index = load_index(data_dir, dataset, cache_dir=cache_dir)
    picks = (pick_level_slices if by_level else pick_show_slices)(index, columns, seed)
    rows = {"ctich": ("brain", "bone"), "images": ("brain",)}.get(dataset, ("brain", "subdural", "bone"))
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(2.1 * len(picks), 2.1 * len(rows) + 0.6), squeeze=False,
                             layout="constrained")
    for c, position in enumerate(picks):
        subtypes = [SHORT_NAMES[name] for name in SUBTYPES if index[name][position]]
        axes[0, c].set_title(f"{index['id'][position]}\n{'+'.join(subtypes) or 'no bleed'}", fontsize=7)
        try:
            images, pixels = _show_pixels(data_dir, index, position, dataset, rows)
            brain, bone, non_tissue, _ = tissue_classes(pixels)
            code = (brain * INTRACRANIAL | bone * BONE | non_tissue * NON_TISSUE).astype(np.uint8)
            if scored_region == "no_bone_3d":  # the bone of the slices above and below, as SliceDataset reads it
                code = add_neighbour_bone(code, [tissue_classes(_show_pixels(data_dir, index, j, dataset, rows)[1])[1] * BONE
                                                 for j in neighbour_rows(index, [position])[0] if j >= 0])
            soft = region_mask(code, scored_region, bone_margin)
        except BadFile as error:
            axes[0, c].text(0.5, 0.5, f"bad file:\n{str(error)[:40]}", ha="center", fontsize=6, transform=axes[0, c].transAxes)
            for r in range(len(rows)):
                axes[r, c].set_axis_off()
            continue
        truth = load_gt_mask(data_dir, index["id"][position], None)
        for r, name in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(images[name], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            if r == 0:
                ax.contour(brain, levels=[0.5], colors="lime", linewidths=0.6)
                ax.contour(soft, levels=[0.5], colors="cyan", linewidths=0.5)
            if truth is not None:
                ax.contour(truth, levels=[0.5], colors="red", linewidths=0.7)
            if c == 0:
                level_width = f" L{WINDOWS[name][0]}/W{WINDOWS[name][1]}" if dataset not in ("ctich", "images") else " as stored"
                ax.text(4, 4, name + level_width, color="yellow", fontsize=7, va="top")
            ax.set_axis_off()
    fig.suptitle(f"{data_dir} ({dataset}): green = intracranial mask, cyan = {scored_region} region (bone margin {bone_margin}), "
                 "red = ground-truth bleed", fontsize=9)
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="ct-pddpm data: look at slices, build the index")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("show", "PNG grid of slices in each window with the masks outlined"),
                       ("index", "build (or load) the index and print its counts")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--data_dir", required=True)
        command.add_argument("--dataset", choices=DATASETS, default=None, help="override the detected layout")
        command.add_argument("--cache_dir", default=None)
        if name == "show":
            command.add_argument("--out", default="grid.png")
            command.add_argument("--columns", type=int, default=8)
            command.add_argument("--seed", type=int, default=0)
            command.add_argument("--by_level", action="store_true",
                                 help="four levels of each drawn scan (face, skull base, mid-brain, vertex), not mid-level slices")
            command.add_argument("--bone_margin", type=int, default=2, help="the scored region's band (scoring --bone_margin)")
            command.add_argument("--scored_region", default="no_bone_3d", choices=SCORED_REGIONS[1:],
                                 help="the scored region drawn in cyan (scoring --scored_region)")
        else:
            command.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS)
    args = parser.parse_args(argv)
    if args.command == "show":
        check_figure_format(args.out, "--out")
        if args.columns < 1:
            raise SystemExit(f"error: --columns {args.columns}: must be at least 1")
        show_grid(args.data_dir, args.out, args.dataset, args.columns, args.seed, args.cache_dir, args.by_level,
                  (args.scored_region, args.bone_margin))
    else:
        start = time.time()
        index = load_index(args.data_dir, args.dataset, args.cache_dir, args.num_workers)
        patients, inverse = np.unique(index["patient"], return_inverse=True)
        sick = np.bincount(inverse, weights=index["any"]) > 0
        print(f"{len(index['id'])} slices, {len(patients)} patients ({sick.sum()} with hemorrhage, {(~sick).sum()} without), "
              f"{len(np.unique(index['scan']))} scans; {time.time() - start:.1f} s")
        print("positive slices: " + ", ".join(f"{name} {int(index[name].sum())}" for name in LABELS))


if __name__ == "__main__":
    main()
