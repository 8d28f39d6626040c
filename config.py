"""A run's configuration, in one place: `RunConfig` (what train.py was told: data, model, optimisation) beside
scoring.ScoringSettings (how slices are scored). Both are dataclasses that make the flags, are saved together in
args.json and in every checkpoint (`"args"`), and are what evaluate.py, predict.py, sweep.py and bench.py read back
with `resolve`: "the flag given now, else the training run's value, else today's default" is written once, here.

Adding a run flag: a field of RunConfig (its default) and its line in add_run_flags (its help); check() if it has a
range. Adding a scoring option: scoring.py (ScoringSettings and add_scoring_flags).
"""
import argparse
import dataclasses
import math
import os

import cohort
import inputs
import models
import runfiles
import scoring


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a training run was told, less the scoring (scoring.ScoringSettings). channels None = 1 (3 with
    pretrained); lr None = 1e-4 scratch, 1e-5 pretrained; run_label None = built from the settings: filled()."""
    # data
    data_dir: str = None
    dataset: str = "auto"
    cache_dir: str = None
    output_dir: str = "./checkpoints"
    num_samples: object = cohort.DEFAULT_NUM_SAMPLES  # an int, or "all" (bench.py)
    eval_samples: object = cohort.DEFAULT_EVAL_SAMPLES  # an int, or "all"
    image_size: int = 256
    channels: int = None
    num_workers: int = 2
    min_brain_fraction: float = 0.0
    verify_cache: bool = False
    image_window: str = None  # "level,width" of 2-D images (the images layout); None: the folder's window.txt, else 40,80
    framing: str = "none"  # how a slice is brought to the model's frame (inputs.FRAMINGS); saved in the model config
    # model
    pretrained: bool = False
    hf_model: str = "google/ddpm-ema-celebahq-256"
    base_channels: int = 64
    channel_mults: tuple = (1, 2, 4, 8)
    dropout: float = 0.1
    context_slices: int = 0  # 2.5-D: the slices just below and above as extra input channels (models.CONTEXT_SLICES)
    # optimisation
    epochs: int = 12
    batch_size: int = 16
    lr: float = None
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = cohort.DEFAULT_SEED
    hflip: bool = False
    train_noise: str = "gaussian"  # the noise of the training box: gaussian (the spec) or simplex (the official pDDPM)
    device: str = "auto"
    precision: str = "auto"
    # cross-validation (cv.py): K folds of patients, and the one fold to train (None: all of them in turn)
    folds: int = None
    fold: int = None
    fold_processes: int = 1  # folds trained at once, each in its own process (train.train_folds_in_processes)
    # run
    run_label: str = None
    eval_every: int = 1
    max_steps: int = None

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))

    def filled(self):
        """A copy with channels, lr and run_label set from the other fields where they are None, and --dataset auto
        resolved to the layout found in data_dir (once, here: the run records the layout it trained on)."""
        pick = lambda value, default: default if value is None else value  # noqa: E731
        channels = pick(self.channels, 3 if self.pretrained else 1)
        kind = (f"pretrained {os.path.basename(os.path.normpath(self.hf_model))}" if self.pretrained
                else f"scratch bc{self.base_channels}")
        dataset = cohort.check_dataset(self.data_dir, self.dataset) if self.data_dir else self.dataset
        return dataclasses.replace(self, channels=channels, lr=pick(self.lr, 1e-5 if self.pretrained else 1e-4),
                                   run_label=pick(self.run_label, f"{kind} {channels}ch {self.image_size}px"),
                                   dataset=dataset)

    def check(self):
        """self, or a one-line SystemExit naming the first flag out of its range (before any data is read)."""
        check_flags(self)
        if self.cache_dir:
            runfiles.check_cache_dir(self.cache_dir)
        return self

    def as_dict(self):
        return {name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_flags(cls, flags):
        """From parsed flags (a namespace or a dict): the fields' values; names missing or None keep the default."""
        return cls(**_given(cls, flags))


FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
DEFAULTS = RunConfig()


def _given(cls, flags):
    flags = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
    return {f.name: flags[f.name] for f in dataclasses.fields(cls) if flags.get(f.name) is not None}


