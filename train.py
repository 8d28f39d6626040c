"""Train a patched diffusion model (pDDPM) on healthy head-CT slices.

    python train.py --data_dir DATA --output_dir runs/scratch
    python train.py --data_dir DATA --output_dir runs/pre --pretrained --hf_model google/ddpm-ema-celebahq-256
    torchrun --nproc_per_node=4 train.py --data_dir DATA ...        (see README, "Multiple GPUs")
    python train.py --data_dir DATA --output_dir runs/cv --folds 4  (a cross-validation run: one model per fold, cv.py)

Each step: take a batch of healthy slices, noise one random patch_size box per slice at a
random timestep, and teach the network to rebuild the clean box from the noised box plus the
clean surroundings (loss on the box only). Each epoch: validation loss on held-out healthy
slices, then the same sliding-window anomaly scoring that evaluate.py runs, on the
validation split (patients never seen in training), giving the ROC-AUC used to keep
best_model.pt. The test split is left alone: evaluate.py reports it once.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import multiprocessing
import os
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cohort
import config
import cv
import data
import inputs
import metrics
import models
import plots
import runfiles
import scoring


def get_args(argv=None):
    """The run's configuration (config.RunConfig) and scoring settings (scoring.ScoringSettings) as one namespace,
    the way args.json and the checkpoints record them, with --resume / --new_schedule / --overwrite."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = config.add_run_flags(p)
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output_dir from last.pt, with its saved splits. Refused if a flag would "
                        "make it another run (seed, data, model, batch, scoring...); free to change: "
                        + ", ".join(sorted(RESUME_MAY_CHANGE)))
    g.add_argument("--new_schedule", action="store_true",
                   help="with --resume: accept a changed --lr and/or --epochs and recompute the cosine learning-rate "
                        "schedule as if the run had used them from its start (the lr jumps to that curve at the current step)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty --output_dir (its checkpoints, history and plots are deleted first)")
    scoring.add_scoring_flags(p.add_argument_group("anomaly scoring (evaluate.py uses the run's values)"))
    args = p.parse_args(argv)
    if not args.data_dir:
        raise SystemExit("error: --data_dir is required: point it at the RSNA data (stage_2_train/ + stage_2_train.csv, "
                         "see docs/data.md), a CT-ICH folder, or a phantom made by `python phantom.py --out DIR`")
    # every flag is checked here, before any data is read: a bad value is one line now, not a traceback an epoch later
    run = config.RunConfig.from_flags(args).check()
    models.check_flag(not args.new_schedule or args.resume, "new_schedule", "", "only means something with --resume")
    settings = scoring.ScoringSettings.from_flags(args).check(run.image_size, training=True)
    run = run.filled()  # last: it looks into --data_dir for the layout
    return argparse.Namespace(**run.as_dict(), **settings.as_dict(), resume=args.resume, new_schedule=args.new_schedule,
                              overwrite=args.overwrite)


# what `--resume` may change without making the run another one; everything else must be as the run was started
RESUME_MAY_CHANGE = {"num_workers", "fold_processes", "eval_every", "device", "precision", "eval_batch_size", "pack_windows",
                     "pack_gap", "channels_last", "cache_dir", "run_label", "hf_model", "output_dir", "resume", "overwrite",
                     "new_schedule", "verify_cache"}
SCHEDULE_FLAGS = ("lr", "epochs")  # changed only with --new_schedule
TRAIN_OUTPUTS = ("last.pt", "best_model.pt", "best_model_loss.pt", "training_history.json", "args.json", "splits.json",
                 "training_curves.png")  # with eval_scores_epoch_*.png and diagnostics_epoch_*.png



def last_good(args):
    """End of the message when training stops on a non-finite value: what is left to resume from."""
    last = os.path.join(args.output_dir, "last.pt")
    if not os.path.exists(last):
        return "no epoch had finished, so no checkpoint was written"
    return f"the last good checkpoint, {last}, is untouched (train.py --resume continues from it)"


