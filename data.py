"""Head CT from files on disk to model inputs: labels, an index, patient-level splits, windows,
intracranial masks and a memory-mapped slice cache. (The synthetic phantom is phantom.py.)

Two layouts are read, detected from the folder (or forced with dataset="rsna"|"ctich"):
  rsna : <data_dir>/stage_2_train/ID_<hex>.dcm + stage_2_train.csv
         (RSNA Intracranial Hemorrhage Detection, or the phantom that phantom.py writes)
  ctich: <data_dir>/Patients_CT/<pid>/{brain,bone}/<n>.jpg + hemorrhage_diagnosis.csv
         (PhysioNet CT-ICH v1.0.0, Hssayeni et al. 2020, CC BY 4.0)

Index rows are slices; the index is columnar (a dict of equal-length numpy arrays) because RSNA
has 752,803 slices. Images go to the model as float [C, S, S] in [-1, 1]; channel k means the same
window on both layouts (see CHANNEL_WINDOWS and make_input).

CLI:
  python data.py show --data_dir DIR --out grid.png
  python data.py index --data_dir DIR
"""
import argparse
import collections
import csv
import functools
import hashlib
import multiprocessing
import os
import time
import warnings

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.multival import MultiValue
from scipy import ndimage
from tqdm import tqdm

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
LABELS = ("any",) + SUBTYPES
WINDOWS = {"brain": (40, 80), "subdural": (80, 200), "bone": (600, 2800)}  # (level, width) in HU
# Which window each input channel shows. CT-ICH has no subdural window (its JPGs are brain and bone
# windows only), so there the subdural channel repeats the brain JPG: the 3-channel input is
# (brain, brain, bone) and channel 3 is the bone window on both layouts.
CHANNEL_WINDOWS = {1: ("brain",), 2: ("brain", "bone"), 3: ("brain", "subdural", "bone")}
INDEX_COLUMNS = ("id", "path", "patient", "scan", "series", "z") + LABELS
CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
# what a run reads unless told otherwise (train.py's flags; evaluate.py falls back to them for old checkpoints)
DEFAULT_SEED = 42  # the split seed
DEFAULT_NUM_SAMPLES = 2000  # healthy training slices
DEFAULT_EVAL_SAMPLES = 50  # validation / test slices per class
MIN_SLICE_SIDE = 16  # pixels; real head CT is 512 (RSNA) or 650 (CT-ICH), the tests' phantoms 32 and up
HOW_TO_GET_DATA = ("get the RSNA data (kaggle competitions download -c rsna-intracranial-hemorrhage-detection: "
                   "stage_2_train/ + stage_2_train.csv) or make a phantom: python phantom.py --out DIR")
SHORT_NAMES = {"epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
               "subarachnoid": "SAH", "subdural": "SDH"}


class BadFile(Exception):
    """A slice that cannot be used; the message is the reason ("category: detail")."""


# ---------------------------------------------------------------------------------------------
# where things are

LAYOUTS = {"rsna": ("stage_2_train", "stage_2_train.csv"), "ctich": ("Patients_CT", "hemorrhage_diagnosis.csv")}


def has_layout(data_dir, dataset):
    folder, label_file = LAYOUTS[dataset]
    return os.path.isdir(os.path.join(data_dir, folder)) and os.path.isfile(os.path.join(data_dir, label_file))


