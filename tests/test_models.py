"""models.py: the networks, patched noising, the loss, the Diffusion object, model configs and checkpoints."""
import os

import numpy as np

import pytest
import torch
import torch.nn as nn
from diffusers import UNet2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import config
import models
from helpers import as_diffusion, make_scheduler, tiny_unet

# the spec model (literal reading of its level list) and the ~14M reading; see models.py docstring
SPEC_PARAMS = 30_281_793
DEEPEST_256_PARAMS = 14_805_569
CELEBAHQ_PARAMS = 113_673_219

def test_scheduler_settings():
    s = as_diffusion(tiny_unet()).scheduler
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
    d = config.DEFAULTS  # the model's defaults live in the run's configuration: 64 channels, levels 1 2 4 8
    spec = models.UNet(in_channels=1, base_channels=d.base_channels, channel_mults=d.channel_mults, dropout=d.dropout)
    n_spec = sum(p.numel() for p in spec.parameters())
    n_deep256 = sum(p.numel() for p in models.UNet(in_channels=1, base_channels=d.base_channels, channel_mults=(1, 2, 4, 4),
                                                   dropout=d.dropout).parameters())
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
    models.save_checkpoint(tmp_path / "pre.pt", models.Diffusion(model, diffusion_config(config)))
    (tmp_path / "unet" / "config.json").unlink()
    diffusion, _ = models.load_checkpoint(tmp_path / "pre.pt")
    loaded, loaded_config = diffusion.network, diffusion.config
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
    x_t = models.noise_boxes(x0, boxes, 8, torch.tensor([10, 500, 999]), make_scheduler(), noise)
    inside = torch.zeros_like(x0, dtype=torch.bool)
    for i, (top, left) in enumerate(boxes.tolist()):
        inside[i, :, top:top + 8, left:left + 8] = True
    assert torch.equal(x_t[~inside], x0[~inside])  # bit-identical
    assert (x_t[inside] != x0[inside]).all()
    # patch-sized noise is the same as the box cut out of full-size noise
    patch_noise = models.crop_boxes(noise, boxes, 8)
    assert torch.equal(models.noise_boxes(x0, boxes, 8, torch.tensor([10, 500, 999]),
                                          make_scheduler(), patch_noise), x_t)

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

def diffusion_config(network_config, patch_size=8):
    channels = network_config["in_channels"]
    return models.diffusion_config(network_config, patch_size=patch_size, input_hu=[[0.0, 80.0]] * channels)

def scratch_config(base_channels=8):
    d = config.DEFAULTS
    return diffusion_config(models.model_config(pretrained=False, in_channels=1, image_size=32, base_channels=base_channels,
                                                channel_mults=d.channel_mults, dropout=d.dropout, hf_model=d.hf_model))

def test_checkpoint_round_trip(tmp_path):
    model, path = tiny_unet(seed=3), tmp_path / "model.pt"
    models.save_checkpoint(path, models.Diffusion(model, scratch_config()), epoch=4, history=[{"val_roc_auc": 0.7}])
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind
    diffusion, checkpoint = models.load_checkpoint(path)
    loaded = diffusion.network
    assert diffusion.config == scratch_config() and checkpoint["epoch"] == 4
    assert diffusion.patch_size == 8 and diffusion.input_hu == [[0.0, 80.0]] and diffusion.scheduler.config.clip_sample is False
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
    models.save_checkpoint(good, models.Diffusion(model, scratch_config()))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SystemExit) as e:
        models.load_checkpoint(truncated)
    assert str(truncated) in str(e.value) and "\n" not in str(e.value)

    mismatch = tmp_path / "mismatch.pt"
    models.save_checkpoint(mismatch, models.Diffusion(model, scratch_config(base_channels=16)))
    with pytest.raises(SystemExit) as e:
        models.load_checkpoint(mismatch)
    assert str(mismatch) in str(e.value) and "do not match" in str(e.value) and "\n" not in str(e.value)

    with pytest.raises(SystemExit, match="no such checkpoint"):
        models.load_checkpoint(tmp_path / "missing.pt")


