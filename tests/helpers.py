"""Helpers shared by the test modules (one version of each; fixtures are in conftest.py). Not a test module."""
import contextlib
import csv
import io
import os
import signal
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PNG = b"\x89PNG\r\n\x1a\n"
# --standalone: a local rendezvous on a free port, so a test never collides with another run.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


# ---------------------------------------------------------------------------------------------
# running the scripts

def quiet(fn, *args, **kwargs):
    """fn(...) with its stdout captured -> (result, stdout)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def tiny_train_args(data_dir, out, *extra):
    """train.py flags for a run of seconds on the 64 px phantom (32 px inputs, an 8-channel UNet, one epoch); later
    flags in `extra` win."""
    return ["--data_dir", str(data_dir), "--output_dir", str(out), "--image_size", "32", "--patch_size", "8",
            "--stride", "8", "--base_channels", "8", "--num_samples", "12", "--eval_samples", "all", "--batch_size", "8",
            "--epochs", "1", "--num_workers", "0", "--eval_batch_size", "64", "--seed", "1", *map(str, extra)]


def run_cli(cmd, timeout=300, **popen):
    """A command line as a user runs it, in the repository, one OpenMP thread. On timeout its whole process group
    (torchrun's workers too, which would otherwise outlive the test) is killed and the test fails.
    -> CompletedProcess with text stdout / stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree(folder):
    """{relative path: size} of every file under folder."""
    return {os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(folder) for name in names}


# ---------------------------------------------------------------------------------------------
# DICOM files

def edit_dicom(path, **changes):
    """Set header fields of a DICOM file in place; a value of None deletes the field."""
    ds = pydicom.dcmread(str(path))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(str(path))


def head_hu(rows=32, columns=32):
    """Integer HU: a brain disc (30) in a skull ring (1000) and scalp (40), in air (-1000)."""
    row, col = np.mgrid[0:rows, 0:columns]
    radius = np.hypot(row - (rows - 1) / 2, col - (columns - 1) / 2) / (min(rows, columns) / 2)
    hu = np.full((rows, columns), -1000.0, np.float32)
    hu[radius < 0.92] = 40.0
    hu[radius < 0.83] = 1000.0
    hu[radius < 0.73] = 30.0
    return hu


def head_and_radius(size=96, gap_degrees=0):
    """(HU, radius): a disc of brain (30 HU) in a 1000 HU skull ring and a 40 HU scalp, in air; optionally a gap in
    the skull. At 96 px the brain ends at radius 35, the skull at 40, the scalp at 44 (radius in 96 px units)."""
    row, col = np.mgrid[0:size, 0:size] - (size - 1) / 2
    radius = np.hypot(row, col) * 96 / size
    hu = np.full((size, size), -1000.0, np.float32)
    hu[radius < 44] = 40.0
    hu[radius < 40] = 1000.0
    hu[radius < 35] = 30.0
    if gap_degrees:
        gap = (np.abs(np.degrees(np.arctan2(row, col))) < gap_degrees / 2) & (radius >= 35) & (radius < 40)
        hu[gap] = 40.0
    return hu, radius


CORPUS_PATIENT = "ID_corpus"


def ct_file(path, hu=None, *, instance, quirk12=False, slope=1.0, **changes):
    """A 32 px CT DICOM of one healthy patient (CORPUS_PATIENT), as the phantom writes them, then header changes
    (None deletes)."""
    import phantom
    phantom.write_ct_dicom(str(path), head_hu() if hu is None else hu, patient_id=CORPUS_PATIENT,
                           study_uid="1.2.826.0.1.5", series_uid="1.2.826.0.1.5.1", instance=instance, z=5.0 * instance,
                           spacing=0.75, slope=slope, intercept=-1024.0, quirk12=quirk12)
    if changes:
        edit_dicom(path, **changes)


def cut(path, keep):
    """Keep the first `keep` bytes of a file (negative: drop the last -keep)."""
    content = open(path, "rb").read()
    open(path, "wb").write(content[:keep])


def one_scan_folder(phantom_dir, folder, hemorrhage=True):
    """The files and label rows of one patient of the phantom as an RSNA-layout folder: a hemorrhage patient (never a
    training patient), or a healthy one; the second of them, which has none of the phantom's quirk files. -> folder."""
    import shutil
    labels = list(csv.reader(open(os.path.join(phantom_dir, "stage_2_train.csv"))))
    positive = {row[0].rsplit("_", 1)[0] for row in labels[1:] if row[0].endswith("_any") and row[1] == "1"}
    by_patient = {}
    for name in sorted(os.listdir(os.path.join(phantom_dir, "stage_2_train"))):
        ds = pydicom.dcmread(os.path.join(phantom_dir, "stage_2_train", name), stop_before_pixels=True)
        by_patient.setdefault(ds.PatientID, []).append(name)
    chosen = [p for p, names in sorted(by_patient.items()) if any(n[:-4] in positive for n in names) == hemorrhage]
    names = by_patient[chosen[1]]
    os.makedirs(folder / "stage_2_train")
    for name in names:
        shutil.copy(os.path.join(phantom_dir, "stage_2_train", name), folder / "stage_2_train" / name)
    keep = {n[:-4] for n in names}
    with open(folder / "stage_2_train.csv", "w", newline="") as f:
        csv.writer(f).writerows([labels[0]] + [row for row in labels[1:] if row[0].rsplit("_", 1)[0] in keep])
    return folder


# ---------------------------------------------------------------------------------------------
# CT-ICH folders

def write_ctich(root, slices_per_patient=(3, 3, 2)):
    """A tiny CT-ICH folder: 64 px brain/bone JPGs of patients 050.. (051's slice 2 holds a bleed). -> the rows of
    its hemorrhage_diagnosis.csv (header first; the file itself is the caller's to write)."""
    hu, radius = head_and_radius(64)
    header = "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,No_Hemorrhage,Fracture_Yes_No"
    rows = [header]
    for k, count in enumerate(slices_per_patient):
        pid = 50 + k
        for folder in ("brain", "bone"):
            os.makedirs(os.path.join(root, "Patients_CT", f"{pid:03d}", folder), exist_ok=True)
        for n in range(1, count + 1):
            bleed = pid == 51 and n == 2
            slice_hu = np.where(radius < 6, 75.0, hu) if bleed else hu
            brain = np.round((np.clip(slice_hu, -20, 100) + 20) / 120 * 255).astype(np.uint8)
            bone = np.round((np.clip(slice_hu, -450, 1550) + 450) / 2000 * 255).astype(np.uint8)
            Image.fromarray(brain).save(os.path.join(root, "Patients_CT", f"{pid:03d}", "brain", f"{n}.jpg"), quality=95)
            Image.fromarray(bone).save(os.path.join(root, "Patients_CT", f"{pid:03d}", "bone", f"{n}.jpg"), quality=95)
            rows.append(f"{pid},{n},0,{int(bleed)},0,0,0,{int(not bleed)},0")
    return rows


def write_ctich_with_masks(root):
    """write_ctich with three hemorrhage slices and its CSV: 051/2 with a good *_HGE_Seg.jpg mask, 050/2 without one,
    052/1 with a mask of the wrong size. -> the CSV rows."""
    rows = write_ctich(root)
    rows = [r.replace("50,2,0,0,0,0,0,1,0", "50,2,0,0,0,1,0,0,0").replace("52,1,0,0,0,0,0,1,0", "52,1,0,0,0,1,0,0,0") for r in rows]
    with open(os.path.join(root, "hemorrhage_diagnosis.csv"), "w", encoding="utf-8-sig", newline="") as f:
        f.write("\r\n".join(rows) + "\r\n")
    _, radius = head_and_radius(64)
    brain = os.path.join(root, "Patients_CT", "{}", "brain", "{}_HGE_Seg.jpg")
    Image.fromarray(np.where(radius < 6, 255, 0).astype(np.uint8)).save(brain.format("051", 2), quality=90)
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(brain.format("052", 1))
    return rows


# ---------------------------------------------------------------------------------------------
# tiny networks

def tiny_unet(in_channels=1, seed=0):
    """The scratch UNet at 8 channels (the run's other defaults, config.RunConfig's), in eval mode."""
    import config
    import models
    torch.manual_seed(seed)
    d = config.DEFAULTS
    return models.UNet(in_channels=in_channels, base_channels=8, channel_mults=d.channel_mults, dropout=d.dropout).eval()


def make_scheduler():
    import models
    from diffusers import DDPMScheduler
    return DDPMScheduler(**models.SCHEDULE)


def as_diffusion(network, patch_size=8, precision="fp32", channels=1):
    """A Diffusion around a test network (DICOM brain window input)."""
    import models
    return models.Diffusion(network, {"patch_size": patch_size, "input_hu": [[0.0, 80.0]] * channels,
                                      "schedule": models.SCHEDULE}, precision)


def disc_slice(size=32, blob=False, seed=0):
    """One slice [1, 1, S, S]: air (-1) around a disc of healthy tissue (0.2 + noise), optionally with a bright
    bleed-like blob inside, and its brain mask [1, S, S]."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    brain = (yy - centre) ** 2 + (xx - centre) ** 2 < (0.4 * size) ** 2
    gen = torch.Generator().manual_seed(seed)
    image = torch.where(brain, 0.2 + 0.02 * torch.randn(size, size, generator=gen), torch.tensor(-1.0))
    if blob:
        image[(yy - centre - 3) ** 2 + (xx - centre + 2) ** 2 < (size / 10) ** 2] = 0.9
    return image[None, None], brain[None]


class HealthyTissue(torch.nn.Module):
    """Test double for an x0 predictor that always answers 'healthy tissue'; records what it saw."""

    def __init__(self, value=0.2):
        super().__init__()
        self.value = value
        self.input_shapes = []

    def forward(self, x_t, t):
        self.input_shapes.append(tuple(x_t.shape))
        return torch.full_like(x_t, self.value)


def copy_run(run, tmp_path, name="run"):
    """A copy of a run folder (the shared tiny_run) that a test may change. -> its path."""
    import shutil
    out = tmp_path / name
    shutil.copytree(run, out)
    return out


def stand_in_figures(monkeypatch):
    """plots.py's figures neither built nor drawn: each writes an empty file where its figure would go (a figure costs
    0.2-1 s of matplotlib here); conftest's no_figures fixture, or a module fixture's MonkeyPatch.context().
    -> the paths asked for, in order."""
    import plots
    import runfiles
    asked = []

    def empty_file(path):
        asked.append(str(path))
        runfiles.write_atomically(path, lambda f: None)

    def plot_overlays(path, examples, *args, **kwargs):  # as plots.plot_overlays: no file, and False, without examples
        if not any(examples.values()):
            return False
        empty_file(path)
        return True
    monkeypatch.setattr(plots, "plot_scores", lambda path, *args, **kwargs: empty_file(path))
    monkeypatch.setattr(plots, "plot_runs", lambda histories, labels, path: empty_file(path))
    monkeypatch.setattr(plots, "save_diagnostics", lambda path, *args, **kwargs: empty_file(path))
    monkeypatch.setattr(plots, "plot_overlays", plot_overlays)
    return asked