def detect_dataset(data_dir):
    """"rsna" or "ctich" from the files in data_dir; SystemExit saying how to get data otherwise."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: {data_dir}: no such folder; {HOW_TO_GET_DATA}")
    for dataset in LAYOUTS:
        if has_layout(data_dir, dataset):
            return dataset
    if not [name for name in os.listdir(data_dir) if not name.startswith(".")]:
        raise SystemExit(f"error: {data_dir}: folder is empty; {HOW_TO_GET_DATA}")
    raise SystemExit(f"error: {data_dir}: neither the RSNA layout (stage_2_train/ + stage_2_train.csv) nor the CT-ICH "
                     f"layout (Patients_CT/ + hemorrhage_diagnosis.csv); {HOW_TO_GET_DATA}")


def check_dataset(data_dir, dataset):
    """The dataset to read: detected when None, else the one asked for, which must be there."""
    if dataset is None:
        return detect_dataset(data_dir)
    if dataset not in LAYOUTS:
        raise SystemExit(f"error: {data_dir}: unknown dataset {dataset!r} (rsna or ctich)")
    if not has_layout(data_dir, dataset):
        folder, label_file = LAYOUTS[dataset]
        raise SystemExit(f"error: {data_dir}: dataset {dataset} needs {folder}/ and {label_file} there")
    return dataset


def default_cache_dir(data_dir):
    """<data_dir>/.ctpddpm_cache, or ~/.cache/ct-pddpm/<hash> when data_dir must not be written to."""
    data_dir = os.path.abspath(os.fspath(data_dir))
    # Root passes os.access on any folder, so a folder whose mode says read-only (the shared data)
    # is taken at its word too.
    if os.stat(data_dir).st_mode & 0o222 and os.access(data_dir, os.W_OK):
        try:
            os.makedirs(os.path.join(data_dir, ".ctpddpm_cache"), exist_ok=True)
            return os.path.join(data_dir, ".ctpddpm_cache")
        except OSError:  # read-only file system
            pass
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    path = os.path.join(base, "ct-pddpm", hashlib.sha1(data_dir.encode()).hexdigest()[:12])
    os.makedirs(path, exist_ok=True)
    return path


def report_skips(what, skips, examples=10):
    """One summary line for all skipped files: count per reason, and the first file of each reason
    (so every kind of problem comes with a file to look at)."""
    if not skips:
        return
    counts = collections.Counter(reason.split(":")[0] for _, reason in skips)
    summary = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
    first_of_each = {}
    for name, reason in skips:
        first_of_each.setdefault(reason.split(":")[0], f"{name} ({reason})")
    print(f"{what}: skipped {len(skips)} file(s): {summary}. First: {'; '.join(list(first_of_each.values())[:examples])}")


def _one_line(error):
    return " ".join(f"{type(error).__name__}: {error}".split())


def _skip_bad(fn, item):
    try:
        return True, fn(item)
    except BadFile as error:
        return False, str(error)
    except Exception as error:  # a file nobody foresaw must not end an hours-long run: count it, name it, go on
        return False, f"unexpected error: {_one_line(error)}"


def _worker_init():
    torch.set_num_threads(1)  # the workers are the parallelism; threads inside them only contend


def parallel_map(fn, items, num_workers, desc):
    """Yield (True, fn(item)) or (False, reason) for each item, in order; worker processes when num_workers > 1."""
    work = functools.partial(_skip_bad, fn)
    if num_workers <= 1 or len(items) < 4:
        yield from map(work, tqdm(items, desc=desc, disable=None))
        return
    chunksize = max(1, min(64, len(items) // (num_workers * 8)))
    with multiprocessing.Pool(num_workers, initializer=_worker_init) as pool:
        yield from tqdm(pool.imap(work, items, chunksize), total=len(items), desc=desc, disable=None)


# ---------------------------------------------------------------------------------------------
# DICOM -> Hounsfield units, JPG -> windowed image

def first(value):
    """Multi-valued DICOM fields (RSNA has e.g. WindowCenter [40, 40]) count by their first value."""
    if isinstance(value, (MultiValue, list, tuple)):
        return value[0] if len(value) else None
    return value


def header_number(ds, keyword, default):
    value = first(ds.get(keyword))
    return default if value in (None, "") else float(value)


HEADER_TAGS = ["Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient", "InstanceNumber"]
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as written in little-endian files


def _header_lacks(what, path):
    """Reason for a header without `what`. pydicom reads a file cut off mid-header without complaint, as a
    header that simply stops, so a file with no pixel data element at all is called truncated."""
    with open(path, "rb") as f:  # read in full, but only for files that are already failing
        cut = PIXEL_DATA_TAG not in f.read()
    return f"truncated DICOM: {what}, and the file ends before any pixel data" if cut else what


def read_header(path):
    """(patient, study, series, z) from a DICOM header, without reading pixels."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except Exception as error:  # pydicom raises many types on damaged files; all mean "unusable"
        raise BadFile(f"unreadable DICOM header: {_one_line(error)}")
    modality = str(first(ds.get("Modality")) or "CT")
    if modality != "CT":
        raise BadFile(f"modality {modality}, not CT")
    patient = str(first(ds.get("PatientID")) or "")
    if not patient:
        raise BadFile(_header_lacks("no PatientID", path))
    study = str(first(ds.get("StudyInstanceUID")) or patient)  # scan falls back to the patient
    series = str(first(ds.get("SeriesInstanceUID")) or study)
    position = ds.get("ImagePositionPatient")
    if position is not None and len(position) >= 3:
        z = float(position[2])
    elif ds.get("InstanceNumber") not in (None, ""):
        z = float(first(ds.InstanceNumber))
    else:
        raise BadFile(_header_lacks("no slice position (ImagePositionPatient, InstanceNumber)", path))
    return patient, study, series, z


def hu_from_dicom(path):
    """float32 Hounsfield units of one CT slice; BadFile when it cannot be used."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # see read_header
        raise BadFile(f"unreadable DICOM: {_one_line(error)}")
    modality = str(first(ds.get("Modality")) or "CT")
    if modality != "CT":
        raise BadFile(f"modality {modality}, not CT")
    if "PixelData" not in ds:
        raise BadFile("no pixel data")
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as error:
        raise BadFile(f"truncated or undecodable pixel data: {_one_line(error)}")
    if pixels.ndim != 2:
        raise BadFile(f"pixel array of shape {pixels.shape}, not one 2-D slice")
    try:
        slope = header_number(ds, "RescaleSlope", 1.0)
        intercept = header_number(ds, "RescaleIntercept", 0.0)
    except (TypeError, ValueError) as error:
        raise BadFile(f"unreadable RescaleSlope/RescaleIntercept: {_one_line(error)}")
    if header_number(ds, "BitsStored", 16) == 12 and header_number(ds, "PixelRepresentation", 0) == 0 and intercept > -100:
        # RSNA quirk: some series store HU + 1000 wrapped modulo 4096 as unsigned 12-bit values with an
        # intercept near 0, so air reads ~3096 and bone wraps around. Unwrapping and using intercept
        # -1000 gives air ~ -1000 HU and brain 20-45 HU.
        pixels = np.mod(pixels + 1000, 4096)
        intercept = -1000.0
    with np.errstate(over="ignore", invalid="ignore"):  # reported below as one reason, not a numpy warning per file
        hu = pixels * slope + intercept
    if not np.isfinite(hu).all():
        raise BadFile("non-finite HU values (check RescaleSlope/RescaleIntercept)")
    # A wrong slope/intercept (or an image that is not in HU) puts the slice far outside the CT range;
    # windowing would turn it into a flat square. Padding outside the field of view (-2000 or -3024 HU
    # on many scanners) covers at most ~21 % of a slice, so a real slice is mostly inside this range.
    plausible = np.mean((hu >= -1100) & (hu <= 4000))
    if plausible < 0.5:
        raise BadFile(f"implausible HU values: {plausible:.0%} of pixels within -1100..4000 HU "
                      f"(min {hu.min():.4g}, max {hu.max():.4g}; check RescaleSlope/RescaleIntercept)")
    return hu


def read_jpg(path):
    """uint8 2-D grayscale image; BadFile when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except (OSError, SyntaxError, ValueError) as error:  # PIL: unidentified, truncated or broken JPGs
        raise BadFile(f"unreadable JPG: {_one_line(error)}")


