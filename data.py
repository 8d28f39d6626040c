"""Head CT from files on disk to model inputs: labels, an index, patient-level splits, windows,
intracranial masks and a memory-mapped slice cache. (The synthetic phantom is phantom.py.)

Three layouts are read, detected from the folder (or forced with dataset="rsna"|"ctich"|"nifti"):
  rsna : <data_dir>/stage_2_train/ID_<hex>.dcm + stage_2_train.csv
         (RSNA Intracranial Hemorrhage Detection, or the phantom that phantom.py writes); DICOM may be
         compressed (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) or lack the 128-byte preamble
  ctich: <data_dir>/Patients_CT/<pid>/{brain,bone}/<n>.jpg + hemorrhage_diagnosis.csv
         (PhysioNet CT-ICH v1.0.0, Hssayeni et al. 2020, CC BY 4.0)
  nifti: <data_dir>/ct_scans/<name>.nii[.gz] + masks/<name>.nii[.gz] (CT-ICH >= 1.3.1), images/ + labels/
         (BHSD-style, mask values 1-5 = SUBTYPES), ... (NIFTI_FOLDERS): one index row per axial slice

Index rows are slices; the index is columnar (a dict of equal-length numpy arrays) because RSNA
has 752,803 slices. Images go to the model as float [C, S, S] in [-1, 1]; channel k means the same
window on both layouts (see CHANNEL_WINDOWS and make_input).

CLI:
  python data.py show --data_dir DIR --out grid.png
  python data.py index --data_dir DIR
"""
import argparse
import collections
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import signal
import socket
import tempfile
import time
import warnings

import nibabel
import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
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
CACHE_VERSION = 2  # bump when decoding or the cache layout changes, so old caches are not reused
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
# NIfTI volumes <images>/<name>.nii[.gz] with bleed masks of the same name in <masks>/ (the first pair present is
# used). What a mask value means: "classes" = BHSD's numbering, 1..5 = SUBTYPES in this order (a dataset.json with
# "labels", as BHSD and nnU-Net ship, overrides it); "binary" = any non-zero voxel is a bleed, subtype not given.
NIFTI_FOLDERS = (("ct_scans", "masks", "binary"),  # PhysioNet CT-ICH from v1.3.1
                 ("images", "labels", "classes"),  # BHSD-style
                 ("images", "ground truths", "classes"),  # BHSD's label_192.zip as unpacked
                 ("imagesTr", "labelsTr", "classes"),  # nnU-Net raw layout (with its dataset.json)
                 ("data", "label", "binary"))  # INSTANCE 2022 training set
DATASETS = (*LAYOUTS, "nifti")


def is_nifti(path):
    return str(path).endswith((".nii", ".nii.gz"))


def nifti_folders(data_dir):
    """(image folder, mask folder, mask meaning) of the first NIFTI_FOLDERS pair in data_dir whose image folder
    holds .nii[.gz] files, or None."""
    for images, masks, meaning in NIFTI_FOLDERS:
        folder = os.path.join(data_dir, images)
        if os.path.isdir(folder) and os.path.isdir(os.path.join(data_dir, masks)) and any(map(is_nifti, os.listdir(folder))):
            return images, masks, meaning
    return None


def has_layout(data_dir, dataset):
    if dataset == "nifti":
        return nifti_folders(data_dir) is not None
    folder, label_file = LAYOUTS[dataset]
    return os.path.isdir(os.path.join(data_dir, folder)) and os.path.isfile(os.path.join(data_dir, label_file))


def brain_input_hu(dataset):
    """(HU at input -1, HU at input +1) of channel 0 (the brain window) for this layout: CT-ICH's brain JPG maps
    -20..100 HU (L40/W120) onto 0..255; DICOM and NIfTI inputs are windowed with WINDOWS["brain"]."""
    if dataset == "ctich":
        return (-20.0, 100.0)
    level, width = WINDOWS["brain"]
    return (level - width / 2, level + width / 2)


def detect_dataset(data_dir):
    """"rsna", "ctich" or "nifti" from the files in data_dir; SystemExit saying how to get data otherwise."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: {data_dir}: no such folder; {HOW_TO_GET_DATA}")
    for dataset in DATASETS:
        if has_layout(data_dir, dataset):
            return dataset
    if not [name for name in os.listdir(data_dir) if not name.startswith(".")]:
        raise SystemExit(f"error: {data_dir}: folder is empty; {HOW_TO_GET_DATA}")
    raise SystemExit(f"error: {data_dir}: neither the RSNA layout (stage_2_train/ + stage_2_train.csv), the CT-ICH "
                     f"layout (Patients_CT/ + hemorrhage_diagnosis.csv) nor NIfTI volumes with masks (ct_scans/ + masks/ "
                     f"or images/ + labels/); {HOW_TO_GET_DATA}")


def check_dataset(data_dir, dataset):
    """The dataset to read: detected when None, else the one asked for, which must be there."""
    if dataset is None:
        return detect_dataset(data_dir)
    if dataset not in DATASETS:
        raise SystemExit(f"error: {data_dir}: unknown dataset {dataset!r} ({', '.join(DATASETS)})")
    if not has_layout(data_dir, dataset):
        if dataset == "nifti":
            pairs = ", ".join(f"{images}/ + {masks}/" for images, masks, _ in NIFTI_FOLDERS)
            raise SystemExit(f"error: {data_dir}: dataset nifti needs .nii or .nii.gz volumes and a mask folder "
                             f"there (one of {pairs})")
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
    return check_cache_dir(path)


def check_cache_dir(path):
    """The cache folder, created if needed; a one-line error when it is a file or cannot be made."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: --cache_dir {path}: not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: --cache_dir {path}: cannot create the cache folder ({error.strerror or error})")
    return path


