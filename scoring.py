"""Anomaly scoring, in one place: the settings, the sliding-window anomaly map, slice scores, and
scoring a whole split. score_split is the one scoring path: train.py (per-epoch validation and its
diagnostics panel), evaluate.py, sweep.py, bench.py and predict.py all score through it, so a number
from one is the number the others would give (tests/test_one_path.py checks it, option by option).

The map (pDDPM): for each slice, window and timestep t, noise only that window, let the model
predict the clean slice x0 in one step, and write the residual of the window into the map,
averaging where windows or timesteps overlap. A slice score reduces the map to one number.

Adding a residual or a slice score: one entry in RESIDUALS (and RESIDUAL_LABELS) or SLICE_SCORES
below, plus its test; the flags, sweep.py and the reports pick it up from there.
"""
import argparse
import collections
import contextlib
import dataclasses
import heapq
import time

import numpy as np
import scipy.ndimage
import torch
from tqdm import tqdm

import inputs
import midline
import models

# error map [B, H, W] from the difference x - x0_hat [B, C, H, W] (mean over channels)
RESIDUALS = {
    "abs": lambda difference: difference.abs().mean(dim=1),  # the spec's |x - x0_hat|
    # Acute blood is hyperdense, while at bone edges the rebuilt window smears bright bone into the
    # darker brain, which is an error of the other sign: keep only what is brighter than rebuilt.
    "positive": lambda difference: difference.clamp(min=0).mean(dim=1),
}
RESIDUAL_LABELS = {"abs": "reconstruction error |x - x0_hat|", "positive": "brighter than rebuilt: max(x - x0_hat, 0)"}


def map_label(settings):
    """What a map's values are, for a figure's colour bar: the residual, then the map options that change its units."""
    parts = [RESIDUAL_LABELS[settings.residual]]
    if settings.anomaly_map == "blood_band":
        parts = ["acute-blood band membership (no model)"]
    if settings.hyperdensity_prior:
        parts.append("x blood-band weight")
    if settings.normative == "z":
        parts.append("z-scored against the healthy error here")
    if settings.asymmetry != "none":
        parts.append("less its mirror image" if settings.asymmetry == "mirror" else "mean with its mirror difference")
    return ";\n".join(parts)

# slice score from (the whole map [H, W], its values inside the intracranial mask [n])
SLICE_SCORES = {
    "mean": lambda error_map, inside: error_map.mean(),  # the spec's score
    "brain_mean": lambda error_map, inside: inside.mean(),
    "brain_p99": lambda error_map, inside: np.percentile(inside, 99),
}
SCORES = tuple(SLICE_SCORES)

# Pixel histogram bins: error maps are residuals of images in [-1, 1], so values lie in [0, 2] (larger values go
# to the last bin). Log-spaced edges keep ~0.25 % relative resolution from 1e-4 up, enough for pixel ROC-AUC /
# AUPRC / Dice within ~1e-3 of the exact values, in 32 KB per class.
PIXEL_EDGES = np.concatenate([[0.0], np.geomspace(1e-4, 2.0, 4095)])
EXAMPLE_KINDS = ("true positive", "false positive", "miss")


# ---------------------------------------------------------------------------------------------
# the settings: one set of defaults for every script