def check_jpg(path):
    """Header-only check of a JPG (the CT-ICH counterpart of read_header)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as error:
        raise BadFile(f"unreadable JPG: {_one_line(error)}")


def read_ctich_slice(brain_path, with_bone=True):
    """{"brain": ..., "bone": ...} in [-1, 1] for one CT-ICH slice.

    The JPGs are already windowed to 8 bits (brain L40/W120 per the dataset; HU are gone), so the
    brain JPG is not re-windowed: [0, 255] maps linearly to [-1, 1]; the same for the bone JPG."""
    images = {"brain": read_jpg(brain_path).astype(np.float32) / 127.5 - 1}
    if with_bone:
        bone_path = os.path.join(os.path.dirname(os.path.dirname(brain_path)), "bone", os.path.basename(brain_path))
        if not os.path.exists(bone_path):
            raise BadFile("bone JPG missing")
        images["bone"] = read_jpg(bone_path).astype(np.float32) / 127.5 - 1
        if images["bone"].shape != images["brain"].shape:
            raise BadFile(f"bone JPG {images['bone'].shape} and brain JPG {images['brain'].shape} differ in size")
    return images


# ---------------------------------------------------------------------------------------------
# windows, model inputs, masks

def window(hu, level, width):
    """HU -> [0, 1] over [level - width/2, level + width/2] -> [-1, 1]."""
    low = level - width / 2
    return (np.clip((np.asarray(hu, np.float32) - low) / width, 0, 1) * 2 - 1).astype(np.float32)


def _square_resize(stack, image_size, pad_value, mode):
    """[C, H, W] -> [C, S, S]: pad to a square (centred, keeps the aspect ratio), then resize."""
    stack = np.asarray(stack, np.float32)
    h, w = stack.shape[-2:]
    side = max(h, w)
    if h != w:
        top, left = (side - h) // 2, (side - w) // 2
        padded = np.full(stack.shape[:-2] + (side, side), pad_value, np.float32)
        padded[..., top:top + h, left:left + w] = stack
        stack = padded
    if image_size is None or image_size == side:
        return stack
    tensor = torch.from_numpy(np.ascontiguousarray(stack))[None]
    if mode == "area":
        out = F.interpolate(tensor, size=(image_size, image_size), mode="area")
    else:  # antialias: a 512 -> 256 or 650 -> 128 shrink must average, not skip pixels
        out = F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].numpy()


def make_input(hu_or_img, channels, image_size):
    """Model input, float32 [C, S, S] in [-1, 1].

    hu_or_img: a 2-D HU slice (RSNA, phantom), windowed with CHANNEL_WINDOWS[channels]; or a dict of
    already windowed 2-D images in [-1, 1] keyed by window name (CT-ICH: "brain", "bone"), where a
    window the set lacks (subdural) takes the brain image. Non-square slices are padded with air (-1)."""
    if channels not in CHANNEL_WINDOWS:
        raise ValueError(f"channels must be one of {sorted(CHANNEL_WINDOWS)}, got {channels}")
    names = CHANNEL_WINDOWS[channels]
    if isinstance(hu_or_img, dict):
        stack = [hu_or_img.get(name, hu_or_img["brain"]) for name in names]
    else:
        stack = [window(hu_or_img, *WINDOWS[name]) for name in names]
    return np.clip(_square_resize(np.stack(stack), image_size, -1.0, "bilinear"), -1, 1)


def resize_mask(mask, image_size):
    """bool [H, W] -> bool [S, S], padded to a square like make_input; a pixel is in if >= half covered."""
    return _square_resize(np.asarray(mask, np.float32)[None], image_size, 0.0, "area")[0] >= 0.5


def _largest_component(mask):
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _fill_holes(mask):
    """ndimage.binary_fill_holes, 5x faster: background pieces that do not touch the border are holes."""
    background, n = ndimage.label(~mask)
    hole = np.ones(n + 1, bool)
    hole[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    return mask | hole[background]


def _closing(mask, radius):
    # pad first: scipy's closing erodes from the image border, which would open heads that touch it
    padded = np.pad(mask, radius + 1)
    return ndimage.binary_closing(padded, iterations=radius)[radius + 1:-radius - 1, radius + 1:-radius - 1]


def intracranial_mask(bone, tissue):
    """Inside the skull, bone and air/fat excluded, eroded a little.

    bone: pixels dense enough to be skull; tissue: pixels that are not air or fat. The skull is
    closed (to bridge sutures and foramina), its holes filled, the skull and non-tissue removed, the
    largest piece kept, and its holes filled again so bright islands inside (bleeds, calcifications)
    count as brain. Where the skull does not close even after a wide closing (skull base, fracture,
    craniectomy), the tissue inside minus what a wide opening strips off is used instead: the scalp is a
    thin band that the opening removes, the brain is not."""
    size = min(bone.shape)
    close_px, erode_px = max(1, round(size / 100)), max(1, round(size / 128))
    for radius in (close_px, 3 * close_px):
        skull = _closing(bone, radius)
        inside = _largest_component(_fill_holes(skull) & ~skull & tissue)
        if inside.sum() > 0.005 * bone.size:
            break
    else:
        inside = _largest_component(ndimage.binary_opening(tissue & ~bone, iterations=4 * close_px))
    return ndimage.binary_erosion(_fill_holes(inside), iterations=erode_px)


def brain_mask_from_hu(hu):
    """Intracranial mask from HU: bone >= 200 HU, tissue > -50 HU (air and fat excluded)."""
    return intracranial_mask(hu >= 200, hu > -50)


def brain_mask_from_windowed(brain):
    """Intracranial mask from a brain-window image in [-1, 1] (CT-ICH's JPG, L40/W120 = -20..100 HU).

    HU are gone, so the skull is what saturates the window (>= 0.95, about 97 HU and up; bleeds are
    50-90 HU and come back in anyway by the final hole filling) and air/fat is what bottoms out
    (<= -0.9, below about -14 HU; CSF at 0-15 HU stays in)."""
    return intracranial_mask(brain >= 0.95, brain > -0.9)


def load_gt_mask(data_dir, image_id, image_size):
    """Ground-truth bleed mask (phantom: <data_dir>/masks/<id>.npy) as bool [S, S], or None if there is none."""
    path = os.path.join(os.fspath(data_dir), "masks", f"{image_id}.npy")
    if not os.path.exists(path):
        return None
    return resize_mask(np.load(path), image_size)


# ---------------------------------------------------------------------------------------------
# labels and the index

def read_rsna_labels(csv_path):
    """stage_2_train.csv (ID_<hex>_<subtype>,Label rows, duplicates allowed) -> {image id: [6 labels in LABELS order]}.
    A label the CSV does not give stays -1."""
    column = {name: k for k, name in enumerate(LABELS)}
    labels = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        header = f.readline().strip()
        if header.replace(" ", "") != "ID,Label":
            raise SystemExit(f"error: {csv_path}: expected the columns ID,Label, got {header[:80]!r}")
        for line_number, line in enumerate(f, 2):
            line = line.strip()
            if not line:
                continue
            try:
                key, value = line.split(",")
                image_id, subtype = key.rsplit("_", 1)
                k, value = column[subtype], int(value)
                if value not in (0, 1):
                    raise ValueError(value)
            except (ValueError, KeyError):
                raise SystemExit(f"error: {csv_path}:{line_number}: cannot parse {line[:80]!r} "
                                 f"(expected ID_<hex>_<subtype>,0|1 with subtype in {', '.join(LABELS)})")
            row = labels.setdefault(image_id, [-1] * len(LABELS))
            row[k] = max(row[k], value)  # duplicated rows agree in RSNA; if not, positive wins
    return labels


def build_rsna_index(data_dir, num_workers):
    csv_path = os.path.join(data_dir, "stage_2_train.csv")
    image_dir = os.path.join(data_dir, "stage_2_train")
    labels = read_rsna_labels(csv_path)
    names = sorted(name for name in os.listdir(image_dir) if name.endswith(".dcm"))
    if not names:
        raise SystemExit(f"error: {image_dir}: no .dcm files; {HOW_TO_GET_DATA}")
    skips, kept = [], []
    for name in names:
        row = labels.get(name[:-4])
        if row is None:
            skips.append((name, "no row in stage_2_train.csv"))
        elif -1 in row:
            skips.append((name, "incomplete label rows in stage_2_train.csv"))
        else:
            kept.append(name)
    on_disk = set(name[:-4] for name in names)
    skips += [(f"{image_id}.dcm", "in stage_2_train.csv but file missing") for image_id in labels if image_id not in on_disk]
    columns = {name: [] for name in INDEX_COLUMNS}
    paths = [os.path.join(image_dir, name) for name in kept]
    for name, (ok, result) in zip(kept, parallel_map(read_header, paths, num_workers, "headers")):
        if not ok:
            skips.append((name, result))
            continue
        for column, value in zip(("patient", "scan", "series", "z"), result):
            columns[column].append(value)
        columns["id"].append(name[:-4])
        columns["path"].append(f"stage_2_train/{name}")
        for column, value in zip(LABELS, labels[name[:-4]]):
            columns[column].append(value)
    return columns, skips


CTICH_COLUMNS = {"epidural": "Epidural", "intraparenchymal": "Intraparenchymal", "intraventricular": "Intraventricular",
                 "subarachnoid": "Subarachnoid", "subdural": "Subdural"}


def read_ctich_labels(csv_path):
    """hemorrhage_diagnosis.csv (UTF-8 with BOM) -> {(patient number, slice number): [6 labels in LABELS order]}.
    any = 1 - No_Hemorrhage; the subtypes come from their columns."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        needed = ["PatientNumber", "SliceNumber", "No_Hemorrhage", *CTICH_COLUMNS.values()]
        missing = [name for name in needed if name not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"error: {csv_path}: missing column(s) {', '.join(missing)}")
        labels = {}
        for line_number, row in enumerate(reader, 2):
            try:
                key = (int(row["PatientNumber"]), int(row["SliceNumber"]))
                values = [1 - int(row["No_Hemorrhage"])] + [int(row[CTICH_COLUMNS[name]]) for name in SUBTYPES]
            except (TypeError, ValueError):
                raise SystemExit(f"error: {csv_path}:{line_number}: cannot parse row {dict(row)}")
            old = labels.get(key, values)
            labels[key] = [max(a, b) for a, b in zip(old, values)]
    return labels


def build_ctich_index(data_dir, num_workers):
    csv_path = os.path.join(data_dir, "hemorrhage_diagnosis.csv")
    patients_dir = os.path.join(data_dir, "Patients_CT")
    labels = read_ctich_labels(csv_path)
    found = []  # (patient folder, slice number); other files (e.g. *_HGE_Seg.jpg masks) are not slices
    for pid in sorted(os.listdir(patients_dir)):
        brain_dir = os.path.join(patients_dir, pid, "brain")
        if pid.isdigit() and os.path.isdir(brain_dir):
            found += [(pid, int(name[:-4])) for name in os.listdir(brain_dir) if name.endswith(".jpg") and name[:-4].isdigit()]
    if not found:
        raise SystemExit(f"error: {patients_dir}: no <patient>/brain/<n>.jpg files")
    skips, kept = [], []
    for pid, n in sorted(found):
        path = f"Patients_CT/{pid}/brain/{n}.jpg"
        if (int(pid), n) not in labels:
            skips.append((path, "no row in hemorrhage_diagnosis.csv"))
        elif not os.path.exists(os.path.join(patients_dir, pid, "bone", f"{n}.jpg")):
            skips.append((path, "bone JPG missing"))
        else:
            kept.append((pid, n, path))
    on_disk = set((int(pid), n) for pid, n in found)
    skips += [(f"patient {p} slice {n}", "in hemorrhage_diagnosis.csv but JPG missing") for p, n in labels if (p, n) not in on_disk]
    columns = {name: [] for name in INDEX_COLUMNS}
    paths = [os.path.join(data_dir, path) for _, _, path in kept]
    for (pid, n, path), (ok, result) in zip(kept, parallel_map(check_jpg, paths, num_workers, "headers")):
        if not ok:
            skips.append((path, result))
            continue
        for column, value in zip(("id", "path", "patient", "scan", "series", "z"), (f"ctich_{pid}_{n}", path, pid, pid, pid, n)):
            columns[column].append(value)
        for column, value in zip(LABELS, labels[(int(pid), n)]):
            columns[column].append(value)
    return columns, skips


def data_signature(data_dir, dataset):
    """Changes when the label file or the image folder changes, which invalidates the index cache."""
    image_dir, csv_name = LAYOUTS[dataset]
    csv_stat, dir_stat = os.stat(os.path.join(data_dir, csv_name)), os.stat(os.path.join(data_dir, image_dir))
    return f"{dataset}:{csv_stat.st_size}:{csv_stat.st_mtime_ns}:{dir_stat.st_mtime_ns}"


def load_index(data_dir, dataset=None, cache_dir=None, num_workers=DEFAULT_WORKERS):
    """The slice index, a dict of equal-length arrays (INDEX_COLUMNS), rows ordered by (patient, scan, z).

    Headers are read once, in parallel, and the index is cached as .npz in cache_dir; later calls load it."""
    data_dir = os.fspath(data_dir)
    dataset = check_dataset(data_dir, dataset)
    cache_dir = os.fspath(cache_dir) if cache_dir else default_cache_dir(data_dir)
    os.makedirs(cache_dir, exist_ok=True)
    cache_path = os.path.join(cache_dir, f"index_{dataset}_v{CACHE_VERSION}.npz")
    signature = data_signature(data_dir, dataset)
    if os.path.exists(cache_path):
        try:
            with np.load(cache_path) as cached:
                if str(cached["signature"]) == signature:
                    index = {name: cached[name] for name in INDEX_COLUMNS}
                    print(f"index: {len(index['id'])} slices from {cache_path} ({int(cached['n_skipped'])} files skipped when built)")
                    return index
        except (OSError, KeyError, ValueError):  # damaged cache: build it again
            pass
    start = time.time()
    build = build_rsna_index if dataset == "rsna" else build_ctich_index
    columns, skips = build(data_dir, num_workers)
    report_skips("index", skips)
    if not columns["id"]:
        raise SystemExit(f"error: {data_dir}: no usable slices (all {len(skips)} skipped)")
    index = {name: np.array(columns[name]) for name in ("id", "path", "patient", "scan", "series")}
    index["z"] = np.array(columns["z"], np.float32)
    index.update({name: np.array(columns[name], np.int8) for name in LABELS})
    order = np.lexsort((index["id"], index["z"], index["scan"], index["patient"]))
    index = {name: index[name][order] for name in INDEX_COLUMNS}
    temporary = f"{cache_path}.{os.getpid()}.tmp.npz"
    np.savez(temporary, signature=signature, n_skipped=len(skips), **index)
    os.replace(temporary, cache_path)  # atomic: a concurrent reader never sees half a file
    print(f"index: {len(index['id'])} slices, {len(np.unique(index['patient']))} patients in {time.time() - start:.1f} s -> {cache_path}")
    return index


# ---------------------------------------------------------------------------------------------
# patient-level splits

def split_patients(index, seed, train_fraction=0.5):
    """{"train", "val", "test"} -> sorted patient arrays. Healthy patients (no positive slice) are
    split train / val / test; hemorrhage patients go to val / test only, half each."""
    patients, inverse = np.unique(index["patient"], return_inverse=True)
    sick = np.bincount(inverse, weights=index["any"], minlength=len(patients)) > 0
    rng = np.random.default_rng(seed)
    healthy, hemorrhage = rng.permutation(patients[~sick]), rng.permutation(patients[sick])
    n_train = int(round(len(healthy) * train_fraction))
    held_out = healthy[n_train:]
    n_val_healthy, n_val_sick = (len(held_out) + 1) // 2, (len(hemorrhage) + 1) // 2
    return {"train": np.sort(healthy[:n_train]),
            "val": np.sort(np.concatenate([held_out[:n_val_healthy], hemorrhage[:n_val_sick]])),
            "test": np.sort(np.concatenate([held_out[n_val_healthy:], hemorrhage[n_val_sick:]]))}


def _draw(rng, positions, n, what):
    if n is None or n == "all" or len(positions) <= int(n):
        if n not in (None, "all") and len(positions) < int(n):
            warnings.warn(f"{what}: only {len(positions)} slices available, {n} asked for; using all")
        return positions
    return np.sort(rng.choice(positions, int(n), replace=False))


def parse_eval_samples(text):
    """--eval_samples: 'all' or a positive number of slices per class."""
    if str(text) == "all":
        return "all"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return n


def make_splits(index, seed, num_samples, eval_samples, train_fraction=0.5):
    """{"train", "val", "test"} -> int64 row positions, patient level, deterministic from seed.

    train: num_samples slices of healthy training patients ("all" or None: all of them).
    val/test: slices of held-out patients, eval_samples per class (int) or "all"."""
    patients = split_patients(index, seed, train_fraction)
    splits = {}
    for k, name in enumerate(("train", "val", "test")):
        rng = np.random.default_rng([seed, k])  # one stream per split: changing one never moves another
        rows = np.flatnonzero(np.isin(index["patient"], patients[name])).astype(np.int64)
        if name == "train":
            splits[name] = _draw(rng, rows, num_samples, "train healthy slices")
        else:
            positive = rows[index["any"][rows] == 1]
            negative = rows[index["any"][rows] == 0]
            splits[name] = np.sort(np.concatenate([_draw(rng, positive, eval_samples, f"{name} hemorrhage slices"),
                                                   _draw(rng, negative, eval_samples, f"{name} healthy slices")]))
    return splits


# ---------------------------------------------------------------------------------------------
# the slice cache

def load_slice(path, channels, image_size):
    """Decode one slice: (image float16 [C, S, S] in [-1, 1], brain mask uint8 [S, S])."""
    if path.endswith(".jpg"):
        pixels = read_ctich_slice(path, with_bone=channels > 1)  # {"brain": ..., "bone": ...}, already windowed
        shape = pixels["brain"].shape
    else:
        pixels = hu_from_dicom(path)
        shape = pixels.shape
    if min(shape) < MIN_SLICE_SIDE:
        raise BadFile(f"image of {shape[0]}x{shape[1]} pixels, too small for a head CT slice")
    mask = brain_mask_from_windowed(pixels["brain"]) if isinstance(pixels, dict) else brain_mask_from_hu(pixels)
    image = make_input(pixels, channels, image_size)
    return image.astype(np.float16), resize_mask(mask, image_size).astype(np.uint8)


class SliceCache:
    """Decoded slices on disk, one row per index row: images float16 [N, C, S, S] in [-1, 1], brain
    masks uint8 [N, S, S], state uint8 [N] (0 not decoded, 1 ok, 2 bad file). Memory-mapped read-only
    on first use; pickles as its file prefix only, so DataLoader workers map the files themselves."""

    def __init__(self, prefix):
        self.prefix = prefix
        self._arrays = None

    def _open(self):
        if self._arrays is None:
            self._arrays = {name: np.load(f"{self.prefix}.{name}.npy", mmap_mode="r") for name in ("images", "masks", "state")}
        return self._arrays

    @property
    def images(self):
        return self._open()["images"]

    @property
    def masks(self):
        return self._open()["masks"]

    @property
    def state(self):
        return self._open()["state"]

    def ok(self, positions, min_brain_fraction=0.0):
        """The positions that decoded fine, in the given order; with min_brain_fraction > 0, only
        those whose intracranial mask covers at least that fraction of the slice. Face, skull-base
        and vertex slices hold little brain, almost never a labelled bleed, and mostly bone edges
        that no model rebuilds exactly, so they dominate a ranking of slices by error: on CT-ICH
        at 128 px, 470 of 1,767 slices have under 5 % brain and 2 of them a bleed."""
        positions = np.asarray(positions, np.int64)
        positions = positions[self.state[positions] == 1]
        if min_brain_fraction > 0 and len(positions):
            fraction = np.array([self.masks[p].mean() for p in positions])
            positions = positions[fraction >= min_brain_fraction]
        return positions

    def __getstate__(self):
        return {"prefix": self.prefix, "_arrays": None}


def _create_cache_files(prefix, n, channels, image_size):
    """Create the three files, all together (with every row "not decoded") unless all are there already."""
    shapes = {"images": ((n, channels, image_size, image_size), np.float16),
              "masks": ((n, image_size, image_size), np.uint8), "state": ((n,), np.uint8)}
    try:
        if all(np.load(f"{prefix}.{name}.npy", mmap_mode="r").shape == shape for name, (shape, _) in shapes.items()):
            return
    except (OSError, ValueError):  # missing or damaged
        pass
    for name, (shape, dtype) in shapes.items():  # state last: it is what says the others are there
        temporary = f"{prefix}.{name}.{os.getpid()}.tmp"
        np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape).flush()  # sparse: zeros cost no disk
        os.replace(temporary, f"{prefix}.{name}.npy")


