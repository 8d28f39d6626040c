"""The pDDPM core: the networks, the noise schedule, patched noising and the patch loss, and the Diffusion object
that holds them with the patch size, precision and input representation of a run (what every script trains and
scores with; saved and loaded with the checkpoint). The anomaly maps are scoring.py's (scoring.score_split).

Method: Behrendt et al., "Patched Diffusion Models for Unsupervised Anomaly Detection in Brain
MRI", MIDL 2023. A network that predicts the clean slice x0 from a slice in which only one box
was noised learns to fill a box in from its healthy surroundings; where the tissue in the box is
not healthy (a bleed), the fill-in differs from what is there, and that difference is the map.

Which reading of the spec's architecture this is
------------------------------------------------
The spec lists the encoder levels as 64, 128, 256, 512 channels (the deepest at 1/8 of the image
size, no downsample after it), a 512-channel middle (ResBlock, 4-head self-attention, ResBlock)
and a decoder that concatenates one skip per level (512+512 -> 256, 256+256 -> 128,
128+128 -> 64, 64+64 -> 64), and says "~14M parameters". Those two statements disagree. UNet()
builds the description literally (channel_mults=(1, 2, 4, 8)):

    base_channels=64, channel_mults=(1, 2, 4, 8): 30,281,793 parameters, 165.0 GFLOPs at 256^2
    base_channels=64, channel_mults=(1, 2, 4, 4): 14,805,569 parameters, 132.8 GFLOPs at 256^2

(measured with `python models.py`, which prints params= and gflops= for forward, batch 1).
The second reading is the one that matches the stated count; it is one argument away
(`channel_mults=[1, 2, 4, 4]` in the config). We default to the description because it says
what every layer is, whereas the count is a one-word summary that could have been rounded from
any model. Which one detects bleeds better is for held-out data to say, not this comment.

Shapes: images are [B, C, H, W] in [-1, 1]; boxes are [B, 2] LongTensors of (top, left);
t is an int or a [B] tensor of timesteps in [0, 1000).
"""
import collections
import math
import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from pytorch_msssim import ssim
from torch.utils.flop_counter import FlopCounterMode

import cohort
import inputs
import runfiles


# ----------------------------------------------------------------------------------------------
# noise schedule

# diffusers' DDPMScheduler arguments; a checkpoint records them (Diffusion.config), so a later default never changes
# how an older model is scored. clip_sample is off: we never sample, and clipping would hide the error of an x0
# prediction that overshoots [-1, 1].
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
            "clip_sample": False}
NUM_TRAIN_TIMESTEPS = SCHEDULE["num_train_timesteps"]  # t runs over 0..999


def _timesteps(t, batch_size, device):
    """An int, a 0-d or a [B] tensor of timesteps -> a [B] long tensor on device."""
    t = torch.as_tensor(t, device=device).long().reshape(-1)
    return t.expand(batch_size) if t.numel() == 1 else t


# ----------------------------------------------------------------------------------------------
# from-scratch UNet (the spec's architecture)

