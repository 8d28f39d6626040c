"""Speed of pDDPM scoring and training: slices/s per scoring mode, steps/s, loader images/s, GFLOPs.

    python bench.py                                   # small CPU run, a few minutes
    python bench.py --image_size 128 --patch_size 32 --stride 16      # the CPU acceptance size
    python bench.py --image_size 256 --base_channels 64 --patch_size 64 --stride 32 \
        --device cuda --slices 64 --compile --peak_tflops 989    # H100 SXM dense bf16 peak
    python bench.py --scale 100000                    # the index at RSNA size: build, start-up, memory

Every mode scores the same phantom slices with the same model and the same noise, so its
ROC-AUC is printed beside its speed: a speed-up that changes the result shows up here. The
model is trained for a few steps first (--train_steps), which also gives the training figures;
a random network would make every ROC-AUC meaningless.

`naive` is the spec's pipeline (one window, one forward pass, in a Python loop, fp32). It exists
only here, as the reference: users run scoring.anomaly_maps through evaluate.py and train.py,
whose defaults are the `default` row. The other rows switch one option at a time so that what
each contributes can be read off.

Timing: a short warm-up run of every mode, then --repeats rounds in which every mode scores all
slices once, in turn; the median per mode is reported. Taking the modes in turn
spreads the load of a shared machine over all of them, instead of over whichever ran last.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import io
import os
import resource
import statistics
import tempfile
import time
import tracemalloc

import numpy as np
import scipy.stats
import torch

import cohort
import config
import data
import runfiles
import phantom
import readers
import inputs
import metrics
import models
import scoring


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--base_channels", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    # The scoring flags of train.py / evaluate.py, with their defaults: the `default` row is what they run.
    scoring.add_scoring_flags(p.add_argument_group("scoring (every row; naive and the other rows change only speed options)"))
    p.add_argument("--slices", type=int, default=16, help="phantom slices scored per mode (half with a bleed)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up; the median is reported")
    p.add_argument("--train_steps", type=int, default=400, help="training steps before scoring (also timed)")
    p.add_argument("--batch_size", type=int, default=16, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="training lr: higher than train.py's, so that a few hundred steps give a usable model")
    p.add_argument("--loader_images", type=int, default=2048, help="images read per loader measurement (0 = skip)")
    config.add_device_flags(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice). On a loaded machine, fewer threads than cores "
                        "avoids OpenMP threads waiting on each other, which penalises small forward passes most")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the default mode")
    p.add_argument("--time_torch_dropout", action="store_true",
                   help="also time the training step with torch's nn.Dropout (the step before models.Dropout), same "
                        "start, same steps, and print the ratio")
    p.add_argument("--profile_training", type=int, default=0, metavar="STEPS",
                   help="also profile this many more training steps (torch.profiler; they train the scored model further) and "
                        "print the operators by their own time")
    p.add_argument("--time_bootstrap", action="store_true",
                   help="also time the evaluation's patient bootstrap (1000 samples) against a loop of sklearn calls")
    p.add_argument("--modes", nargs="+", default=None,
                   help="time only these rows (names as printed, or 'default'); naive, the reference, always runs")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak (e.g. dense bf16) to report the fraction achieved")
    p.add_argument("--data_dir", default=None, help="phantom or real data; default: a fresh phantom in a temp dir")
    p.add_argument("--checkpoint", default=None,
                   help="score this trained model (train.py's best_model.pt, or --save_model's) instead of the briefly "
                        "trained one; its image size and channels are used. Training is still timed, on a fresh model")
    p.add_argument("--save_model", default=None, help="save the briefly trained model here (for --checkpoint)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("scale (instead of the speed table)")
    g.add_argument("--scale", type=int, default=None,
                   help="write a synthetic RSNA-layout folder of this many tiny DICOM files (with its label CSV) and time "
                        "the index build, the start-up on the unchanged folder, and the index's memory")
    g.add_argument("--scale_dir", default=None, help="where --scale writes its folder (default: a temp dir, removed after)")
    g.add_argument("--num_workers", type=int, default=2, help="--scale: processes writing files and reading headers")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# --scale: the index at RSNA size (752,803 files)

RSNA_FILES = 752_803
SCALE_SLICES_PER_SCAN = 32  # RSNA scans have ~35 slices


def write_scale_file(k, images):
    """Slice k of the --scale folder: a 16 x 16 px head (30 HU in air), patients of SCALE_SLICES_PER_SCAN slices."""
    hu = np.full((16, 16), -1000.0, np.float32)
    hu[3:13, 3:13] = 30.0
    patient, level = divmod(k, SCALE_SLICES_PER_SCAN)
    phantom.write_ct_dicom(os.path.join(images, f"ID_{k:09x}.dcm"), hu, patient_id=f"ID_p{patient:07d}",
                           study_uid=f"1.2.826.0.1.3680043.10.{patient}", series_uid=f"1.2.826.0.1.3680043.10.{patient}.1",
                           instance=level + 1, z=5.0 * level, spacing=0.5, slope=1.0, intercept=-1024.0)


def write_scale_folder(out, n, num_workers):
    """An RSNA-layout folder (stage_2_train/ + stage_2_train.csv) of n tiny DICOM files; every tenth patient has a
    bleed label on all its slices. Written once: a folder that already holds n files is reused."""
    images = os.path.join(out, cohort.LAYOUTS["rsna"][0])
    os.makedirs(images, exist_ok=True)
    if len(os.listdir(images)) != n:
        for ok, reason in readers.parallel_map(functools.partial(write_scale_file, images=images), list(range(n)),
                                               num_workers, "write"):
            if not ok:
                raise SystemExit(f"error: --scale_dir {out}: cannot write the files ({reason})")
    lines = ["ID,Label"]
    for k in range(n):
        bleed = (k // SCALE_SLICES_PER_SCAN) % 10 == 0
        lines += [f"ID_{k:09x}_{name},{int(bleed and name in ('any', 'subdural'))}" for name in cohort.LABELS]
    runfiles.write_atomically(os.path.join(out, cohort.LAYOUTS["rsna"][1]), lambda f: f.write("\n".join(lines).encode() + b"\n"))


def timed_index(out, num_workers, check_files=False):
    """(seconds, index) of one cohort.load_index call, its prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        index = cohort.load_index(out, num_workers=num_workers, check_files=check_files)
    return time.perf_counter() - start, index


