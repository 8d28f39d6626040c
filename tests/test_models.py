"""models.py: the networks, patched noising, the loss, anomaly maps, scores and checkpoints."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import UNet2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402

# the spec model (literal reading of its level list) and the ~14M reading; see models.py docstring
SPEC_PARAMS = 30_281_793
DEEPEST_256_PARAMS = 14_805_569
CELEBAHQ_PARAMS = 113_673_219


def tiny_unet(in_channels=1, seed=0):
    torch.manual_seed(seed)
    return models.UNet(in_channels=in_channels, base_channels=8).eval()


def phantom(size=32, blob=False, seed=0):
    """One slice [1, 1, S, S]: air (-1) around a disc of healthy tissue (0.2 + noise), optionally
    with a bright bleed-like blob inside, and its brain mask [1, S, S]."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    brain = (yy - centre) ** 2 + (xx - centre) ** 2 < (0.4 * size) ** 2
    gen = torch.Generator().manual_seed(seed)
    image = torch.where(brain, 0.2 + 0.02 * torch.randn(size, size, generator=gen), torch.tensor(-1.0))
    if blob:
        image[(yy - centre - 3) ** 2 + (xx - centre + 2) ** 2 < (size / 10) ** 2] = 0.9
    return image[None, None], brain[None]


class HealthyTissue(nn.Module):
    """Test double for an x0 predictor that always answers 'healthy tissue'; records what it saw."""

    def __init__(self, value=0.2):
        super().__init__()
        self.value = value
        self.input_shapes = []

    def forward(self, x_t, t):
        self.input_shapes.append(tuple(x_t.shape))
        return torch.full_like(x_t, self.value)


def test_scheduler_settings():
    s = models.make_scheduler()
    assert s.config.num_train_timesteps == 1000
    assert s.config.beta_schedule == "squaredcos_cap_v2"
    assert s.config.prediction_type == "sample" and s.config.clip_sample is False


@pytest.mark.parametrize("in_channels", [1, 3])
def test_unet_output_shape(in_channels):
    model = tiny_unet(in_channels)
    x = torch.randn(2, in_channels, 32, 32)
    assert model(x, torch.tensor([0, 999])).shape == x.shape
    assert model(x, 150).shape == x.shape
    with pytest.raises(ValueError, match="multiple of 8"):
        model(torch.randn(1, in_channels, 36, 36), 0)


def test_spec_model_parameter_count():
    spec = models.UNet()  # in_channels=1, base_channels=64, channel_mults=(1, 2, 4, 8)
    n_spec = sum(p.numel() for p in spec.parameters())
    n_deep256 = sum(p.numel() for p in models.UNet(channel_mults=(1, 2, 4, 4)).parameters())
    print(f"spec UNet (literal, 64-128-256-512): {n_spec:,} parameters; deepest level 256: {n_deep256:,}")
    assert n_spec == SPEC_PARAMS
    assert n_deep256 == DEEPEST_256_PARAMS
    assert abs(n_deep256 - 14e6) / 14e6 < 0.10  # the reading that matches the spec's "~14M"


def test_count_flops_counts_attention_by_hand():
    model = tiny_unet()
    flops = models.count_flops(model, 32, 1)
    # the unfused math kernel decomposes attention into matmuls, which FlopCounterMode does count
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, 32, 32), 0)
    assert flops == counter.get_total_flops()
    with FlopCounterMode(display=False) as fused, torch.no_grad():  # what it misses by itself
        model(torch.zeros(1, 1, 32, 32), 0)
    assert fused.get_total_flops() < flops


def test_pretrained_wrapper_loads_a_local_directory(tmp_path):
    standin = models.save_standin(tmp_path / "unet")  # celebahq block types, tiny widths
    assert "AttnDownBlock2D" in standin.config.down_block_types
    config = {"kind": "pretrained", "in_channels": 3, "base_channels": 0, "image_size": 32,
              "hf_model": str(tmp_path / "unet")}
    model = models.build_model(config).eval()
    assert isinstance(model.unet, UNet2DModel)
    for name, tensor in standin.state_dict().items():
        assert torch.equal(model.unet.state_dict()[name], tensor), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([10, 500]))
        assert out.shape == x.shape
        assert torch.equal(out, standin.eval()(x, torch.tensor([10, 500])).sample)
    with pytest.raises(ValueError, match="takes 3 channels"):
        model(torch.randn(1, 1, 32, 32), 0)

    # the checkpoint carries the architecture: loading needs neither the hub nor the directory
    models.save_checkpoint(tmp_path / "pre.pt", model, config)
    (tmp_path / "unet" / "config.json").unlink()
    loaded, loaded_config, _ = models.load_checkpoint(tmp_path / "pre.pt")
    assert loaded_config["unet_config"]["down_block_types"] == list(standin.config.down_block_types)
    with torch.no_grad():
        assert torch.equal(loaded(x, 7), model(x, 7))