# ---------------------------------------------------------------------------------------------
# writing outputs: atomically, and one run per folder

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomically(path, write):
    """Every result file (checkpoints, metrics, scores, args, history, plots, caches' index) is written here:
    write(f) fills a temporary binary file in the same folder, which then replaces `path` in one rename. A full
    disk or a crash leaves the old file (or none), never a truncated one, and a failed write is one line."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    except OSError as error:
        raise SystemExit(f"error: {path}: cannot write ({error.strerror or error})")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes it private; results are as readable as any new file
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # RuntimeError: torch.save's writer on a full disk
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        left = "the previous file is left as it was" if existed else "no file was written"
        raise SystemExit(f"error: {path}: cannot write ({_one_line_os(error)}); {left}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _one_line_os(error):
    return error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())[:160]


def write_json(path, content):
    write_atomically(path, lambda f: f.write((json.dumps(content, indent=2) + "\n").encode()))


def check_figure_format(path, flag):
    """A figure path must name a format matplotlib writes (png, pdf, svg, ...): checked before any work."""
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(os.fspath(path))[1][1:].lower()
    if extension and extension not in formats:
        raise SystemExit(f"error: {flag} {path}: matplotlib cannot write .{extension} files "
                         f"(use one of {', '.join(sorted(formats))})")


def save_figure(fig, path, **savefig_kwargs):
    """fig.savefig, atomically (the format from the file name's extension, png without one)."""
    extension = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"
    write_atomically(path, lambda f: fig.savefig(f, format=extension, **savefig_kwargs))


LOCK_NAME = ".run.lock"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def lock_output_dir(output_dir, what):
    """One run per output folder at a time: <output_dir>/.run.lock holds "pid host start-time", is created
    with its content in one step (a hard link), and is removed by release_output_dir. A lock left by a crashed
    run on this host (its pid is gone) is taken over; one from another host is named in the error, with how to
    clear it. -> the lock's path."""
    path = os.path.join(os.fspath(output_dir), LOCK_NAME)
    mine = f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')} {what}\n"
    for attempt in range(2):
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w") as f:
                f.write(mine)
        except OSError as error:
            raise SystemExit(f"error: {output_dir}: cannot write output dir ({error.strerror or error})")
        try:
            os.link(temporary, path)  # fails if the lock exists: no two runs both get it
            return path
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create, then the content
            try:
                with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
                    f.write(mine)
                return path
            except FileExistsError:
                pass
        finally:
            os.unlink(temporary)
        try:
            with open(path) as f:
                pid, host, started, *_ = f.read().split() + ["?"] * 3
            pid = int(pid)
        except (OSError, ValueError):
            raise SystemExit(f"error: {output_dir}: holds a lock file {path} that is not ours; delete it if no run "
                             "is using this folder")
        if host == socket.gethostname() and not _pid_alive(pid) and attempt == 0:
            print(f"note: {path}: left by a run that is gone (pid {pid}, started {started}); taking it over")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        where = "on this host" if host == socket.gethostname() else f"on host {host}; delete {path} if that run is gone"
        raise SystemExit(f"error: {output_dir}: another run is using this output dir (pid {pid} {where}, "
                         f"started {started})")
    raise SystemExit(f"error: {output_dir}: another run took the lock {path} at the same moment")


def release_output_dir(lock_path):
    """Remove the lock, if it is still this process's."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(lock_path) as f:
            if int(f.read().split()[0]) == os.getpid():
                os.unlink(lock_path)


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops them and says one line


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


HEADER_TAGS = ["Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient", "InstanceNumber",
               "Rows", "Columns"]
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as written in little-endian files
# What to pip install when pydicom has no decoder for a compressed transfer syntax. requirements.txt installs all of
# them (README, "Compressed DICOM": they decode JPEG Lossless, JPEG-LS, JPEG 2000 exactly); RLE needs none.
JPEG_PACKAGES, J2K_PACKAGES = "pylibjpeg pylibjpeg-libjpeg", "pylibjpeg pylibjpeg-openjpeg"
DECODER_PACKAGES = {**dict.fromkeys([f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)], JPEG_PACKAGES),
                    **dict.fromkeys([f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 201, 202, 203)], J2K_PACKAGES)}


def read_dicom(path, unreadable, **kwargs):
    """pydicom.dcmread(path, **kwargs). A file without the 128-byte preamble and 'DICM' prefix (older archives
    write none) is read again with force=True and kept only if it then has an image header (Rows and Columns):
    force=True makes a "dataset" of any file. A missing transfer syntax is taken from how the data set was
    encoded. `unreadable` starts the reason of a file that cannot be read."""
    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError:
        pass
    except Exception as error:  # pydicom raises many types on damaged files; all mean "unusable"
        raise BadFile(f"{unreadable}: {_one_line(error)}")
    try:
        ds = pydicom.dcmread(path, force=True, **kwargs)
    except Exception as error:
        raise BadFile(f"{unreadable}: {_one_line(error)}")
    if "Rows" not in ds or "Columns" not in ds:
        raise BadFile(f"{unreadable}: no DICOM preamble, and no image header (Rows, Columns) when read without it")
    if "TransferSyntaxUID" not in ds.file_meta:  # no file meta at all: only an uncompressed data set can be read
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (
            ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def decoder_problem(ds):
    """None when pydicom can decode this file's pixel data, else the reason, which names the transfer syntax and
    what to install. Asked of pydicom's decoder registry, not read from its error texts (they change between
    versions)."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        named = f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)
        return f"unsupported transfer syntax {named}: pydicom has no decoder for it"
    if decoder.is_available:
        return None
    install = DECODER_PACKAGES.get(syntax, f"{JPEG_PACKAGES} pylibjpeg-openjpeg")
    return f"no decoder installed for {syntax.name} ({syntax}): pip install {install}"


def _header_lacks(what, path):
    """Reason for a header without `what`. pydicom reads a file cut off mid-header without complaint, as a
    header that simply stops, so a file with no pixel data element at all is called truncated."""
    with open(path, "rb") as f:  # read in full, but only for files that are already failing
        cut = PIXEL_DATA_TAG not in f.read()
    return f"truncated DICOM: {what}, and the file ends before any pixel data" if cut else what


def read_header(path, need_patient=True):
    """(patient, study, series, z) from a DICOM header, without reading pixels; a file whose pixel data this
    installation cannot decode is a BadFile here already (decoder_problem). need_patient=False (predict.py: no
    splits by patient) accepts an empty PatientID, as anonymised exports have."""
    ds = read_dicom(path, "unreadable DICOM header", stop_before_pixels=True, specific_tags=HEADER_TAGS)
    modality = str(first(ds.get("Modality")) or "CT")
    if modality != "CT":
        raise BadFile(f"modality {modality}, not CT")
    problem = decoder_problem(ds)
    if problem:
        raise BadFile(problem)
    patient = str(first(ds.get("PatientID")) or "")
    if not patient and need_patient:
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
    ds = read_dicom(path, "unreadable DICOM")
    modality = str(first(ds.get("Modality")) or "CT")
    if modality != "CT":
        raise BadFile(f"modality {modality}, not CT")
    if "PixelData" not in ds:
        raise BadFile("no pixel data")
    problem = decoder_problem(ds)
    if problem:
        raise BadFile(problem)
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as error:
        raise BadFile(f"truncated or undecodable pixel data: {ds.file_meta.TransferSyntaxUID.name}: {_one_line(error)}")
    if pixels.ndim != 2:
        raise BadFile(f"pixel array of shape {pixels.shape}, not one 2-D slice")
    try:
        slope = header_number(ds, "RescaleSlope", 1.0)
        intercept = header_number(ds, "RescaleIntercept", 0.0)
    except (TypeError, ValueError) as error:
        raise BadFile(f"unreadable RescaleSlope/RescaleIntercept: {_one_line(error)}")
    check_plausible_header(ds, pixels, slope)
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
    check_plausible_hu(hu, "RescaleIntercept" in ds and intercept != 0)
    return hu


def check_size(shape):
    if min(shape) < MIN_SLICE_SIDE:
        raise BadFile(f"image of {shape[0]}x{shape[1]} pixels, too small for a head CT slice")