def prepare_slices(data_dir, index, positions, image_size, channels, cache_dir=None, num_workers=DEFAULT_WORKERS, dataset=None):
    """Decode the given index rows once into the memory-mapped SliceCache; rows already decoded
    (by an earlier epoch or run) are not touched again. Prints slices/s and a skip summary."""
    data_dir = os.fspath(data_dir)
    dataset = check_dataset(data_dir, dataset)
    if channels not in CHANNEL_WINDOWS:
        raise SystemExit(f"error: channels must be one of {sorted(CHANNEL_WINDOWS)}, got {channels}")
    cache_dir = os.fspath(cache_dir) if cache_dir else default_cache_dir(data_dir)
    os.makedirs(cache_dir, exist_ok=True)
    index_hash = hashlib.sha1("\n".join(index["id"].tolist()).encode()).hexdigest()[:10]
    prefix = os.path.join(cache_dir, f"slices_{dataset}_{index_hash}_{image_size}px_{channels}ch_v{CACHE_VERSION}")
    _create_cache_files(prefix, len(index["id"]), channels, image_size)
    positions = np.unique(np.asarray(positions, np.int64))
    state = np.load(f"{prefix}.state.npy", mmap_mode="r+")
    todo = positions[state[positions] == 0]
    if len(todo):
        images = np.load(f"{prefix}.images.npy", mmap_mode="r+")
        masks = np.load(f"{prefix}.masks.npy", mmap_mode="r+")
        decode = functools.partial(load_slice, channels=channels, image_size=image_size)
        paths = [os.path.join(data_dir, index["path"][p]) for p in todo]
        skips, start = [], time.time()
        for k, (ok, result) in enumerate(parallel_map(decode, paths, num_workers, "decode")):
            position = todo[k]
            if ok:
                images[position], masks[position] = result
                state[position] = 1
            else:
                state[position] = 2
                skips.append((str(index["path"][position]), result))
            if k % 512 == 511:  # data before state, so an interrupted run never trusts a row it did not write
                images.flush(), masks.flush(), state.flush()
        images.flush(), masks.flush(), state.flush()
        seconds = time.time() - start
        print(f"slices: decoded {len(todo)} in {seconds:.1f} s ({len(todo) / max(seconds, 1e-9):.0f} slices/s) -> {prefix}.*.npy")
        report_skips("slices", skips)
    n_bad = int((state[positions] == 2).sum())
    print(f"slices: {len(positions)} requested, {len(positions) - len(todo)} were cached, {n_bad} bad file(s) left out")
    del state
    return SliceCache(prefix)