def bench_scale(args):
    """--scale N: index build (files/s), start-up on the unchanged folder, index memory; linear extrapolation to
    RSNA's 752,803 files (both are one pass over the files: headers read, or files stat'ed)."""
    tmp = tempfile.TemporaryDirectory(prefix="ctpddpm_scale_") if args.scale_dir is None else None
    out = args.scale_dir or tmp.name
    start = time.perf_counter()
    write_scale_folder(out, args.scale, args.num_workers)
    written = time.perf_counter() - start
    for name in os.listdir(os.path.join(out, ".ctpddpm_cache")) if os.path.isdir(os.path.join(out, ".ctpddpm_cache")) else []:
        os.unlink(os.path.join(out, ".ctpddpm_cache", name))  # a fresh build every time
    build, index = timed_index(out, args.num_workers)
    startups = [timed_index(out, args.num_workers)[0] for _ in range(3)]
    checked = statistics.median(timed_index(out, args.num_workers, check_files=True)[0] for _ in range(3))
    tracemalloc.start()
    timed_index(out, args.num_workers)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n, factor = len(index["id"]), RSNA_FILES / args.scale
    report = {"files": args.scale, "indexed": n, "write_s": written, "build_s": build, "build_files_per_s": n / build,
              "startup_s": statistics.median(startups), "startup_check_files_s": checked, "index_bytes": sum(a.nbytes for a in index.values()),
              "startup_peak_bytes": peak, "rss_max_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    report["at_rsna"] = {"build_s": build * factor, "startup_s": report["startup_s"] * factor, "startup_check_files_s": checked * factor,
                         "index_bytes": report["index_bytes"] * factor, "startup_peak_bytes": peak * factor}
    print(f"scale: {args.scale} files written in {written:.0f} s; index build {build:.1f} s ({n / build:.0f} files/s, "
          f"{args.num_workers} workers); start-up on the unchanged folder {report['startup_s']:.2f} s (median of 3; "
          f"{checked:.2f} s with every file stat'ed, as --verify_cache does); "
          f"index {report['index_bytes'] / 2**20:.0f} MiB, start-up peak {peak / 2**20:.0f} MiB (tracemalloc)")
    a = report["at_rsna"]
    print(f"at RSNA size ({RSNA_FILES} files, x{factor:.2f}, linear): build {a['build_s'] / 60:.1f} min, start-up "
          f"{a['startup_s']:.1f} s ({a['startup_check_files_s']:.1f} s with every file stat'ed), index {a['index_bytes'] / 2**20:.0f} MiB, start-up peak {a['startup_peak_bytes'] / 2**20:.0f} MiB")
    if args.json:
        runfiles.write_json(args.json, report)
    return report