def _is_encapsulated(ds):
    """Compressed pixel data (whose length says nothing about Rows x Columns); without file meta (a file with no
    preamble) the data itself tells: encapsulated data starts with an item tag."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None:
        return syntax.is_compressed
    return bytes(ds.PixelData[:4]) == b"\xfe\xff\x00\xe0"


def check_plausible_header(ds, pixels, slope):
    """BadFile for a decoded slice whose header cannot describe it: a zero or non-finite slope (every pixel would
    get the same HU), or uncompressed pixel data longer or shorter than Rows x Columns x BitsAllocated says (pydicom
    only warns when Columns is one short, and decodes a sheared picture)."""
    if slope == 0 or not math.isfinite(slope):
        raise BadFile(f"implausible RescaleSlope: {slope:g}")
    if not _is_encapsulated(ds):
        rows, columns = int(header_number(ds, "Rows", 0)), int(header_number(ds, "Columns", 0))
        bits = int(header_number(ds, "BitsAllocated", 16))
        n = rows * columns * int(header_number(ds, "SamplesPerPixel", 1)) * int(header_number(ds, "NumberOfFrames", 1))
        expected = (n * bits + 7) // 8
        if len(ds.PixelData) not in (expected, expected + expected % 2):  # odd lengths are padded to even
            raise BadFile(f"pixel data length does not match the header: {len(ds.PixelData)} bytes, but Rows x Columns "
                          f"x BitsAllocated ({rows} x {columns} x {bits} bit) make {expected}")
    check_size(pixels.shape)


def check_plausible_hu(hu, has_intercept):
    """BadFile for HU that no head CT has: a wrong slope/intercept (or an image that is not in HU) puts the slice
    far outside the CT range, and windowing would turn it into a flat square or noise.
    - mostly outside -1100..3000 HU: padding outside the field of view (-2000 or -3024 HU on many scanners)
      covers at most ~21 % of a slice, so a real slice is mostly inside;
    - over 5 % above 3000 HU: denser than any bone, more than metal implants cover; typically signed pixels
      read as unsigned (negative padding turned into ~63000);
    - no air (under 1 % below -200 HU): a head CT shows the air around the head; typically pixels stored as
      HU + 1024 without their RescaleIntercept, so air reads ~0 and brain ~1060."""
    plausible = np.mean((hu >= -1100) & (hu <= 3000))
    if plausible < 0.5:
        raise BadFile(f"implausible HU values: {plausible:.0%} of pixels within -1100..3000 HU "
                      f"(min {hu.min():.4g}, max {hu.max():.4g}; check RescaleSlope/RescaleIntercept)")
    too_dense = np.mean(hu > 3000)
    if too_dense > 0.05:
        raise BadFile(f"implausible HU values: {too_dense:.0%} of pixels above 3000 HU (max {hu.max():.4g}; "
                      "signed pixels read as unsigned? check PixelRepresentation)")
    air = np.mean(hu < -200)
    if air < 0.01:
        hint = "" if has_intercept else "; stored as HU + 1024 without RescaleIntercept?"
        raise BadFile(f"implausible HU values: no air around the head ({air:.1%} of pixels below -200 HU, "
                      f"min {hu.min():.4g}{hint})")


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


def load_nifti(path, mask=False):
    """(nibabel image, its 3-D values): HU as float32 with the header's scl_slope / scl_inter applied (get_fdata),
    or for a mask the stored values. BadFile when the file cannot be read or is not one 3-D volume."""
    try:
        image = nibabel.load(path)
        values = np.asanyarray(image.dataobj) if mask else image.get_fdata(dtype=np.float32)
        io_orientation(image.affine)  # a degenerate affine fails here, not half-way through a run
    except Exception as error:  # nibabel raises many types on damaged files; all mean "unusable"
        raise BadFile(f"unreadable NIfTI: {_one_line(error)}")
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise BadFile(f"NIfTI image of shape {values.shape}, not one 3-D volume")
    return image, values


def axial_slices(values, affine):
    """(slices [Z, H, W], their z positions in mm [Z], lowest first) of a volume in any stored orientation.

    The volume is turned to nibabel's canonical RAS+ axes (io_orientation: the axis swaps and flips closest to the
    affine, no resampling), so axis 2 runs from feet to head. Each axial slice is then laid out as DICOM shows one:
    rows from anterior to posterior, columns from the patient's right to left (the radiological view of every RSNA
    slice), so a model sees NIfTI and DICOM heads the same way round. nifti_volume() undoes this."""
    orientation = io_orientation(affine)
    canonical = apply_orientation(values, orientation)
    canonical_affine = affine @ inv_ornt_aff(orientation, values.shape)
    slices = np.ascontiguousarray(canonical[::-1, ::-1, :].transpose(2, 1, 0))
    centre = [(canonical.shape[0] - 1) / 2, (canonical.shape[1] - 1) / 2]
    z = np.array([canonical_affine[2] @ [*centre, k, 1] for k in range(canonical.shape[2])], np.float32)
    return slices, z


def nifti_volume(slices, affine):
    """The inverse of axial_slices: per-slice arrays [Z, H, W] back to the stored voxel order of a volume with this
    affine, so that saved with the same affine they lie on the input voxel for voxel."""
    canonical = np.asarray(slices).transpose(2, 1, 0)[::-1, ::-1, :]
    to_stored = ornt_transform(axcodes2ornt("RAS"), io_orientation(affine))
    return np.ascontiguousarray(apply_orientation(canonical, to_stored))


def read_nifti_labels(item):
    """(z [Z], labels int8 [Z, 6] in LABELS order) of one CT volume from its mask. item: (CT path, mask path,
    {mask value: subtype} or None for a 0/1 mask). The mask must have the CT's voxel grid; it is turned with the CT's
    affine, so its slices are the CT's slices."""
    ct_path, mask_path, classes = item
    try:
        ct = nibabel.load(ct_path)
        orientation = io_orientation(ct.affine)
    except Exception as error:
        raise BadFile(f"unreadable NIfTI: {_one_line(error)}")
    mask_image, mask = load_nifti(mask_path, mask=True)
    if mask.shape != ct.shape[:3]:
        raise BadFile(f"mask {os.path.basename(mask_path)} of shape {mask.shape}, the CT volume is {ct.shape[:3]}")
    if not np.array_equal(io_orientation(mask_image.affine), orientation):
        raise BadFile(f"mask {os.path.basename(mask_path)} is oriented {''.join(nibabel.aff2axcodes(mask_image.affine))}, "
                      f"the CT volume {''.join(nibabel.aff2axcodes(ct.affine))}")
    slices, z = axial_slices(np.rint(mask).astype(np.int16) if mask.dtype.kind == "f" else mask, ct.affine)
    labels = np.zeros((len(slices), len(LABELS)), np.int8)
    labels[:, 0] = (slices != 0).any(axis=(1, 2))
    for value, subtype in (classes or {}).items():
        labels[:, LABELS.index(subtype)] = (slices == value).any(axis=(1, 2))
    return z, labels


def read_nifti_slices(path, numbers):
    """HU float32 [len(numbers), H, W] of the given axial slices (axial_slices' numbering) of one CT volume,
    read once for all of them."""
    image, hu = load_nifti(path)
    slices, _ = axial_slices(hu, image.affine)
    if numbers and max(numbers) >= len(slices):
        raise BadFile(f"NIfTI volume has {len(slices)} axial slices, slice {max(numbers)} asked for (file changed?)")
    return slices[list(numbers)]


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