class SliceDataset(torch.utils.data.Dataset):
    """Items dict(image float32 [C, S, S], mask bool [S, S], label int (any), position int (index row)).
    Positions whose slice did not decode (cache state != 1) are left out. .positions, .labels, .patients
    and .scans are aligned arrays over the items (for metrics that group by patient or scan)."""

    def __init__(self, cache, index, positions):
        self.cache = cache
        self.positions = cache.ok(positions)
        # copies of the few columns needed, not the whole index: DataLoader workers stay light
        self.labels = np.asarray(index["any"])[self.positions].astype(np.int64)
        self.patients = np.asarray(index["patient"])[self.positions]
        self.scans = np.asarray(index["scan"])[self.positions]

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        position = int(self.positions[i])
        return {"image": torch.from_numpy(self.cache.images[position].astype(np.float32)),
                "mask": torch.from_numpy(self.cache.masks[position] > 0),
                "label": int(self.labels[i]), "position": position}


# ---------------------------------------------------------------------------------------------
# what a run reads: index, splits and the slice cache

RunData = collections.namedtuple("RunData", "index splits cache")


def in_turn(build, rank, world):
    """build() on every process, but one group after the other, with a barrier between: first rank 0, then local
    rank 0 of each other node, then the rest. build() fills the index and slice caches, and two processes creating
    the same cache files at once would replace each other's files; going in turn, the later ones find them built
    (on a node-local cache dir, each node builds its own copy once)."""
    if world == 1:
        return build()
    turn = 0 if rank == 0 else 1 if int(os.environ.get("LOCAL_RANK", rank)) == 0 else 2
    result = None
    for t in range(3):
        if t == turn:
            result = build()
        torch.distributed.barrier()
    return result