@pytest.mark.slow
def test_real_celebahq_architecture_fits_the_wrapper():
    # google/ddpm-ema-celebahq-256's config, random weights (the hub is unreachable here)
    unet_config = dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=[128, 128, 256, 256, 512, 512],
                       down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
                       attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False,
                       freq_shift=1, norm_eps=1e-6)
    model = models.build_model({"kind": "pretrained", "in_channels": 3, "base_channels": 0,
                                "image_size": 256, "hf_model": "google/ddpm-ema-celebahq-256",
                                "unet_config": unet_config}).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"celebahq UNet2DModel: {n:,} parameters")
    assert n == CELEBAHQ_PARAMS
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x, 150).shape == x.shape


def test_noise_boxes_touches_only_the_box():
    x0 = torch.rand(3, 2, 32, 32) * 2 - 1
    boxes = models.random_boxes(3, 32, 8, torch.Generator().manual_seed(0))
    assert boxes.shape == (3, 2) and boxes.dtype == torch.long and int(boxes.max()) <= 24
    noise = torch.randn(3, 2, 32, 32)
    x_t = models.noise_boxes(x0, boxes, 8, torch.tensor([10, 500, 999]), models.make_scheduler(), noise)
    inside = torch.zeros_like(x0, dtype=torch.bool)
    for i, (top, left) in enumerate(boxes.tolist()):
        inside[i, :, top:top + 8, left:left + 8] = True
    assert torch.equal(x_t[~inside], x0[~inside])  # bit-identical
    assert (x_t[inside] != x0[inside]).all()
    # patch-sized noise is the same as the box cut out of full-size noise
    patch_noise = models.crop_boxes(noise, boxes, 8)
    assert torch.equal(models.noise_boxes(x0, boxes, 8, torch.tensor([10, 500, 999]),
                                          models.make_scheduler(), patch_noise), x_t)


def test_patch_loss_ignores_pixels_outside_the_box():
    x0 = torch.rand(2, 1, 32, 32) * 2 - 1
    boxes = torch.tensor([[0, 0], [20, 12]])
    assert models.patch_loss(x0.clone(), x0, boxes, 8).item() == pytest.approx(0.0, abs=1e-6)
    x0_hat = torch.randn(2, 1, 32, 32, requires_grad=True)
    models.patch_loss(x0_hat, x0, boxes, 8).backward()
    inside = torch.zeros_like(x0, dtype=torch.bool)
    for i, (top, left) in enumerate(boxes.tolist()):
        inside[i, :, top:top + 8, left:left + 8] = True
    assert (x0_hat.grad[~inside] == 0).all()
    assert (x0_hat.grad[inside] != 0).any()


def test_window_grid_covers_the_image():
    assert len(models.window_grid(256, 64, 32)) == 49  # the spec's 49 windows per slice
    grid = models.window_grid(30, 8, 8)
    assert grid[-1] == (22, 22)  # last window flush with the border
    covered = np.zeros((30, 30), bool)
    for top, left in grid:
        covered[top:top + 8, left:left + 8] = True
    assert covered.all()


def one_window_at_a_time(model, images, scheduler, patch_size, stride, t, seeds):
    """Reference: the spec's loop, one window and one forward at a time, written independently."""
    N, C, H, W = images.shape
    total, count = torch.zeros(N, H, W), torch.zeros(N, H, W)
    for i in range(N):
        for k, (top, left) in enumerate(models.window_grid(H, patch_size, stride)):
            x_t = images[i:i + 1].clone()
            noise = models.window_noise(seeds[i], k, t, (C, patch_size, patch_size))
            a = scheduler.alphas_cumprod[t]
            x_t[0, :, top:top + patch_size, left:left + patch_size] = (
                a.sqrt() * x_t[0, :, top:top + patch_size, left:left + patch_size] + (1 - a).sqrt() * noise)
            with torch.no_grad():
                x0_hat = model(x_t, t)
            error = (images[i] - x0_hat[0]).abs().mean(dim=0)
            total[i, top:top + patch_size, left:left + patch_size] += error[top:top + patch_size, left:left + patch_size]
            count[i, top:top + patch_size, left:left + patch_size] += 1
    return total / count