def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_slices(args, data_dir, input_hu):
    """A phantom (or --data_dir) opened as a training run opens it (seed 0 splits): healthy slices of the training
    patients (training), and the hemorrhage slices of the held-out patients against as many of their healthy
    slices, taken at the same heights in the head (scoring). Matching heights keeps the AUC about bleeds: the top
    and bottom of a head give larger errors than its middle, where most bleeds are."""
    if args.data_dir is None:
        phantom.write_phantom(data_dir, patients=24, slices=10, size=args.image_size, seed=args.seed)
    run = config.RunConfig(data_dir=data_dir, image_size=args.image_size, seed=args.seed, num_samples="all",
                           eval_samples="all", num_workers=0)
    rd = data.open_run_data(run, input_hu, ("train", "val", "test"))
    rng = np.random.default_rng(args.seed)
    held_out = rd.cache.ok(np.concatenate([rd.splits["val"], rd.splits["test"]]))
    pos, neg = held_out[rd.index["any"][held_out] == 1], held_out[rd.index["any"][held_out] == 0]
    k = min(args.slices // 2, len(pos), len(neg))
    if k == 0 or len(rd.cache.ok(rd.splits["train"])) == 0:
        raise SystemExit(f"error: {data_dir}: need hemorrhage slices and at least two patients without a bleed")
    pos = rng.choice(pos, k, replace=False)
    height = cohort.relative_heights(rd.index)
    neg_left, matched = list(rng.permutation(neg)), []
    for p in pos:  # the nearest height among the healthy slices not taken yet
        j = int(np.argmin([abs(height[n] - height[p]) for n in neg_left]))
        matched.append(neg_left.pop(j))
    return rd.index, rd.cache, rd.cache.ok(rd.splits["train"]), np.concatenate([pos, matched])


def bench_training(diffusion, train_images, args, device, profile=0):
    """Steps/s of train.py's step (models.Diffusion.loss under its precision, clipped AdamW); profile: also profile
    that many steps after the timed ones."""
    model = diffusion.network
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()

    def step():
        x0 = train_images[torch.randint(0, len(train_images), (args.batch_size,), generator=gen)].to(device)
        loss = diffusion.loss(x0, gen).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    step()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - t0
    if profile:
        profile_steps(step, profile, device)
    model.eval()
    return {"steps_per_s": args.train_steps / seconds, "images_per_s": args.train_steps * args.batch_size / seconds,
            "seconds": seconds, "steps": args.train_steps, "batch_size": args.batch_size,
            "precision": "bf16" if diffusion.autocast_dtype is not None else "fp32", "final_loss": loss.item()}


def time_training(fresh, train_images, args, device):
    """bench_training of the fresh model (and, with --time_torch_dropout, first of a copy with torch's dropout), printed."""
    torch_dropout = bench_training(with_torch_dropout(fresh), train_images, args, device) if args.time_torch_dropout else None
    train = bench_training(fresh, train_images, args, device, profile=args.profile_training)
    print(f"training ({train['precision']}): {train['steps_per_s']:.2f} steps/s, {train['images_per_s']:.1f} images/s "
          f"(batch {args.batch_size}, {args.train_steps} steps, final loss {train['final_loss']:.4f})")
    if torch_dropout:
        train["torch_dropout"] = torch_dropout
        print(f"  with torch's nn.Dropout: {torch_dropout['steps_per_s']:.2f} steps/s (final loss "
              f"{torch_dropout['final_loss']:.4f}): models.Dropout is {train['steps_per_s'] / torch_dropout['steps_per_s']:.2f}x")
    return train


def profile_steps(step, steps, device):
    """Print where `steps` training steps spend their time: torch.profiler's operators by self time (the top 12)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        sync(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of {steps} training steps:\n" + profiler.key_averages().table(sort_by=sort_by, row_limit=12))


def with_torch_dropout(diffusion):
    """A copy of diffusion (same weights) whose network drops out with torch's nn.Dropout, as training did before
    models.Dropout: the reference of --time_torch_dropout."""
    reference = copy.deepcopy(diffusion)
    for module in reference.network.modules():
        if isinstance(module, models.Dropout):
            module.__class__ = torch.nn.Dropout
    return reference


def bench_loader(cache, index, positions, args, device):
    """Images/s of the training input pipeline alone: DataLoader over data.SliceDataset (memory-mapped
    slice cache), random order, after the first batch (worker start-up is not counted)."""
    dataset = data.SliceDataset(cache, index, positions)
    results = {}
    for workers in (0, 1, 2):
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=args.loader_images,
                                                 generator=torch.Generator().manual_seed(args.seed))
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                                             pin_memory=device.type == "cuda")
        batches = iter(loader)
        next(batches)
        t0, n = time.perf_counter(), 0
        for batch in batches:
            n += len(batch["image"].to(device, non_blocking=True))
        sync(device)
        results[f"num_workers={workers}"] = n / (time.perf_counter() - t0)
    return results


def bench_bootstrap(result, score, n_boot=1000):
    """The evaluation's patient bootstrap (metrics.slice_metrics, every sample's ROC-AUC and AP at once) against the
    same bootstrap calling sklearn once per sample and metric, as evaluate.py did before: seconds each, and the
    largest difference of their 95 % CIs, on a mode's score_split result (its `score`), repeated 10 times over as
    many patients for an evaluation's size."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    labels, scores = np.tile(result["labels"], 10), np.tile(result["scores"][score], 10)
    patients = np.concatenate([[f"{p}/{k}" for p in result["patients"]] for k in range(10)])
    t0 = time.perf_counter()
    fast = metrics.slice_metrics(labels, scores, patients, n_boot=n_boot, seed=0)
    t1 = time.perf_counter()
    codes = np.unique(patients, return_inverse=True)[1]
    aucs, aps = [], []
    for weights in metrics.bootstrap_weights(codes, codes.max() + 1, n_boot, np.random.default_rng(0)):
        for w in weights:
            keep = w > 0
            if labels[keep].min() != labels[keep].max():
                aucs.append(roc_auc_score(labels[keep], scores[keep], sample_weight=w[keep]))
                aps.append(average_precision_score(labels[keep], scores[keep], sample_weight=w[keep]))
    t2 = time.perf_counter()
    difference = max(np.abs(np.subtract(fast["roc_auc_ci"], np.percentile(aucs, [2.5, 97.5]))).max(),
                     np.abs(np.subtract(fast["auprc_ci"], np.percentile(aps, [2.5, 97.5]))).max())
    out = {"slices": len(labels), "n_boot": n_boot, "seconds": t1 - t0, "seconds_sklearn_loop": t2 - t1,
           "speedup": (t2 - t1) / (t1 - t0), "max_ci_difference": float(difference)}
    print(f"evaluation bootstrap ({out['slices']} slices, {n_boot} samples): {out['seconds']:.2f} s, {out['speedup']:.0f}x "
          f"the sklearn loop ({out['seconds_sklearn_loop']:.1f} s); CIs differ by at most {out['max_ci_difference']:.1e}")
    return out