def open_run_data(data_dir, *, image_size, channels, split_seed, num_samples, eval_samples, decode,
                  dataset="auto", cache_dir=None, num_workers=DEFAULT_WORKERS, rank=0, world=1):
    """The index, the patient-level splits (make_splits) and a slice cache holding the splits named in `decode`
    (e.g. ("train", "val")), as train.py, evaluate.py, sweep.py and bench.py all read them. Under torchrun the
    processes build the caches in turn (in_turn), rank 0 first."""
    def build():
        index = load_index(data_dir, dataset=None if dataset == "auto" else dataset, cache_dir=cache_dir,
                           num_workers=num_workers)
        splits = make_splits(index, split_seed, num_samples, eval_samples)
        needed = np.concatenate([splits[name] for name in decode])
        cache = prepare_slices(data_dir, index, needed, image_size, channels, cache_dir=cache_dir, num_workers=num_workers)
        return RunData(index, splits, cache)
    return in_turn(build, rank, world)


# ---------------------------------------------------------------------------------------------
# looking at the data

def pick_show_slices(index, columns, seed=0):
    """Mid-level slices (never the lowest, face-level ones): up to half positives of distinct subtypes, the rest
    from healthy patients."""
    rng = np.random.default_rng(seed)
    # rows are sorted by (patient, scan, z): a scan is a run of rows, and a row's rank in its run is its level
    starts_run = np.r_[True, (index["patient"][1:] != index["patient"][:-1]) | (index["scan"][1:] != index["scan"][:-1])]
    run = np.cumsum(starts_run) - 1
    rank = np.arange(len(run)) - np.flatnonzero(starts_run)[run]
    relative = rank / np.maximum(np.bincount(run)[run] - 1, 1)
    middle = (relative >= 0.4) & (relative <= 0.8)
    positives = []
    for name in SUBTYPES:
        rows = np.flatnonzero(middle & (index[name] == 1))
        rows = rows[~np.isin(rows, positives)]
        if len(rows) and len(positives) < columns // 2:
            positives.append(int(rng.choice(rows)))
    patients, inverse = np.unique(index["patient"], return_inverse=True)
    sick_patient = np.bincount(inverse, weights=index["any"]) > 0
    healthy_rows = np.flatnonzero(middle & ~sick_patient[inverse])
    negatives = rng.choice(healthy_rows, min(columns - len(positives), len(healthy_rows)), replace=False).tolist()
    return positives + sorted(negatives)


