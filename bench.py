"""Speed of pDDPM scoring and training: slices/s per scoring mode, steps/s, GFLOPs.

    python bench.py                                   # small CPU run, a few minutes
    python bench.py --image_size 256 --base_channels 64 --patch_size 64 --stride 32 \
        --device cuda --slices 64 --compile --peak_tflops 989    # H100 dense bf16 peak

Every mode scores the same phantom slices with the same model, so its ROC-AUC is printed
beside its speed: a speed-up that changes the result shows up here. The model is trained for
a few steps first (--train_steps), which also gives the training figures; a random network
would make every ROC-AUC meaningless.

`naive` is the spec's pipeline (one window, one forward pass, in a Python loop). It exists
only here, as the reference: users run `batched` and its options through evaluate.py.
"""
import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch

import data
import evaluate
import models


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--base_channels", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--eval_t", type=int, default=150)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--context", type=int, default=None, help="context crop for the crop mode (default 2 x patch_size)")
    p.add_argument("--slices", type=int, default=16, help="phantom slices scored per mode (half with a bleed)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; the median is reported")
    p.add_argument("--train_steps", type=int, default=200, help="training steps before scoring (also timed)")
    p.add_argument("--batch_size", type=int, default=16, help="training batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak (e.g. bf16 dense) to report the fraction achieved")
    p.add_argument("--data_dir", default=None, help="phantom or real data; default: a fresh phantom in a temp dir")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def timed(fn, repeats, device):
    """Median wall time of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def load_slices(args, device):
    """Equal numbers of healthy and hemorrhage slices, through the same loading path as training."""
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = tempfile.mkdtemp(prefix="ctpddpm_bench_")
        data.write_phantom(data_dir, patients=16, slices=10, size=args.image_size, seed=args.seed)
    index = data.load_index(data_dir, num_workers=0)
    positions = np.arange(len(index["id"]))
    cache = data.prepare_slices(data_dir, index, positions, args.image_size, args.channels, num_workers=0)
    ok = cache.ok(positions)
    rng = np.random.default_rng(args.seed)
    bleed_patients = set(index["patient"][ok][index["any"][ok] == 1])
    # Train on slices of patients without any bleed, score slices of the others.
    train_pos = ok[~np.isin(index["patient"][ok], list(bleed_patients))]
    held = ok[np.isin(index["patient"][ok], list(bleed_patients))]
    pos, neg = held[index["any"][held] == 1], held[index["any"][held] == 0]
    k = min(args.slices // 2, len(pos), len(neg))
    score_pos = np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)])
    images = torch.from_numpy(cache.images[score_pos].astype(np.float32)).to(device)
    masks = torch.from_numpy(cache.masks[score_pos].astype(bool)).to(device)
    labels = index["any"][score_pos]
    train_images = torch.from_numpy(cache.images[train_pos].astype(np.float32))
    return images, masks, labels, score_pos, train_images


def bench_training(model, scheduler, train_images, args, device, amp_dtype=None):
    """Steps/s of the real training step (patched noising + loss + AdamW)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()

    def step():
        idx = torch.randint(0, len(train_images), (args.batch_size,), generator=gen)
        x0 = train_images[idx].to(device)
        boxes = models.random_boxes(len(idx), args.image_size, args.patch_size, gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        x_t = models.noise_boxes(x0, boxes, args.patch_size, t, scheduler, torch.randn(x0.shape, generator=gen).to(device))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            x0_hat = model(x_t, t)
        loss = models.patch_loss(x0_hat.float(), x0, boxes, args.patch_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        last_loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.eval()
    return {"steps_per_s": args.train_steps / seconds, "images_per_s": args.train_steps * args.batch_size / seconds,
            "final_loss": last_loss}


def main(argv=None):
    args = get_args(argv)
    device = models.pick_device(args.device)
    torch.manual_seed(args.seed)
    images, masks, labels, positions, train_images = load_slices(args, device)
    config = {"kind": "scratch", "in_channels": args.channels, "base_channels": args.base_channels, "image_size": args.image_size}
    model = models.build_model(config).to(device)
    scheduler = models.make_scheduler()
    gflops = models.count_flops(model, args.image_size, args.channels) / 1e9
    train = bench_training(model, scheduler, train_images, args, device)
    print(f"device {device} | image {args.image_size}^2 | base_channels {args.base_channels} | patch {args.patch_size} "
          f"stride {args.stride} | {gflops:.2f} GFLOPs per forward | {len(labels)} slices ({int(labels.sum())} hemorrhage)")
    print(f"training: {train['steps_per_s']:.2f} steps/s, {train['images_per_s']:.1f} images/s "
          f"(batch {args.batch_size}, {args.train_steps} steps, final loss {train['final_loss']:.4f})")

    seeds = [args.seed * 1_000_003 + int(p) for p in positions]
    base = dict(patch_size=args.patch_size, stride=args.stride, timesteps=[args.eval_t], seeds=seeds, brain_masks=masks)
    context = args.context or 2 * args.patch_size
    bf16 = torch.bfloat16
    modes = {
        "naive": dict(eval_batch_size=1),
        "batched": dict(eval_batch_size=args.eval_batch_size),
        "batched+channels_last": dict(eval_batch_size=args.eval_batch_size, channels_last=True),
        "batched+bf16": dict(eval_batch_size=args.eval_batch_size, autocast_dtype=bf16),
        "batched+bf16+channels_last": dict(eval_batch_size=args.eval_batch_size, autocast_dtype=bf16, channels_last=True),
        "batched+skip_outside_mask": dict(eval_batch_size=args.eval_batch_size, skip_outside_mask=True),
        f"batched+context{context}": dict(eval_batch_size=args.eval_batch_size, context=context),
        f"batched+skip+context{context}": dict(eval_batch_size=args.eval_batch_size, skip_outside_mask=True, context=context),
        f"batched+skip+context{context}+bf16": dict(eval_batch_size=args.eval_batch_size, skip_outside_mask=True,
                                                     context=context, autocast_dtype=bf16, channels_last=True),
    }
    scoring_model = {name: model for name in modes}
    if args.compile:
        compiled = torch.compile(model)
        modes["batched+compile"] = dict(eval_batch_size=args.eval_batch_size)
        scoring_model["batched+compile"] = compiled

    results = {}
    naive_maps = None
    n_windows_full = len(models.window_grid(args.image_size, args.patch_size, args.stride))
    for name, options in modes.items():
        def run():
            return models.anomaly_maps(scoring_model[name], images, scheduler, **base, **options)
        # the naive loop is slow; one timed repeat is enough to rank it
        seconds, maps = timed(run, 1 if name == "naive" else args.repeats, device)
        scores = models.slice_scores(maps, masks)
        naive_maps = maps if name == "naive" else naive_maps
        results[name] = {"slices_per_s": len(labels) / seconds,
                         "roc_auc": {k: evaluate.roc_auc(labels, v) for k, v in scores.items()},
                         "max_abs_map_diff_vs_naive": float((maps - naive_maps).abs().max())}
    naive_speed = results["naive"]["slices_per_s"]
    score_names = list(results["naive"]["roc_auc"])
    print(f"\nanomaly maps: {n_windows_full} windows per slice, median of {args.repeats} repeats after warm-up")
    header = f"{'mode':38s} {'slices/s':>9s} {'x naive':>8s} " + " ".join(f"{'AUC ' + s:>15s}" for s in score_names) + f" {'max|dmap|':>10s}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        r["speedup_vs_naive"] = r["slices_per_s"] / naive_speed
        aucs = " ".join(f"{(r['roc_auc'][s] if r['roc_auc'][s] is not None else float('nan')):15.3f}" for s in score_names)
        print(f"{name:38s} {r['slices_per_s']:9.2f} {r['speedup_vs_naive']:8.1f} {aucs} {r['max_abs_map_diff_vs_naive']:10.2e}")
    if args.peak_tflops:
        achieved = results["batched+bf16+channels_last"]["slices_per_s"] * n_windows_full * gflops / 1e3
        print(f"\nbatched+bf16: {achieved:.1f} TFLOP/s = {100 * achieved / args.peak_tflops:.1f}% of the given peak {args.peak_tflops} TFLOP/s")
    report = {"modes": results, "train": train, "gflops_per_forward": gflops, "windows_per_slice": n_windows_full,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "settings": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