def resolve(cls, saved, overrides=None):
    """The one rule of every script that reads a run back: a flag given now (not None) wins, else the run's saved
    value, else today's default of cls (a RunConfig or a ScoringSettings). -> (cls instance, names neither given
    nor saved)."""
    saved, overrides = dict(saved or {}), _given(cls, overrides or {})
    names = [f.name for f in dataclasses.fields(cls)]
    merged = {name: saved.get(name) for name in names} | overrides
    return cls.from_flags(merged), [name for name in names if merged.get(name) is None and name not in _NONE_IS_DEFAULT]


# fields whose default is None, and framing (the model config's is the one read: models.complete_config): "not
# recorded" is not worth a note for them
_NONE_IS_DEFAULT = {"cache_dir", "max_steps", "patch_size", "stride", "pack_gap", "folds", "fold", "image_window", "framing"}


def add_run_flags(p):
    """train.py's flags of RunConfig, grouped, with its defaults. -> the "run" group (train.py adds its own)."""
    d = DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=d.data_dir,
                   help="RSNA folder (stage_2_train/ + stage_2_train.csv), CT-ICH folder, NIfTI layout, or a phantom from "
                        "`python phantom.py`")
    g.add_argument("--dataset", default=d.dataset, choices=["auto", *cohort.DATASETS],
                   help="the layout of --data_dir (auto: detected; nifti = CT volumes + masks, see docs/data.md)")
    g.add_argument("--cache_dir", default=d.cache_dir, help="slice/index cache (default: next to the data, or ~/.cache/ct-pddpm)")
    g.add_argument("--output_dir", default=d.output_dir)
    g.add_argument("--num_samples", type=int, default=d.num_samples, help="healthy training slices")
    g.add_argument("--eval_samples", type=cohort.parse_eval_samples, default=d.eval_samples,
                   help="validation slices per class for the per-epoch ROC-AUC, or 'all'")
    g.add_argument("--image_size", type=int, default=d.image_size)
    g.add_argument("--channels", type=int, choices=[1, 3], default=d.channels,
                   help="1 = brain window, 3 = brain/subdural/bone (default: 1, or 3 with --pretrained)")
    g.add_argument("--num_workers", type=int, default=d.num_workers)
    g.add_argument("--min_brain_fraction", type=float, default=d.min_brain_fraction,
                   help="use only slices whose intracranial mask covers at least this fraction of the image, "
                        "in training and evaluation (leaves out face, skull-base and vertex slices)")
    add_verify_cache_flag(g)
    g.add_argument("--image_window", type=cohort.window_flag, default=d.image_window, help="level,width in HU that the "
                   "2-D images of --data_dir (images/ + labels.csv) were saved in (default: its window.txt, else 40,80)")
    g.add_argument("--framing", default=d.framing, choices=list(inputs.FRAMINGS),
                   help="none: the slice padded to a square and resized (as before); head: cropped to the head's "
                        "bounding box plus a margin, square, then resized, at training and scoring (saved with the model)")
    add_model_flags(p, d)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="slices per process per step; under torchrun one step sees nproc x batch_size slices (the global batch)")
    g.add_argument("--lr", type=float, default=d.lr, help="default 1e-4 scratch, 1e-5 pretrained; not scaled with the number of processes")
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument("--grad_clip", type=float, default=d.grad_clip)
    g.add_argument("--seed", type=int, default=d.seed, help="the patient split, the initialisation and the scoring noise")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=d.hflip,
                   help="flip each training slice left-right with probability 1/2 (heads are near-symmetric; "
                        "doubles what a small healthy set shows the model)")
    g.add_argument("--train_noise", default=d.train_noise, choices=["gaussian", "simplex"],
                   help="noise of the training box: gaussian (the spec) or simplex-like multi-octave noise, as the official "
                        "pDDPM trains (saved with the model; give --noise simplex as well to score with it)")
    add_device_flags(g)
    g = p.add_argument_group("cross-validation")
    g.add_argument("--folds", type=int, default=d.folds,
                   help="K: a patient-level K-fold cross-validation run in --output_dir (folds.json, fold_<k>/): fold k's "
                        "model trains and validates on patients outside fold k only (docs/method.md)")
    g.add_argument("--fold", type=int, default=d.fold, help="with --folds: train this fold only (default: every fold in turn)")
    g.add_argument("--fold_processes", type=int, default=d.fold_processes,
                   help="with --folds: train this many folds at once, each in its own process with its share of the CPU "
                        "threads and its output in RUN/fold_<k>.log (on a 2-core CPU, 2 trains the CT-ICH recipe 1.2x "
                        "faster; not under torchrun)")
    g = p.add_argument_group("run")
    g.add_argument("--run_label", default=d.run_label, help="label for plots (default: built from the settings)")
    g.add_argument("--eval_every", type=int, default=d.eval_every, help="score the validation split every N epochs (and after the last)")
    g.add_argument("--max_steps", type=int, default=d.max_steps, help="stop each epoch after this many steps (smoke tests)")
    return g