def group_norm(channels):
    # 32 groups at full width (the usual DDPM choice), never fewer than two channels per group,
    # so the same code runs at tiny test widths (base_channels=8).
    groups = math.gcd(32, channels // 2) if channels % 2 == 0 else 1
    return nn.GroupNorm(groups, channels)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the timesteps t [B] -> [B, dim] (Transformer positions)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def keep_mask(shape, p):
    """A dropout keep-mask of shape (True with probability 1 - p, p rounded to 1/65536) from torch's default CPU
    generator: 16 bits of a 64-bit draw per element, four elements a draw."""
    n = math.prod(shape)
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    # each int16 lane of a word is uniform on [-32768, 32767]; drop the lowest round(p * 65536) of its values
    return (words.view(torch.int16)[:n] >= round(p * 65536) - 32768).view(shape)


class Dropout(nn.Dropout):
    """nn.Dropout, with the mask of a CPU training step made by keep_mask. Why: torch's CPU dropout (bernoulli_) draws
    one generator number per element on one thread; at the CT-ICH recipe's shapes that was 23 % of a training step on
    our 2-core AMD EPYC, keep_mask a quarter of it (RESULTS, 2026-12-06). Elsewhere (CUDA's fused kernel is fast) and
    in eval mode it is nn.Dropout. Both draw from torch's default generator, so a seeded epoch repeats exactly."""

    def forward(self, x):
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        return x * (keep_mask(x.shape, self.p).to(x.dtype) * (1.0 / (1.0 - self.p)))


class ResBlock(nn.Module):
    """GN -> SiLU -> Conv -> + time -> GN -> SiLU -> Dropout -> Conv, plus a (1x1) skip."""

    def __init__(self, in_channels, out_channels, time_dim, dropout):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of the deepest feature map, residual."""

    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        # heads split so the feature dim is the contiguous one: the fused CPU/GPU attention
        # kernels need that, otherwise torch silently takes the slow unfused path
        qkv = self.qkv(tokens).reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # each [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(h).transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """x0-predicting UNet of the spec. Level i has base_channels * channel_mults[i] channels and
    two ResBlocks; every level but the last halves the resolution after its ResBlocks. The
    decoder mirrors it, concatenating the encoder output of the same level (one skip per level)."""

    # the architecture's fixed parts (the spec's); the run's choices (width, levels, dropout) are config.RunConfig's
    num_res_blocks, attention_heads, time_embed_dim, time_dim = 2, 4, 64, 256

    def __init__(self, *, in_channels, base_channels, channel_mults, dropout):
        super().__init__()
        num_res_blocks, attention_heads = self.num_res_blocks, self.attention_heads
        time_embed_dim, time_dim = self.time_embed_dim, self.time_dim
        widths = [base_channels * m for m in channel_mults]
        self.size_multiple = 2 ** (len(widths) - 1)
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        channels = base_channels
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(channels, width, time_dim, dropout))
                channels = width
            self.down_blocks.append(nn.ModuleList(blocks))
            last = level == len(widths) - 1
            self.downsamples.append(nn.Identity() if last else
                                    nn.Conv2d(width, width, 3, stride=2, padding=1))

        self.mid_block1 = ResBlock(channels, channels, time_dim, dropout)
        self.mid_attention = SelfAttention(channels, attention_heads)
        self.mid_block2 = ResBlock(channels, channels, time_dim, dropout)

        # decoder level i: [h, skip_i] (2 * width_i) -> width_{i-1} (base_channels at level 0)
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            out_width = widths[level - 1] if level > 0 else base_channels
            blocks = []
            channels = 2 * widths[level]
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(channels, out_width, time_dim, dropout))
                channels = out_width
            self.up_blocks.append(nn.ModuleList(blocks))
            self.upsamples.append(nn.Identity() if level == 0 else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(out_width, out_width, 3, padding=1)))

        self.norm_out = group_norm(base_channels)
        self.conv_out = nn.Conv2d(base_channels, in_channels, 3, padding=1)

    def forward(self, x_t, t):
        if x_t.shape[-1] % self.size_multiple or x_t.shape[-2] % self.size_multiple:
            raise ValueError(f"UNet input {tuple(x_t.shape[-2:])} is not a multiple of "
                             f"{self.size_multiple} (one halving per level)")
        t = _timesteps(t, x_t.shape[0], x_t.device)
        emb = self.time_mlp(timestep_embedding(t, self.time_embed_dim))
        h = self.conv_in(x_t)
        skips = []
        for blocks, downsample in zip(self.down_blocks, self.downsamples):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            h = downsample(h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)
        for blocks, upsample in zip(self.up_blocks, self.upsamples):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            h = upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# pretrained diffusers UNet behind the same call signature

class PretrainedUNet(nn.Module):
    """A diffusers UNet2DModel (default google/ddpm-ema-celebahq-256, 3 channels) fine-tuned to
    predict x0. hf_model is a hub id or a local directory written by save_pretrained (offline
    clusters). With unet_config (stored in our checkpoints) the architecture is built without
    touching the hub and the weights come from the checkpoint.

    The input must have the model's channel count: inputs.make_input gives the 3-channel model
    three CT windows (brain, subdural, bone). We do not repeat or average channels here."""

    def __init__(self, hf_model, unet_config=None):
        super().__init__()
        self.hf_model = str(hf_model)
        if unet_config is not None:
            self.unet = UNet2DModel.from_config(unet_config)
        else:
            self.unet = UNet2DModel.from_pretrained(self.hf_model, low_cpu_mem_usage=False)
        self.in_channels = self.unet.config.in_channels
        self.size_multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)

    def forward(self, x_t, t):
        if x_t.shape[1] != self.in_channels:
            raise ValueError(f"{self.hf_model} takes {self.in_channels} channels, got {x_t.shape[1]}")
        return self.unet(x_t, _timesteps(t, x_t.shape[0], x_t.device)).sample


def _plain(value):
    """diffusers configs hold tuples and FrozenDicts; checkpoints hold plain lists and dicts."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def model_config(*, pretrained, in_channels, image_size, base_channels, channel_mults, dropout, hf_model):
    """The plain-data model config that checkpoints store and build_model reads (the values: config.RunConfig's
    flags; its defaults are the spec's description, 30.3M parameters; channel_mults 1 2 4 4 is its "~14M" reading,
    14.8M)."""
    return {"kind": "pretrained" if pretrained else "scratch", "in_channels": in_channels, "base_channels": base_channels,
            "image_size": image_size, "hf_model": str(hf_model), "channel_mults": [int(m) for m in channel_mults],
            "dropout": float(dropout)}


def build_model(config):
    """config: plain data with kind ("scratch" | "pretrained"), in_channels, base_channels,
    image_size, hf_model; optional channel_mults, dropout; unet_config (set by save_checkpoint)."""
    if config["kind"] == "pretrained":
        if config.get("context_slices", 0):
            raise SystemExit("error: --context_slices needs the scratch UNet: a pretrained UNet2DModel takes its own channels")
        try:
            return PretrainedUNet(config["hf_model"], config.get("unet_config"))
        except (OSError, ValueError, EnvironmentError) as e:  # no such hub id / folder, offline, not a UNet2DModel
            raise SystemExit(f"error: {config['hf_model']}: cannot load a UNet2DModel "
                             f"({' '.join(str(e).split())[:200]})")
    if config["kind"] == "scratch":  # in_channels: the slice's own channels; its neighbours' come on top (2.5-D)
        return UNet(in_channels=config["in_channels"] * (1 + 2 * config.get("context_slices", 0)),
                    base_channels=config["base_channels"],
                    channel_mults=tuple(config["channel_mults"]), dropout=config["dropout"])
    raise ValueError(f"unknown model kind {config['kind']!r} (scratch | pretrained)")


def save_standin(directory, in_channels=3, seed=0):
    """A tiny, randomly initialised UNet2DModel with the block types of
    google/ddpm-ema-celebahq-256 (attention one level above the bottom), written with
    save_pretrained. It stands in for the hub model where the hub is unreachable (tests, the
    demo): --hf_model DIR then runs the same code path as the real model. Not pretrained. Seeded, so that
    the demo's stand-in run gives the same figures every time."""
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=64, in_channels=in_channels, out_channels=in_channels,
                       layers_per_block=2, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False,
                       freq_shift=1, norm_eps=1e-6)
    unet.save_pretrained(directory)
    return unet