@dataclasses.dataclass(frozen=True)
class ScoringSettings:
    """How slices are scored. The defaults were chosen on the CT-ICH validation split (README, "Choosing
    the scoring settings"). patch_size None = image_size // 4 (64 at the
    spec's 256^2), stride None = patch_size // 2: call for_image() to fill them in."""
    patch_size: int = None
    stride: int = None
    eval_t: tuple = (250,)
    eval_batch_size: int = 64
    residual: str = "positive"
    score: str = "brain_p99"
    median_size: int = 5
    smooth_slices: int = 2
    skip_outside_mask: bool = False
    # bench.py (README, "Speed"): 49 windows in 9 passes at 128^2, 9-11x naive with bf16 + channels_last; slice
    # ROC-AUC moved by up to 0.02 against one window per pass on the phantom (<= 0.008 on CT-ICH), rho >= 0.976.
    pack_windows: bool = True
    # Pixels between windows noised in one pass; None: patch_size // 2 (for_image), 9 passes. Gap 0 (windows edge to
    # edge, 4 passes) scores 1.65-2x faster but lowered slice ROC-AUC out of fold on CT-ICH in all six pairs
    # measured (-0.001 to -0.028; RESULTS.md 2026-12-06, sixth session): an option for screening, not the default.
    pack_gap: int = None
    # bench.py: 1.3x at 128^2 with bf16 on this CPU (slightly slower at 64^2); the same map up to bf16 rounding.
    channels_last: bool = True
    # Options of the issue-13 method study, off by default (README, "Round two": each measured on validation,
    # paired against the default).
    noise: str = "gaussian"  # or "simplex": smooth multi-octave noise in the noised window (the official pDDPM's)
    hyperdensity_prior: bool = False  # weight the map by how far the pixel sits in the acute-blood band (50-90 HU)
    # Issue 20 (RESULTS.md): what is scored, level-normalised slice scores, and a no-learning baseline.
    # Issue 29: the default since round four (RESULTS.md 2026-12-04: on 24 held-back patients +0.059 [+0.024, +0.093]
    # slice and +0.207 [+0.039, +0.413] scan ROC-AUC against "intracranial", paired; the same direction out of fold).
    scored_region: str = "no_bone_3d"  # or "intracranial": the whole mask; no_bone_3d leaves out bone, air/fat and a
    bone_margin: int = 2  # band of bone_margin pixels (of a 128^2 slice) around them (scored_masks)
    level_norm: str = "none"  # "z": slice scores z-scored against healthy reference slices of the same level
    anomaly_map: str = "model"  # or "blood_band": no model, the input's acute-blood band membership (a baseline)
    # Issue 29 (a): "mirror": the map less its mirror image about the head's midline (midline.py), max(., 0);
    # "mix": the mean of the map and that. Off by default (RESULTS.md: measured out of fold).
    asymmetry: str = "none"
    # Issue 29 (b): "z": the map z-scored pixel by pixel against the healthy error at that position and level
    # (fit_normative on the run's reference slices, cv.fold_normative). Needs the reference: evaluation only.
    normative: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "eval_t", tuple(int(t) for t in np.atleast_1d(self.eval_t)))

    def for_image(self, image_size):
        """A copy with patch_size and stride filled in for this image size."""
        patch_size = self.patch_size or image_size // 4
        pack_gap = patch_size // 2 if self.pack_gap is None else self.pack_gap
        return dataclasses.replace(self, patch_size=patch_size, stride=self.stride or patch_size // 2, pack_gap=pack_gap)

    def check(self, image_size, training=False):
        """self.for_image(image_size), or a one-line SystemExit naming the first flag that cannot work at this
        image size. Every script that scores calls this right after parsing; training=True (train.py, bench.py)
        also refuses the options that need statistics of the trained model (EVALUATION_ONLY)."""
        need = models.check_flag
        if training:
            for name in EVALUATION_ONLY:
                need(getattr(self, name) == getattr(DEFAULTS, name), name, getattr(self, name),
                     "evaluation only: it needs statistics of the trained model (its healthy validation slices); "
                     "give it to evaluate.py, sweep.py or predict.py")
        for name in ("patch_size", "stride"):  # 0 or negative must not fall back to the default silently
            need(getattr(self, name) is None or getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
        filled = self.for_image(image_size)
        need(filled.patch_size <= image_size, "patch_size", filled.patch_size, f"larger than the image ({image_size} px)")
        need(filled.patch_size >= 2, "patch_size", filled.patch_size, "must be at least 2 pixels")
        need(filled.stride >= 1, "stride", filled.stride, "must be at least 1")
        need(filled.pack_gap >= 0, "pack_gap", filled.pack_gap, "must be 0 (windows edge to edge) or more")
        need(filled.stride <= filled.patch_size, "stride", filled.stride,
             f"larger than the window (--patch_size {filled.patch_size}): pixels between windows would never be scored")
        need(len(self.eval_t) >= 1, "eval_t", "", "give at least one timestep")
        steps = models.NUM_TRAIN_TIMESTEPS
        for t in self.eval_t:
            need(0 <= t < steps, "eval_t", t, f"timesteps run from 0 to {steps - 1}")
        need(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be at least 1")
        need(self.median_size >= 0, "median_size", self.median_size, "must be 0 (off) or more")
        need(self.smooth_slices >= 0, "smooth_slices", self.smooth_slices, "must be 0 (off) or more")
        need(self.residual in RESIDUALS, "residual", self.residual, f"unknown (one of {', '.join(RESIDUALS)})")
        need(self.score in SLICE_SCORES, "score", self.score, f"unknown (one of {', '.join(SLICE_SCORES)})")
        need(self.noise in NOISES, "noise", self.noise, f"unknown (one of {', '.join(NOISES)})")
        need(self.scored_region in SCORED_REGIONS, "scored_region", self.scored_region, f"one of {', '.join(SCORED_REGIONS)}")
        need(self.bone_margin >= 0, "bone_margin", self.bone_margin, "must be 0 (bone itself only) or more")
        need(self.level_norm in LEVEL_NORMS, "level_norm", self.level_norm, f"one of {', '.join(LEVEL_NORMS)}")
        need(self.anomaly_map in ANOMALY_MAPS, "anomaly_map", self.anomaly_map, f"one of {', '.join(ANOMALY_MAPS)}")
        need(self.asymmetry in ASYMMETRIES, "asymmetry", self.asymmetry, f"one of {', '.join(ASYMMETRIES)}")
        need(self.normative in NORMATIVES, "normative", self.normative, f"one of {', '.join(NORMATIVES)}")
        return filled

    def as_dict(self):
        return {name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_flags(cls, flags):
        """From parsed flags (an argparse namespace or a dict); names missing or None keep the default. A run's saved
        settings with flags given now on top: config.read_back."""
        flags = vars(flags) if isinstance(flags, argparse.Namespace) else flags
        return cls(**{f.name: flags[f.name] for f in dataclasses.fields(cls) if flags.get(f.name) is not None})


NOISES = ("gaussian", "simplex")
SCORED_REGIONS = inputs.SCORED_REGIONS
LEVEL_NORMS = ("none", "z")
LEVEL_BINS = 5  # level bins of --level_norm z: quantiles of the reference slices' levels
ANOMALY_MAPS = ("model", "blood_band")
ASYMMETRIES = ("none", "mirror", "mix")
NORMATIVES = ("none", "z")
# need statistics of the trained model (its healthy validation slices): refused by train.py
EVALUATION_ONLY = ("level_norm", "normative")
FIELDS = tuple(f.name for f in dataclasses.fields(ScoringSettings))
DEFAULTS = ScoringSettings()
SPEC_EVAL_T = 150  # the spec's noise timestep (--eval_t's help)


def noise_seed(seed, position):
    """The seed of one slice's scoring noise: a function of the run's seed and the slice's index row only, so a
    map does not depend on batch size, order, device or process rank."""
    return seed * 1_000_003 + int(position)


def add_scoring_flags(group, from_checkpoint=False, leave_out=()):
    """The scoring flags of train.py, evaluate.py, predict.py, sweep.py and bench.py, with DEFAULTS as their defaults.
    from_checkpoint: every default is None, meaning "the training run's value". leave_out: flags the script makes
    itself (sweep.py's grids)."""
    group = _Leaving(group, leave_out)

    def default(name):
        value = None if from_checkpoint else getattr(DEFAULTS, name)
        return list(value) if isinstance(value, tuple) else value
    group.add_argument("--patch_size", type=int, default=default("patch_size"),
                       help="side of the noised square window (default: image_size / 4, 64 at 256^2)")
    group.add_argument("--stride", type=int, default=default("stride"), help="step between windows (default: patch_size / 2)")
    group.add_argument("--eval_t", type=int, nargs="+", default=default("eval_t"),
                       help=f"noise timestep(s) when scoring; several are averaged (spec: {SPEC_EVAL_T})")
    group.add_argument("--eval_batch_size", type=int, default=default("eval_batch_size"), help="windows per forward pass when scoring")
    group.add_argument("--residual", default=default("residual"), choices=list(RESIDUALS),
                       help="error map: abs = |x - rebuilt| (the spec), positive = only where x is brighter than rebuilt")
    group.add_argument("--score", default=default("score"), choices=SCORES,
                       help="slice score: mean of the whole map (the spec's), or mean / 99th percentile inside the brain mask")
    group.add_argument("--median_size", type=int, default=default("median_size"),
                       help="median filter (pixels) on the error map before scoring (0 = off, the spec)")
    group.add_argument("--smooth_slices", type=int, default=default("smooth_slices"),
                       help="average each slice score with those of the scored slices up to N slices above and below "
                            "in the same scan (bleeds span several slices, edge noise does not; 0 = off, the spec)")
    group.add_argument("--skip_outside_mask", action=argparse.BooleanOptionalAction, default=default("skip_outside_mask"),
                       help="do not run windows that contain no intracranial pixel (faster; their error counts as 0)")
    group.add_argument("--pack_windows", action=argparse.BooleanOptionalAction, default=default("pack_windows"),
                       help="noise several windows at least --pack_gap apart in one forward pass (49 windows in 9 "
                            "passes at the default gap); --no-pack_windows runs one window per pass, as the spec")
    group.add_argument("--pack_gap", type=int, default=default("pack_gap"),
                       help="pixels between windows noised in one pass (default: patch_size / 2, 49 windows in 9 "
                            "passes; 0: edge to edge, 4 passes, 1.65-2x faster scoring, out-of-fold slice ROC-AUC on "
                            "CT-ICH 0.001-0.028 lower)")
    group.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=default("channels_last"),
                       help="score in NHWC memory layout (weights converted for the call and back)")
    group.add_argument("--noise", default=default("noise"), choices=NOISES,
                       help="noise of the noised window: gaussian (the spec) or simplex-like multi-octave noise")
    group.add_argument("--hyperdensity_prior", action=argparse.BooleanOptionalAction, default=default("hyperdensity_prior"),
                       help="weight the map by the pixel's membership of the acute-blood band (50-90 HU)")
    group.add_argument("--scored_region", default=default("scored_region"), choices=SCORED_REGIONS,
                       help="what a slice score reads: the intracranial mask; or no_bone_3d (bone and air/fat inside "
                            "it, the bays where ridges of bone poke in and a --bone_margin band around them left out, "
                            "and the pixels over or under bone in the neighbouring slices, away from the outline's rim)")
    group.add_argument("--bone_margin", type=int, default=default("bone_margin"),
                       help="band (pixels of a 128^2 slice) around bone and air/fat left out by --scored_region no_bone_3d")
    group.add_argument("--level_norm", default=default("level_norm"), choices=LEVEL_NORMS,
                       help="z: each slice score z-scored against healthy reference slices of its anatomical level "
                            "(intracranial / head area), the validation patients the model never trained on")
    group.add_argument("--anomaly_map", default=default("anomaly_map"), choices=ANOMALY_MAPS,
                       help="model: the pDDPM map; blood_band: no model, each pixel's membership of the acute-blood band "
                            "(50-90 HU), a no-learning baseline through the same region, scores and normalisation")
    group.add_argument("--asymmetry", default=default("asymmetry"), choices=ASYMMETRIES,
                       help="mirror: score the map less its mirror image about the head's own midline (what one side "
                            "has and the other has not), max(., 0); mix: the mean of the map and that; none: the map")
    group.add_argument("--normative", default=default("normative"), choices=NORMATIVES,
                       help="z: the map z-scored pixel by pixel against the healthy error at that position and "
                            "anatomical level, fitted on the run's reference (the healthy validation patients); "
                            "evaluation only")


class _Leaving:
    """An argument group that skips the flags named in leave_out."""

    def __init__(self, group, leave_out):
        self.group, self.leave_out = group, {f"--{name}" for name in leave_out}

    def add_argument(self, flag, **kwargs):
        if flag not in self.leave_out:
            self.group.add_argument(flag, **kwargs)


def smoothing_note(smooth_slices, eval_samples):
    """A one-line warning when --smooth_slices has few neighbours to average: a per-class sample of
    slices (--eval_samples N) leaves most slices without their scored neighbours."""
    if smooth_slices and eval_samples != "all":
        return (f"note: --smooth_slices {smooth_slices} averages a slice's score with its scored neighbours; with "
                f"--eval_samples {eval_samples} most slices have none, so use --eval_samples all for reported figures")
    return None


# ---------------------------------------------------------------------------------------------
# windows

Window = collections.namedtuple("Window", "k top left")  # k: the window's number in the grid (its noise)
Job = collections.namedtuple("Job", "slice t windows")  # one pass: windows of a slice noised at t


def window_grid(image_size, patch_size, stride):
    """Top-left corners of a sliding window covering the image; the last row/column is moved
    flush with the border so no pixel is left out (256, 64, 32 -> 7 x 7 = 49 windows)."""
    starts = list(range(0, image_size - patch_size + 1, stride))
    if starts[-1] != image_size - patch_size:
        starts.append(image_size - patch_size)
    return [(top, left) for top in starts for left in starts]


def window_noise(seed, window_index, t, shape, noise="gaussian"):
    """The noise for one window: a function of (slice seed, window index, t) only, drawn on the
    CPU, so a map does not depend on batch size, batch composition, device or process rank."""
    key = [int(seed), int(window_index), int(t)]
    state = np.random.SeedSequence(key).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    if noise == "simplex":
        return models.smooth_noise(shape, generator)
    return torch.randn(shape, generator=generator)


def pack_windows(windows, patch_size, stride, gap):
    """Groups of windows [(k, top, left), ...] in which every two windows are at least `gap`
    pixels apart (edge to edge, along rows or along columns). Windows are taken class by class of
    the grid (row and column index modulo the number of strides that span patch + gap), each put
    in the first group it fits: on a regular grid every class is one group, e.g. 256^2, window 64,
    stride 32, gap 32 -> every third window of every third row, 49 windows in 9 groups."""
    spacing = -(-(patch_size + gap) // stride)
    order = sorted(windows, key=lambda w: ((w[1] // stride) % spacing, (w[2] // stride) % spacing, w[1], w[2]))
    groups = []
    for window in order:
        for group in groups:
            if all(max(abs(window[1] - w[1]), abs(window[2] - w[2])) >= patch_size + gap for w in group):
                group.append(window)
                break
        else:
            groups.append([window])
    return groups


def window_jobs(settings, image_size, n_slices, brain_masks=None):
    """The forward passes that score n_slices slices, in a fixed order (so is the order of the sums): per t, per
    slice, per group of windows noised together (one window unless settings.pack_windows). With brain_masks
    (bool [N, H, W], on the CPU), windows that touch no brain are left out."""
    settings = settings.for_image(image_size)  # the default gap, where a caller did not fill it in
    p = settings.patch_size
    windows = [Window(k, top, left) for k, (top, left) in enumerate(window_grid(image_size, p, settings.stride))]
    jobs = []
    for t in settings.eval_t:
        for i in range(n_slices):
            kept = windows if brain_masks is None else [
                w for w in windows if brain_masks[i, w.top:w.top + p, w.left:w.left + p].any()]
            groups = pack_windows(kept, p, settings.stride, settings.pack_gap) if settings.pack_windows else [[w] for w in kept]
            jobs += [Job(i, t, group) for group in groups]
    return jobs


def passes_per_slice(settings, image_size):
    """Forward passes per slice and timestep when no window is skipped."""
    return len(window_jobs(dataclasses.replace(settings, eval_t=(0,)), image_size, 1))


# ---------------------------------------------------------------------------------------------
# the anomaly map of a batch of slices

@contextlib.contextmanager
def scoring_mode(model, channels_last):
    """Eval mode (and NHWC weights) for the call; afterwards the model is as it was, so a model that goes on
    training after validation scoring trains in train mode and NCHW (with bf16 on this CPU a channels_last
    training step was slower). On this CPU an NHWC input alone gained nothing, input and weights 1.2-1.4x."""
    was_training = model.training
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


def noise_windows(x0, jobs, seeds, t, diffusion, patch_size, noise="gaussian"):
    """x0 [B, C, H, W] (one row per job) with every window of its job noised to the job's t; row b's noise depends
    on (seeds[job.slice], window number, t) only. A packed job's windows do not overlap, so they are noised one
    after the other: the j-th window of every job that has one, together."""
    shape = (x0.shape[1], patch_size, patch_size)
    x_t = x0
    for j in range(max(len(job.windows) for job in jobs)):
        rows = [b for b, job in enumerate(jobs) if len(job.windows) > j]
        windows = [jobs[b].windows[j] for b in rows]
        boxes = torch.tensor([(w.top, w.left) for w in windows])
        drawn = torch.stack([window_noise(seeds[jobs[b].slice], w.k, jobs[b].t, shape, noise)
                             for b, w in zip(rows, windows)])
        if len(rows) == len(jobs):  # j = 0: every job, and a copy of x0
            x_t = diffusion.noise(x_t, boxes, t, drawn.to(x0.device), patch_size)
        else:
            x_t[rows] = diffusion.noise(x_t[rows], boxes, t[rows], drawn.to(x0.device), patch_size)
    return x_t


def anomaly_maps(diffusion, images, settings, seeds, brain_masks=None):
    """Per-pixel anomaly maps [N, H, W] (float32, on images' device) of slices images [N, C, H, W] in [-1, 1]:
    the raw map, before the options that look at the input (adjust_maps) and the median filter. Callers score
    through score_split.

    seeds: one int per slice (noise_seed). Jobs (window_jobs) go through diffusion.rebuild eval_batch_size at a
    time (under the diffusion's precision). With settings.skip_outside_mask, windows that do not touch
    brain_masks [N, H, W] are not run and pixels no window covered are 0. Packing (settings.pack_windows) noises
    several windows far apart in one pass of the whole slice and reads each window's error from that one
    prediction: each window gets the same noise as alone, but its surroundings hold other noised windows, and the
    UNet's receptive field, GroupNorm and bottleneck attention span the whole slice, so this is an approximation
    (bench.py measures what it does to the ROC-AUC)."""
    N, C, H, W = images.shape
    if H != W:
        raise ValueError(f"anomaly_maps expects square slices, got {H}x{W}")
    if len(seeds) != N:
        raise ValueError(f"anomaly_maps needs one seed per slice: {len(seeds)} seeds, {N} slices")
    if settings.residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {', '.join(RESIDUALS)}, got {settings.residual!r}")
    if settings.skip_outside_mask and brain_masks is None:
        raise ValueError("skip_outside_mask needs brain_masks")
    p, device = settings.patch_size, images.device
    scored_channels = getattr(diffusion, "image_channels", C)  # the slice's own; a 2.5-D input's neighbours follow
    # decided on the CPU: one GPU sync per window would cost more than it saves
    jobs = window_jobs(settings, H, N, torch.as_tensor(brain_masks).bool().cpu() if settings.skip_outside_mask else None)
    error_sum = torch.zeros(N, H, W, device=device)
    count = torch.zeros(N, H, W, device=device)
    with scoring_mode(diffusion.network, settings.channels_last), torch.inference_mode():
        for start in range(0, len(jobs), settings.eval_batch_size):
            batch = jobs[start:start + settings.eval_batch_size]
            x0 = images[[job.slice for job in batch]].float()
            t = torch.tensor([job.t for job in batch], device=device)
            x_t = noise_windows(x0, batch, seeds, t, diffusion, p, settings.noise)
            if settings.channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            difference = (x0 - diffusion.rebuild(x_t, t).float())[:, :scored_channels]
            errors = RESIDUALS[settings.residual](difference)
            for b, job in enumerate(batch):
                for w in job.windows:
                    box = (job.slice, slice(w.top, w.top + p), slice(w.left, w.left + p))
                    error_sum[box] += errors[b, box[1], box[2]]
                    count[box] += 1
    return error_sum / count.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# options that use the input (issue 13; off by default), the scored region and the slice's level

BLOOD_HU = (45.0, 55.0, 90.0, 100.0)  # weight rises 45 -> 55 HU, is 1 to 90 HU, falls to 0 at 100 HU (bone)


def blood_weight(image, brain_hu):
    """Per pixel [H, W]: membership of the acute-blood band (BLOOD_HU) of channel 0, with brain_hu the HU at -1, +1."""
    hu = brain_hu[0] + (np.asarray(image[0], np.float32) + 1) / 2 * (brain_hu[1] - brain_hu[0])
    low, full, end, zero = BLOOD_HU
    return np.clip((hu - low) / (full - low), 0, 1) * np.clip((zero - hu) / (zero - end), 0, 1)


def blood_band_maps(images, brain_hu):
    """--anomaly_map blood_band: the no-learning baseline's map [N, H, W] (tensor on images' device), each pixel's
    blood_weight. Through brain_mean its slice score is the fraction of the scored region in the acute-blood band."""
    maps = [blood_weight(image, brain_hu) for image in images.float().cpu().numpy()]
    return torch.from_numpy(np.stack(maps).astype(np.float32)).to(images.device)


def scored_masks(masks, anatomy, settings):
    """The region a slice score reads, bool numpy [N, H, W]: the intracranial masks, or with --scored_region
    no_bone_3d (inputs.no_bone_3d) those less bone and air/fat inside the mask (inputs.anatomy_code), the bays where
    ridges of bone poke in, a band of bone_margin pixels (of a 128^2 slice) around them, and what is bone in the
    slice above or below. The band is why: at the skull base, partial-volume bone inside the mask (petrous ridges,
    clinoids, sphenoid) is rebuilt darker than it is and outscored every bleed (issue 20). RESULTS.md measures what
    the region costs on bleed pixels."""
    masks = torch.as_tensor(masks).bool().cpu().numpy()
    if settings.scored_region == "intracranial" or anatomy is None:
        return masks
    return masks & inputs.region_mask(torch.as_tensor(anatomy).cpu().numpy(), settings.scored_region, settings.bone_margin)


def slice_levels(anatomy, masks):
    """Each slice's anatomical level, float [N]: its intracranial area over its head area (inputs.anatomy_code), low
    at the skull base and vertex, high mid-brain. masks: the intracranial masks, used alone where codes carry no head."""
    masks = torch.as_tensor(masks).bool().cpu().numpy().reshape(len(masks), -1)
    if anatomy is None:
        return masks.mean(1)
    head = (torch.as_tensor(anatomy).cpu().numpy().reshape(len(masks), -1) & inputs.HEAD) > 0
    return masks.sum(1) / np.maximum(head.sum(1), np.maximum(masks.sum(1), 1))


def adjust_maps(maps, images, settings, brain_hu=None, brain_masks=None, normative=None, levels=None):
    """The map options, in this order: --hyperdensity_prior (the map times blood_weight; brain_hu: channel 0's HU at
    input -1 and +1, the model's input representation), then --normative z (normative_maps against `normative`,
    fit_normative's, at the slices' `levels`), then --asymmetry (asymmetric_maps; brain_masks: the intracranial
    masks, whose shape gives the midline)."""
    if not settings.hyperdensity_prior and settings.asymmetry == "none" and settings.normative == "none":
        return maps
    out = maps.detach().float().cpu().numpy().copy()
    if settings.hyperdensity_prior:
        images = torch.as_tensor(images).float().cpu().numpy()
        for i in range(len(out)):
            out[i] *= blood_weight(images[i], brain_hu)
    if settings.normative == "z":
        if normative is None:
            raise ValueError("--normative z needs the normative map fitted on the run's reference (cv.fold_normative)")
        out = normative_maps(out, levels, normative)
    out = asymmetric_maps(out, brain_masks, settings)
    return torch.from_numpy(out).to(maps.device)


def asymmetric_maps(maps, brain_masks, settings, midlines=None):
    """--asymmetry on maps [N, H, W] (numpy): mirror, each map less its mirror image about the head's midline (found
    on the slice's intracranial mask, midline.py), max(., 0); mix, the mean of the map and that; none, the maps.
    sweep.py applies it to saved maps, with each slice's midline found once (midlines: midline.find_midline's)."""
    if settings.asymmetry == "none":
        return maps
    brain_masks = torch.as_tensor(brain_masks).bool().cpu().numpy()
    if midlines is None:
        midlines = [midline.find_midline(b) for b in brain_masks]
    one_sided = np.stack([midline.asymmetry(m, b, line) for m, b, line in zip(maps, brain_masks, midlines)]).astype(np.float32)
    return one_sided if settings.asymmetry == "mirror" else ((maps + one_sided) / 2).astype(np.float32)


NORMATIVE_BLUR = 3.0  # pixels (of 128^2): heads are not registered, so the healthy error is pooled over ~this much
NORMATIVE_BINS = LEVEL_BINS


def fit_normative(maps, brain_masks, levels, bins=NORMATIVE_BINS):
    """The per-pixel healthy error by anatomical level (issue 29 b): from the maps [N, H, W] of healthy slices that
    the model never trained on, with their intracranial masks and levels (slice_levels), per level bin (quantiles of
    the levels) the mean and std of the map at each pixel over the slices whose mask covers it, smoothed by
    NORMATIVE_BLUR; a pixel's std is floored at the median std inside the brain, so that rare pixels cannot blow
    z-scores up. -> {"edges": inner level edges, "mean": [B, H, W], "std": [B, H, W]}."""
    maps, brain_masks, levels = np.asarray(maps, np.float64), np.asarray(brain_masks, bool), np.asarray(levels, np.float64)
    edges = np.unique(np.quantile(levels, np.linspace(0, 1, bins + 1)[1:-1])) if bins > 1 else np.zeros(0)
    which = np.digitize(levels, edges)
    means, stds = [], []
    for b in range(len(edges) + 1):
        chosen = which == b if (which == b).any() else np.ones(len(maps), bool)
        weight = scipy.ndimage.gaussian_filter(brain_masks[chosen].sum(0).astype(np.float64), NORMATIVE_BLUR) + 1e-6
        total = scipy.ndimage.gaussian_filter((maps[chosen] * brain_masks[chosen]).sum(0), NORMATIVE_BLUR)
        squares = scipy.ndimage.gaussian_filter((maps[chosen] ** 2 * brain_masks[chosen]).sum(0), NORMATIVE_BLUR)
        mean = total / weight
        std = np.sqrt(np.maximum(squares / weight - mean ** 2, 0))
        inside = brain_masks[chosen].any(0)
        floor = max(float(np.median(std[inside])) if inside.any() else float(std.mean()), 1e-12)
        means.append(mean)
        stds.append(np.maximum(std, floor))
    return {"edges": edges, "mean": np.stack(means).astype(np.float32), "std": np.stack(stds).astype(np.float32)}


def normative_maps(maps, levels, normative):
    """--normative z on maps [N, H, W] (numpy): each map z-scored pixel by pixel against the healthy error of its
    level bin (fit_normative), so a healthy slice like those fitted scores ~0 everywhere."""
    which = np.digitize(np.asarray(levels, np.float64), normative["edges"])
    return ((np.asarray(maps, np.float32) - normative["mean"][which]) / normative["std"][which]).astype(np.float32)


def median_filtered(error_map, median_size):
    """The filter applied to a map [H, W] (numpy) before it is scored (and shown: overlays, pixel metrics)."""
    if median_size and median_size > 1:
        return scipy.ndimage.median_filter(error_map, size=median_size)
    return error_map


def slice_scores(maps, brain_masks, median_size=0):
    """maps [N, H, W], brain_masks [N, H, W] (tensors or arrays) -> {name: float64 [N]} for every SLICE_SCORES
    entry. median_size > 1 median-filters each map first (suppresses single-pixel noise so p99 follows blobs).
    A slice with an empty brain mask is scored over the whole map."""
    maps = torch.as_tensor(maps).float().cpu().numpy()
    brain_masks = torch.as_tensor(brain_masks).bool().cpu().numpy()
    scores = {name: [] for name in SLICE_SCORES}
    for error_map, mask in zip(maps, brain_masks):
        error_map = median_filtered(error_map, median_size)
        inside = error_map[mask] if mask.any() else error_map.ravel()
        for name, score in SLICE_SCORES.items():
            scores[name].append(score(error_map, inside))
    return {name: np.asarray(values, dtype=np.float64) for name, values in scores.items()}


def _score_batch(diffusion, images, masks, seeds, settings, brain_masks, normative=None, levels=None):
    """(maps [N, H, W] before the median filter, {score name: [N]} before smoothing) of one batch of slices; seeds: each
    slice's noise seed (noise_seed(seed, its index row): the noise depends on nothing else). masks: the scored regions;
    brain_masks: the intracranial masks (--skip_outside_mask skips the windows that miss them, so that the map does
    not depend on the scored region and sweep.py reads every region off one set of maps; --asymmetry finds the
    midline on them)."""
    if settings.anomaly_map == "blood_band":
        maps = blood_band_maps(images, diffusion.input_hu[0])
    else:
        maps = anomaly_maps(diffusion, images, settings, seeds, torch.as_tensor(brain_masks).to(diffusion.device)).float()
    maps = adjust_maps(maps, images, settings, diffusion.input_hu[0], brain_masks, normative, levels)
    return maps, slice_scores(maps, masks, settings.median_size)


def finish_scores(positions, scans, scores, settings):
    """The last step of every slice score, after slice_scores: smoothed along the scan (--smooth_slices).
    score_split ends with it; sweep.py re-scores saved maps with it."""
    return smooth_along_scans(positions, scans, scores, settings.smooth_slices)


def smooth_along_scans(positions, scans, scores, width):
    """Mean of each slice's score and the scores of the slices up to `width` index rows above and below it
    in the same scan, where those were scored too. Index rows of a scan are consecutive and ordered by z
    (cohort.load_index), so row p +- 1 is the next slice up or down; slices left out (bad file, too little
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


# ---------------------------------------------------------------------------------------------
# scoring a split

def new_pixel_accumulator():
    """Histograms of error-map values inside the brain mask, for bleed and non-bleed pixels."""
    return {"edges": PIXEL_EDGES, "pos": np.zeros(len(PIXEL_EDGES), np.int64),
            "neg": np.zeros(len(PIXEL_EDGES), np.int64), "slices": 0, "positive_slices_without_mask": 0}


def merge_pixel_accumulators(accumulators):
    """One accumulator holding the pixels of all of them (the shards of a split, the folds of a CV run)."""
    merged = new_pixel_accumulator()
    for acc in accumulators:
        for key in ("pos", "neg", "slices", "positive_slices_without_mask"):
            merged[key] += acc[key]
        for key in ("unusable_masks", "bleed_pixels_outside_region"):
            merged[key] = merged.get(key, 0) + acc.get(key, 0)
    return merged


def accumulate_pixels(acc, error_map, brain_mask, gt_mask):
    """Add one slice. Only pixels inside the brain mask count (the protocol scores the intracranial space)."""
    values = np.asarray(error_map, np.float64)[brain_mask]
    bleed = np.asarray(gt_mask, bool)[brain_mask]
    bins = np.searchsorted(acc["edges"], values, side="right") - 1  # bin i holds [edges[i], edges[i+1])
    acc["pos"] += np.bincount(bins[bleed], minlength=len(acc["edges"]))
    acc["neg"] += np.bincount(bins[~bleed], minlength=len(acc["edges"]))
    acc["slices"] += 1


def add_pixels(acc, error_map, region, brain_mask, label, gt):
    """Accumulate one slice's pixels inside its intracranial mask, the map read as 0 outside the scored region (so
    a region that leaves bleed pixels out pays for them: they count as missed); -> its bleed mask (None for a
    hemorrhage slice without one, which is counted and left out; a healthy slice without one has no bleed)."""
    if gt is None and label == 1:
        acc["positive_slices_without_mask"] += 1
        return None
    gt = np.zeros(brain_mask.shape, bool) if gt is None else np.asarray(gt, bool)
    accumulate_pixels(acc, np.where(region, error_map, 0.0), brain_mask, gt)
    acc["bleed_pixels_outside_region"] = acc.get("bleed_pixels_outside_region", 0) + int((gt & brain_mask & ~region).sum())
    return gt


def _keep(heap, k, key, make_example, counter):
    """Keep the k items with the largest key; build the (copied) example only when it is kept."""
    if k <= 0:
        return
    if len(heap) < k:
        heapq.heappush(heap, (key, counter, make_example()))
    elif key > heap[0][0]:
        heapq.heapreplace(heap, (key, counter, make_example()))


def _record_batch(acc, batch, maps, masks, scores, settings, keep_examples, gt_masks_fn):
    """Add one loader batch (maps and masks, the scored regions, as numpy) to the accumulated scores, examples and
    pixel histograms."""
    inside = batch["mask"].numpy()
    positions, labels = batch["position"].numpy().astype(np.int64), batch["label"].numpy().astype(np.int8)
    acc["positions"].append(positions)
    acc["labels"].append(labels)
    for name, values in scores.items():
        acc["scores"].setdefault(name, []).append(np.asarray(values, np.float64))
    if acc["maps"] is not None:
        acc["maps"].append(np.stack([median_filtered(m, settings.median_size) for m in maps]).astype(np.float32))
    for i, (pos, label) in enumerate(zip(positions, labels)):
        # Pixel metrics and overlays see the map the slice score saw (median-filtered if asked);
        # filtering is slow on CPU, so it is done only for slices that need it.
        error_map = median_filtered(maps[i], settings.median_size) if acc["pixel"] is not None else None
        gt = (add_pixels(acc["pixel"], error_map, masks[i], inside[i], label, gt_masks_fn(int(pos)))
              if acc["pixel"] is not None else None)
        score = float(scores[settings.score][i])

        def example(kind, i=i, pos=pos, label=label, score=score, error_map=error_map, gt=gt):
            shown = median_filtered(maps[i], settings.median_size) if error_map is None else error_map
            return {"kind": kind, "position": int(pos), "label": int(label), "score": score,
                    "image": batch["image"][i, 0].numpy().copy(), "map": np.array(shown, np.float32),
                    "brain_mask": masks[i].copy(), "gt_mask": gt}
        heaps = acc["heaps"]
        if label == 1:
            _keep(heaps["true positive"], keep_examples, score, lambda: example("true positive"), int(pos))
            _keep(heaps["miss"], keep_examples, -score, lambda: example("miss"), int(pos))
        else:
            _keep(heaps["false positive"], keep_examples, score, lambda: example("false positive"), int(pos))


# Who scores: DataLoader worker processes reading the slices, and under torchrun this process's rank of `world`.
Workers = collections.namedtuple("Workers", "loader rank world", defaults=(0, 0, 1))


def split_loader(dataset, settings, workers=Workers()):
    """This process's share of the slices (every world-th), in batches that fill a few forward passes."""
    passes = passes_per_slice(settings, dataset[0]["image"].shape[-1]) if len(dataset) else 1
    slices_per_batch = max(8, -(-4 * settings.eval_batch_size // passes))
    shard = torch.utils.data.Subset(dataset, range(workers.rank, len(dataset), workers.world))
    return torch.utils.data.DataLoader(shard, batch_size=slices_per_batch, shuffle=False, num_workers=workers.loader)


def score_split(diffusion, dataset, settings, *, seed, keep_examples=8, keep_maps=False, gt_masks_fn=None,
                workers=Workers(), normative=None):
    """Score every slice of `dataset` with the sliding-window anomaly map of `settings`: the one scoring path of
    train.py (validation), evaluate.py, sweep.py, bench.py and predict.py. dataset: items dict(image, mask, label,
    position) with aligned arrays .positions, .patients, .scans (data.SliceDataset, data.ArrayDataset).

    Keeps the keep_examples highest- and lowest-scoring slices of each EXAMPLE_KINDS (ranked by settings.score,
    unsmoothed) for the overlays; keep_maps: also every slice's map as scored (median-filtered), in position order
    (predict.py, sweep.py: a scan's or a validation split's worth). gt_masks_fn(position) -> bool [S, S] bleed mask
    or None; when given, pixel histograms are accumulated. workers (Workers): DataLoader worker processes, and with
    world > 1 (torch.distributed initialised) each rank scores every world-th slice and all ranks return the merged
    result (keep_maps: one process only). normative: the model's fitted normative map (cv.fold_normative), which
    --normative z needs. Returns a dict: positions, labels,
    patients, scans (sorted by position), scores {name: float64 [N]} (finish_scores applied), examples {kind:
    [example dicts]}, pixel (accumulator or None), maps (float32 [N, S, S] or None), seconds."""
    rank, world = workers.rank, workers.world
    if keep_maps and world > 1:
        raise ValueError("score_split: keep_maps runs in one process")
    acc = {"positions": [], "labels": [], "levels": [], "scores": {}, "heaps": {kind: [] for kind in EXAMPLE_KINDS},
           "pixel": new_pixel_accumulator() if gt_masks_fn is not None else None, "maps": [] if keep_maps else None}
    diffusion.network.eval()
    dataset.context_slices = getattr(diffusion, "context_slices", 0)  # the neighbours the model reads (2.5-D)
    t0 = time.time()
    for batch in tqdm(split_loader(dataset, settings, workers), desc="scoring slices", unit="batch",
                      leave=False, disable=True if rank else None):  # None: shown on a terminal only
        images, anatomy = batch["image"].to(diffusion.device), batch.get("anatomy")
        region = scored_masks(batch["mask"], anatomy, settings)
        levels = slice_levels(anatomy, batch["mask"])
        maps, scores = _score_batch(diffusion, images, torch.from_numpy(region).to(diffusion.device),
                                    [noise_seed(seed, p) for p in batch["position"].tolist()], settings,
                                    brain_masks=batch["mask"], normative=normative, levels=levels)
        _record_batch(acc, batch, maps.cpu().numpy(), region, scores, settings, keep_examples, gt_masks_fn)
        acc["levels"].append(levels)
    result = {"positions": np.concatenate(acc["positions"]) if acc["positions"] else np.zeros(0, np.int64),
              "labels": np.concatenate(acc["labels"]) if acc["labels"] else np.zeros(0, np.int8),
              "levels": np.concatenate(acc["levels"]) if acc["levels"] else np.zeros(0),
              "scores": {name: np.concatenate(v) for name, v in acc["scores"].items()},
              "heaps": acc["heaps"], "pixel": acc["pixel"]}
    if world > 1:
        result = _merge_ranks(result, keep_examples)
    order = np.argsort(result["positions"], kind="stable")  # one order whatever the sharding
    positions = result["positions"][order]
    pixel = result["pixel"]
    if pixel is not None and pixel["pos"].sum() == 0:
        pixel = None  # masks were looked up but none of the slices had one: no pixel metrics
    scans = _lookup(dataset.positions, dataset.scans, positions)
    return {"positions": positions, "labels": result["labels"][order], "levels": result["levels"][order],
            "patients": _lookup(dataset.positions, dataset.patients, positions), "scans": scans,
            "scores": {name: finish_scores(positions, scans, v[order], settings) for name, v in result["scores"].items()},
            "examples": {kind: [ex for _, _, ex in sorted(result["heaps"][kind], reverse=True)] for kind in EXAMPLE_KINDS},
            "pixel": pixel, "maps": np.concatenate(acc["maps"])[order] if keep_maps and acc["maps"] else None,
            "seconds": time.time() - t0}


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
              "levels": np.concatenate([p["levels"] for p in parts]),
              # a rank with an empty shard (fewer slices than processes) has no score arrays at all
              "scores": {name: np.concatenate([p["scores"].get(name, np.zeros(0)) for p in parts])
                         for name in SCORES if any(name in p["scores"] for p in parts)},
              "heaps": {kind: heapq.nlargest(keep_examples, [item for p in parts for item in p["heaps"][kind]])
                        for kind in EXAMPLE_KINDS},
              "pixel": None}
    if parts[0]["pixel"] is not None:
        merged["pixel"] = merge_pixel_accumulators([p["pixel"] for p in parts])
    return merged