def _same(key, saved, now):
    if key == "dataset" and saved == "auto":  # a run that recorded --dataset auto, not the layout it resolved to
        return True
    if key == "data_dir":
        return os.path.realpath(os.fspath(saved)) == os.path.realpath(os.fspath(now))  # symlinks: the same folder
    return (list(saved) if isinstance(saved, (list, tuple)) else saved) == (list(now) if isinstance(now, (list, tuple)) else now)


def check_resume(args, run_config, world):
    """Load last.pt and refuse, in one line, a --resume whose flags would make the run another one: another model,
    seed, data folder, batch, scoring... (a changed --lr / --epochs only with --new_schedule). -> the checkpoint."""
    last = os.path.join(args.output_dir, "last.pt")
    # load_checkpoint refuses, in one line naming the file, a truncated file, pickled objects (weights_only)
    # and weights that do not fit their config; the run's model must then be the one this command builds.
    saved, ckpt = models.load_checkpoint(last)
    saved_config = saved.config
    # hf_model is left out: it only says where the starting weights came from (a path may move); last.pt holds them;
    # precision may change on resume (RESUME_MAY_CHANGE)
    changed = [f"{key} {saved_config.get(key)!r}, now {value!r}" for key, value in run_config.items()
               if key not in ("hf_model", "precision", "format") and saved_config.get(key) != value]
    if changed:
        raise SystemExit(f"error: {last}: the run was trained with another model ({'; '.join(changed)}); "
                         "resume with the run's own settings (see args.json next to it)")
    missing = [key for key in ("optimizer", "lr_schedule", "history", "epoch") if key not in ckpt]
    if missing:
        raise SystemExit(f"error: {last}: not a resumable checkpoint (no {', '.join(missing)})")
    saved = dict(ckpt.get("args") or {})
    if ckpt.get("splits"):
        saved["data_dir"] = ckpt["splits"]["data_dir"]  # absolute, where args.json may hold a relative path
    now = vars(args) | {"world_size": world}
    changed = [key for key, value in now.items()
               if key not in RESUME_MAY_CHANGE and key in saved and not _same(key, saved[key], value)]
    if args.new_schedule:  # the schedule may change: only the rest is refused
        changed = [key for key in changed if key not in SCHEDULE_FLAGS] or changed
    described = "; ".join(f"--{key} {saved[key]!r}, now {now[key]!r}" for key in changed)
    if any(key not in SCHEDULE_FLAGS for key in changed):
        raise SystemExit(f"error: {last}: --resume would make it another run ({described}); resume with the run's own "
                         "values (args.json next to it) or start a new run in another --output_dir")
    if changed and not args.new_schedule:
        raise SystemExit(f"error: {last}: --resume with a changed schedule ({described}); add --new_schedule to "
                         "recompute the learning-rate schedule for the new values, or resume with the run's own")
    if args.epochs < ckpt["epoch"]:
        raise SystemExit(f"error: {last}: the run already finished epoch {ckpt['epoch']}; --epochs {args.epochs} is less")
    return ckpt


@torch.no_grad()
def validation_loss(diffusion, dataset, args):
    """Patch loss on held-out healthy slices, with boxes, timesteps and noise fixed across epochs."""
    diffusion.network.eval()
    gen = torch.Generator().manual_seed(args.seed + 12345)
    total, count = 0.0, 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=0):
        x0 = batch["image"].to(diffusion.device)
        total += diffusion.loss(x0, gen).loss.item() * x0.shape[0]
        count += x0.shape[0]
    return total / max(count, 1)


Datasets = collections.namedtuple("Datasets", "train val_loss val_eval")  # healthy training slices; healthy val; all of val


@dataclasses.dataclass
class TrainState:
    """What the loop carries from epoch to epoch (and last.pt saves)."""
    diffusion: models.Diffusion
    train_model: torch.nn.Module  # the network, or its DistributedDataParallel wrapper under torchrun
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    sampler: object  # DistributedSampler under torchrun, else None
    steps_per_epoch: int
    history: list = dataclasses.field(default_factory=list)
    start_epoch: int = 1
    best: dict = None  # best val ROC-AUC and loss so far; by_loss: best_model.pt goes by the loss (no bleed in val)