def test_batched_map_equals_one_window_at_a_time():
    model, scheduler = tiny_unet(), models.make_scheduler()
    images = torch.cat([phantom(32, blob=b, seed=s)[0] for s, b in [(0, False), (1, True)]])
    reference = one_window_at_a_time(model, images, scheduler, 16, 8, 150, seeds=[3, 4])
    for batch_size in (1, 7, 64):  # 7 splits windows of one slice across batches
        maps = models.anomaly_maps(model, images, scheduler, patch_size=16, stride=8, seeds=[3, 4],
                                   eval_batch_size=batch_size)
        assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
        torch.testing.assert_close(maps, reference, atol=1e-5, rtol=0)


def test_map_independent_of_batch_composition_and_deterministic():
    model, scheduler = tiny_unet(), models.make_scheduler()
    images = torch.cat([phantom(32, seed=s)[0] for s in range(3)])
    kw = dict(patch_size=16, stride=8, timesteps=(150, 300))
    together = models.anomaly_maps(model, images, scheduler, seeds=[5, 6, 7], eval_batch_size=16, **kw)
    alone = models.anomaly_maps(model, images[1:2], scheduler, seeds=[6], eval_batch_size=3, **kw)
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=0)
    again = models.anomaly_maps(model, images, scheduler, seeds=[5, 6, 7], eval_batch_size=16, **kw)
    assert torch.equal(together, again)
    masks = torch.ones(3, 32, 32, dtype=torch.bool)
    scores, scores_again = models.slice_scores(together, masks, 3), models.slice_scores(again, masks, 3)
    for name in ("mean", "brain_mean", "brain_p99"):
        assert np.array_equal(scores[name], scores_again[name])
    other_seed = models.anomaly_maps(model, images, scheduler, seeds=[8, 6, 7], eval_batch_size=16, **kw)
    assert not torch.equal(other_seed[0], together[0]) and torch.equal(other_seed[1], together[1])


def test_several_timesteps_average_the_maps():
    model, scheduler = tiny_unet(), models.make_scheduler()
    images = phantom(32)[0]
    kw = dict(patch_size=16, stride=8, seeds=[1])
    both = models.anomaly_maps(model, images, scheduler, timesteps=(150, 500), **kw)
    single = [models.anomaly_maps(model, images, scheduler, timesteps=(t,), **kw) for t in (150, 500)]
    torch.testing.assert_close(both, (single[0] + single[1]) / 2, atol=1e-5, rtol=0)


def test_bright_blob_scores_higher_under_brain_p99():
    healthy, mask = phantom(64, blob=False)
    bleed, _ = phantom(64, blob=True)
    model, scheduler = HealthyTissue(0.2), models.make_scheduler()
    maps = models.anomaly_maps(model, torch.cat([healthy, bleed]), scheduler, patch_size=16,
                               stride=8, seeds=[0, 0], brain_masks=mask.expand(2, -1, -1))
    scores = models.slice_scores(maps, mask.expand(2, -1, -1), median_size=3)
    assert scores["brain_p99"][1] > scores["brain_p99"][0] + 0.3
    assert scores["brain_mean"][1] > scores["brain_mean"][0]


def test_positive_residual_keeps_only_what_is_brighter_than_the_rebuild():
    model, scheduler = HealthyTissue(0.2), models.make_scheduler()
    images = torch.cat([torch.full((1, 1, 32, 32), -0.5), torch.full((1, 1, 32, 32), 0.9)])  # darker, brighter
    kw = dict(patch_size=8, stride=8, seeds=[0, 1])
    abs_maps = models.anomaly_maps(model, images, scheduler, **kw)
    positive = models.anomaly_maps(model, images, scheduler, residual="positive", **kw)
    assert torch.allclose(abs_maps[0], torch.full((32, 32), 0.7)) and torch.allclose(abs_maps[1], torch.full((32, 32), 0.7))
    assert torch.all(positive[0] == 0)                 # darker than expected: not an anomaly of this kind
    assert torch.allclose(positive[1], abs_maps[1])    # brighter: the same as |x - x0_hat|
    with pytest.raises(ValueError, match="residual"):
        models.anomaly_maps(model, images, scheduler, residual="squared", **kw)