def add_verify_cache_flag(group, from_checkpoint=False):
    """--verify_cache (train.py, and evaluate.py / sweep.py where None means "the training run's value")."""
    group.add_argument("--verify_cache", action="store_true", default=None if from_checkpoint else DEFAULTS.verify_cache,
                       help="serve a cached slice only if a hash of its file's bytes is unchanged (not only size and "
                            "modification time): for data copied with tools that keep modification times; reads every "
                            "file once per run" + (" (default: the training run's value)" if from_checkpoint else ""))


def add_device_flags(group, from_checkpoint=False):
    """--device and --precision (from_checkpoint: precision defaults to None, "the training run's value")."""
    group.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    group.add_argument("--precision", default=None if from_checkpoint else "auto", choices=["auto", "fp32", "bf16"],
                       help="autocast: auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32"
                            + (" (default: the training run's value)" if from_checkpoint else ""))


def add_model_flags(p, d):
    """add_run_flags' "model" group."""
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", action="store_true", help="fine-tune a diffusers UNet2DModel instead of training the scratch UNet")
    g.add_argument("--hf_model", default=d.hf_model, help="hub id or local directory (offline clusters)")
    g.add_argument("--base_channels", type=int, default=d.base_channels, help="width of the scratch UNet")
    g.add_argument("--channel_mults", type=int, nargs="+", default=list(d.channel_mults),
                   help="width of each scratch UNet level in base_channels (the spec's description, 30.3M parameters at "
                        "base 64; 1 2 4 4 is its '~14M' reading, 14.8M)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout in the scratch UNet's ResBlocks")
    g.add_argument("--context_slices", type=int, choices=list(models.CONTEXT_SLICES), default=d.context_slices,
                   help="2.5-D: 1 = the slices just below and above as extra input channels, noised in the same box as the "
                        "slice so nothing is copied across; only the slice's own channels are scored (scratch UNet; saved "
                        "with the model). With --framing head each neighbour is brought into the slice's own frame "
                        "(inputs.reframe)")