def main(argv=None):
    args = get_args(argv)
    # Under torchrun (world > 1) every process runs this script; rank 0 alone checks and writes --output_dir.
    rank, world, device = models.setup_distributed(args.device)
    models.check_flag(args.fold_processes == 1 or world == 1, "fold_processes", args.fold_processes,
                      "is not for torchrun (there the processes share each fold)")
    if args.folds:
        train_cv(args, rank, world, device)
    else:
        train_one(args, rank, world, device)
    models.teardown_distributed(world)


def train_one(args, rank, world, device, fold_splits=None):
    """One run in args.output_dir (a CV fold: with that fold's splits record), under the folder's lock."""
    lock = claim_run_dir(args) if rank == 0 else None
    try:
        train(args, rank, world, device, fold_splits)
    except KeyboardInterrupt:
        if rank == 0:
            resumable = os.path.exists(os.path.join(args.output_dir, "last.pt"))
            print("interrupted: continue with --resume" if resumable else
                  "interrupted before the first epoch finished: nothing to resume; start again with --overwrite",
                  file=sys.stderr)
        raise SystemExit(130)
    finally:
        if lock:
            runfiles.release_output_dir(lock)


def stated_window(args):
    """The stated window (low, high) HU of the 2-D images of --data_dir (--image_window, window.txt, 40,80), or None
    for another layout."""
    return cohort.stated_window(args.data_dir, args.image_window) if args.dataset == "images" else None


def train(args, rank, world, device, fold_splits=None):
    """Train one model into args.output_dir. fold_splits: a CV fold's splits record (else drawn from --seed)."""
    is_main = rank == 0
    settings = scoring.ScoringSettings.from_flags(args)

    # The model's configuration: the network, the patch size, the noise schedule, the precision, the input
    # representation of the training data's layout (its windows; 2-D images: their stated window) and the framing,
    # all saved with the weights.
    network = models.model_config(pretrained=args.pretrained, in_channels=args.channels, image_size=args.image_size,
                                  base_channels=args.base_channels, channel_mults=args.channel_mults,
                                  dropout=args.dropout, hf_model=args.hf_model)
    model_config = models.diffusion_config(network, patch_size=args.patch_size, precision=args.precision,
                                           input_hu=inputs.native_input_hu(args.dataset, args.channels, stated_window(args)),
                                           train_noise=args.train_noise, framing=args.framing,
                                           context_slices=args.context_slices)
    ckpt = check_resume(args, model_config, world) if args.resume else None

    # The data, with its patient splits frozen: saved ones when resuming, a CV fold's, or drawn from --seed now.
    splits, datasets = open_data(args, ckpt, fold_splits, inputs.InputHU(model_config["input_hu"], args.framing), rank, world)
    for dataset in datasets:  # 2.5-D: each slice with the slices below and above, as the model reads it
        dataset.context_slices = args.context_slices
    if is_main:
        announce_data(args, splits, datasets, settings, device, world)

    # The network (initialised from --seed), optimiser, learning-rate schedule; restored from last.pt on --resume.
    torch.manual_seed(args.seed)
    state = new_state(args, models.build_diffusion(model_config, device), datasets, ckpt, rank, world)
    if ckpt and is_main:
        print(f"resuming {args.output_dir} after epoch {state.start_epoch - 1}")
    if is_main:
        runfiles.write_json(os.path.join(args.output_dir, "args.json"),
                            vars(args) | {"world_size": world, "global_batch_size": args.batch_size * world})

    # Train: each epoch, patched denoising steps on healthy slices, then validation (the loss, and the scoring
    # evaluate.py runs), then the epoch's checkpoints and figures.
    for epoch in range(state.start_epoch, args.epochs + 1):
        t0 = time.time()
        train_loss, images = train_epoch(state, datasets.train, args, epoch, rank, world)
        t1 = time.time()
        val_loss, result = validate(state.diffusion, datasets, args, settings, epoch, rank, world)
        if is_main:
            state.history.append(epoch_record(args, epoch, (train_loss, val_loss), result,
                                              state.lr_schedule.get_last_lr()[0], (t1 - t0, time.time() - t1), images))
            write_epoch(args, state, result, datasets.val_eval, settings, world, splits)
    if is_main:
        best = state.best
        chosen = f"val ROC-AUC {best['auc']:.3f}" if not best["by_loss"] else f"val loss {best['loss']:.4f} (no bleed in val)"
        print(f"done: best {chosen}; outputs in {args.output_dir}")


