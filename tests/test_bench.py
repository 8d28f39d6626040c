"""bench.py end to end at a tiny size (schema, and the batched fp32 maps equal the naive ones). No timing
assertions; the speed options themselves are tested in test_scoring.py."""
import json

import pytest
import torch


import bench


def test_bench_tiny_run_writes_the_table(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(["--image_size", "32", "--base_channels", "8", "--patch_size", "8", "--stride", "8",
                "--slices", "4", "--train_steps", "2", "--repeats", "1", "--loader_images", "32",
                "--threads", "1", "--json", str(path)])
    report = json.loads(path.read_text())

    assert {"naive", "batched", report["default_mode"]} <= set(report["modes"])
    for name, mode in report["modes"].items():
        assert mode["slices_per_s"] > 0, name
        assert mode["roc_auc"] is not None, name  # the 4 slices hold both classes
        # every window of every slice unless windows are skipped (outside the brain) or packed (several per pass)
        assert (mode["forwards_per_slice"] == 16) == ("skip" not in name and "pack" not in name), name
        assert set(mode["roc_auc_by_score"]) == {"mean", "brain_mean", "brain_p99"}, name
        assert mode["roc_auc"] == mode["roc_auc_by_score"][report["settings"]["score"]], name
        assert mode["forwards_per_slice"] > 0, name
    assert report["modes"]["naive"]["speedup_vs_naive"] == 1.0
    # 16 windows per slice; skipping and packing can only run fewer forward passes
    assert report["modes"]["batched"]["forwards_per_slice"] == 16
    assert all(m["forwards_per_slice"] <= 16 for m in report["modes"].values())
    assert any(m["forwards_per_slice"] < 16 for name, m in report["modes"].items() if "pack" in name)
    # windows edge to edge (stride = window here): the whole grid in one pass, against 4 at the default gap of 4
    edge_to_edge = report["default_mode"] + "-gap0"
    assert report["modes"][edge_to_edge]["forwards_per_slice"] == 1
    assert report["modes"][report["default_mode"]]["forwards_per_slice"] == 4

    # batching changes nothing but the speed: same windows, same noise, fp32
    assert report["modes"]["batched"]["max_abs_map_diff_vs_naive"] < 1e-4
    assert report["modes"]["batched"]["roc_auc_by_score"] == report["modes"]["naive"]["roc_auc_by_score"]

    assert report["train"]["steps_per_s"] > 0 and report["train"]["images_per_s"] > 0
    assert report["gflops_per_forward"] > 0
    assert isinstance(report["device"], str) and report["device"]
    assert set(report["loader_images_per_s"]) == {"num_workers=0", "num_workers=1", "num_workers=2"}


def test_bench_modes_keeps_naive_and_the_default(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main(["--image_size", "32", "--base_channels", "8", "--patch_size", "8", "--stride", "8",
                "--slices", "4", "--train_steps", "1", "--repeats", "1", "--loader_images", "0",
                "--threads", "1", "--modes", "default", "--time_torch_dropout", "--profile_training", "1", "--json", str(path)])
    report = json.loads(path.read_text())
    assert set(report["modes"]) == {"naive", report["default_mode"]}
    # the reference step trained a copy: the same number of steps from the same start, timed on its own
    reference = report["train"]["torch_dropout"]
    assert reference["steps"] == report["train"]["steps"] == 1 and reference["steps_per_s"] > 0
    printed = capsys.readouterr().out
    assert "profile of 1 training steps" in printed and "aten::convolution_backward" in printed


def test_the_reference_of_time_torch_dropout_is_a_copy_with_torch_dropout():
    import models
    from helpers import as_diffusion, tiny_unet
    diffusion = as_diffusion(tiny_unet())
    reference = bench.with_torch_dropout(diffusion)
    kinds = lambda d: {type(m) for m in d.network.modules() if isinstance(m, torch.nn.Dropout)}  # noqa: E731
    assert kinds(diffusion) == {models.Dropout} and kinds(reference) == {torch.nn.Dropout}
    assert all(torch.equal(a, b) for a, b in zip(diffusion.network.parameters(), reference.network.parameters()))


def test_bench_scale_writes_an_rsna_folder_and_times_the_index(tmp_path):
    report = bench.main(["--scale", "40", "--scale_dir", str(tmp_path / "scale"), "--num_workers", "1",
                         "--json", str(tmp_path / "scale.json")])
    assert report["files"] == report["indexed"] == 40  # every tiny file is a usable slice
    assert len(list((tmp_path / "scale" / "stage_2_train").iterdir())) == 40
    assert report["build_files_per_s"] > 0 and report["startup_s"] > 0 and report["index_bytes"] > 0
    assert report["at_rsna"]["startup_s"] == pytest.approx(report["startup_s"] * bench.RSNA_FILES / 40)
    assert json.loads((tmp_path / "scale.json").read_text())["files"] == 40
