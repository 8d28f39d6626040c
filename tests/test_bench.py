"""bench.py end to end at a tiny size (schema, and the batched fp32 maps equal the naive ones), and
the speed options of models.anomaly_maps that bench.py measures. No timing assertions."""
import json

import torch

import bench
import models


def test_bench_tiny_run_writes_the_table(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(["--image_size", "32", "--base_channels", "8", "--patch_size", "8", "--stride", "8",
                "--slices", "4", "--train_steps", "2", "--repeats", "1", "--loader_images", "32",
                "--threads", "1", "--json", str(path)])
    report = json.loads(path.read_text())

    assert {"naive", "batched", report["default_mode"]} <= set(report["modes"])
    for name, mode in report["modes"].items():
        assert mode["slices_per_s"] > 0, name
        assert mode["roc_auc"] is None or 0.0 <= mode["roc_auc"] <= 1.0, name
        assert set(mode["roc_auc_by_score"]) == {"mean", "brain_mean", "brain_p99"}, name
        assert mode["roc_auc"] == mode["roc_auc_by_score"][report["settings"]["score"]], name
        assert mode["forwards_per_slice"] > 0, name
    assert report["modes"]["naive"]["speedup_vs_naive"] == 1.0
    # 16 windows per slice; skipping and packing can only run fewer forward passes
    assert report["modes"]["batched"]["forwards_per_slice"] == 16
    assert all(m["forwards_per_slice"] <= 16 for m in report["modes"].values())
    assert any(m["forwards_per_slice"] < 16 for name, m in report["modes"].items() if "pack" in name)

    # batching changes nothing but the speed: same windows, same noise, fp32
    assert report["modes"]["batched"]["max_abs_map_diff_vs_naive"] < 1e-4
    assert report["modes"]["batched"]["roc_auc_by_score"] == report["modes"]["naive"]["roc_auc_by_score"]

    assert report["train"]["steps_per_s"] > 0 and report["train"]["images_per_s"] > 0
    assert report["gflops_per_forward"] > 0
    assert isinstance(report["device"], str) and report["device"]
    assert set(report["loader_images_per_s"]) == {"num_workers=0", "num_workers=1", "num_workers=2"}


def test_bench_modes_keeps_naive_and_the_default(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(["--image_size", "32", "--base_channels", "8", "--patch_size", "8", "--stride", "8",
                "--slices", "4", "--train_steps", "1", "--repeats", "1", "--loader_images", "0",
                "--threads", "1", "--modes", "default", "--json", str(path)])
    report = json.loads(path.read_text())
    assert set(report["modes"]) == {"naive", report["default_mode"]}


def _tiny_setup():
    torch.manual_seed(0)
    model = models.UNet(in_channels=1, base_channels=8).eval()
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    return model, models.make_scheduler(), images


def test_channels_last_scoring_leaves_the_weights_as_they_were():
    model, scheduler, images = _tiny_setup()
    before = models.anomaly_maps(model, images, scheduler, patch_size=8, stride=8, seeds=[1, 2])
    after = models.anomaly_maps(model, images, scheduler, patch_size=8, stride=8, seeds=[1, 2], channels_last=True)
    assert all(p.is_contiguous() for p in model.parameters())
    assert torch.allclose(before, after, atol=1e-5)


def test_packed_windows_are_apart_and_cover_every_window_once():
    for size, patch, stride, gap in [(128, 32, 16, 16), (60, 16, 8, 8), (64, 16, 8, 0)]:
        windows = [(k, top, left) for k, (top, left) in enumerate(models.window_grid(size, patch, stride))]
        groups = models.pack_windows(windows, patch, stride, gap)
        assert sorted(w for group in groups for w in group) == windows
        for group in groups:
            for a in group:
                for b in group:
                    assert a == b or max(abs(a[1] - b[1]), abs(a[2] - b[2])) >= patch + gap
    grid = [(k, top, left) for k, (top, left) in enumerate(models.window_grid(128, 32, 16))]
    assert len(models.pack_windows(grid, 32, 16, 16)) == 9  # every third window of every third row


def test_packing_with_one_window_per_group_is_the_plain_map():
    model, scheduler, images = _tiny_setup()
    plain = models.anomaly_maps(model, images, scheduler, patch_size=8, stride=4, seeds=[1, 2], eval_batch_size=5)
    alone = models.anomaly_maps(model, images, scheduler, patch_size=8, stride=4, seeds=[1, 2], eval_batch_size=5,
                                pack_gap=1000)
    packed = models.anomaly_maps(model, images, scheduler, patch_size=8, stride=4, seeds=[1, 2], eval_batch_size=5,
                                 pack_gap=4)
    assert torch.allclose(plain, alone, atol=1e-5)
    assert (packed > 0).all() and not torch.allclose(plain, packed, atol=1e-5)  # an approximation, not the same map