def claim_run_dir(args):
    """The run's folder, claimed (runfiles.claim_output_dir: locked, then checked): one that holds files is refused
    unless --resume (half-written *.tmp files of the killed run are removed) or --overwrite (the previous run's
    files are removed). -> the lock's path."""
    if args.resume and not os.path.exists(os.path.join(args.output_dir, "last.pt")):
        raise SystemExit(f"error: {args.output_dir}: nothing to resume (no last.pt)")
    lock = runfiles.claim_output_dir(args.output_dir, "train.py", overwrite=args.overwrite or args.resume, resumable=True)
    try:
        names = [name for name in os.listdir(args.output_dir) if not name.startswith(runfiles.LOCK_NAME)]
        if args.resume:
            for name in names:
                if name.endswith(".tmp"):  # half-written by the run that was killed (writes go to *.tmp, then a rename)
                    os.remove(os.path.join(args.output_dir, name))
        elif names:
            old = [name for name in names if name in TRAIN_OUTPUTS or name.endswith(".tmp") or
                   (name.endswith(".png") and name.startswith(("eval_scores_epoch_", "diagnostics_epoch_")))]
            for name in old:
                os.remove(os.path.join(args.output_dir, name))
            print(f"--overwrite: removed {len(old)} file(s) of the previous run in {args.output_dir}"
                  + (f"; left {len(names) - len(old)} other entries (e.g. {sorted(set(names) - set(old))[0]})"
                     if len(names) > len(old) else ""))
    except BaseException:
        runfiles.release_output_dir(lock)
        raise
    return lock


def open_data(args, ckpt, fold_splits, input_hu, rank, world):
    """The run's data and frozen splits: last.pt's splits when resuming (splits.json for a run older than that),
    else fold_splits, else drawn from --seed. -> (splits record, Datasets)."""
    saved = ckpt.get("splits") if ckpt else None
    if ckpt and saved is None:
        saved = cohort.load_splits_record({}, os.path.join(args.output_dir, "last.pt"))
        if saved is None and rank == 0:
            print(f"note: {args.output_dir} holds no saved splits (a run from before they were saved); the splits are "
                  "drawn from --seed again")
    if saved is not None and fold_splits is not None:  # --resume of a CV fold: last.pt must be this run's fold
        cv.check_fold(fold_splits["cv"]["folds"], fold_splits["cv"]["fold"], {"splits": saved},
                      os.path.join(args.output_dir, "last.pt"))
    saved = saved or fold_splits
    rd = data.open_run_data(args, input_hu, ("train", "val"), saved_splits=saved, rank=rank, world=world)
    train_pos = rd.cache.ok(rd.splits["train"], args.min_brain_fraction)
    val_pos = rd.cache.ok(rd.splits["val"], args.min_brain_fraction)
    if len(train_pos) == 0:
        why = "all of them are bad files" if len(rd.splits["train"]) else "no patient without a hemorrhage slice to train on"
        raise SystemExit(f"error: {args.data_dir}: no usable healthy training slices ({why})")
    val_healthy = val_pos[rd.index["any"][val_pos] == 0]
    if len(val_healthy) == 0:  # the validation loss, and so best_model_loss.pt, would be made of nothing
        raise SystemExit(f"error: {args.data_dir}: no usable healthy validation slices (the validation split has "
                         f"{len(rd.patients['val'])} patient(s); a run needs at least 2 healthy patients with usable slices)")
    splits = saved or cohort.splits_record(rd.patients, seed=args.seed, data_dir=args.data_dir, dataset=args.dataset)
    return splits, Datasets(*(data.SliceDataset(rd.cache, rd.index, p) for p in (train_pos, val_healthy, val_pos)))


