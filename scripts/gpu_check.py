"""The GPU check: every figure a lent GPU machine should give, in one command of at most ~9 minutes.

    python scripts/gpu_check.py --prepare /path/to/ct-ich gpu_data/ctich256      # here, once: a 256^2 copy (~35 MiB)
    python scripts/gpu_check.py --ctich gpu_data/ctich256 --out "$OUT"          # on the GPU machine
    python scripts/gpu_check.py --dry_run --out /tmp/gpu_dry                     # on a CPU at tiny sizes (a test runs it)

Steps, each timed, each allowed to fail without stopping the others:
  1. env.json         the machine: torch, CUDA, the device, its capability, the packages the project needs
  2. pytest_gpu.txt   the CUDA-only code paths (tests/test_gpu.py, marker gpu: bf16 autocast on CUDA, torch.compile,
                      channels_last, pinned loading, torchrun with NCCL on one GPU); the CPU suite skips them
  3. bench256.json    bench.py at the spec's 256^2 model (base 64, the 14.8M reading 1 2 4 4, window 64, stride 32):
                      slices/s per scoring mode, training steps/s, the fraction of the bf16 peak
  4. cv.txt           the README's CT-ICH CV recipe at 256^2 (4 folds, window 64 / stride 32, the 14.8M UNet, batch
                      16) trained, then scored out of fold by evaluate.py: the log with its wall times
  5. cv_metrics.json  its out-of-fold metrics.json
  6. summary.md       one table of the figures above
The device carries the working tree (64 MiB at most) and reaches no package registry: the 256^2 CT-ICH copy (--prepare)
and the wheels of the packages its image lacks travel in ignored folders (docs/gpus-and-speed.md, "The GPU check").
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

H200_BF16_PEAK_TFLOPS = 989  # dense bf16, the H100/H200 SXM figure
NEEDED = ("torch", "diffusers", "pydicom", "nibabel", "scipy", "sklearn", "matplotlib", "pytorch_msssim", "PIL", "tqdm")


def sizes(dry_run):
    """The check's sizes: the spec's 256^2 model on the GPU; a tiny one for the CPU dry run."""
    if dry_run:
        return {"image": 32, "base": 8, "mults": ["1", "2"], "patch": 8, "stride": 4, "batch": 4, "epochs": 1,
                "folds": 2, "steps": 2, "slices": 8, "min_brain": "0"}
    return {"image": 256, "base": 64, "mults": ["1", "2", "4", "4"], "patch": 64, "stride": 32, "batch": 16, "epochs": 24,
            "folds": 4, "steps": 50, "slices": 64, "min_brain": "0.15"}


def step_env(out, device):
    import importlib
    import torch
    found = {}
    for name in NEEDED:
        try:
            module = importlib.import_module(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError as error:
            found[name] = f"missing: {error}"
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "packages": found,
           "capability": list(torch.cuda.get_device_capability(0)) if device == "cuda" else None}
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(env, f, indent=2)
    return f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}"


def step_pytest(out, device):
    if device != "cuda":
        return "skipped: no CUDA (the CPU suite skips marker gpu too)"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", os.path.join(ROOT, "tests", "test_gpu.py")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    with open(os.path.join(out, "pytest_gpu.txt"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    return (proc.stdout.strip().splitlines() or ["no output"])[-1]


def step_bench(out, device, size):
    import bench
    flags = ["--image_size", str(size["image"]), "--base_channels", str(size["base"]), "--patch_size", str(size["patch"]),
             "--stride", str(size["stride"]), "--slices", str(size["slices"]), "--train_steps", str(size["steps"]),
             "--repeats", "2", "--device", device, "--loader_images", "0", "--json", os.path.join(out, "bench256.json"),
             "--modes", "naive", "default", "--peak_tflops", str(H200_BF16_PEAK_TFLOPS)]
    if device == "cuda":
        flags.append("--compile")
    report = bench.main(flags)
    default = report["modes"][report["default_mode"]]
    return (f"default {default['slices_per_s']:.1f} slices/s ({default['speedup_vs_naive']:.1f}x naive, ROC-AUC "
            f"{default['roc_auc_minus_naive'] or 0:+.3f} vs naive), training "
            f"{report['train']['steps_per_s']:.2f} steps/s")


def step_cv(out, device, size, ctich):
    import evaluate
    import train
    run_dir = os.path.join(out, "cv_run")
    recipe = ["--data_dir", ctich, "--output_dir", run_dir, "--folds", str(size["folds"]), "--image_size", str(size["image"]),
              "--patch_size", str(size["patch"]), "--stride", str(size["stride"]), "--base_channels", str(size["base"]),
              "--channel_mults", *size["mults"], "--batch_size", str(size["batch"]), "--epochs", str(size["epochs"]),
              "--lr", "5e-4", "--hflip", "--eval_samples", "100", "--eval_every", str(max(size["epochs"] // 2, 1)),
              "--min_brain_fraction", size["min_brain"], "--num_workers", "4" if device == "cuda" else "0", "--seed", "42",
              "--device", device, "--overwrite"]
    log = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(log):
        train.main(recipe)
        t1 = time.time()
        evaluate.main(["--checkpoint", run_dir, "--fold_checkpoint", "best_model_loss.pt", "--eval_samples", "all",
                       "--skip_outside_mask", "--device", device, "--output_dir", os.path.join(run_dir, "oof")])
    t2 = time.time()
    with open(os.path.join(out, "cv.txt"), "w") as f:
        f.write(f"train {t1 - t0:.0f} s, out-of-fold evaluation {t2 - t1:.0f} s\n" + log.getvalue())
    with open(os.path.join(run_dir, "oof", "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(out, "cv_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    score = metrics["score"]
    return (f"train {t1 - t0:.0f} s + out of fold {t2 - t1:.0f} s; slice ROC-AUC {metrics['slice'][score]['roc_auc']:.3f}, "
            f"scan {metrics['scan']['max']['roc_auc']:.3f}")


def prepare(source, target, size=256):
    """A copy of the CT-ICH JPG release at size^2 (the same layout, the same windows), small enough to travel."""
    from PIL import Image
    for folder, _, files in os.walk(os.path.join(source, "Patients_CT")):
        out = os.path.join(target, os.path.relpath(folder, source))
        os.makedirs(out, exist_ok=True)
        for name in files:
            if name.lower().endswith(".jpg"):
                with Image.open(os.path.join(folder, name)) as image:
                    image.convert("L").resize((size, size), Image.BILINEAR).save(os.path.join(out, name), quality=92)
    for name in ("hemorrhage_diagnosis.csv", "patient_demographics.csv"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(target, name))
    print(f"wrote {target} ({sum(len(f) for _, _, f in os.walk(target))} files)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--ctich", default=None, help="the CT-ICH layout to run the CV recipe on (--prepare's 256^2 copy)")
    p.add_argument("--dry_run", action="store_true", help="CPU, tiny sizes, a fresh phantom instead of CT-ICH")
    p.add_argument("--prepare", nargs=2, metavar=("CTICH_DIR", "COPY_DIR"), help="write the 256^2 copy and stop")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare(*args.prepare)
    os.makedirs(args.out, exist_ok=True)
    device, size = ("cpu" if args.dry_run else "cuda"), sizes(args.dry_run)
    data_dir = args.ctich
    if args.dry_run and data_dir is None:
        import phantom
        data_dir = phantom.write_phantom(os.path.join(args.out, "phantom"), patients=12, slices=5, size=32, seed=0)
    steps = [("environment", lambda: step_env(args.out, device)), ("CUDA-only tests", lambda: step_pytest(args.out, device)),
             ("bench", lambda: step_bench(args.out, device, size)),
             ("CV recipe", lambda: step_cv(args.out, device, size, data_dir) if data_dir else "skipped: no --ctich")]
    lines = ["| step | seconds | result |", "|---|---|---|"]
    for name, run in steps:
        t0 = time.time()
        try:
            result = run()
        except (Exception, SystemExit) as error:  # every step runs; a failure is a row of the summary
            result = f"FAILED: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
        lines.append(f"| {name} | {time.time() - t0:.0f} | {result} |")
        print(lines[-1], flush=True)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