def to_slice_shape(image, shape):
    """The inverse of make_input's square padding and resize for a 2-D map [S, S] (e.g. an anomaly map): back onto
    its slice's own [H, W] pixels (bilinear), so that it lies on the slice it was computed from."""
    h, w = shape
    side = max(h, w)
    tensor = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    if side != tensor.shape[-1]:
        tensor = F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False)
    top, left = (side - h) // 2, (side - w) // 2
    return tensor[0, 0, top:top + h, left:left + w].numpy()


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
    """Ground-truth bleed mask as bool [S, S] (resized like the slice), or None if there is none: the phantom's
    <data_dir>/masks/<id>.npy, or CT-ICH's Patients_CT/<pid>/brain/<n>_HGE_Seg.jpg. BadFile when a mask does not
    fit its slice (the caller counts it and leaves the slice out of the pixel metrics)."""
    if str(image_id).startswith("ctich_"):
        return _ctich_gt_mask(os.fspath(data_dir), str(image_id), image_size)
    if "#" in str(image_id):  # a slice of a NIfTI volume: "<volume>#<k>"
        volume, k = str(image_id).rsplit("#", 1)
        slices = _nifti_mask_slices(os.fspath(data_dir), volume)
        return None if slices is None else resize_mask(slices[int(k)], image_size)
    path = os.path.join(os.fspath(data_dir), "masks", f"{image_id}.npy")
    if not os.path.exists(path):
        return None
    return resize_mask(np.load(path), image_size)


@functools.lru_cache(maxsize=2)  # slices are scored in index order, volume after volume: each mask is read once
def _nifti_mask_slices(data_dir, volume):
    """bool [Z, H, W] bleed mask of a NIfTI volume, sliced like its CT (read_nifti_labels), or None."""
    ct, mask = _cached_nifti_volumes(data_dir).get(volume, (None, None))
    if mask is None:
        return None
    ct_image = nibabel.load(os.path.join(data_dir, ct))
    _, values = load_nifti(os.path.join(data_dir, mask), mask=True)
    return axial_slices(np.asarray(values) != 0, ct_image.affine)[0]


@functools.lru_cache(maxsize=4)
def _cached_nifti_volumes(data_dir):
    return nifti_volumes(data_dir)


def _ctich_gt_mask(data_dir, image_id, image_size):
    """CT-ICH's hemorrhage mask next to the brain slice: same size, white = hemorrhage; JPEG, so mid-grey splits."""
    _, pid, n = image_id.split("_")
    brain_dir = os.path.join(data_dir, "Patients_CT", pid, "brain")
    path = os.path.join(brain_dir, f"{n}_HGE_Seg.jpg")
    if not os.path.exists(path):
        return None
    mask = read_jpg(path) >= 128
    width, height = check_jpg(os.path.join(brain_dir, f"{n}.jpg"))
    if mask.shape != (height, width):
        raise BadFile(f"{path}: mask of {mask.shape[0]}x{mask.shape[1]} pixels, its slice is {height}x{width}")
    return resize_mask(mask, image_size)


# ---------------------------------------------------------------------------------------------
# labels and the index

