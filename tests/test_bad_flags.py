"""Flags out of range (issue 15): one line naming the flag and what it must be, before any data is read or any folder
is made; from train.py, evaluate.py, sweep.py, compare.py, phantom.py and data.py."""
import contextlib
import io
import json
import re

import pytest
import torch

import compare
import data
import evaluate
import phantom
import sweep
import train
from helpers import quiet, tiny_train_args


BAD_TRAIN_FLAGS = [
    (["--stride", "0"], "--stride 0: must be at least 1"),
    (["--eval_t", "5000"], "--eval_t 5000: timesteps run from 0 to 999"),
    (["--eval_t", "-1"], "--eval_t -1: timesteps run from 0 to 999"),
    (["--eval_every", "0"], "--eval_every 0: must be at least 1"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--lr", "nan"], "--lr nan: must be a finite number above 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number above 0"),
    (["--lr", "-0.001"], "--lr -0.001: must be a finite number above 0"),
    (["--image_size", "63"], "--image_size 63: must be a multiple of 8 (the UNet halves it 3 times) and at least 8"),
    (["--patch_size", "64"], "--patch_size 64: larger than the image (32 px)"),
    (["--patch_size", "1"], "--patch_size 1: must be at least 2 pixels"),
    (["--median_size", "-1"], "--median_size -1: must be 0 (off) or more"),
    (["--eval_batch_size", "0"], "--eval_batch_size 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--num_workers", "-2"], "--num_workers -2: must be 0 or more"),
    (["--min_brain_fraction", "1.5"], "--min_brain_fraction 1.5: must be in [0, 1)"),
    (["--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
    (["--device", "tpu9"], "--device tpu9: not a device name (auto, cpu, cuda, cuda:N, mps)"),
    (["--new_schedule"], "--new_schedule : only means something with --resume"),
]


@pytest.mark.parametrize("flags,message", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_bad_train_flags_are_one_line_errors_before_any_work(phantom_dir, tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", *flags))
    assert str(e.value) == f"error: {message}"
    assert not (tmp_path / "run").exists()  # refused before the output dir was made


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(phantom_dir, tmp_path, tiny_run):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", "--device", "cuda"))
    assert str(e.value) == "error: --device cuda: CUDA is not available here (use --device cpu or auto)"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tiny_run / "best_model.pt"), "--device", "cuda"])
    assert str(e.value) == "error: --device cuda: CUDA is not available here (use --device cpu or auto)"


def test_cache_dir_that_is_a_file(phantom_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", "--cache_dir", str(tmp_path / "afile")))
    assert str(e.value) == f"error: --cache_dir {tmp_path / 'afile'}: not a directory"


def test_stride_larger_than_the_window_would_leave_pixels_unscored(phantom_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", "--stride", "12"))
    assert str(e.value) == ("error: --stride 12: larger than the window (--patch_size 8): pixels between windows would "
                            "never be scored")


def test_pretrained_model_that_cannot_be_loaded(phantom_dir, tmp_path):
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_train_args(phantom_dir, tmp_path / "run", "--pretrained", "--hf_model", str(tmp_path / "nowhere")))
    assert str(e.value).startswith(f"error: {tmp_path / 'nowhere'}: cannot load a UNet2DModel (")


@pytest.mark.parametrize("script,flags,message", [
    ("evaluate", ["--stride", "0"], "--stride 0: must be at least 1"),
    ("evaluate", ["--eval_t", "1000"], "--eval_t 1000: timesteps run from 0 to 999"),
    ("evaluate", ["--patch_size", "33"], "--patch_size 33: larger than the image (32 px)"),
    ("evaluate", ["--keep_examples", "-1"], "--keep_examples -1: must be 0 or more"),
    ("sweep", ["--windows", "8:0"], "--stride 0: must be at least 1"),
    ("sweep", ["--windows", "8x4"], "--windows 8x4: expected patch:stride, e.g. 32:16"),
    ("sweep", ["--eval_t", "250", "2000", "--multi_t"], "--eval_t 2000: timesteps run from 0 to 999"),
], ids=["eval_stride", "eval_t", "eval_patch", "eval_keep", "sweep_stride", "sweep_window", "sweep_t"])
def test_bad_evaluate_and_sweep_flags(tiny_run, tmp_path, script, flags, message):
    main = {"evaluate": evaluate.main, "sweep": sweep.main}[script]
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tiny_run / "best_model.pt"), "--output_dir", str(tmp_path / "out"), *flags])
    assert str(e.value) == f"error: {message}" and not (tmp_path / "out").exists()


def test_eval_samples_larger_than_available(tiny_run, tmp_path, no_figures):
    _, printed = quiet(evaluate.main, ["--checkpoint", str(tiny_run / "best_model.pt"), "--eval_samples", "100000",
                                       "--n_boot", "0", "--keep_examples", "1", "--output_dir", str(tmp_path / "ev")])
    notes = sorted(line for line in printed.splitlines() if line.startswith("note: ") and " slices: only " in line)
    assert len(notes) == 4 and all(re.fullmatch(r"note: (test|val) (healthy|hemorrhage) slices: only \d+ slices available, "
                                                r"100000 asked for; using all", m) for m in notes)
    counts = json.loads((tmp_path / "ev" / "metrics.json").read_text())["counts"]
    available = {re.match(r"note: (\w+ \w+)", m)[1]: int(re.search(r"only (\d+)", m)[1]) for m in notes}
    assert (counts["hemorrhage_slices"], counts["healthy_slices"]) == (available["test hemorrhage"], available["test healthy"])


def test_eval_samples_zero_is_a_usage_error(tiny_run, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tiny_run / "best_model.pt"), "--eval_samples", "0"])
    assert e.value.code == 2 and "argument --eval_samples: expected a positive integer or 'all', got '0'" in capsys.readouterr().err


def test_compare_output_that_matplotlib_cannot_write(tiny_run, tmp_path):
    with pytest.raises(SystemExit) as e:
        compare.main([str(tiny_run), "--output", str(tmp_path / "curves.txt")])
    assert str(e.value).startswith(f"error: --output {tmp_path / 'curves.txt'}: matplotlib cannot write .txt files (use one of ")
    assert not (tmp_path / "curves.txt").exists()


@pytest.mark.parametrize("argv,message", [
    (["--patients", "0"], "error: --patients 0: must be at least 1"),
    (["--slices", "0"], "error: --slices 0: must be at least 1"),
    (["--size", "8"], "error: --size 8: must be at least 16"),
    (["--seed", "-1"], "error: --seed -1: must be at least 0"),
], ids=["patients", "slices", "size", "seed"])
def test_bad_phantom_flags(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        phantom.main(["--out", str(tmp_path / "p"), *argv])
    assert str(e.value) == message and not (tmp_path / "p").exists()


def test_bad_show_flags(phantom_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        data.main(["show", "--data_dir", phantom_dir, "--out", str(tmp_path / "grid.docx")])
    assert str(e.value).startswith(f"error: --out {tmp_path / 'grid.docx'}: matplotlib cannot write .docx files")
    with pytest.raises(SystemExit) as e:
        data.main(["show", "--data_dir", phantom_dir, "--out", str(tmp_path / "grid.png"), "--columns", "0"])
    assert str(e.value) == "error: --columns 0: must be at least 1"