def announce_data(args, splits, datasets, settings, device, world):
    """Rank 0, once the data is open: splits.json (a new run's splits, fixed now: evaluate.py and sweep.py score
    exactly these patients), and what the run trains and validates on."""
    if not args.resume:
        runfiles.write_json(os.path.join(args.output_dir, "splits.json"), splits)
    amp_dtype = models.autocast_dtype(args.precision, device)
    print(f"train: {len(datasets.train)} healthy slices | val: {len(datasets.val_eval)} slices "
          f"({int(datasets.val_eval.labels.sum())} hemorrhage) | device {device} x{world} | "
          f"precision {'bf16' if amp_dtype else 'fp32'}")
    if not datasets.val_eval.labels.any():
        print("warning: the validation split has no hemorrhage slice, so no ROC-AUC can be computed; best_model.pt "
              "is chosen by validation loss (as best_model_loss.pt)", file=sys.stderr)
    if scoring.smoothing_note(settings.smooth_slices, args.eval_samples):
        print(scoring.smoothing_note(settings.smooth_slices, args.eval_samples))


def new_state(args, diffusion, datasets, ckpt, rank, world):
    """The optimiser, the cosine schedule over every step of the run, and (torchrun) the sampler that gives each
    process its own 1/world of the slices, reshuffled every epoch: one step sees world x batch_size slices, and the
    learning rate is not scaled for that. Restored from ckpt (last.pt) when resuming. -> TrainState."""
    model, device = diffusion.network, diffusion.device
    models.check_flag(args.image_size % model.size_multiple == 0, "image_size", args.image_size,
                      f"must be a multiple of {model.size_multiple} for this model")
    if rank == 0:
        print(f"model: {args.run_label}, {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sampler = (torch.utils.data.DistributedSampler(datasets.train, world, rank, shuffle=True, seed=args.seed, drop_last=True)
               if world > 1 else None)
    steps_per_epoch = min(len(datasets.train) // (args.batch_size * world) or 1, args.max_steps or math.inf)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    history, start_epoch = [], 1
    if ckpt:
        history, start_epoch, lr_schedule = restore(args, ckpt, model, optimizer, lr_schedule)
    best = {"auc": max([h["val_roc_auc"] for h in history if h["val_roc_auc"] is not None], default=-math.inf),
            "loss": min([h["val_loss"] for h in history], default=math.inf), "by_loss": not datasets.val_eval.labels.any()}
    train_model = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainState(diffusion, train_model, optimizer, lr_schedule, sampler, steps_per_epoch, history, start_epoch, best)


def restore(args, ckpt, model, optimizer, lr_schedule):
    """Load the checkpoint into model, optimizer and schedule -> (history, first epoch to run, schedule)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if not args.new_schedule:
        lr_schedule.load_state_dict(ckpt["lr_schedule"])
        return ckpt["history"], ckpt["epoch"] + 1, lr_schedule
    # the cosine schedule of the new --lr / --epochs, at the step the run has reached
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = args.lr
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=lr_schedule.T_max)
    with warnings.catch_warnings():  # "step() before optimizer.step()": on purpose, to reach the current step
        warnings.simplefilter("ignore")
        for _ in range(ckpt["lr_schedule"]["last_epoch"]):
            schedule.step()
    print(f"--new_schedule: lr {schedule.get_last_lr()[0]:.3g} at step {schedule.last_epoch} of {schedule.T_max}")
    return ckpt["history"], ckpt["epoch"] + 1, schedule


def train_epoch(state, train_set, args, epoch, rank, world):
    """One epoch of patched denoising steps. Every random draw of an epoch comes from (seed, epoch, rank), so a
    resumed run repeats it and the processes of a torchrun draw different patch boxes, timesteps and noise.
    -> (the mean loss of the epoch's steps over every process, slices seen)."""
    torch.manual_seed(args.seed + 1000 * epoch + rank)
    gen = torch.Generator().manual_seed(args.seed + 1000 * epoch + rank)
    device, sampler = state.diffusion.device, state.sampler
    if sampler is not None:
        sampler.set_epoch(epoch)
    per_process = len(sampler) if sampler is not None else len(train_set)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None,
                                         generator=gen if sampler is None else None, drop_last=per_process >= args.batch_size,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0)
    state.train_model.train()
    losses = []
    bar = tqdm(loader, total=state.steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", leave=False,
               disable=True if rank else None)  # None: shown on a terminal only (not in a log file)
    for step, batch in enumerate(bar):
        if step >= state.steps_per_epoch:
            break
        x0 = batch["image"].to(device, non_blocking=True)
        if args.hflip:  # drawn from gen like every other draw, so a resumed epoch flips the same slices
            flip = (torch.rand(x0.shape[0], generator=gen) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        loss = state.diffusion.loss(x0, gen, network=state.train_model).loss
        if not torch.isfinite(loss):
            raise SystemExit(f"error: non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; {last_good(args)}")
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(state.diffusion.network.parameters(), args.grad_clip)
        if not torch.isfinite(grad_norm):  # stepping would write NaN into every weight
            raise SystemExit(f"error: non-finite gradient norm at epoch {epoch}, step {step}; {last_good(args)}")
        state.optimizer.step()
        state.lr_schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    train_loss = float(np.mean(losses))
    if world > 1:  # the mean over all processes' steps, not rank 0's alone
        total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        train_loss = (total[0] / total[1]).item()
    return train_loss, len(losses) * args.batch_size * world


def validate(diffusion, datasets, args, settings, epoch, rank, world):
    """The validation loss (rank 0 alone, on all of the healthy val slices, with fixed draws: the same number
    whatever the world size) and, every eval_every epochs and after the last, the scoring evaluate.py runs, on the
    validation split (sharded over the processes). -> (val_loss or None off rank 0, score_split result or None)."""
    val_loss = validation_loss(diffusion, datasets.val_loss, args) if rank == 0 else None
    if val_loss is not None and not math.isfinite(val_loss):  # the last step left non-finite weights: do not save them
        raise SystemExit(f"error: non-finite validation loss at epoch {epoch}; {last_good(args)}")
    # Sliding-window scoring costs far more than an epoch of training on small sets; --eval_every thins it out.
    if epoch % args.eval_every and epoch != args.epochs:
        return val_loss, None
    return val_loss, scoring.score_split(diffusion, datasets.val_eval, settings, seed=args.seed,
                                            workers=scoring.Workers(0, rank, world))


def epoch_record(args, epoch, losses, result, lr, seconds, images):
    """One entry of training_history.json. losses: (train, val); seconds: (training, validation)."""
    score = args.score
    m = (metrics.slice_metrics(result["labels"], result["scores"][score], result["patients"], n_boot=200, seed=args.seed)
         if result else {"roc_auc": None, "roc_auc_ci": None, "auprc": None})
    return {"epoch": epoch, "train_loss": losses[0], "val_loss": losses[1],
            "val_roc_auc": m["roc_auc"], "val_roc_auc_ci": m["roc_auc_ci"], "val_auprc": m["auprc"],
            "val_roc_auc_by_score": {name: metrics.roc_auc(result["labels"], s) for name, s in result["scores"].items()} if result else None,
            "lr": lr, "train_seconds": seconds[0], "eval_seconds": seconds[1], "images_per_second": images / max(seconds[0], 1e-9)}


def write_epoch(args, state, result, val_eval_set, settings, world, splits):
    """The diagnostics panel (on scoring epochs), best_model.pt (best val ROC-AUC; best val loss when the validation
    split has no bleed), best_model_loss.pt (best val loss), history, curves, plots, then last.pt: it is what --resume
    trusts, so it only names an epoch whose files are all written. Every checkpoint holds the run's splits."""
    record, out, best, diffusion = state.history[-1], args.output_dir, state.best, state.diffusion
    if result is not None:
        plots.save_diagnostics(os.path.join(out, f"diagnostics_epoch_{record['epoch']}.png"), diffusion, val_eval_set,
                               settings, args.seed, record["epoch"], args.run_label)
    extra = {"args": vars(args) | {"world_size": world}, "epoch": record["epoch"], "metrics": record, "splits": splits,
             "best_by": "val_loss" if best["by_loss"] else "val_roc_auc"}
    auc = record["val_roc_auc"] if record["val_roc_auc"] is not None else -math.inf
    if auc > best["auc"] or (best["by_loss"] and record["val_loss"] < best["loss"]):
        best["auc"] = auc
        models.save_checkpoint(os.path.join(out, "best_model.pt"), diffusion, **extra)
    if record["val_loss"] < best["loss"]:
        best["loss"] = record["val_loss"]
        models.save_checkpoint(os.path.join(out, "best_model_loss.pt"), diffusion, **extra)
    runfiles.write_json(os.path.join(out, "training_history.json"), state.history)
    plots.plot_runs([state.history], [args.run_label], os.path.join(out, "training_curves.png"))
    if result is not None:
        plots.plot_scores(os.path.join(out, f"eval_scores_epoch_{record['epoch']}.png"), result["labels"],
                          result["scores"][args.score], title=f"validation, epoch {record['epoch']}, score {args.score}")
    models.save_checkpoint(os.path.join(out, "last.pt"), diffusion, **extra, optimizer=state.optimizer.state_dict(),
                           lr_schedule=state.lr_schedule.state_dict(), history=state.history)
    ci = record["val_roc_auc_ci"]
    auc_text = "n/a" if record["val_roc_auc"] is None else f"{record['val_roc_auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    print(f"epoch {record['epoch']:3d} | train loss {record['train_loss']:.4f} | val loss {record['val_loss']:.4f} | "
          f"val ROC-AUC ({args.score}) {auc_text} | {record['train_seconds']:.0f}s train, {record['eval_seconds']:.0f}s eval",
          flush=True)


# ---------------------------------------------------------------------------------------------
# a cross-validation run

def train_cv(args, rank, world, device):
    """--folds K: the CV run in --output_dir. folds.json is drawn from --seed when the run starts (an earlier one
    found there is kept and only extended with new patients) and read back as it is on --resume; then each fold
    (--fold k, or all in turn) is an ordinary run in RUN/fold_<k>/: resumed where it has a last.pt, started where
    it has none."""
    lock = runfiles.claim_output_dir(args.output_dir, "train.py", overwrite=args.overwrite or args.resume,
                                     resumable=True) if rank == 0 else None
    try:
        index = cohort.load_index(args.data_dir, dataset=args.dataset, cache_dir=args.cache_dir,
                                  num_workers=max(args.num_workers, 1))
        saved = cv.load_folds(args.output_dir)
        if saved is None and args.resume:
            raise SystemExit(f"error: {args.output_dir}: nothing to resume (no {cv.FOLDS_FILE})")
        if saved is not None and saved["k"] != args.folds:
            raise SystemExit(f"error: --folds {args.folds}: the run's {cv.FOLDS_FILE} has {saved['k']} folds")
        record = saved if args.resume else cv.assign_folds(index, args.folds, args.seed, saved)
        if rank == 0 and not args.resume:
            cv.write_folds(args.output_dir, record)
        runs = [fold_run(args, index, record, fold, rank)
                for fold in ([args.fold] if args.fold is not None else range(args.folds))]
        if args.fold_processes > 1 and len(runs) > 1:
            train_folds_in_processes(runs, args.fold_processes, device)
        else:
            for fold_args, splits in runs:
                train_one(fold_args, rank, world, device, splits)
    finally:
        if lock:
            runfiles.release_output_dir(lock)


def fold_run(args, index, record, fold, rank):
    """Fold k of a CV run as an ordinary run: (its args, into RUN/fold_<k>/; its splits record)."""
    folder = cv.fold_dir(args.output_dir, fold)
    # the fold's own files were checked with the run folder's: a fold without last.pt (never started, or killed in
    # its first epoch) starts afresh
    resume = args.resume and os.path.exists(os.path.join(folder, "last.pt"))
    fold_args = argparse.Namespace(**vars(args) | {"output_dir": folder, "fold": fold, "resume": resume, "overwrite": True})
    splits = cv.fold_splits_record(index, record, fold, data_dir=args.data_dir, dataset=args.dataset)
    if rank == 0:
        print(f"fold {fold} of {args.folds}: test {len(splits['patients']['test'])} patients, val "
              f"{len(splits['patients']['val'])}, train {len(splits['patients']['train'])} -> {folder}")
    return fold_args, splits


def train_folds_in_processes(runs, processes, device):
    """--fold_processes N: the folds trained N at a time, each in its own process with 1/N of torch's threads, its
    output in RUN/fold_<k>.log. Why: one small model's step uses two CPU cores poorly; on our 2-core CPU two folds at
    one thread each take 0.83x the time of one after the other at two threads (RESULTS, 2026-12-06). Each fold is
    seeded on its own (train.train), so the order does not matter; its numbers move by the rounding of another thread
    count only. The first fold to fail stops the run (the folds not started are cancelled)."""
    threads = max(1, torch.get_num_threads() // processes)
    print(f"training {len(runs)} folds, {processes} at a time, {threads} thread(s) each; progress in each RUN/fold_<k>.log")
    pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        start_method = multiprocessing.get_start_method()  # the platform's, before spawn's children overwrite theirs
        jobs = {pool.submit(train_fold_logged, fold_args, splits, device, threads, start_method, os.getpid()): fold_args
                for fold_args, splits in runs}
        for job in concurrent.futures.as_completed(jobs):
            fold, log_path = jobs[job].fold, fold_log(jobs[job])
            try:
                print(f"fold {fold}: {job.result()}", flush=True)
            except SystemExit as e:  # a fold's one-line error, said with its fold
                raise SystemExit(f"{e.code} (fold {fold})" if isinstance(e.code, str) else e.code) from None
            except concurrent.futures.process.BrokenProcessPool:  # killed from outside (out of memory, a signal)
                raise SystemExit(f"error: fold {fold}'s process died (out of memory? killed?); its log: {log_path}; "
                                 "continue with --resume") from None
    finally:
        pool.shutdown(cancel_futures=True)


def exit_with_parent(parent_pid):
    """End this fold's process once train.py's is gone (killed from outside: `kill`, a scheduler). Otherwise it would go
    on training and writing into the run unseen. Checkpoints are written to *.tmp and renamed, so a hard exit leaves
    at most a .tmp file, which --resume removes."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def fold_log(fold_args):
    """RUN/fold_<k>.log, beside the fold's folder (which holds the run's own files only)."""
    return os.path.normpath(fold_args.output_dir) + ".log"


def train_fold_logged(fold_args, splits, device, threads, start_method, parent_pid):
    """One fold in a process of train_folds_in_processes, printing into RUN/fold_<k>.log. -> the log's last line."""
    torch.set_num_threads(threads)
    # parent_pid is train.py's as it was when the fold was sent: had it died before this process got here, this
    # process's parent would already be another one
    threading.Thread(target=exit_with_parent, args=(parent_pid,), daemon=True).start()
    # a spawned process starts its own children by spawn too; the epoch's data loader workers (a new one each epoch)
    # would then import everything again each epoch (~4 s an epoch here): start them as train.py alone does
    multiprocessing.set_start_method(start_method, force=True)
    log_path = fold_log(fold_args)
    # a resumed fold goes on with its log; a fold started afresh (or overwritten) starts a new one
    with open(log_path, "a" if fold_args.resume else "w", buffering=1) as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train_one(fold_args, 0, 1, device, splits)
    with open(log_path) as log:
        return f"{[line.strip() for line in log if line.strip()][-1]} (log: {log_path})"


if __name__ == "__main__":
    models.run_script(main)
