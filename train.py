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
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import compare
import cohort
import config
import cv
import data
import runfiles
import evaluate
import inputs
import models
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
    run = config.RunConfig.from_flags(args).filled().check()
    models.check_flag(not args.new_schedule or args.resume, "new_schedule", "", "only means something with --resume")
    settings = scoring.ScoringSettings.from_flags(args).check(run.image_size, training=True)
    return argparse.Namespace(**run.as_dict(), **settings.as_dict(), resume=args.resume, new_schedule=args.new_schedule,
                              overwrite=args.overwrite)


# what `--resume` may change without making the run another one; everything else must be as the run was started
RESUME_MAY_CHANGE = {"num_workers", "eval_every", "device", "precision", "eval_batch_size", "pack_windows",
                     "channels_last", "cache_dir", "run_label", "hf_model", "output_dir", "resume", "overwrite",
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


def check_cv_dir(args):
    """The CV run folder: created and locked; one that holds files is refused unless --resume or --overwrite.
    -> the lock's path."""
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: {args.output_dir}: cannot write output dir ({e.strerror})")
    lock = runfiles.lock_output_dir(args.output_dir, "train.py")
    if [name for name in os.listdir(args.output_dir) if name != runfiles.LOCK_NAME] and not (args.resume or args.overwrite):
        runfiles.release_output_dir(lock)
        raise SystemExit(f"error: {args.output_dir}: output dir is not empty; use --resume to continue that CV run "
                         "or --overwrite to replace it (its folds.json is kept)")
    return lock


def check_output_dir(args):
    """Refuse to silently overwrite a finished run, and take the folder's lock (one run per output dir at a time).
    -> the lock's path (runfiles.release_output_dir frees it)."""
    if args.resume and not os.path.exists(os.path.join(args.output_dir, "last.pt")):
        raise SystemExit(f"error: {args.output_dir}: nothing to resume (no last.pt)")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        probe = os.path.join(args.output_dir, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: {args.output_dir}: cannot write output dir ({e.strerror})")
    lock = runfiles.lock_output_dir(args.output_dir, "train.py")
    try:
        names = [name for name in os.listdir(args.output_dir) if name != runfiles.LOCK_NAME]
        if args.resume:
            for name in names:
                if name.endswith(".tmp"):  # half-written by the run that was killed (writes go to *.tmp, then a rename)
                    os.remove(os.path.join(args.output_dir, name))
        elif names and not args.overwrite:
            raise SystemExit(f"error: {args.output_dir}: output dir is not empty; "
                             "use --resume to continue that run or --overwrite to replace it")
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


def open_datasets(args, rank, world, saved_splits, input_hu):
    """(run data, training set of healthy slices, validation healthy slices for the loss, the whole validation
    split). saved_splits: the run's splits record when resuming (None: drawn from --seed now)."""
    rd = data.open_run_data(args.data_dir, image_size=args.image_size, input_hu=input_hu, split_seed=args.seed,
                            num_samples=args.num_samples, eval_samples=args.eval_samples, decode=("train", "val"),
                            dataset=args.dataset, cache_dir=args.cache_dir, num_workers=args.num_workers, rank=rank,
                            world=world, saved_splits=saved_splits, verify_cache=args.verify_cache)
    train_pos = rd.cache.ok(rd.splits["train"], args.min_brain_fraction)
    val_pos = rd.cache.ok(rd.splits["val"], args.min_brain_fraction)
    if len(train_pos) == 0:
        why = "all of them are bad files" if len(rd.splits["train"]) else "no patient without a hemorrhage slice to train on"
        raise SystemExit(f"error: {args.data_dir}: no usable healthy training slices ({why})")
    val_healthy = val_pos[rd.index["any"][val_pos] == 0]
    if len(val_healthy) == 0:  # the validation loss, and so best_model_loss.pt, would be made of nothing
        raise SystemExit(f"error: {args.data_dir}: no usable healthy validation slices (the validation split has "
                         f"{len(rd.patients['val'])} patient(s); a run needs at least 2 healthy patients with usable slices)")
    return (rd, data.SliceDataset(rd.cache, rd.index, train_pos), data.SliceDataset(rd.cache, rd.index, val_healthy),
            data.SliceDataset(rd.cache, rd.index, val_pos))


def _same(key, saved, now):
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


def train_epoch(train_model, diffusion, train_set, sampler, optimizer, lr_schedule, args, device, epoch, rank,
                steps_per_epoch):
    """One epoch of patched denoising steps -> the losses of its steps. Every random draw of an epoch comes from
    (seed, epoch, rank), so a resumed run repeats it and the processes of a torchrun draw different patch boxes,
    timesteps and noise."""
    torch.manual_seed(args.seed + 1000 * epoch + rank)
    gen = torch.Generator().manual_seed(args.seed + 1000 * epoch + rank)
    if sampler is not None:
        sampler.set_epoch(epoch)
    per_process = len(sampler) if sampler is not None else len(train_set)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None,
                                         generator=gen if sampler is None else None, drop_last=per_process >= args.batch_size,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0)
    train_model.train()
    losses = []
    bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", disable=rank != 0, leave=False)
    for step, batch in enumerate(bar):
        if step >= steps_per_epoch:
            break
        x0 = batch["image"].to(device, non_blocking=True)
        if args.hflip:  # drawn from gen like every other draw, so a resumed epoch flips the same slices
            flip = (torch.rand(x0.shape[0], generator=gen) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        loss = diffusion.loss(x0, gen, network=train_model).loss
        if not torch.isfinite(loss):
            raise SystemExit(f"error: non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; {last_good(args)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(diffusion.network.parameters(), args.grad_clip)
        if not torch.isfinite(grad_norm):  # stepping would write NaN into every weight
            raise SystemExit(f"error: non-finite gradient norm at epoch {epoch}, step {step}; {last_good(args)}")
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return losses


@torch.no_grad()
def validation_loss(diffusion, dataset, args, device):
    """Patch loss on held-out healthy slices, with boxes, timesteps and noise fixed across epochs."""
    diffusion.network.eval()
    gen = torch.Generator().manual_seed(args.seed + 12345)
    total, count = 0.0, 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=0):
        x0 = batch["image"].to(device)
        total += diffusion.loss(x0, gen).loss.item() * x0.shape[0]
        count += x0.shape[0]
    return total / max(count, 1)


def save_diagnostics(path, diffusion, dataset, args, settings, device, epoch):
    """Input, noised patch, one-step reconstruction and the scored anomaly map (the same noise and median filter
    as the validation scoring) for a few val slices."""
    plt = runfiles.pyplot()
    picks = list(np.flatnonzero(dataset.labels == 0)[:3]) + list(np.flatnonzero(dataset.labels == 1)[:3])
    if not picks:
        return
    items = [dataset[i] for i in picks]
    x0 = torch.stack([it["image"] for it in items]).to(device)
    masks = torch.stack([it["mask"] for it in items]).to(device)
    n, p, t_show = len(items), args.patch_size, settings.eval_t[0]
    # Noise the box centred on the brain (or the image centre) so the panel shows a typical window.
    boxes = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        ys, xs = torch.nonzero(masks[i].cpu(), as_tuple=True)
        cy, cx = (int(ys.float().mean()), int(xs.float().mean())) if len(ys) else (args.image_size // 2,) * 2
        boxes[i] = torch.tensor([min(max(c - p // 2, 0), args.image_size - p) for c in (cy, cx)])
    diffusion.network.eval()
    with torch.no_grad():
        step = diffusion.loss(x0, torch.Generator().manual_seed(args.seed), boxes=boxes, t=torch.full((n,), t_show))
    shown = data.ArrayDataset([it["image"].numpy() for it in items], [it["mask"].numpy() for it in items],
                              dataset.positions[picks], dataset.scans[picks], dataset.heights[picks])
    scored = scoring.score_split(diffusion, shown, settings, seed=args.seed, keep_examples=0, keep_maps=True)
    maps = scored["maps"][np.searchsorted(scored["positions"], dataset.positions[picks])]  # back to the panel order
    # Only the box is trained and scored; outside it the network's output is unconstrained, so the
    # panel shows the input with the reconstructed box pasted in.
    inside = torch.zeros_like(x0, dtype=torch.bool)
    for i, (y, x) in enumerate(boxes.tolist()):
        inside[i, :, y:y + p, x:x + p] = True
    rebuilt = torch.where(inside, step.x0_hat.float(), x0)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    for i in range(n):
        kind = "hemorrhage" if items[i]["label"] else "healthy"
        panels = [(x0[i, 0], "input (brain window)"), (step.x_t[i, 0], f"patch noised at t={t_show}"),
                  (rebuilt[i, 0], "box rebuilt in one step"), (maps[i], f"scored map ({settings.residual} residual)")]
        for j, (img, title) in enumerate(panels):
            ax = axes[i, j]
            img = img.detach().cpu().float().numpy() if torch.is_tensor(img) else img
            im = ax.imshow(img, cmap="inferno" if j == 3 else "gray", vmin=0 if j == 3 else -1, vmax=None if j == 3 else 1)
            if j in (1, 2):
                y, x = boxes[i].tolist()
                ax.add_patch(plt.Rectangle((x, y), p, p, fill=False, ec="cyan", lw=1))
            if j == 3:
                fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(f"{kind}: {title}" if j == 0 else title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"Diagnostics after epoch {epoch} ({args.run_label})")
    fig.tight_layout()
    runfiles.save_figure(fig, path, dpi=80)
    plt.close(fig)


def validate(diffusion, val_loss_set, val_eval_set, args, settings, device, epoch, rank, world):
    """The validation loss (rank 0 alone, on all of the healthy val slices, with fixed draws: the same number
    whatever the world size) and, every eval_every epochs and after the last, the scoring evaluate.py runs, on the
    validation split (sharded over the processes). -> (val_loss or None off rank 0, score_split result or None)."""
    val_loss = validation_loss(diffusion, val_loss_set, args, device) if rank == 0 else None
    if val_loss is not None and not math.isfinite(val_loss):  # the last step left non-finite weights: do not save them
        raise SystemExit(f"error: non-finite validation loss at epoch {epoch}; {last_good(args)}")
    # Sliding-window scoring costs far more than an epoch of training on small sets; --eval_every thins it out.
    if epoch % args.eval_every and epoch != args.epochs:
        return val_loss, None
    return val_loss, scoring.score_split(diffusion, val_eval_set, settings, seed=args.seed, rank=rank, world=world)


def epoch_record(epoch, train_loss, val_loss, result, score, lr, train_time, eval_time, images, seed):
    """One entry of training_history.json."""
    metrics = (evaluate.slice_metrics(result["labels"], result["scores"][score], result["patients"], n_boot=200, seed=seed)
               if result else {"roc_auc": None, "roc_auc_ci": None, "auprc": None})
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
            "val_roc_auc": metrics["roc_auc"], "val_roc_auc_ci": metrics["roc_auc_ci"], "val_auprc": metrics["auprc"],
            "val_roc_auc_by_score": {name: evaluate.roc_auc(result["labels"], s) for name, s in result["scores"].items()} if result else None,
            "lr": lr, "train_seconds": train_time, "eval_seconds": eval_time, "images_per_second": images / max(train_time, 1e-9)}


def write_epoch(args, diffusion, history, result, best, optimizer, lr_schedule, world, splits):
    """best_model.pt (best val ROC-AUC; best val loss when the validation split has no bleed), best_model_loss.pt
    (best val loss), history, curves, plots, then last.pt: it is what --resume trusts, so it only names an epoch
    whose files are all written. Every checkpoint holds the run's splits (plain lists)."""
    record, out = history[-1], args.output_dir
    extra = {"args": vars(args) | {"world_size": world}, "epoch": record["epoch"], "metrics": record, "splits": splits,
             "best_by": "val_loss" if best["by_loss"] else "val_roc_auc"}
    auc = record["val_roc_auc"] if record["val_roc_auc"] is not None else -math.inf
    if auc > best["auc"] or (best["by_loss"] and record["val_loss"] < best["loss"]):
        best["auc"] = auc
        models.save_checkpoint(os.path.join(out, "best_model.pt"), diffusion, **extra)
    if record["val_loss"] < best["loss"]:
        best["loss"] = record["val_loss"]
        models.save_checkpoint(os.path.join(out, "best_model_loss.pt"), diffusion, **extra)
    runfiles.write_json(os.path.join(out, "training_history.json"), history)
    compare.plot_runs([history], [args.run_label], os.path.join(out, "training_curves.png"))
    if result is not None:
        evaluate.plot_scores(os.path.join(out, f"eval_scores_epoch_{record['epoch']}.png"), result["labels"],
                             result["scores"][args.score], title=f"validation, epoch {record['epoch']}, score {args.score}")
    models.save_checkpoint(os.path.join(out, "last.pt"), diffusion, **extra,
                           optimizer=optimizer.state_dict(), lr_schedule=lr_schedule.state_dict(), history=history)
    ci = record["val_roc_auc_ci"]
    auc_text = "n/a" if record["val_roc_auc"] is None else f"{record['val_roc_auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    print(f"epoch {record['epoch']:3d} | train loss {record['train_loss']:.4f} | val loss {record['val_loss']:.4f} | "
          f"val ROC-AUC ({args.score}) {auc_text} | {record['train_seconds']:.0f}s train, {record['eval_seconds']:.0f}s eval",
          flush=True)


def main(argv=None):
    args = get_args(argv)
    cohort.check_dataset(args.data_dir, None if args.dataset == "auto" else args.dataset)  # before an output dir is made
    # Under torchrun (world > 1) every process runs this script; rank 0 alone checks and writes --output_dir.
    rank, world, device = models.setup_distributed(args.device)
    if args.folds:
        train_cv(args, rank, world, device)
    else:
        train_one(args, rank, world, device)
    models.teardown_distributed(world)


def train_one(args, rank, world, device, splits=None):
    """One run in args.output_dir (a CV fold: with that fold's splits record), under the folder's lock."""
    lock = check_output_dir(args) if rank == 0 else None
    try:
        run(args, rank, world, device, splits)
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


def train_cv(args, rank, world, device):
    """--folds K: the CV run in --output_dir. folds.json is drawn from --seed when the run starts (an earlier one
    found there is kept and only extended with new patients) and read back as it is on --resume; then each fold
    (--fold k, or all in turn) is an ordinary run in RUN/fold_<k>/: resumed where it has a last.pt, started where
    it has none, skipped where its last.pt has reached --epochs."""
    lock = check_cv_dir(args) if rank == 0 else None
    try:
        index = cohort.load_index(args.data_dir, dataset=None if args.dataset == "auto" else args.dataset,
                                  cache_dir=args.cache_dir, num_workers=max(args.num_workers, 1))
        saved = cv.load_folds(args.output_dir)
        if saved is None and args.resume:
            raise SystemExit(f"error: {args.output_dir}: nothing to resume (no {cv.FOLDS_FILE})")
        if saved is not None and saved["k"] != args.folds:
            raise SystemExit(f"error: --folds {args.folds}: the run's {cv.FOLDS_FILE} has {saved['k']} folds")
        record = saved if args.resume else cv.assign_folds(index, args.folds, args.seed, saved)
        if rank == 0 and not args.resume:
            cv.write_folds(args.output_dir, record)
        layout = cohort.check_dataset(args.data_dir, None if args.dataset == "auto" else args.dataset)
        for fold in [args.fold] if args.fold is not None else range(args.folds):
            folder = cv.fold_dir(args.output_dir, fold)
            # the fold's own files were checked with the run folder's: a fold without last.pt (never started, or
            # killed in its first epoch) starts afresh
            resume = args.resume and os.path.exists(os.path.join(folder, "last.pt"))
            fold_args = argparse.Namespace(**vars(args) | {"output_dir": folder, "fold": fold, "resume": resume,
                                                           "overwrite": True})
            splits = cv.fold_splits_record(index, record, fold, data_dir=args.data_dir, dataset=layout)
            if rank == 0:
                print(f"fold {fold} of {args.folds}: test {len(splits['patients']['test'])} patients, val "
                      f"{len(splits['patients']['val'])}, train {len(splits['patients']['train'])} -> {fold_args.output_dir}")
            train_one(fold_args, rank, world, device, splits)
    finally:
        if lock:
            runfiles.release_output_dir(lock)


def open_run(args, run_config, settings, amp_dtype, device, rank, world, fold_splits=None):
    """The checkpoint to resume (or None), the run's frozen splits and its data sets: saved splits when resuming,
    else fold_splits (a CV fold's) or drawn from --seed, and written to splits.json, which evaluate.py and sweep.py
    then score exactly.
    -> (ckpt, splits record, (train, val-loss, val-eval) data sets, whether best_model.pt goes by val loss)."""
    is_main = rank == 0
    ckpt = check_resume(args, run_config, world) if args.resume else None
    saved_splits = ckpt.get("splits") if ckpt else None
    if ckpt and saved_splits is None:
        saved_splits = cohort.load_splits_record({}, os.path.join(args.output_dir, "last.pt"))
        if saved_splits is None and is_main:
            print(f"note: {args.output_dir} holds no saved splits (a run from before they were saved); the splits are "
                  "drawn from --seed again")
    saved_splits = saved_splits or fold_splits
    rd, *datasets = open_datasets(args, rank, world, saved_splits, run_config["input_hu"])
    splits = saved_splits or cohort.splits_record(rd.patients, seed=args.seed, data_dir=args.data_dir,
                                                dataset=cohort.check_dataset(args.data_dir, None if args.dataset == "auto" else args.dataset))
    train_set, val_eval_set = datasets[0], datasets[2]
    by_loss = not val_eval_set.labels.any()
    if is_main:
        if not args.resume:  # fixed now: evaluate.py and sweep.py score exactly these patients
            runfiles.write_json(os.path.join(args.output_dir, "splits.json"), splits)
        print(f"train: {len(train_set)} healthy slices | val: {len(val_eval_set)} slices "
              f"({int(val_eval_set.labels.sum())} hemorrhage) | device {device} x{world} | "
              f"precision {'bf16' if amp_dtype else 'fp32'}")
        if by_loss:
            print("warning: the validation split has no hemorrhage slice, so no ROC-AUC can be computed; best_model.pt "
                  "is chosen by validation loss (as best_model_loss.pt)", file=sys.stderr)
        if scoring.smoothing_note(settings.smooth_slices, args.eval_samples):
            print(scoring.smoothing_note(settings.smooth_slices, args.eval_samples))
    return ckpt, splits, datasets, by_loss


def run(args, rank, world, device, splits=None):
    """Train one model into args.output_dir; splits: a CV fold's splits record (else drawn from --seed, see open_run)."""
    is_main = rank == 0
    amp_dtype = models.autocast_dtype(args.precision, device)
    settings = scoring.ScoringSettings.from_flags(args)
    # the input representation is the training data's (its layout's windows), saved with the model
    layout = cohort.check_dataset(args.data_dir, None if args.dataset == "auto" else args.dataset)
    run_config = models.diffusion_config(
        models.model_config(pretrained=args.pretrained, in_channels=args.channels, image_size=args.image_size,
                            base_channels=args.base_channels, channel_mults=args.channel_mults, dropout=args.dropout,
                            hf_model=args.hf_model),
        patch_size=args.patch_size, input_hu=inputs.native_input_hu(layout, args.channels), precision=args.precision,
        train_noise=args.train_noise)
    ckpt, splits, (train_set, val_loss_set, val_eval_set), by_loss = open_run(args, run_config, settings, amp_dtype, device,
                                                                              rank, world, splits)

    torch.manual_seed(args.seed)
    diffusion = models.build_diffusion(run_config, device)
    model = diffusion.network
    models.check_flag(args.image_size % model.size_multiple == 0, "image_size", args.image_size,
                      f"must be a multiple of {model.size_multiple} for this model")
    if is_main:
        print(f"model: {args.run_label}, {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Each process trains on its own 1/world of the slices (reshuffled every epoch by set_epoch), so one optimiser
    # step sees world x batch_size slices; the learning rate is not scaled for that.
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed, drop_last=True) if world > 1 else None
    steps_per_epoch = min(len(train_set) // (args.batch_size * world) or 1, args.max_steps or math.inf)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    history, start_epoch = [], 1
    if ckpt:
        history, start_epoch, lr_schedule = restore(args, ckpt, model, optimizer, lr_schedule)
    best = {"auc": max([h["val_roc_auc"] for h in history if h["val_roc_auc"] is not None], default=-math.inf),
            "loss": min([h["val_loss"] for h in history], default=math.inf), "by_loss": by_loss}
    if args.resume and is_main:
        print(f"resuming {args.output_dir} after epoch {start_epoch - 1}")
    train_model = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if is_main:
        runfiles.write_json(os.path.join(args.output_dir, "args.json"),
                        vars(args) | {"world_size": world, "global_batch_size": args.batch_size * world})

    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        losses = train_epoch(train_model, diffusion, train_set, sampler, optimizer, lr_schedule, args, device, epoch, rank,
                             steps_per_epoch)
        train_time = time.time() - t0
        train_loss = float(np.mean(losses))
        if world > 1:  # the mean over all processes' steps, not rank 0's alone
            total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            train_loss = (total[0] / total[1]).item()
        t1 = time.time()
        val_loss, result = validate(diffusion, val_loss_set, val_eval_set, args, settings, device, epoch, rank, world)
        if not is_main:
            continue
        history.append(epoch_record(epoch, train_loss, val_loss, result, args.score, lr_schedule.get_last_lr()[0],
                                    train_time, time.time() - t1, len(losses) * args.batch_size * world, args.seed))
        if result is not None:
            save_diagnostics(os.path.join(args.output_dir, f"diagnostics_epoch_{epoch}.png"), diffusion, val_eval_set,
                             args, settings, device, epoch)
        write_epoch(args, diffusion, history, result, best, optimizer, lr_schedule, world, splits)
    if is_main:
        chosen = f"val ROC-AUC {best['auc']:.3f}" if not by_loss else f"val loss {best['loss']:.4f} (no bleed in val)"
        print(f"done: best {chosen}; outputs in {args.output_dir}")


if __name__ == "__main__":
    models.run_script(main)