def check_flag(ok, flag, value, what):
    """The one form of a flag check right after parsing: SystemExit("error: --<flag> <value>: <what>") unless ok."""
    if not ok:
        raise SystemExit(f"error: --{flag} {value}: {what}")


def pick_device(name="auto"):
    """"auto" -> cuda if present, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: not a device name (auto, cpu, cuda, cuda:N, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name}: MPS is not available here (use --device cpu or auto)")
    return device


def cpu_has_native_bf16():
    # bf16 autocast pays off only where the CPU computes bf16 natively (AVX512-BF16 / AMX):
    # on this project's machine it made a training step 1.9-2.9x faster. Elsewhere it is
    # emulated and slower than fp32.
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision, device):
    """--precision {auto,fp32,bf16} -> the torch.autocast dtype, or None for plain fp32.
    auto = bf16 on CUDA GPUs that support it and on CPUs with native bf16, else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def setup_distributed(device_name="auto"):
    """-> (rank, world, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run is rank 0 of 1.
    Each process drives the GPU of its local rank (backend nccl), or the CPU (backend gloo)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def run_script(main):
    """A script's main(), as `python script.py` or under torchrun. Under torchrun (WORLD_SIZE > 1) a rank that stops
    with the project's one-line error says it as `rank N: error: ...` on stderr, once, and exits 1; a rank that loses
    its peers in a collective (another rank failed first) says so in one line instead of a gloo/NCCL traceback.
    torchrun's own report after them (its ChildFailedError traceback) is the launcher's and cannot be silenced here."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        result = main()
        if runfiles.repeated_notes():
            print(runfiles.repeated_notes())
        return result
    rank = os.environ.get("RANK", "?")
    try:
        return main()
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise
        line = stop.code
    except torch.distributed.DistError as error:
        line = f"stopped: lost the other processes ({type(error).__name__}); see the failing rank's line"
    sys.stdout.flush()
    print(f"rank {rank}: {' '.join(line.split())}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def teardown_distributed(world):
    """Leave together: rank 0 writes plots and checkpoints long after the others finish, and a rank that tore its
    process group down alone was seen to hang there once (gloo, CPU, a local CI run)."""
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, diffusion, **extra_plain_data):
    """Write {"model": state_dict, "config": diffusion.config, **extra} atomically: a crash mid-write leaves the
    previous checkpoint in place, never a truncated one."""
    config = dict(diffusion.config)
    if isinstance(diffusion.network, PretrainedUNet):
        config["unet_config"] = _plain(dict(diffusion.network.unet.config))  # rebuild offline on load
    checkpoint = {"model": diffusion.network.state_dict(), "config": config, **extra_plain_data}
    runfiles.write_atomically(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, device="cpu", precision=None):
    """-> (Diffusion in eval mode on device, checkpoint dict); precision: None = the run's. Refuses anything that
    is not plain tensors and data (weights_only), a config without what builds the model, and weights that do not
    fit it or are not finite, each in one line naming the file."""
    checkpoint = _read_checkpoint(path, device)
    config = complete_config(checkpoint, path)
    network = build_model(config)
    try:
        network.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise SystemExit(f"error: {path}: weights do not match the architecture in its config "
                         f"({str(e).strip().splitlines()[0]})")
    # a model with one NaN weight scores every slice NaN: say so now, not after hours of scoring
    bad = [name for name, tensor in checkpoint["model"].items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise SystemExit(f"error: {path}: non-finite weights (NaN or inf) in {bad[0]}"
                         + (f" and {len(bad) - 1} other tensor(s)" if len(bad) > 1 else "") + "; the checkpoint is unusable")
    return Diffusion(network.to(device).eval(), config, precision), checkpoint


def _read_checkpoint(path, device):
    """The checkpoint dict, loaded with weights_only=True, or a one-line SystemExit."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a damaged file can fail anywhere inside the unpickler
        text = str(e)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            what = f"a pickled {found.group(1)}" if found else "an object"
            raise SystemExit(f"error: {path}: refused to load, it holds {what}, not only tensors and "
                             f"plain data (checkpoints are loaded with weights_only=True)")
        # torch's own text runs to several sentences of advice; its first sentence says what is wrong
        first_line = re.split(r"(?<=\.) ", text.strip().splitlines()[0])[0][:160] if text.strip() else ""
        raise SystemExit(f"error: {path}: unreadable or truncated checkpoint ({type(e).__name__}: {first_line})")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or not isinstance(checkpoint.get("config"), dict):
        raise SystemExit(f"error: {path}: not a ct-pddpm checkpoint (no 'model' and 'config' entries)")
    return checkpoint


REQUIRED_CONFIG = {"scratch": ("in_channels", "image_size", "base_channels"), "pretrained": ("in_channels", "image_size", "hf_model")}


def complete_config(checkpoint, path):
    """The checkpoint's config, checked and completed: a key that builds the network missing is a one-line
    SystemExit naming it and the format that wrote the file; what a checkpoint older than FORMAT lacks (patch
    size, input representation, schedule, precision) is taken from its saved args or the layout it trained on,
    with a note."""
    config, args = dict(checkpoint["config"]), checkpoint.get("args") or {}
    written = f"checkpoint format {config['format']}" if "format" in config else f"a ct-pddpm before checkpoint format {FORMAT}"
    if config.get("kind") not in REQUIRED_CONFIG:
        raise SystemExit(f"error: {path}: its config has model kind {config.get('kind')!r} (scratch | pretrained; "
                         f"written by {written})")
    missing = [key for key in REQUIRED_CONFIG[config["kind"]] if key not in config]
    if missing:
        raise SystemExit(f"error: {path}: its model config lacks {', '.join(missing)} (written by {written}, or edited); "
                         "the network cannot be rebuilt from it")
    defaults = {"patch_size": lambda: args.get("patch_size") or config["image_size"] // 4, "schedule": lambda: dict(SCHEDULE),
                "precision": lambda: args.get("precision") or "auto",
                "input_hu": lambda: inputs.native_input_hu(trained_layout(args), config["in_channels"], trained_window(args))}
    config.setdefault("train_noise", "gaussian")  # the only training noise before it was recorded: no note
    config.setdefault("framing", "none")  # the only framing before it was recorded: no note
    config.setdefault("context_slices", 0)  # 2-D models only before it was recorded: no note
    if config["kind"] == "scratch":  # the only widths and dropout of the scratch UNet before they were recorded
        config.setdefault("channel_mults", [1, 2, 4, 8])
        config.setdefault("dropout", 0.1)
    filled = [key for key in defaults if key not in config]
    for key in filled:
        config[key] = defaults[key]()
    if filled:
        print(f"note: {path}: written by {written}; {', '.join(filled)} taken from its args or the layout it trained on "
              f"(input {config['input_hu']} HU)")
    return config


def trained_window(args):
    """The stated window (low, high) HU of the 2-D images a run trained on (its --image_window, else its folder's), or
    None for another layout."""
    if trained_layout(args) != "images":
        return None
    try:
        return cohort.stated_window(args.get("data_dir") or ".", args.get("image_window"))
    except SystemExit:  # its window.txt is unreadable now
        return None


def trained_layout(args):
    """The data layout a run trained on (its --dataset, else detected from its data folder; "rsna" when gone)."""
    if args.get("dataset") not in (None, "auto"):
        return args["dataset"]
    data_dir = args.get("data_dir")
    try:
        return cohort.detect_dataset(data_dir) if data_dir else "rsna"
    except SystemExit:  # the folder is gone or holds no known layout any more
        return "rsna"


# ----------------------------------------------------------------------------------------------
# patched noising and the patch loss

def random_boxes(n, image_size, patch_size, generator=None):
    """n uniformly placed boxes fully inside the image -> LongTensor [n, 2] of (top, left)."""
    return torch.randint(0, image_size - patch_size + 1, (n, 2), generator=generator)


def crop_boxes(images, boxes, patch_size):
    """[B, C, H, W] and boxes [B, 2] -> the boxed patches [B, C, p, p]."""
    return torch.stack([image[:, top:top + patch_size, left:left + patch_size]
                        for image, (top, left) in zip(images, boxes.tolist())])


def noise_boxes(x0, boxes, patch_size, t, scheduler, noise):
    """Noise the box of each slice to timestep t with the scheduler's q(x_t | x0); every pixel
    outside the box is copied, bit for bit. noise is [B, C, p, p] (patch-sized) or [B, C, H, W]
    (the boxes are cut out of it)."""
    if noise.shape[-2:] != (patch_size, patch_size):
        noise = crop_boxes(noise, boxes, patch_size)
    t = _timesteps(t, x0.shape[0], x0.device)
    noisy = scheduler.add_noise(crop_boxes(x0, boxes, patch_size), noise.to(x0), t)
    x_t = x0.clone()
    for i, (top, left) in enumerate(boxes.tolist()):
        x_t[i, :, top:top + patch_size, left:left + patch_size] = noisy[i]
    return x_t


def patch_loss(x0_hat, x0, boxes, patch_size):
    """MSE + (1 - SSIM) between prediction and clean slice, on the noised box only (the rest of
    the slice was given to the network, so copying it teaches nothing)."""
    pred = crop_boxes(x0_hat, boxes, patch_size).float()
    target = crop_boxes(x0, boxes, patch_size).float()
    # SSIM's Gaussian window must fit in the patch (valid convolution) and be odd.
    win_size = min(11, patch_size if patch_size % 2 else patch_size - 1)
    structural = ssim(pred, target, data_range=2.0, win_size=win_size)  # [-1, 1] images
    return F.mse_loss(pred, target) + (1.0 - structural)


PatchStep = collections.namedtuple("PatchStep", "loss x_t x0_hat boxes t")


# ----------------------------------------------------------------------------------------------
# the diffusion object: what every script trains and scores with

FORMAT = 3  # checkpoint format: 3 = config holds the Diffusion's patch_size, input_hu, schedule and precision


class Diffusion:
    """The trained model as every script uses it: the network with its noise schedule, training patch size,
    precision (the autocast dtype on the network's device) and the input representation it was trained on
    (input_hu: per channel, the HU at input -1 and +1, inputs.native_input_hu; an inputs.InputHU that also carries
    the framing, config["framing"], "none" for checkpoints before it). config is the plain data a
    checkpoint records (model_config plus those four); save_checkpoint / load_checkpoint write and read it, so no
    caller builds a scheduler.

    loss(x0, generator): one patched denoising step (training, validation loss, diagnostics, bench.py).
    noise(x0, boxes, t, noise, patch_size): the boxes of x0 noised to t, every other pixel copied.
    rebuild(x_t, t): the network's x0 prediction under the precision's autocast."""

    def __init__(self, network, config, precision=None):
        self.network, self.config = network, dict(config)
        self.patch_size = int(config["patch_size"])
        self.train_noise = config.get("train_noise", "gaussian")
        self.framing = config.get("framing", "none")  # inputs.FRAMINGS; carried by input_hu to every reader
        # 2.5-D: the slices just below and above as extra input channels (data.with_context), noised with the slice
        # in the same box; image_channels: the slice's own channels, the first of the input, the ones scored
        self.context_slices = int(config.get("context_slices", 0))
        self.image_channels = len(config["input_hu"])
        self.input_hu = inputs.InputHU(config["input_hu"], self.framing)
        self.scheduler = DDPMScheduler(**config["schedule"])
        self.precision = precision or config.get("precision", "auto")
        self.device = next(network.parameters(), torch.zeros(0)).device  # a test double may have no weights
        self.autocast_dtype = autocast_dtype(self.precision, self.device)

    def noise(self, x0, boxes, t, noise, patch_size=None):
        return noise_boxes(x0, boxes, patch_size or self.patch_size, t, self.scheduler, noise)

    def rebuild(self, x_t, t, network=None):
        """x0 predicted from x_t at t (network: e.g. the DistributedDataParallel wrapper of self.network)."""
        with torch.autocast(x_t.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return (self.network if network is None else network)(x_t, t)

    def loss(self, x0, generator, boxes=None, t=None, network=None):
        """One patched denoising step: per slice a box (uniform, fully inside), a timestep (uniform in [0, T)) and
        noise, drawn in that order from generator (a CPU torch.Generator) unless boxes / t are given; noise the box,
        rebuild, and the patch loss on the box. Gradients flow unless the caller turns them off. -> PatchStep."""
        n, device, p = x0.shape[0], x0.device, self.patch_size
        if boxes is None:
            boxes = random_boxes(n, x0.shape[-1], p, generator)
        if t is None:
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)
        t = torch.as_tensor(t).to(device)
        if self.train_noise == "simplex":  # the box's noise only, at the box's scale (as scoring draws it per window)
            noise = torch.stack([smooth_noise((x0.shape[1], p, p), generator) for _ in range(n)]).to(device)
        else:
            noise = torch.randn(x0.shape, generator=generator).to(device)
        x_t = self.noise(x0, boxes, t, noise)
        x0_hat = self.rebuild(x_t, t, network)
        return PatchStep(patch_loss(x0_hat.float(), x0, boxes, p), x_t, x0_hat, boxes, t)


def diffusion_config(network_config, *, patch_size, input_hu, precision="auto", train_noise="gaussian", framing="none",
                     context_slices=0):
    """A Diffusion's config: the network's (model_config) with the patch size, input representation, framing
    (inputs.FRAMINGS), noise schedule, training noise (TRAIN_NOISES) and precision of the run."""
    if train_noise not in TRAIN_NOISES:
        raise ValueError(f"train_noise must be one of {', '.join(TRAIN_NOISES)}, got {train_noise!r}")
    if framing not in inputs.FRAMINGS:
        raise ValueError(f"framing must be one of {', '.join(inputs.FRAMINGS)}, got {framing!r}")
    if context_slices not in CONTEXT_SLICES:
        raise ValueError(f"context_slices must be one of {', '.join(map(str, CONTEXT_SLICES))}, got {context_slices!r}")
    return dict(network_config) | {"patch_size": int(patch_size), "input_hu": [[float(v) for v in pair] for pair in input_hu],
                                   "framing": framing, "context_slices": int(context_slices),
                                   "schedule": dict(SCHEDULE), "train_noise": train_noise, "precision": precision,
                                   "format": FORMAT}


TRAIN_NOISES = ("gaussian", "simplex")
CONTEXT_SLICES = (0, 1)  # 2.5-D: how many slices below and above the model sees (0: the slice alone)


def smooth_noise(shape, generator, octaves=4, persistence=0.8, base_cells=2):
    """Simplex-like noise [C, P, P]: octaves of Gaussian lattices (2, 4, 8, 16 cells across the window) upsampled
    bicubically, weighted by persistence ** octave, then standardised to mean 0, std 1 per channel, so the noise
    schedule sees the same variance as Gaussian noise. The official pDDPM uses simplex noise of this kind (in
    training and scoring: train.py --train_noise, scoring --noise); no maintained simplex package on PyPI is
    vectorised (opensimplex loops in Python), and smooth lattice noise gives the property that matters: structure
    larger than a pixel, which a model cannot average away."""
    channels, size = shape[0], shape[-1]
    total = torch.zeros(shape)
    for octave in range(octaves):
        cells = min(base_cells * 2 ** octave, size)
        lattice = torch.randn((1, channels, cells + 1, cells + 1), generator=generator)
        total += persistence ** octave * F.interpolate(lattice, size=(size, size), mode="bicubic", align_corners=True)[0]
    total -= total.mean(dim=(-2, -1), keepdim=True)
    return total / total.std(dim=(-2, -1), keepdim=True).clamp(min=1e-6)


def build_diffusion(config, device="cpu", precision=None):
    """A new Diffusion (fresh network, on device) from a diffusion_config."""
    return Diffusion(build_model(config).to(device), config, precision)


# ----------------------------------------------------------------------------------------------
# size of the model

def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """QK^T and attention x V, 2 FLOPs per multiply-add (FlopCounterMode's convention)."""
    *batch, q_len, head_dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * q_len * k_len * (head_dim + v_dim)


def count_flops(model, image_size, channels):
    """Forward FLOPs of model at batch 1. FlopCounterMode has no formula for the CPU kernel of
    scaled_dot_product_attention (it counts it as 0), so its two matmuls are counted by hand
    (_sdpa_flops) through custom_mapping."""
    x = torch.zeros(1, channels, image_size, image_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops})
    with torch.no_grad(), counter:
        model(x, 0)
    return counter.get_total_flops()