def check_flags(flags):
    """Range checks of the run flags a namespace or config has (those it has), at once, before any data is read."""
    get = lambda name: getattr(flags, name, None)  # noqa: E731
    for name in ("base_channels", "batch_size", "epochs", "eval_every", "max_steps", "steps", "slices"):
        if get(name) is not None:
            models.check_flag(get(name) >= 1, name, get(name), "must be at least 1")
    if isinstance(get("num_samples"), int):
        models.check_flag(get("num_samples") >= 1, "num_samples", get("num_samples"), "must be at least 1")
    for name in ("lr", "grad_clip"):
        if get(name) is not None:
            models.check_flag(math.isfinite(get(name)) and get(name) > 0, name, get(name), "must be a finite number above 0")
    if get("weight_decay") is not None:
        models.check_flag(math.isfinite(get("weight_decay")) and get("weight_decay") >= 0, "weight_decay", get("weight_decay"),
                   "must be a finite number, 0 or more")
    for name in ("dropout", "min_brain_fraction"):
        if get(name) is not None:
            models.check_flag(0 <= get(name) < 1, name, get(name), "must be in [0, 1)")
    for name in ("num_workers", "seed"):
        if get(name) is not None:
            models.check_flag(get(name) >= 0, name, get(name), "must be 0 or more")
    if get("folds") is not None:
        models.check_flag(get("folds") >= 2, "folds", get("folds"), "must be at least 2")
    if get("fold") is not None:
        models.check_flag(get("folds") is not None and 0 <= get("fold") < get("folds"), "fold", get("fold"),
                          "needs --folds K and must be in 0..K-1")
    if get("fold_processes") is not None:
        models.check_flag(get("fold_processes") >= 1, "fold_processes", get("fold_processes"), "must be at least 1")
        models.check_flag(get("fold_processes") == 1 or get("folds") is not None, "fold_processes", get("fold_processes"),
                          "needs --folds K")
    if get("context_slices"):
        models.check_flag(not get("pretrained"), "context_slices", get("context_slices"),
                          "needs the scratch UNet (a pretrained UNet2DModel takes its own channels)")
    if get("channel_mults") is not None:
        models.check_flag(all(m >= 1 for m in get("channel_mults")), "channel_mults", " ".join(map(str, get("channel_mults"))),
                   "every level must be at least 1")
    if get("image_size") is not None:
        levels = len(get("channel_mults")) - 1 if not get("pretrained") and get("channel_mults") else 0
        models.check_flag(get("image_size") >= 8 and get("image_size") % 2 ** levels == 0, "image_size", get("image_size"),
                   f"must be a multiple of {2 ** levels} (the UNet halves it {levels} times) and at least 8"
                   if levels else "must be at least 8")
    models.pick_device(get("device") or "auto")


READ_BACK_FLAGS = ("data_dir", "eval_samples", "num_workers", "min_brain_fraction", "verify_cache", "image_window")  # what a script reading a run may set
# options removed in ct-pddpm (issue 27) that old runs still record, with the value that meant "off"; a run that trained
# with --bleed_train_fraction is refused (cohort.refuse_bleed_training), one scored with a removed scoring option is
# scored without it, with a note, and a removed scored region is refused
REMOVED_SCORING = {"noise_draws": 1, "draw_combine": "mean", "input_norm": "none", "calibrate": "none", "min_height": 0.0}
REMOVED_SCORED_REGIONS = ("soft_tissue", "no_bone_islands")


def read_back(checkpoint, flags, checkpoint_path, image_size):
    """A trained run as evaluate.py, predict.py and sweep.py use it: (RunConfig: the run's saved args with the
    READ_BACK_FLAGS given now on top; ScoringSettings: the run's saved scoring with every scoring flag given now on
    top, checked at image_size; the scoring noise seed: --seed given now, else the run's). What the run did not
    record takes today's default, named in a one-line note."""
    saved = checkpoint.get("args") or {}
    flags = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
    cohort.refuse_bleed_training(saved, checkpoint_path)
    run, missing_run = resolve(RunConfig, saved, {name: flags.get(name) for name in READ_BACK_FLAGS})
    settings, missing = resolve(scoring.ScoringSettings, saved, flags)
    if settings.scored_region in REMOVED_SCORED_REGIONS:
        raise SystemExit(f"error: {checkpoint_path}: scored with --scored_region {settings.scored_region}, an option removed "
                         f"in ct-pddpm; give --scored_region {' or '.join(scoring.SCORED_REGIONS)}")
    removed = [f"--{name} {saved[name]}" for name, off in REMOVED_SCORING.items() if saved.get(name, off) not in (off, None)]
    if removed:
        print(f"note: {checkpoint_path} was scored with {', '.join(removed)}, removed in ct-pddpm; scoring without")
    if missing_run + missing:
        print(f"note: {checkpoint_path} does not record {', '.join(missing_run + missing)}; using today's defaults")
    seed = run.seed if flags.get("seed") is None else flags["seed"]
    check_flags(argparse.Namespace(num_workers=run.num_workers, min_brain_fraction=run.min_brain_fraction, seed=seed))
    return run, settings.check(image_size), seed