def read_label_text(csv_path):
    """The text of a label CSV, decoded by its byte-order mark (UTF-8, UTF-16 or UTF-32, as Excel exports may be)
    or as UTF-8; anything else is a one-line error naming the file."""
    with open(csv_path, "rb") as f:
        raw = f.read()
    boms = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xef\xbb\xbf", "utf-8-sig"),
            (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
    encoding = next((name for bom, name in boms if raw.startswith(bom)), "utf-8")
    if raw.startswith(b"PK\x03\x04"):
        raise SystemExit(f"error: {csv_path}: a zip or Excel workbook, not a CSV text file (save it as CSV)")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise SystemExit(f"error: {csv_path}: not {encoding.upper()} text (byte {raw[error.start]:#04x} at offset "
                         f"{error.start}); save it as CSV UTF-8")
    if "\x00" in text:
        raise SystemExit(f"error: {csv_path}: holds NUL characters (UTF-16 without a byte-order mark?); save it as CSV UTF-8")
    return text


def read_rsna_labels(csv_path):
    """stage_2_train.csv (ID_<hex>_<subtype>,Label rows, duplicates allowed) -> {image id: [6 labels in LABELS order]}.
    A label the CSV does not give stays -1. A subtype of 1 under an 'any' of 0 is a one-line error naming the line."""
    column = {name: k for k, name in enumerate(LABELS)}
    labels = {}
    lines = io.StringIO(read_label_text(csv_path))  # 4.5 M lines for RSNA: read one at a time, not split into a list
    header = lines.readline().strip()
    if header.replace(" ", "") != "ID,Label":
        raise SystemExit(f"error: {csv_path}: expected the columns ID,Label, got {header[:80]!r}")
    for line_number, line in enumerate(lines, 2):
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
        if row[0] == 0 and 1 in row[1:]:
            raise SystemExit(f"error: {csv_path}:{line_number}: {image_id} has any=0 but "
                             f"{LABELS[row.index(1, 1)]}=1 (its label rows contradict each other)")
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
    any = 1 - No_Hemorrhage; the subtypes come from their columns. A value other than 0/1, or a row whose
    No_Hemorrhage disagrees with its subtypes, is a one-line error naming the line."""
    reader = csv.DictReader(io.StringIO(read_label_text(csv_path), newline=""))
    needed = ["PatientNumber", "SliceNumber", "No_Hemorrhage", *CTICH_COLUMNS.values()]
    missing = [name for name in needed if name not in (reader.fieldnames or [])]
    if missing:
        raise SystemExit(f"error: {csv_path}: missing column(s) {', '.join(missing)}")
    labels = {}
    for line_number, row in enumerate(reader, 2):
        try:
            key = (int(row["PatientNumber"]), int(row["SliceNumber"]))
            flags = {name: int(row[name]) for name in ["No_Hemorrhage", *CTICH_COLUMNS.values()]}
        except (TypeError, ValueError):
            raise SystemExit(f"error: {csv_path}:{line_number}: cannot parse row {dict(row)}")
        wrong = [f"{name}={value}" for name, value in flags.items() if value not in (0, 1)]
        if wrong:
            raise SystemExit(f"error: {csv_path}:{line_number}: {', '.join(wrong)}, expected 0 or 1")
        present = [name for name in CTICH_COLUMNS.values() if flags[name]]
        if flags["No_Hemorrhage"] == 1 and present:
            raise SystemExit(f"error: {csv_path}:{line_number}: No_Hemorrhage=1 but {'=1, '.join(present)}=1 "
                             "(the row contradicts itself)")
        if flags["No_Hemorrhage"] == 0 and not present:
            raise SystemExit(f"error: {csv_path}:{line_number}: No_Hemorrhage=0 but no subtype column is 1 "
                             "(the row contradicts itself)")
        values = [1 - flags["No_Hemorrhage"]] + [flags[CTICH_COLUMNS[name]] for name in SUBTYPES]
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


NIFTI_PATIENT_TABLE = "patients.csv"  # optional, in data_dir: columns scan,patient (scan = volume name)
SUBTYPE_NAMES = {**{name: name for name in SUBTYPES}, **{short.lower(): name for name, short in SHORT_NAMES.items()},
                 "extradural": "epidural", "intracerebral": "intraparenchymal"}


def nifti_name(filename):
    """A volume's name: the file name without .nii / .nii.gz."""
    return filename[:-7] if filename.endswith(".nii.gz") else filename[:-4]


def nifti_volumes(data_dir):
    """{volume name: (CT path, mask path or None)}, paths relative to data_dir, for the NIfTI layout in data_dir. A
    mask has the CT's file name, less the "_0000" channel suffix of nnU-Net image names."""
    images, masks, _ = nifti_folders(data_dir)
    mask_files = {nifti_name(name): name for name in os.listdir(os.path.join(data_dir, masks)) if is_nifti(name)}
    volumes = {}
    for name in sorted(os.listdir(os.path.join(data_dir, images))):
        if is_nifti(name):
            volume = nifti_name(name)
            mask = mask_files.get(volume) or mask_files.get(volume.removesuffix("_0000"))
            volumes[volume] = (f"{images}/{name}", f"{masks}/{mask}" if mask else None)
    return volumes


def nifti_mask_classes(data_dir, meaning):
    """{mask value: subtype} for class-valued masks, None for 0/1 masks (NIFTI_FOLDERS). A dataset.json with
    "labels" ({"1": "epidural", ...}, or nnU-Net v2's {"epidural": 1, ...}) decides instead; its names that are no
    subtype (e.g. "hemorrhage") count as a bleed of no given subtype."""
    path = os.path.join(data_dir, "dataset.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                labels = json.load(f).get("labels") or {}
        except (OSError, ValueError, AttributeError) as error:
            raise SystemExit(f"error: {path}: unreadable dataset.json ({_one_line(error)})")
        if labels:
            classes = {}
            for key, value in labels.items():
                name, number = (value, key) if str(key).isdigit() else (key, value)
                subtype = SUBTYPE_NAMES.get(str(name).strip().lower())
                if subtype and str(number).isdigit():
                    classes[int(number)] = subtype
            return classes
    return {k + 1: name for k, name in enumerate(SUBTYPES)} if meaning == "classes" else None


def read_patient_table(data_dir):
    """{volume name: patient} from <data_dir>/patients.csv, or {} (then each volume is its own patient)."""
    path = os.path.join(data_dir, NIFTI_PATIENT_TABLE)
    if not os.path.exists(path):
        return {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"scan", "patient"} <= set(reader.fieldnames or []):
            raise SystemExit(f"error: {path}: expected the columns scan,patient, got {reader.fieldnames}")
        return {row["scan"].strip(): row["patient"].strip() for row in reader}


def build_nifti_index(data_dir, num_workers):
    """One row per axial slice of every CT volume that has a mask; id "<volume>#<k>" (k: axial_slices' number)."""
    _, _, meaning = nifti_folders(data_dir)
    classes = nifti_mask_classes(data_dir, meaning)
    patients = read_patient_table(data_dir)
    skips, kept = [], []
    for volume, (ct, mask) in nifti_volumes(data_dir).items():
        if mask is None:
            skips.append((ct, "no mask of the same name (labels unknown)"))
        else:
            kept.append((volume, ct, (os.path.join(data_dir, ct), os.path.join(data_dir, mask), classes)))
    columns = {name: [] for name in INDEX_COLUMNS}
    for (volume, ct, _), (ok, result) in zip(kept, parallel_map(read_nifti_labels, [job for *_, job in kept],
                                                                num_workers, "volumes")):
        if not ok:
            skips.append((ct, result))
            continue
        z, labels = result
        for k in range(len(z)):
            for column, value in zip(("id", "path", "patient", "scan", "series", "z"),
                                     (f"{volume}#{k}", ct, patients.get(volume, volume), volume, volume, z[k])):
                columns[column].append(value)
            for column, value in zip(LABELS, labels[k]):
                columns[column].append(int(value))
    return columns, skips


def installed_decoders():
    """Which compressed transfer syntaxes pydicom can decode here, as a string of 0/1: installing a decoder
    changes it, so an index that left those files out is built again."""
    def available(syntax):
        try:
            return get_decoder(syntax).is_available
        except NotImplementedError:
            return False
    return "".join("1" if available(syntax) else "0" for syntax in sorted(DECODER_PACKAGES))


def data_signature(data_dir, dataset):
    """Changes when the label file or the image folder changes (NIfTI: the image and mask folders and the optional
    patient table and dataset.json) or, for DICOM, the installed decoders: it invalidates the index cache."""
    if dataset == "nifti":
        images, masks, _ = nifti_folders(data_dir)
        names = [images, masks, NIFTI_PATIENT_TABLE, "dataset.json"]
    else:
        names = list(LAYOUTS[dataset])
    parts = [dataset]
    for name in names:
        if os.path.exists(os.path.join(data_dir, name)):
            stat = os.stat(os.path.join(data_dir, name))
            parts += [name, str(stat.st_size), str(stat.st_mtime_ns)]
    return ":".join(parts + ([installed_decoders()] if dataset == "rsna" else []))


def nothing_usable(data_dir, skips):
    """The one-line error when every file was skipped: the most common reason in full (e.g. the transfer syntax
    that no installed decoder reads, and what to pip install), with a file that has it."""
    message = f"error: {data_dir}: no usable slices (all {len(skips)} skipped)"
    if not skips:
        return message
    category, n = collections.Counter(reason.split(":")[0] for _, reason in skips).most_common(1)[0]
    name, reason = next((name, reason) for name, reason in skips if reason.split(":")[0] == category)
    return f"{message}: {'' if n == len(skips) else f'{n} of them: '}{reason} (e.g. {name})"


def _sources(data_dir, index):
    """source_identity of every index row, as int64 [N, 2] ((-1, -1) where the file is gone)."""
    identities = [source_identity(os.path.join(data_dir, path)) or (-1, -1) for path in index["path"]]
    return np.array(identities, np.int64).reshape(-1, 2)


def _changed_files(data_dir, index, sources):
    """Paths of the index rows whose file is not the one the index was built from (rewritten in place, which
    leaves the folder's modification time alone): their header may now say another patient or position."""
    changed = np.flatnonzero((_sources(data_dir, index) != sources).any(axis=1))
    return [str(index["path"][k]) for k in changed]


def load_index(data_dir, dataset=None, cache_dir=None, num_workers=DEFAULT_WORKERS):
    """The slice index, a dict of equal-length arrays (INDEX_COLUMNS), rows ordered by (patient, scan, z).

    Headers are read once, in parallel, and the index is cached as .npz in cache_dir; later calls load it, unless
    the label file, the folder (files added or removed) or any indexed file (size, modification time) changed."""
    data_dir = os.fspath(data_dir)
    dataset = check_dataset(data_dir, dataset)
    cache_dir = check_cache_dir(cache_dir) if cache_dir else default_cache_dir(data_dir)
    folder_hash = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:8]
    cache_path = os.path.join(cache_dir, f"index_{dataset}_{folder_hash}_v{CACHE_VERSION}.npz")
    signature = f"{os.path.abspath(data_dir)}:{data_signature(data_dir, dataset)}"
    if os.path.exists(cache_path):
        try:
            with np.load(cache_path) as cached:
                if str(cached["signature"]) == signature:
                    index, sources = {name: cached[name] for name in INDEX_COLUMNS}, cached["source"]
                    changed = _changed_files(data_dir, index, sources)
                    if not changed:
                        print(f"index: {len(index['id'])} slices from {cache_path} ({int(cached['n_skipped'])} files skipped when built)")
                        return index
                    print(f"index: {len(changed)} file(s) changed since the index was built (first: {changed[0]}); "
                          "reading the headers again")
        except (OSError, KeyError, ValueError):  # damaged or older cache: build it again
            pass
    start = time.time()
    build = {"rsna": build_rsna_index, "ctich": build_ctich_index, "nifti": build_nifti_index}[dataset]
    columns, skips = build(data_dir, num_workers)
    report_skips("index", skips)
    if not columns["id"]:
        raise SystemExit(nothing_usable(data_dir, skips))
    index = {name: np.array(columns[name]) for name in ("id", "path", "patient", "scan", "series")}
    index["z"] = np.array(columns["z"], np.float32)
    index.update({name: np.array(columns[name], np.int8) for name in LABELS})
    order = np.lexsort((index["id"], index["z"], index["scan"], index["patient"]))
    index = {name: index[name][order] for name in INDEX_COLUMNS}
    sources = _sources(data_dir, index)
    write_atomically(cache_path, lambda f: np.savez(f, signature=signature, n_skipped=len(skips), source=sources, **index))
    print(f"index: {len(index['id'])} slices, {len(np.unique(index['patient']))} patients in {time.time() - start:.1f} s -> {cache_path}")
    return index


# ---------------------------------------------------------------------------------------------
# patient-level splits

BLEED_MARGIN = 3  # --bleed_train_fraction: training slices of a hemorrhage patient keep this many slices from any bleed


def split_patients(index, seed, train_fraction=0.5, bleed_train_fraction=0.0):
    """{"train", "val", "test"} -> sorted patient arrays. Healthy patients (no positive slice) are
    split train / val / test; hemorrhage patients go to val / test only, half each. Opt-in protocol
    (bleed_train_fraction > 0): that fraction of the hemorrhage patients of val and of test goes to training
    instead (their slices BLEED_MARGIN or more from any bleed, see make_splits). The rest stay where the standard
    protocol puts them: val and test only shrink, so no test patient ever moves into val."""
    patients, inverse = np.unique(index["patient"], return_inverse=True)
    sick = np.bincount(inverse, weights=index["any"], minlength=len(patients)) > 0
    rng = np.random.default_rng(seed)
    healthy, hemorrhage = rng.permutation(patients[~sick]), rng.permutation(patients[sick])
    n_train = int(round(len(healthy) * train_fraction))
    held_out = healthy[n_train:]
    n_val_healthy, n_val_sick = (len(held_out) + 1) // 2, (len(hemorrhage) + 1) // 2
    val_sick, test_sick = hemorrhage[:n_val_sick], hemorrhage[n_val_sick:]
    n_val_moved, n_test_moved = (int(round(len(p) * bleed_train_fraction)) for p in (val_sick, test_sick))
    return {"train": np.sort(np.concatenate([healthy[:n_train], val_sick[:n_val_moved], test_sick[:n_test_moved]])),
            "val": np.sort(np.concatenate([held_out[:n_val_healthy], val_sick[n_val_moved:]])),
            "test": np.sort(np.concatenate([held_out[n_val_healthy:], test_sick[n_test_moved:]]))}


SPLIT_NAMES = ("train", "val", "test")


def splits_record(patients, *, seed, data_dir, dataset, bleed_train_fraction=0.0):
    """What splits.json and every checkpoint hold: the patient lists of the run's splits as plain data (loadable
    with torch.load(weights_only=True)), fixed when training starts."""
    return {"seed": int(seed), "data_dir": os.path.abspath(os.fspath(data_dir)), "dataset": dataset,
            "patients": {name: [str(p) for p in patients[name]] for name in SPLIT_NAMES},
            "bleed_train_fraction": float(bleed_train_fraction)}


def load_splits_record(checkpoint, checkpoint_path):
    """The run's saved splits: from the checkpoint, else from splits.json next to it; None for a run older than
    saved splits. A damaged record is a one-line error."""
    record = checkpoint.get("splits")
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "splits.json")
    if record is None and os.path.isfile(path):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: {path}: cannot read the run's saved splits ({_one_line(error)})")
    if record is None:
        return None
    lists = record.get("patients") if isinstance(record, dict) else None
    if not isinstance(lists, dict) or not all(isinstance(lists.get(name), list) for name in SPLIT_NAMES):
        raise SystemExit(f"error: {checkpoint_path}: its saved splits are damaged (no train/val/test patient lists)")
    return record