def mode_name(options, args):
    """A row name that says which speed options a mode switches on."""
    if options.get("eval_batch_size", 1) == 1:
        return "naive"
    name = "batched"
    if options.get("channels_last"):
        name += "+channels_last"
    if options.get("autocast_dtype") is not None:
        name += "+" + str(options["autocast_dtype"]).replace("torch.bfloat", "bf").replace("torch.float", "fp")
    if options.get("skip_outside_mask"):
        name += "+skip"
    if options.get("pack_windows"):
        gap = options.get("pack_gap", args.pack_gap)
        name += "+pack" + ("" if gap is None else f"-gap{gap}")
    if options.get("compile"):
        name += "+compile"
    if options.get("eval_batch_size") != args.eval_batch_size:
        name += f"@{options['eval_batch_size']}"
    return name


SPEED_OPTIONS = ("eval_batch_size", "channels_last", "skip_outside_mask", "pack_windows")


def scoring_modes(args, default):
    """name -> speed options (SPEED_OPTIONS, autocast_dtype, compile): the reference, then one option at a time on
    top of batching and of the default's precision, then the default and options on top of it. Modes with the same
    options are run once."""
    batch = {"eval_batch_size": args.eval_batch_size}
    bf16 = {"autocast_dtype": torch.bfloat16}
    one_per_pass = default | batch | {"pack_windows": False}  # the default, unpacked
    candidates = [
        {"eval_batch_size": 1},  # naive: the spec's pipeline
        batch,
        batch | bf16,
        one_per_pass,
        one_per_pass | {"channels_last": True},
        one_per_pass | {"skip_outside_mask": True},
        one_per_pass | {"pack_windows": True},
        default,
        default | {"channels_last": True},
        default | {"skip_outside_mask": True},
        default | {"pack_gap": 0},  # windows edge to edge: 4 passes instead of 9 (moves CT-ICH figures: RESULTS)
    ]
    if args.compile:
        candidates.append(default | {"compile": True})
    modes = {}
    for options in candidates:
        options = {k: v for k, v in options.items() if v is not None and v is not False}
        modes.setdefault(mode_name(options, args), options)
    return modes