def show_grid(data_dir, out, dataset=None, columns=8, seed=0, cache_dir=None):
    """PNG grid: one column per slice, one row per window; brain mask outlined green, GT bleed mask red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data_dir = os.fspath(data_dir)
    dataset = check_dataset(data_dir, dataset)
    index = load_index(data_dir, dataset, cache_dir=cache_dir)
    picks = pick_show_slices(index, columns, seed)
    rows = ("brain", "subdural", "bone") if dataset == "rsna" else ("brain", "bone")
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(2.1 * len(picks), 2.1 * len(rows) + 0.6), squeeze=False,
                             layout="constrained")
    for c, position in enumerate(picks):
        path = os.path.join(data_dir, index["path"][position])
        subtypes = [SHORT_NAMES[name] for name in SUBTYPES if index[name][position]]
        axes[0, c].set_title(f"{index['id'][position]}\n{'+'.join(subtypes) or 'no bleed'}", fontsize=7)
        try:
            if dataset == "rsna":
                hu = hu_from_dicom(path)
                images, brain = {name: window(hu, *WINDOWS[name]) for name in rows}, brain_mask_from_hu(hu)
            else:
                images = read_ctich_slice(path)
                brain = brain_mask_from_windowed(images["brain"])
        except BadFile as error:
            axes[0, c].text(0.5, 0.5, f"bad file:\n{str(error)[:40]}", ha="center", fontsize=6, transform=axes[0, c].transAxes)
            for r in range(len(rows)):
                axes[r, c].set_axis_off()
            continue
        truth = load_gt_mask(data_dir, index["id"][position], None)
        for r, name in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(images[name], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            if r == 0:
                ax.contour(brain, levels=[0.5], colors="lime", linewidths=0.6)
            if truth is not None:
                ax.contour(truth, levels=[0.5], colors="red", linewidths=0.7)
            if c == 0:
                level_width = f" L{WINDOWS[name][0]}/W{WINDOWS[name][1]}" if dataset == "rsna" else " JPG"
                ax.text(4, 4, name + level_width, color="yellow", fontsize=7, va="top")
            ax.set_axis_off()
    fig.suptitle(f"{data_dir} ({dataset}): green = brain mask, red = ground-truth bleed", fontsize=9)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="ct-pddpm data: look at slices, build the index")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("show", "PNG grid of slices in each window with the masks outlined"),
                       ("index", "build (or load) the index and print its counts")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--data_dir", required=True)
        command.add_argument("--dataset", choices=("rsna", "ctich"), default=None, help="override the detected layout")
        command.add_argument("--cache_dir", default=None)
        if name == "show":
            command.add_argument("--out", default="grid.png")
            command.add_argument("--columns", type=int, default=8)
            command.add_argument("--seed", type=int, default=0)
        else:
            command.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS)
    args = parser.parse_args(argv)
    if args.command == "show":
        show_grid(args.data_dir, args.out, args.dataset, args.columns, args.seed, args.cache_dir)
    else:
        start = time.time()
        index = load_index(args.data_dir, args.dataset, args.cache_dir, args.num_workers)
        patients, inverse = np.unique(index["patient"], return_inverse=True)
        sick = np.bincount(inverse, weights=index["any"]) > 0
        print(f"{len(index['id'])} slices, {len(patients)} patients ({sick.sum()} with hemorrhage, {(~sick).sum()} without), "
              f"{len(np.unique(index['scan']))} scans; {time.time() - start:.1f} s")
        print("positive slices: " + ", ".join(f"{name} {int(index[name].sum())}" for name in LABELS))


if __name__ == "__main__":
    main()