def apply_saved_splits(index, record):
    """{"train", "val", "test"} -> patient arrays: the saved lists, less the patients no longer in the index.
    Patients in the index but in no saved list (added since training) are left out of every split; both are
    counted in one line each. A training patient is never in val or test, and a training patient whose slices
    are now labelled as a bleed is left out of training."""
    lists = {name: [str(p) for p in record["patients"][name]] for name in SPLIT_NAMES}
    overlap = set(lists["train"]) & (set(lists["val"]) | set(lists["test"])) or set(lists["val"]) & set(lists["test"])
    if overlap:
        raise SystemExit(f"error: the run's saved splits put patient {sorted(overlap)[0]} in two splits (damaged splits.json?)")
    patients, inverse = np.unique(index["patient"], return_inverse=True)
    sick = set(patients[np.bincount(inverse, weights=index["any"], minlength=len(patients)) > 0].tolist())
    present, known = set(patients.tolist()), set().union(*lists.values())
    added, gone = sorted(present - known), sorted(known - present)
    if added:
        print(f"splits: {len(added)} patient(s) not in the run's saved splits are left out (added since training): "
              f"{', '.join(added[:10])}{' ...' if len(added) > 10 else ''}")
    if gone:
        counts = ", ".join(f"{name} {len(set(lists[name]) - present)}" for name in SPLIT_NAMES)
        print(f"splits: {len(gone)} patient(s) of the run's saved splits are no longer in the data ({counts})")
    if record.get("bleed_train_fraction", 0):  # the opt-in protocol trains on hemorrhage patients' far slices
        sick = set()
    now_sick = sorted(set(lists["train"]) & sick)
    if now_sick:
        print(f"splits: {len(now_sick)} training patient(s) now have a bleed label and are left out of training: "
              f"{', '.join(now_sick[:10])}")
    return {name: np.array(sorted(p for p in lists[name] if p in present and not (name == "train" and p in sick)),
                           dtype=index["patient"].dtype) for name in SPLIT_NAMES}


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