def mode_settings(base, options):
    """The scoring settings of a mode: the run's, with the mode's speed options (absent = off)."""
    return dataclasses.replace(base, **{k: options.get(k, False) for k in SPEED_OPTIONS if k != "eval_batch_size"},
                               eval_batch_size=options.get("eval_batch_size", 1), pack_gap=options.get("pack_gap", base.pack_gap))


def forwards_per_slice(masks, settings, args):
    """Forward passes the mode runs per slice (skip_outside_mask leaves out windows without brain)."""
    jobs = scoring.window_jobs(settings, args.image_size, len(masks), masks.cpu() if settings.skip_outside_mask else None)
    return len(jobs) / len(masks)


def time_modes(diffusion, modes, slices, base, seed, repeats, device):
    """-> (score_split result per mode, seconds per round per mode): a warm-up run of every mode, then `repeats`
    rounds in which every mode scores all slices once, in turn, by the one scoring path (scoring.score_split).
    slices: {"all": the scored slices, "warm-up": two of them} (data.SliceDataset)."""
    scorer = {}
    for name, options in modes.items():
        # a copy per mode: no mode can leave something behind (weight layout, compiled state) for the next
        network = copy.deepcopy(diffusion.network)
        if options.get("compile"):
            network = torch.compile(network)
        scorer[name] = models.Diffusion(network, diffusion.config, "bf16" if options.get("autocast_dtype") else "fp32")

    def run(name, which):
        result = scoring.score_split(scorer[name], slices[which], mode_settings(base, modes[name]), seed=seed,
                                     keep_examples=0, keep_maps=True)
        sync(device)
        return result

    for name in modes:  # warm-up (torch.compile compiles for every batch shape it will see)
        run(name, "all" if modes[name].get("compile") else "warm-up")
    results, times = {}, {name: [] for name in modes}
    for _ in range(max(repeats, 1)):
        for name in modes:
            t0 = time.perf_counter()
            results[name] = run(name, "all")  # the same every round: the noise is fixed by the seeds
            times[name].append(time.perf_counter() - t0)
    return results, times


def mode_results(modes, scored, times, masks, base, gflops, args):
    """Speed, FLOPs, ROC-AUC per slice score and agreement with naive, per mode (masks: the slices' brain masks, in
    position order as the scores are)."""
    results, inside = {}, torch.as_tensor(masks).bool()
    naive = scored["naive"]
    for name, options in modes.items():
        seconds = statistics.median(times[name])
        scores, labels = scored[name]["scores"], scored[name]["labels"]
        aucs = {k: metrics.roc_auc(labels, v) for k, v in scores.items()}
        per_slice = forwards_per_slice(masks, mode_settings(base, options), args) * len(base.eval_t)
        diff = torch.as_tensor(scored[name]["maps"] - naive["maps"]).abs()
        results[name] = {
            "slices_per_s": len(masks) / seconds, "roc_auc": aucs[base.score], "roc_auc_by_score": aucs,
            "seconds": seconds, "seconds_all_repeats": times[name],
            "forwards_per_slice": per_slice, "gflops_per_slice": per_slice * gflops,
            "tflops_achieved": per_slice * gflops * len(masks) / seconds / 1e3,
            "max_abs_map_diff_vs_naive": float(diff.max()), "max_abs_map_diff_vs_naive_in_brain": float(diff[inside].max()),
            # finer than the AUC: does the mode rank the slices (all of them, not only across classes) as naive does?
            "score_spearman_vs_naive": float(scipy.stats.spearmanr(scores[base.score], naive["scores"][base.score])[0]),
            "options": {k: str(v) if k == "autocast_dtype" else v for k, v in options.items()}}
    naive = results["naive"]
    for r in results.values():
        r["speedup_vs_naive"] = r["slices_per_s"] / naive["slices_per_s"]
        r["roc_auc_minus_naive"] = (None if r["roc_auc"] is None or naive["roc_auc"] is None
                                    else r["roc_auc"] - naive["roc_auc"])
        if args.peak_tflops:
            r["fraction_of_peak"] = r["tflops_achieved"] / args.peak_tflops
    return results