def test_diffusion_loss_draws_boxes_then_timesteps_then_noise():
    model, scheduler = tiny_unet(), make_scheduler()
    diffusion = as_diffusion(model)
    x0 = torch.rand(3, 1, 32, 32) * 2 - 1
    step = diffusion.loss(x0, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws by hand
    boxes = models.random_boxes(3, 32, 8, gen)
    t = torch.randint(0, 1000, (3,), generator=gen)
    x_t = models.noise_boxes(x0, boxes, 8, t, scheduler, torch.randn(x0.shape, generator=gen))
    assert torch.equal(step.boxes, boxes) and torch.equal(step.t, t) and torch.equal(step.x_t, x_t)
    with torch.no_grad():
        expected = models.patch_loss(model(x_t, t), x0, boxes, 8)
    torch.testing.assert_close(step.loss.detach(), expected)
    assert step.loss.requires_grad  # training backpropagates through it
    fixed = diffusion.loss(x0, gen, boxes=torch.zeros(3, 2, dtype=torch.long), t=torch.full((3,), 250))
    assert (fixed.x_t[:, :, 8:, :] == x0[:, :, 8:, :]).all() and (fixed.t == 250).all()


def test_model_config_channel_mults_and_dropout_reach_the_model():
    d = config.DEFAULTS
    network = models.model_config(pretrained=False, in_channels=1, image_size=64, base_channels=8, channel_mults=[1, 2, 4, 4],
                                  dropout=0.0, hf_model=d.hf_model)
    model = models.build_model(network)
    assert network["channel_mults"] == [1, 2, 4, 4] and model.size_multiple == 8
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    spec_14m = models.build_model(models.model_config(pretrained=False, in_channels=1, image_size=256, channel_mults=[1, 2, 4, 4],
                                                      base_channels=d.base_channels, dropout=d.dropout, hf_model=d.hf_model))
    assert sum(p.numel() for p in spec_14m.parameters()) == DEEPEST_256_PARAMS


def test_checkpoint_from_before_the_diffusion_config_is_completed_or_refused_in_one_line(tmp_path, capsys):
    path, model = tmp_path / "old.pt", tiny_unet()
    old = {k: v for k, v in scratch_config().items() if k not in ("patch_size", "input_hu", "schedule", "precision", "format")}
    torch.save({"model": model.state_dict(), "config": old, "args": {"patch_size": 8, "dataset": "ctich"}}, path)
    diffusion, _ = models.load_checkpoint(path)  # a run of round two: the rest from its args and layout
    assert diffusion.patch_size == 8 and diffusion.input_hu == [[-20.0, 100.0]]  # CT-ICH's brain JPG window
    assert diffusion.scheduler.config.beta_schedule == "squaredcos_cap_v2" and diffusion.precision == "auto"
    assert "before checkpoint format" in capsys.readouterr().out
    del old["base_channels"]  # an edited or much older file: the network cannot be rebuilt
    torch.save({"model": model.state_dict(), "config": old}, path)
    with pytest.raises(SystemExit) as e:
        models.load_checkpoint(path)
    assert str(path) in str(e.value) and "lacks base_channels" in str(e.value) and "\n" not in str(e.value)


def test_simplex_training_noise_is_smooth_and_saved_with_the_model(tmp_path):
    config = dict(scratch_config(), train_noise="simplex")
    diffusion = models.Diffusion(tiny_unet(seed=1), config)
    def neighbour_correlation(diffusion):  # x0 = 0: each box holds the (scaled) noise itself
        step = diffusion.loss(torch.zeros(16, 1, 32, 32), torch.Generator().manual_seed(0), t=torch.full((16,), 999))
        boxes = [step.x_t[i, 0, top:top + 8, left:left + 8] for i, (top, left) in enumerate(step.boxes.tolist())]
        return np.mean([float(torch.corrcoef(torch.stack([b[:, :-1].flatten(), b[:, 1:].flatten()]))[0, 1]) for b in boxes])
    assert neighbour_correlation(diffusion) > 0.4  # smooth, where Gaussian noise has ~0 between neighbouring pixels
    assert abs(neighbour_correlation(models.Diffusion(tiny_unet(seed=1), scratch_config()))) < 0.15
    models.save_checkpoint(tmp_path / "m.pt", diffusion)
    assert models.load_checkpoint(tmp_path / "m.pt")[0].train_noise == "simplex"
    assert models.Diffusion(tiny_unet(), scratch_config()).train_noise == "gaussian"


def test_rebuild_runs_a_given_network_that_has_no_truth_value():
    """A torch.compile'd module raises on len(); rebuild must call the network it is given, not test its truth."""
    unet = tiny_unet()

    class NoLen(nn.Module):  # as torch._dynamo's OptimizedModule: bool() falls back to __len__, which raises
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            return self.inner(x, t) * 2

        def __len__(self):
            raise TypeError("no len()")

    diffusion = as_diffusion(unet)
    x_t, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(diffusion.rebuild(x_t, t, network=NoLen(unet)), 2 * diffusion.rebuild(x_t, t))


def test_dropout_keeps_one_minus_p_scales_the_kept_and_repeats_under_a_seed():
    x = torch.ones(4, 8, 64, 64)
    dropout = models.Dropout(0.1).train()
    torch.manual_seed(3)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 131,072 draws: sd 0.0008
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))  # the expectation of every pixel is kept
    torch.manual_seed(3)
    assert torch.equal(dropout(x), y)  # a seeded epoch (train.train_epoch) repeats its masks
    assert not torch.equal(dropout(x), y)
    # neighbouring elements come from different 16-bit lanes of one draw: no pattern across them
    lanes = kept.flatten()[: 4 * (kept.numel() // 4)].view(-1, 4).float()
    assert (lanes.mean(0) - 0.9).abs().max() < 0.01 and abs(torch.corrcoef(lanes.T)[0, 1].item()) < 0.02
    assert torch.equal(dropout.eval()(x), x) and isinstance(dropout, nn.Dropout)


def test_dropout_passes_the_gradient_through_the_kept_elements_only():
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    y = models.Dropout(0.5).train()(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)
    assert torch.equal(models.Dropout(0.0).train()(x), x)  # p = 0: nothing drawn, nothing dropped
    unet = models.UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), dropout=0.1)
    assert all(type(block.dropout) is models.Dropout for block in unet.down_blocks[0])