def far_from_bleeds(index, rows, margin=BLEED_MARGIN):
    """The rows (of training patients) that are no bleed and at least `margin` slices from any bleed slice of their
    scan (rows of a scan are consecutive and ordered by z). All rows of a healthy patient."""
    bleeds = np.flatnonzero(index["any"] == 1)
    if len(bleeds) == 0 or len(rows) == 0:
        return rows
    scans = np.asarray(index["scan"])
    keep = np.ones(len(rows), bool)
    for offset in range(-margin + 1, margin):
        other = np.clip(rows + offset, 0, len(scans) - 1)
        keep &= ~((index["any"][other] == 1) & (scans[other] == scans[rows]))
    return rows[keep]


def make_splits(index, seed, num_samples, eval_samples, train_fraction=0.5, patients=None):
    """{"train", "val", "test"} -> int64 row positions, patient level, deterministic from seed.

    train: num_samples slices of healthy training patients ("all" or None: all of them).
    val/test: slices of held-out patients, eval_samples per class (int) or "all".
    patients: the patient lists to use (a run's saved splits, apply_saved_splits); default split_patients."""
    if patients is None:
        patients = split_patients(index, seed, train_fraction)
    splits = {}
    for k, name in enumerate(("train", "val", "test")):
        rng = np.random.default_rng([seed, k])  # one stream per split: changing one never moves another
        rows = np.flatnonzero(np.isin(index["patient"], patients[name])).astype(np.int64)
        if name == "train":
            splits[name] = _draw(rng, far_from_bleeds(index, rows), num_samples, "train healthy slices")
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
        with warnings.catch_warnings():  # pydicom's warnings on odd files: such a file is kept or skipped, and counted
            warnings.simplefilter("ignore")
            pixels = hu_from_dicom(path)
    return input_and_brain_mask(pixels, channels, image_size)


def input_and_brain_mask(pixels, channels, image_size):
    """(image float16 [C, S, S] in [-1, 1], brain mask uint8 [S, S]) of one decoded slice (HU, or CT-ICH's dict)."""
    check_size(pixels["brain"].shape if isinstance(pixels, dict) else pixels.shape)
    mask = brain_mask_from_windowed(pixels["brain"]) if isinstance(pixels, dict) else brain_mask_from_hu(pixels)
    image = make_input(pixels, channels, image_size)
    return image.astype(np.float16), resize_mask(mask, image_size).astype(np.uint8)


def load_file_slices(item, channels, image_size):
    """[load_slice result, or the BadFile reason of that slice] for item = (path, slice numbers): a NIfTI volume is
    read once for all of its slices asked for; any other file is one slice."""
    path, numbers = item
    if not is_nifti(path):
        return [load_slice(path, channels, image_size)]
    results = []
    for hu in read_nifti_slices(path, numbers):
        try:
            results.append(nifti_slice_input(hu, channels, image_size))
        except BadFile as error:
            results.append(str(error))
    return results


def nifti_slice_input(hu, channels, image_size):
    """input_and_brain_mask of one NIfTI slice, after the HU check every DICOM slice gets in hu_from_dicom."""
    check_plausible_hu(hu, True)
    return input_and_brain_mask(hu, channels, image_size)


def file_groups(index, positions):
    """[(path, [index rows])]: the rows of one NIfTI volume together (decoded in one read), every other row alone."""
    groups = {}
    for position in positions:
        path = str(index["path"][position])
        groups.setdefault(path if is_nifti(path) else int(position), (path, []))[1].append(int(position))
    return list(groups.values())


def slice_number(image_id):
    """The axial slice number inside its file: k of a NIfTI slice id "<volume>#<k>", else 0."""
    return int(str(image_id).rsplit("#", 1)[1]) if "#" in str(image_id) else 0


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
    """Create the four files, all together (with every row "not decoded") unless all are there already."""
    shapes = {"images": ((n, channels, image_size, image_size), np.float16),
              "masks": ((n, image_size, image_size), np.uint8), "source": ((n, 2), np.int64), "state": ((n,), np.uint8)}
    try:
        if all(np.load(f"{prefix}.{name}.npy", mmap_mode="r").shape == shape for name, (shape, _) in shapes.items()):
            return
    except (OSError, ValueError):  # missing or damaged
        pass
    for name, (shape, dtype) in shapes.items():  # state last: it is what says the others are there
        temporary = f"{prefix}.{name}.{os.getpid()}.tmp"
        np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape).flush()  # sparse: zeros cost no disk
        os.replace(temporary, f"{prefix}.{name}.npy")


def source_identity(path):
    """(size, mtime_ns) of the file(s) a slice is decoded from (a CT-ICH slice: its brain and bone JPG), or None
    when a file cannot be stat'ed. A cache row is served only while this is what it was when the row was decoded."""
    paths = [path]
    if path.endswith(".jpg"):
        bone = os.path.join(os.path.dirname(os.path.dirname(path)), "bone", os.path.basename(path))
        paths += [bone] if os.path.exists(bone) else []
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return sum(s.st_size << (32 * k) for k, s in enumerate(stats)), max(s.st_mtime_ns for s in stats)


def slice_cache_prefix(data_dir, dataset, index, image_size, channels, cache_dir):
    """The slice cache's file prefix: the absolute data folder and the index's ids are in its hash, so two data
    folders with the same image ids never share rows, even in one --cache_dir."""
    key = os.path.abspath(data_dir) + "\n" + "\n".join(index["id"].tolist())
    key_hash = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"slices_{dataset}_{key_hash}_{image_size}px_{channels}ch_v{CACHE_VERSION}")


def _decode_rows(prefix, data_dir, index, todo, identities, channels, image_size, num_workers):
    """Decode the rows `todo` into the cache files; -> the skipped (path, reason) pairs."""
    state = np.load(f"{prefix}.state.npy", mmap_mode="r+")
    state[todo] = 0  # first: a run interrupted below never trusts a row it had begun to replace
    state.flush()
    images = np.load(f"{prefix}.images.npy", mmap_mode="r+")
    masks = np.load(f"{prefix}.masks.npy", mmap_mode="r+")
    source = np.load(f"{prefix}.source.npy", mmap_mode="r+")
    decode = functools.partial(load_file_slices, channels=channels, image_size=image_size)
    groups = file_groups(index, todo)
    items = [(os.path.join(data_dir, path), [slice_number(index["id"][p]) for p in rows]) for path, rows in groups]
    skips, done = [], 0
    for (path, rows), (ok, results) in zip(groups, parallel_map(decode, items, num_workers, "decode")):
        for position, result in zip(rows, results if ok else [results] * len(rows)):
            source[position] = identities[position]  # stat'ed before decoding: a file changed meanwhile is decoded again
            if isinstance(result, str):  # the reason the slice (or its whole file) cannot be used
                state[position] = 2
                skips.append((path if len(rows) == 1 else str(index["id"][position]), result))
            else:
                images[position], masks[position] = result
                state[position] = 1
            done += 1
            if done % 512 == 0:  # data before state, so an interrupted run never trusts a row it did not write
                images.flush(), masks.flush(), source.flush(), state.flush()
    images.flush(), masks.flush(), source.flush(), state.flush()
    return skips


