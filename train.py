"""Train a patched diffusion model (pDDPM) on healthy head-CT slices.

    python train.py --data_dir DATA --output_dir runs/scratch
    python train.py --data_dir DATA --output_dir runs/pre --pretrained --hf_model google/ddpm-ema-celebahq-256
    torchrun --nproc_per_node=4 train.py --data_dir DATA ...        (see README, "Multiple GPUs")

Each step: take a batch of healthy slices, noise one random patch_size box per slice at a
random timestep, and teach the network to rebuild the clean box from the noised box plus the
clean surroundings (loss on the box only). Each epoch: validation loss on held-out healthy
slices, then the same sliding-window anomaly scoring that evaluate.py runs, on the
validation split (patients never seen in training), giving the ROC-AUC used to keep
best_model.pt. The test split is left alone: evaluate.py reports it once.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import compare
import data
import evaluate
import models


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=None,
                   help="RSNA folder (stage_2_train/ + stage_2_train.csv), CT-ICH folder, or a phantom from `python phantom.py`")
    g.add_argument("--dataset", default="auto", choices=["auto", "rsna", "ctich"])
    g.add_argument("--cache_dir", default=None, help="slice/index cache (default: next to the data, or ~/.cache/ct-pddpm)")
    g.add_argument("--output_dir", default="./checkpoints")
    g.add_argument("--num_samples", type=int, default=2000, help="healthy training slices")
    g.add_argument("--eval_samples", type=evaluate.parse_eval_samples, default=50,
                   help="validation slices per class for the per-epoch ROC-AUC, or 'all'")
    g.add_argument("--image_size", type=int, default=256)
    g.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="1 = brain window, 3 = brain/subdural/bone (default: 1, or 3 with --pretrained)")
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--min_brain_fraction", type=float, default=0.0,
                   help="use only slices whose intracranial mask covers at least this fraction of the image, "
                        "in training and evaluation (leaves out face, skull-base and vertex slices; see README)")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", action="store_true", help="fine-tune a diffusers UNet2DModel instead of training the scratch UNet")
    g.add_argument("--hf_model", default="google/ddpm-ema-celebahq-256", help="hub id or local directory (offline clusters)")
    g.add_argument("--base_channels", type=int, default=64, help="width of the scratch UNet")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=12)
    g.add_argument("--batch_size", type=int, default=16,
                   help="slices per process per step; under torchrun one step sees nproc x batch_size slices (the global batch)")
    g.add_argument("--lr", type=float, default=None,
                   help="default 1e-4 scratch, 1e-5 pretrained; not scaled with the number of processes")
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=False,
                   help="flip each training slice left-right with probability 1/2 (heads are near-symmetric; "
                        "doubles what a small healthy set shows the model)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    g.add_argument("--device", default="auto")
    g = p.add_argument_group("anomaly scoring (shared with evaluate.py)")
    evaluate.add_scoring_args(g)
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue the run in --output_dir from last.pt")
    g.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --output_dir")
    g.add_argument("--run_label", default=None, help="label for plots (default: built from the settings)")
    g.add_argument("--eval_every", type=int, default=1, help="score the validation split every N epochs (and after the last)")
    g.add_argument("--max_steps", type=int, default=None, help="stop each epoch after this many steps (smoke tests)")
    args = p.parse_args(argv)
    if not args.data_dir:
        raise SystemExit("error: --data_dir is required: point it at the RSNA data (stage_2_train/ + stage_2_train.csv, "
                         "see README 'Using RSNA'), a CT-ICH folder, or a phantom made by `python phantom.py --out DIR`")
    if args.channels is None:
        args.channels = 3 if args.pretrained else 1
    if args.lr is None:
        args.lr = 1e-5 if args.pretrained else 1e-4
    if args.run_label is None:
        kind = f"pretrained {os.path.basename(os.path.normpath(args.hf_model))}" if args.pretrained else f"scratch bc{args.base_channels}"
        args.run_label = f"{kind} {args.channels}ch {args.image_size}px"
    return args


def last_good(args):
    """End of the message when training stops on a non-finite value: what is left to resume from."""
    last = os.path.join(args.output_dir, "last.pt")
    if not os.path.exists(last):
        return "no epoch had finished, so no checkpoint was written"
    return f"the last good checkpoint, {last}, is untouched (train.py --resume continues from it)"


def check_output_dir(args):
    """Refuse to silently overwrite a finished run."""
    if args.resume:
        if not os.path.exists(os.path.join(args.output_dir, "last.pt")):
            raise SystemExit(f"error: {args.output_dir}: nothing to resume (no last.pt)")
        for name in os.listdir(args.output_dir):
            if name.endswith(".tmp"):  # half-written by the run that was killed (writes go to *.tmp, then a rename)
                os.remove(os.path.join(args.output_dir, name))
        return
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        raise SystemExit(f"error: {args.output_dir}: output dir is not empty; "
                         "use --resume to continue that run or --overwrite to replace it")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        probe = os.path.join(args.output_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: {args.output_dir}: cannot write output dir ({e.strerror})")


@torch.no_grad()
def validation_loss(model, loader, scheduler, args, device, amp_dtype):
    """Patch loss on held-out healthy slices, with boxes, timesteps and noise fixed across epochs."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 12345)
    total, count = 0.0, 0
    for batch in loader:
        x0 = batch["image"].to(device)
        n = x0.shape[0]
        boxes = models.random_boxes(n, args.image_size, args.patch_size, gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = models.noise_boxes(x0, boxes, args.patch_size, t.to(device), scheduler, noise.to(device))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            x0_hat = model(x_t, t.to(device))
        total += models.patch_loss(x0_hat.float(), x0, boxes, args.patch_size).item() * n
        count += n
    return total / max(count, 1)


def save_diagnostics(path, model, dataset, index, scheduler, args, device, epoch, amp_dtype):
    """Input, noised patch, one-step reconstruction and anomaly map for a few val slices."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = index["any"][dataset.positions]
    picks = list(np.flatnonzero(labels == 0)[:3]) + list(np.flatnonzero(labels == 1)[:3])
    if not picks:
        return
    items = [dataset[i] for i in picks]
    x0 = torch.stack([it["image"] for it in items]).to(device)
    masks = torch.stack([it["mask"] for it in items]).to(device)
    n, t_show = len(items), args.eval_t[0]
    # Noise the box centred on the brain (or the image centre) so the panel shows a typical window.
    boxes = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        ys, xs = torch.nonzero(masks[i].cpu(), as_tuple=True)
        cy, cx = (int(ys.float().mean()), int(xs.float().mean())) if len(ys) else (args.image_size // 2,) * 2
        boxes[i, 0] = min(max(cy - args.patch_size // 2, 0), args.image_size - args.patch_size)
        boxes[i, 1] = min(max(cx - args.patch_size // 2, 0), args.image_size - args.patch_size)
    gen = torch.Generator().manual_seed(args.seed)
    t = torch.full((n,), t_show, dtype=torch.long)
    x_t = models.noise_boxes(x0, boxes, args.patch_size, t.to(device), scheduler, torch.randn(x0.shape, generator=gen).to(device))
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        x0_hat = model(x_t, t.to(device)).float()
    # Only the box is trained and scored; outside it the network's output is unconstrained, so the
    # panel shows the input with the reconstructed box pasted in.
    inside = torch.zeros_like(x0, dtype=torch.bool)
    for i, (y, x) in enumerate(boxes.tolist()):
        inside[i, :, y:y + args.patch_size, x:x + args.patch_size] = True
    x0_hat = torch.where(inside, x0_hat, x0)
    maps = models.anomaly_maps(model, x0, scheduler, **evaluate.map_settings(args), seeds=[args.seed + int(it["position"]) for it in items],
                               brain_masks=masks, autocast_dtype=amp_dtype)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    for i in range(n):
        kind = "hemorrhage" if items[i]["label"] else "healthy"
        panels = [(x0[i, 0], "input (brain window)"), (x_t[i, 0], f"patch noised at t={t_show}"),
                  (x0_hat[i, 0], "box rebuilt in one step"), (maps[i], "anomaly map: " + evaluate.RESIDUAL_LABELS[args.residual])]
        for j, (img, title) in enumerate(panels):
            ax = axes[i, j]
            cmap, vmin, vmax = ("inferno", 0, None) if j == 3 else ("gray", -1, 1)
            im = ax.imshow(img.detach().cpu().float().numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
            if j in (1, 2):
                y, x = boxes[i].tolist()
                ax.add_patch(plt.Rectangle((x, y), args.patch_size, args.patch_size, fill=False, ec="cyan", lw=1))
            if j == 3:
                fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(f"{kind}: {title}" if j == 0 else title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"Diagnostics after epoch {epoch} ({args.run_label})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = get_args(argv)
    # Under torchrun (world > 1) every process runs this script; rank 0 alone checks and writes --output_dir.
    rank, world, device = evaluate.setup_distributed(args.device)
    is_main = rank == 0
    amp_dtype = models.autocast_dtype(args.precision, device)

    # ---- data: patient-level splits; healthy slices only for training -----------------------
    def build():
        if is_main:
            check_output_dir(args)
        index = data.load_index(args.data_dir, dataset=None if args.dataset == "auto" else args.dataset,
                                cache_dir=args.cache_dir, num_workers=args.num_workers)
        splits = data.make_splits(index, args.seed, args.num_samples, args.eval_samples)
        needed = np.concatenate([splits["train"], splits["val"]])
        cache = data.prepare_slices(args.data_dir, index, needed, args.image_size, args.channels,
                                    cache_dir=args.cache_dir, num_workers=args.num_workers)
        return index, splits, cache
    index, splits, cache = evaluate.in_turn(build, rank, world)  # rank 0 first: it builds the caches, the others read them
    train_pos = cache.ok(splits["train"], args.min_brain_fraction)
    val_pos = cache.ok(splits["val"], args.min_brain_fraction)
    if len(train_pos) == 0:
        why = "all of them are bad files" if len(splits["train"]) else "no patient without a hemorrhage slice to train on"
        raise SystemExit(f"error: {args.data_dir}: no usable healthy training slices ({why})")
    val_healthy = val_pos[index["any"][val_pos] == 0]
    train_set = data.SliceDataset(cache, index, train_pos)
    val_loss_set = data.SliceDataset(cache, index, val_healthy)
    val_eval_set = data.SliceDataset(cache, index, val_pos)
    if is_main:
        print(f"train: {len(train_pos)} healthy slices | val: {len(val_pos)} slices "
              f"({int(index['any'][val_pos].sum())} hemorrhage) | device {device} x{world} | "
              f"precision {'bf16' if amp_dtype else 'fp32'}")
        if evaluate.smoothing_note(args.smooth_slices, args.eval_samples):
            print(evaluate.smoothing_note(args.smooth_slices, args.eval_samples))

    # ---- model, optimiser, cosine LR over all steps --------------------------------------------
    torch.manual_seed(args.seed)
    config = models.model_config(args)
    model = models.build_model(config).to(device)
    if is_main:
        print(f"model: {args.run_label}, {sum(p.numel() for p in model.parameters()):,} parameters")
    scheduler = models.make_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Each process trains on its own 1/world of the slices (reshuffled every epoch by set_epoch), so one optimiser
    # step sees world x batch_size slices; the learning rate is not scaled for that.
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed, drop_last=True) if world > 1 else None
    steps_per_epoch = len(train_set) // (args.batch_size * world) or 1
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    history, start_epoch, best_auc, best_loss = [], 1, -math.inf, math.inf
    if args.resume:
        last = os.path.join(args.output_dir, "last.pt")
        # load_checkpoint refuses, in one line naming the file, a truncated file, pickled objects (weights_only)
        # and weights that do not fit their config; the run's model must then be the one this command builds.
        _, saved_config, ckpt = models.load_checkpoint(last)
        # hf_model is left out: it only says where the starting weights came from (a path may move); last.pt holds them
        changed = [f"{key} {saved_config.get(key)!r}, now {value!r}" for key, value in config.items()
                   if key != "hf_model" and saved_config.get(key) != value]
        if changed:
            raise SystemExit(f"error: {last}: the run was trained with another model ({'; '.join(changed)}); "
                             "resume with the run's own settings (see args.json next to it)")
        missing = [key for key in ("optimizer", "lr_schedule", "history", "epoch") if key not in ckpt]
        if missing:
            raise SystemExit(f"error: {last}: not a resumable checkpoint (no {', '.join(missing)})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_schedule.load_state_dict(ckpt["lr_schedule"])
        history = ckpt["history"]
        start_epoch = ckpt["epoch"] + 1
        best_auc = max([h["val_roc_auc"] for h in history if h["val_roc_auc"] is not None], default=-math.inf)
        best_loss = min([h["val_loss"] for h in history], default=math.inf)
        if is_main:
            print(f"resuming {args.output_dir} after epoch {ckpt['epoch']}")
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if is_main:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": world, "global_batch_size": args.batch_size * world}, f, indent=2)
    loader_kw = dict(num_workers=args.num_workers, pin_memory=device.type == "cuda",
                     persistent_workers=args.num_workers > 0)
    # the scoring evaluate.py runs, with this run's flags
    val_settings = evaluate.map_settings(args) | {"median_size": args.median_size, "autocast_dtype": amp_dtype,
                                                  "score": args.score, "smooth_slices": args.smooth_slices}

    for epoch in range(start_epoch, args.epochs + 1):
        # Every random draw of an epoch comes from (seed, epoch, rank), so a resumed run repeats it and the
        # processes of a torchrun draw different patch boxes, timesteps and noise.
        torch.manual_seed(args.seed + 1000 * epoch + rank)
        gen = torch.Generator().manual_seed(args.seed + 1000 * epoch + rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
        per_process = len(sampler) if sampler is not None else len(train_set)
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None,
                                             generator=gen if sampler is None else None, drop_last=per_process >= args.batch_size,
                                             **loader_kw)
        train_model.train()
        t0, losses = time.time(), []
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", disable=not is_main, leave=False)
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            x0 = batch["image"].to(device, non_blocking=True)
            n = x0.shape[0]
            if args.hflip:  # drawn from gen like every other draw, so a resumed epoch flips the same slices
                flip = (torch.rand(n, generator=gen) < 0.5).to(device)
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            boxes = models.random_boxes(n, args.image_size, args.patch_size, gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            x_t = models.noise_boxes(x0, boxes, args.patch_size, t, scheduler, noise)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                x0_hat = train_model(x_t, t)
            loss = models.patch_loss(x0_hat.float(), x0, boxes, args.patch_size)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; {last_good(args)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if not torch.isfinite(grad_norm):  # stepping would write NaN into every weight
                raise SystemExit(f"error: non-finite gradient norm at epoch {epoch}, step {step}; {last_good(args)}")
            optimizer.step()
            lr_schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_time = time.time() - t0
        train_loss = float(np.mean(losses))
        if world > 1:  # the mean over all processes' steps, not rank 0's alone
            total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            train_loss = (total[0] / total[1]).item()

        # ---- per-epoch evaluation: the same scoring evaluate.py runs, on the validation split ----
        # The validation loss is cheap (one forward per slice) and uses fixed draws: rank 0 computes it alone, on
        # all of the set, so it is the same number whatever the world size. The scoring is sharded over the processes.
        val_loss = None
        if is_main:
            val_loader = torch.utils.data.DataLoader(val_loss_set, batch_size=args.batch_size, num_workers=0)
            val_loss = validation_loss(model, val_loader, scheduler, args, device, amp_dtype)
        if val_loss is not None and not math.isfinite(val_loss):  # the last step left non-finite weights: do not save them
            raise SystemExit(f"error: non-finite validation loss at epoch {epoch}; {last_good(args)}")
        t1 = time.time()
        # Sliding-window scoring costs far more than an epoch of training on small sets; --eval_every
        # thins it out (the last epoch is always scored).
        scored = epoch % args.eval_every == 0 or epoch == args.epochs
        result = evaluate.score_split(model, val_eval_set, scheduler, val_settings, device, seed=args.seed,
                                      rank=rank, world=world) if scored else None
        eval_time = time.time() - t1
        if not is_main:
            continue
        metrics = evaluate.slice_metrics(result["labels"], result["scores"][args.score], result["patients"], n_boot=200,
                                         seed=args.seed) if scored else {"roc_auc": None, "roc_auc_ci": None, "auprc": None}
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                  "val_roc_auc": metrics["roc_auc"], "val_roc_auc_ci": metrics["roc_auc_ci"], "val_auprc": metrics["auprc"],
                  "val_roc_auc_by_score": {name: evaluate.roc_auc(result["labels"], s) for name, s in result["scores"].items()} if scored else None,
                  "lr": lr_schedule.get_last_lr()[0], "train_seconds": train_time, "eval_seconds": eval_time,
                  "images_per_second": len(losses) * args.batch_size * world / max(train_time, 1e-9)}
        history.append(record)
        extra = {"args": vars(args) | {"world_size": world}, "epoch": epoch, "metrics": record}
        auc = record["val_roc_auc"] if record["val_roc_auc"] is not None else -math.inf
        if auc > best_auc:
            best_auc = auc
            models.save_checkpoint(os.path.join(args.output_dir, "best_model.pt"), model, config, **extra)
        if val_loss < best_loss:
            best_loss = val_loss
            models.save_checkpoint(os.path.join(args.output_dir, "best_model_loss.pt"), model, config, **extra)
        # last.pt last: it is what --resume trusts, so it only names an epoch whose files are all written.
        with open(os.path.join(args.output_dir, "training_history.json.tmp"), "w") as f:
            json.dump(history, f, indent=2)
        os.replace(os.path.join(args.output_dir, "training_history.json.tmp"), os.path.join(args.output_dir, "training_history.json"))
        compare.plot_runs([history], [args.run_label], os.path.join(args.output_dir, "training_curves.png"))
        if scored:
            evaluate.plot_scores(os.path.join(args.output_dir, f"eval_scores_epoch_{epoch}.png"), result["labels"],
                                 result["scores"][args.score], title=f"validation, epoch {epoch}, score {args.score}")
            save_diagnostics(os.path.join(args.output_dir, f"diagnostics_epoch_{epoch}.png"), model, val_eval_set, index,
                             scheduler, args, device, epoch, amp_dtype)
        models.save_checkpoint(os.path.join(args.output_dir, "last.pt"), model, config, **extra,
                               optimizer=optimizer.state_dict(), lr_schedule=lr_schedule.state_dict(), history=history)
        ci = record["val_roc_auc_ci"]
        auc_text = "n/a" if record["val_roc_auc"] is None else f"{record['val_roc_auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        print(f"epoch {epoch:3d} | train loss {record['train_loss']:.4f} | val loss {val_loss:.4f} | "
              f"val ROC-AUC ({args.score}) {auc_text} | {train_time:.0f}s train, {eval_time:.0f}s eval", flush=True)

    if is_main:
        print(f"done: best val ROC-AUC {best_auc:.3f}; outputs in {args.output_dir}")
    if world > 1:
        # Leave together: rank 0 writes plots and checkpoints long after the others finish the last epoch, and a
        # rank that tears its process group down alone was seen to hang there once (gloo, CPU, a local CI run).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