def print_table(results, default_name, train, base, args, n_slices):
    naive = results["naive"]
    score_names = list(naive["roc_auc_by_score"])
    print(f"\nanomaly maps: {n_slices} slices, {len(scoring.window_grid(args.image_size, base.patch_size, base.stride))} "
          f"windows x {len(base.eval_t)} t per slice, median of {args.repeats} rounds after warm-up; "
          f"* = the default of evaluate.py / train.py; AUC headline: {base.score}; rho = Spearman correlation of "
          f"the {base.score} slice scores with naive")
    fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    header = (f"{'mode':44s} {'slices/s':>9s} {'x naive':>8s} {'GFLOP/slice':>11s} {'TFLOP/s':>8s} "
              + " ".join(f"{'AUC ' + s:>14s}" for s in score_names) + f" {'max|dmap| brain':>16s} {'rho':>6s}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name + (' *' if name == default_name else ''):44s} {r['slices_per_s']:9.2f} {r['speedup_vs_naive']:8.2f} "
              f"{r['gflops_per_slice']:11.2f} {r['tflops_achieved']:8.3f} "
              + " ".join(f"{fmt(r['roc_auc_by_score'][s]):>14s}" for s in score_names)
              + f" {r['max_abs_map_diff_vs_naive_in_brain']:16.2e} {r['score_spearman_vs_naive']:6.3f}")
    if args.peak_tflops and default_name in results:
        d = results[default_name]
        print(f"\nof the given peak {args.peak_tflops} TFLOP/s: default scoring {100 * d['fraction_of_peak']:.1f}%, "
              f"training {100 * train['fraction_of_peak']:.1f}% (3 x forward FLOPs per image)")
    if naive["roc_auc"] is not None and abs(naive["roc_auc"] - 0.5) < 0.1:
        print(f"warning: the reference ROC-AUC ({base.score}) is {naive['roc_auc']:.3f}, close to chance, so the AUC "
              "columns say little about a mode; look at rho, or raise --train_steps / --slices, or pass --checkpoint")


def pick_modes(args, default):
    modes = scoring_modes(args, default)
    if args.modes:
        wanted = {mode_name(default, args) if name == "default" else name for name in args.modes} | {"naive"}
        unknown = wanted - set(modes)
        if unknown:
            raise SystemExit(f"error: --modes: no row named {', '.join(sorted(unknown))}; rows: {', '.join(modes)}")
        modes = {name: options for name, options in modes.items() if name in wanted}
    return modes


def open_models(args, device):
    """(the model to score: --checkpoint's, else None; a fresh model to time training with, of the same architecture
    and input representation; the scoring settings). Every flag is checked here."""
    trained = models.load_checkpoint(args.checkpoint, device)[0] if args.checkpoint else None
    if trained is not None:
        net = trained.config
        models.check_flag(not net.get("context_slices"), "checkpoint", args.checkpoint, "a 2.5-D model (--context_slices): "
                          "bench.py times 2-D models (the neighbours only widen the first convolution)")
        args.image_size, args.channels, args.base_channels = net["image_size"], net["in_channels"], net.get("base_channels", args.base_channels)
    else:
        d = config.RunConfig()  # train.py's defaults, but for the width and size bench.py is told
        net = models.model_config(pretrained=False, in_channels=args.channels, image_size=args.image_size,
                                  base_channels=args.base_channels, channel_mults=d.channel_mults, dropout=d.dropout,
                                  hf_model=d.hf_model)
    config.check_flags(argparse.Namespace(**{k: getattr(args, k) for k in (
        "image_size", "base_channels", "batch_size", "lr", "seed", "slices", "device")},
        channel_mults=net.get("channel_mults"), pretrained=net["kind"] == "pretrained"))
    for name in ("repeats", "train_steps"):
        models.check_flag(getattr(args, name) >= 1, name, getattr(args, name), "must be at least 1")
    base = scoring.ScoringSettings.from_flags(args).check(args.image_size, training=True)
    args.patch_size, args.stride = base.patch_size, base.stride
    input_hu = trained.input_hu if trained else inputs.native_input_hu("rsna", args.channels)  # the phantom is DICOM
    torch.manual_seed(args.seed)
    fresh = models.build_diffusion(models.diffusion_config(net, patch_size=base.patch_size, input_hu=input_hu,
                                                           precision=args.precision), device)
    return trained, fresh, base


