"""The CUDA-only code paths (marker gpu): skipped without a GPU, run by scripts/gpu_check.py on a lent device.
bf16 autocast on CUDA, torch.compile of the network, channels_last scoring, pinned loading, torchrun with NCCL."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cohort
import data
import inputs
import models
import scoring

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def diffusion(device, precision="auto"):
    torch.manual_seed(0)
    network = models.model_config(pretrained=False, in_channels=1, image_size=64, base_channels=16, channel_mults=[1, 2, 4],
                                  dropout=0.0, hf_model="unused")
    config = models.diffusion_config(network, patch_size=16, input_hu=inputs.native_input_hu("rsna", 1), precision=precision)
    return models.build_diffusion(config, device)


def maps(model, settings):
    images = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return scoring.anomaly_maps(model, images.to(model.device), settings.for_image(64), [1, 2, 3, 4]).float().cpu()


def test_bf16_autocast_on_cuda_scores_as_fp32_does():
    cuda = diffusion("cuda")
    assert cuda.autocast_dtype == torch.bfloat16
    reference = maps(diffusion("cpu", "fp32"), scoring.ScoringSettings())
    assert (maps(cuda, scoring.ScoringSettings()) - reference).abs().mean() < 0.01 * reference.abs().mean() + 1e-3


def test_compiled_network_scores_as_eager():
    eager = diffusion("cuda")
    compiled = models.Diffusion(torch.compile(eager.network), eager.config)
    settings = scoring.ScoringSettings(channels_last=False)
    assert (maps(compiled, settings) - maps(eager, settings)).abs().max() < 0.05


def test_channels_last_scores_as_contiguous():
    model = diffusion("cuda")
    plain = maps(model, scoring.ScoringSettings(channels_last=False))
    assert (maps(model, scoring.ScoringSettings(channels_last=True)) - plain).abs().max() < 0.05


def test_pinned_loading(phantom_dir):
    index = cohort.load_index(phantom_dir, num_workers=1)
    cache = data.prepare_slices(phantom_dir, index, np.arange(8), 64, inputs.native_input_hu("rsna", 1), num_workers=1)
    loader = torch.utils.data.DataLoader(data.SliceDataset(cache, index, np.arange(8)), batch_size=4, pin_memory=True)
    batch = next(iter(loader))
    assert batch["image"].is_pinned() and batch["image"].to("cuda", non_blocking=True).is_cuda


def test_torchrun_nccl_on_one_gpu(phantom_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               "--data_dir", phantom_dir, "--output_dir", str(tmp_path / "run"), "--image_size", "64", "--base_channels", "8",
               "--channel_mults", "1", "2", "--epochs", "1", "--max_steps", "2", "--batch_size", "4", "--eval_samples", "4",
               "--num_workers", "0", "--device", "cuda"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"TORCH_DISTRIBUTED_DEBUG": "INFO"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "best_model.pt").exists()