def prepare_slices(data_dir, index, positions, image_size, channels, cache_dir=None, num_workers=DEFAULT_WORKERS, dataset=None):
    """Decode the given index rows once into the memory-mapped SliceCache. A row decoded before (by an earlier
    epoch or run) is used again only if its file is the same one (size and modification time); a changed file is
    decoded again, and a file that is gone or no longer decodes is a counted skip. Prints slices/s and a summary."""
    data_dir = os.fspath(data_dir)
    dataset = check_dataset(data_dir, dataset)
    if channels not in CHANNEL_WINDOWS:
        raise SystemExit(f"error: channels must be one of {sorted(CHANNEL_WINDOWS)}, got {channels}")
    cache_dir = check_cache_dir(cache_dir) if cache_dir else default_cache_dir(data_dir)
    prefix = slice_cache_prefix(data_dir, dataset, index, image_size, channels, cache_dir)
    try:
        _create_cache_files(prefix, len(index["id"]), channels, image_size)
    except OSError as error:
        raise SystemExit(f"error: --cache_dir {cache_dir}: cannot write the slice cache ({error.strerror or error})")
    positions = np.unique(np.asarray(positions, np.int64))
    identities = {int(p): source_identity(os.path.join(data_dir, index["path"][p])) for p in positions}
    gone = np.array([p for p in positions if identities[p] is None], np.int64)
    state, source = np.load(f"{prefix}.state.npy", mmap_mode="r+"), np.load(f"{prefix}.source.npy", mmap_mode="r")
    current = np.array([identities[p] or (-1, -1) for p in positions], np.int64).reshape(-1, 2)
    changed = positions[(state[positions] != 0) & (source[positions] != current).any(axis=1) & (current[:, 0] >= 0)]
    todo = np.setdiff1d(positions[state[positions] == 0], gone).astype(np.int64)
    todo = np.union1d(todo, changed).astype(np.int64)
    state[gone] = 2
    state.flush()
    skips = [(str(index["path"][p]), "file missing since the index was built") for p in gone]
    start = time.time()
    if len(todo):
        skips += _decode_rows(prefix, data_dir, index, todo, identities, channels, image_size, num_workers)
        seconds = time.time() - start
        print(f"slices: decoded {len(todo)} in {seconds:.1f} s ({len(todo) / max(seconds, 1e-9):.0f} slices/s) -> {prefix}.*.npy")
    report_skips("slices", skips)
    n_bad = int((state[positions] == 2).sum())
    again = f" ({len(changed)} decoded again: their file changed since it was cached)" if len(changed) else ""
    print(f"slices: {len(positions)} requested, {len(positions) - len(todo) - len(gone)} were cached{again}, "
          f"{n_bad} bad file(s) left out")
    del state, source
    return SliceCache(prefix)


def relative_heights(index):
    """Per index row: its height in its scan, 0 = the lowest slice, 1 = the highest (rows of a scan are consecutive
    and ordered by z, see load_index; z grows toward the vertex in DICOM patient coordinates and in CT-ICH's slice
    numbers). Counts every slice of the scan in the index, scored or not."""
    scans = np.asarray(index["scan"])
    if len(scans) == 0:
        return np.zeros(0)
    starts = np.flatnonzero(np.r_[True, scans[1:] != scans[:-1]])
    lengths = np.diff(np.r_[starts, len(scans)])
    first, length = np.repeat(starts, lengths), np.repeat(lengths, lengths)
    return (np.arange(len(scans)) - first) / np.maximum(length - 1, 1)


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
        self.heights = relative_heights(index)[self.positions]

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        position = int(self.positions[i])
        return {"image": torch.from_numpy(self.cache.images[position].astype(np.float32)),
                "mask": torch.from_numpy(self.cache.masks[position] > 0),
                "label": int(self.labels[i]), "position": position}


# ---------------------------------------------------------------------------------------------
# what a run reads: index, splits and the slice cache

RunData = collections.namedtuple("RunData", "index splits cache patients")  # patients: split -> patient array


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
                  dataset="auto", cache_dir=None, num_workers=DEFAULT_WORKERS, rank=0, world=1, saved_splits=None,
                  bleed_train_fraction=0.0):
    """The index, the patient-level splits (make_splits) and a slice cache holding the splits named in `decode`
    (e.g. ("train", "val")), as train.py, evaluate.py, sweep.py and bench.py all read them. saved_splits: a run's
    splits record (splits_record / load_splits_record): its patient lists are used instead of drawing them from
    split_seed, so patients added to the folder since training never move a training patient into val or test.
    Under torchrun the processes build the caches in turn (in_turn), rank 0 first."""
    def build():
        index = load_index(data_dir, dataset=None if dataset == "auto" else dataset, cache_dir=cache_dir,
                           num_workers=num_workers)
        patients = (split_patients(index, split_seed, bleed_train_fraction=bleed_train_fraction) if saved_splits is None
                    else apply_saved_splits(index, saved_splits))
        splits = make_splits(index, split_seed, num_samples, eval_samples, patients=patients)
        needed = np.concatenate([splits[name] for name in decode])
        cache = prepare_slices(data_dir, index, needed, image_size, channels, cache_dir=cache_dir, num_workers=num_workers)
        return RunData(index, splits, cache, patients)
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
    rows = ("brain", "bone") if dataset == "ctich" else ("brain", "subdural", "bone")
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(2.1 * len(picks), 2.1 * len(rows) + 0.6), squeeze=False,
                             layout="constrained")
    for c, position in enumerate(picks):
        path = os.path.join(data_dir, index["path"][position])
        subtypes = [SHORT_NAMES[name] for name in SUBTYPES if index[name][position]]
        axes[0, c].set_title(f"{index['id'][position]}\n{'+'.join(subtypes) or 'no bleed'}", fontsize=7)
        try:
            if dataset != "ctich":
                hu = read_nifti_slices(path, [slice_number(index["id"][position])])[0] if is_nifti(path) else hu_from_dicom(path)
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
                level_width = f" L{WINDOWS[name][0]}/W{WINDOWS[name][1]}" if dataset != "ctich" else " JPG"
                ax.text(4, 4, name + level_width, color="yellow", fontsize=7, va="top")
            ax.set_axis_off()
    fig.suptitle(f"{data_dir} ({dataset}): green = brain mask, red = ground-truth bleed", fontsize=9)
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="ct-pddpm data: look at slices, build the index")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("show", "PNG grid of slices in each window with the masks outlined"),
                       ("index", "build (or load) the index and print its counts")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--data_dir", required=True)
        command.add_argument("--dataset", choices=DATASETS, default=None, help="override the detected layout")
        command.add_argument("--cache_dir", default=None)
        if name == "show":
            command.add_argument("--out", default="grid.png")
            command.add_argument("--columns", type=int, default=8)
            command.add_argument("--seed", type=int, default=0)
        else:
            command.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS)
    args = parser.parse_args(argv)
    if args.command == "show":
        check_figure_format(args.out, "--out")
        if args.columns < 1:
            raise SystemExit(f"error: --columns {args.columns}: must be at least 1")
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