def main(argv=None):
    args = get_args(argv)
    if args.scale is not None:
        models.check_flag(args.scale >= 1, "scale", args.scale, "must be at least 1")
        return bench_scale(args)
    models.check_flag(args.threads is None or args.threads >= 1, "threads", args.threads, "must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.pick_device(args.device)
    load_before, started = os.getloadavg(), time.perf_counter()
    trained, fresh, base = open_models(args, device)
    tmp = tempfile.TemporaryDirectory(prefix="ctpddpm_bench_") if args.data_dir is None else None  # removed at exit
    index, cache, train_positions, score_positions = load_slices(args, args.data_dir or tmp.name, fresh.input_hu)
    masks = torch.from_numpy(inputs.intracranial(cache.masks[np.sort(score_positions)]))  # position order, as score_split returns
    labels = index["any"][score_positions].astype(int)
    default = {k: getattr(base, k) for k in SPEED_OPTIONS} | {"autocast_dtype": fresh.autocast_dtype}
    gflops = models.count_flops(fresh.network, args.image_size, args.channels) / 1e9
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
                        f"{', native bf16' if models.cpu_has_native_bf16() else ''})")
    print(f"device {device_name} | load average {load_before[0]:.2f} | image {args.image_size}^2 | base_channels "
          f"{args.base_channels} | patch {base.patch_size} stride {base.stride} | {gflops:.3f} GFLOPs per forward | "
          f"{len(labels)} slices scored ({labels.sum()} hemorrhage)")

    train = time_training(fresh, torch.from_numpy(cache.images[train_positions].astype(np.float32)), args, device)
    if args.save_model:
        models.save_checkpoint(args.save_model, fresh, bench_train_steps=args.train_steps, bench_lr=args.lr)
    if trained is not None:
        print(f"scoring with {args.checkpoint}")
    loader = bench_loader(cache, index, train_positions, args, device) if args.loader_images else {}
    if loader:
        print("loader alone (SliceDataset over the slice cache): " + ", ".join(f"{k} {v:.0f} images/s" for k, v in loader.items()))

    modes = pick_modes(args, default)
    slices = {"all": data.SliceDataset(cache, index, score_positions),
              "warm-up": data.SliceDataset(cache, index, score_positions[:2])}
    scored, times = time_modes(trained or fresh, modes, slices, base, args.seed, args.repeats, device)
    results = mode_results(modes, scored, times, masks, base, gflops, args)
    bootstrap = bench_bootstrap(scored[mode_name(default, args)], base.score) if args.time_bootstrap else None
    train["tflops_achieved"] = 3 * gflops * train["images_per_s"] / 1e3  # forward + backward ~ 3 forwards
    if args.peak_tflops:
        train["fraction_of_peak"] = train["tflops_achieved"] / args.peak_tflops
    print_table(results, mode_name(default, args), train, base, args, len(labels))
    load_after, seconds_total = os.getloadavg(), time.perf_counter() - started
    print(f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {seconds_total:.0f} s in all")
    report = {"modes": results, "default_mode": mode_name(default, args), "train": train, "loader_images_per_s": loader,
              "bootstrap": bootstrap,
              "gflops_per_forward": gflops, "device": device_name, "load_average": [load_before[0], load_after[0]],
              "seconds": seconds_total, "settings": vars(args)}
    if args.json:
        runfiles.write_json(args.json, report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    models.run_script(main)