def test_skip_outside_mask_and_context_crop():
    images = phantom(64)[0]
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 24:40, 20:40] = True  # touches 4 of the 16 windows
    scheduler = models.make_scheduler()
    kw = dict(patch_size=16, stride=16, seeds=[0], brain_masks=mask)
    model = HealthyTissue()
    full = models.anomaly_maps(model, images, scheduler, **kw)
    assert model.input_shapes == [(16, 1, 64, 64)]  # 16 windows, one batch

    model = HealthyTissue()
    skipped = models.anomaly_maps(model, images, scheduler, skip_outside_mask=True, **kw)
    run = np.zeros((64, 64), bool)
    for top, left in models.window_grid(64, 16, 16):
        run[top:top + 16, left:left + 16] = bool(mask[0, top:top + 16, left:left + 16].any())
    assert run.mean() == 4 / 16
    assert model.input_shapes == [(4, 1, 64, 64)]
    assert (skipped[0][~torch.from_numpy(run)] == 0).all()
    torch.testing.assert_close(skipped[0][run], full[0][run])
    nothing = models.anomaly_maps(HealthyTissue(), images, scheduler, skip_outside_mask=True,
                                  **(kw | {"brain_masks": torch.zeros_like(mask)}))
    assert (nothing == 0).all()

    model = HealthyTissue()
    cropped = models.anomaly_maps(model, images, scheduler, context=32, **kw)
    assert {shape[-1] for shape in model.input_shapes} == {32}
    torch.testing.assert_close(cropped, full)  # the double ignores context, so same map

    unet = tiny_unet()  # a crop as large as the slice is the slice
    whole = models.anomaly_maps(unet, images, scheduler, **kw)
    torch.testing.assert_close(models.anomaly_maps(unet, images, scheduler, context=64, **kw), whole)
    assert models.anomaly_maps(unet, images, scheduler, context=32, **kw).shape == (1, 64, 64)


def test_channels_last_and_bf16_autocast():
    model, scheduler = tiny_unet(), models.make_scheduler()
    images = phantom(32)[0]
    kw = dict(patch_size=16, stride=8, seeds=[2])
    fp32 = models.anomaly_maps(model, images, scheduler, **kw)
    nhwc = models.anomaly_maps(model, images, scheduler, channels_last=True, **kw)
    torch.testing.assert_close(nhwc, fp32, atol=1e-4, rtol=0)  # other conv kernels, same maths
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    bf16 = models.anomaly_maps(model, images, scheduler, autocast_dtype=torch.bfloat16,
                               channels_last=True, **kw)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().mean() < 0.05 * fp32.abs().mean()


def test_anomaly_maps_restores_training_mode():
    model = tiny_unet().train()
    models.anomaly_maps(model, phantom(32)[0], models.make_scheduler(), patch_size=16, stride=16, seeds=[0])
    assert model.training


def test_slice_scores_values():
    maps = torch.zeros(2, 8, 8)
    maps[0, 2:6, 2:6] = 1.0
    maps[1, 4, 4] = 10.0  # one hot pixel
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    scores = models.slice_scores(maps, masks)
    assert scores["mean"][0] == pytest.approx(16 / 64)
    assert scores["brain_mean"][0] == pytest.approx(1.0) and scores["brain_p99"][0] == pytest.approx(1.0)
    assert scores["brain_p99"][1] > 5
    assert models.slice_scores(maps, masks, median_size=3)["brain_p99"][1] == 0  # filtered out
    empty = models.slice_scores(maps, torch.zeros_like(masks))  # no brain: whole map
    assert empty["brain_mean"][0] == pytest.approx(16 / 64)


def scratch_config(base_channels=8):
    return {"kind": "scratch", "in_channels": 1, "base_channels": base_channels, "image_size": 32,
            "hf_model": "google/ddpm-ema-celebahq-256"}


def test_checkpoint_round_trip(tmp_path):
    model, path = tiny_unet(seed=3), tmp_path / "model.pt"
    models.save_checkpoint(path, model, scratch_config(), epoch=4, history=[{"val_roc_auc": 0.7}])
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind
    loaded, config, checkpoint = models.load_checkpoint(path)
    assert config == scratch_config() and checkpoint["epoch"] == 4
    assert checkpoint["history"] == [{"val_roc_auc": 0.7}] and not loaded.training
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, 3), model(x, 3))


class NotPlainData:
    pass


def test_load_checkpoint_refuses_bad_files(tmp_path):
    model = tiny_unet()
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": model.state_dict(), "config": scratch_config(), "extra": NotPlainData()}, pickled)
    with pytest.raises(SystemExit) as e:
        models.load_checkpoint(pickled)
    assert str(pickled) in str(e.value) and "\n" not in str(e.value) and "refused" in str(e.value) and "NotPlainData" in str(e.value)

    good = tmp_path / "good.pt"
    models.save_checkpoint(good, model, scratch_config())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SystemExit) as e:
        models.load_checkpoint(truncated)
    assert str(truncated) in str(e.value) and "\n" not in str(e.value)

    mismatch = tmp_path / "mismatch.pt"
    models.save_checkpoint(mismatch, model, scratch_config(base_channels=16))
    with pytest.raises(SystemExit) as e:
        models.load_checkpoint(mismatch)
    assert str(mismatch) in str(e.value) and "do not match" in str(e.value) and "\n" not in str(e.value)

    with pytest.raises(SystemExit, match="no such checkpoint"):
        models.load_checkpoint(tmp_path / "missing.pt")
