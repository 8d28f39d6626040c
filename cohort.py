"""The data set as patients: which layout a folder holds, its label tables, the slice index (one row per slice, cached
as .npz) and the patient-level splits.

Four layouts are read, detected from the folder (or forced with dataset="rsna"|"ctich"|"images"|"nifti"):
  rsna : <data_dir>/stage_2_train/ID_<hex>.dcm + stage_2_train.csv
         (RSNA Intracranial Hemorrhage Detection, or the phantom that phantom.py writes); DICOM may be
         compressed (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) or lack the 128-byte preamble
  ctich: <data_dir>/Patients_CT/<pid>/{brain,bone}/<n>.jpg + hemorrhage_diagnosis.csv
         (PhysioNet CT-ICH v1.0.0, Hssayeni et al. 2020, CC BY 4.0)
  images: <data_dir>/images/<any path>.png|.jpg + labels.csv (file,label[,patient,scan,slice]): 2-D slices in a
         stated window (stated_window: --image_window, else window.txt, else 40,80)
  nifti: <data_dir>/ct_scans/<name>.nii[.gz] + masks/<name>.nii[.gz] (CT-ICH >= 1.3.1), images/ + labels/
         (BHSD-style, mask values 1-5 = SUBTYPES), ... (NIFTI_FOLDERS): one index row per axial slice, its id
         "<volume>#<k>" (slice_id, split_slice_id)

Index rows are slices, ordered by (patient, scan, z); the index is columnar (a dict of equal-length numpy arrays)
because RSNA has 752,803 slices.
"""
import argparse
import collections
import csv
import hashlib
import io
import json
import os
import time

import nibabel
import numpy as np
from nibabel.orientations import io_orientation

from readers import (DEFAULT_WORKERS, IMAGE_SUFFIXES, BadFile, axial_slices, check_image, check_jpg, installed_decoders,
                     is_nifti, load_nifti, nifti_name, one_line, parallel_map, read_header, report_skips, source_identity)
from runfiles import check_cache_dir, default_cache_dir, note, write_atomically

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
LABELS = ("any",) + SUBTYPES
SHORT_NAMES = {"epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
               "subarachnoid": "SAH", "subdural": "SDH"}
INDEX_COLUMNS = ("id", "path", "patient", "scan", "series", "z") + LABELS
CACHE_VERSION = 7  # 7: a closed skull must enclose 2 % of the head (inputs.MIN_ENCLOSED), not 0.5 % of the image; 6: framing, stated windows, border-cut skulls (inputs.intracranial_mask's wall); 5: no intracranial mask on face / neck slices (inputs.MIN_BONE_OUTLINE); 4: slice caches hold anatomy codes (inputs.anatomy_code), not 0/1 masks; bump when decoding or the cache layout changes, so old caches are not reused
# what a run reads unless told otherwise (train.py's flags; evaluate.py falls back to them for old checkpoints)
DEFAULT_SEED = 42  # the split seed
DEFAULT_NUM_SAMPLES = 2000  # healthy training slices
DEFAULT_EVAL_SAMPLES = 50  # validation / test slices per class
HOW_TO_GET_DATA = ("get the RSNA data (kaggle competitions download -c rsna-intracranial-hemorrhage-detection: "
                   "stage_2_train/ + stage_2_train.csv) or make a phantom: python phantom.py --out DIR")


# ---------------------------------------------------------------------------------------------
# where things are

LAYOUTS = {"rsna": ("stage_2_train", "stage_2_train.csv"), "ctich": ("Patients_CT", "hemorrhage_diagnosis.csv"),
           "images": ("images", "labels.csv")}  # images: 2-D slice images (PNG/JPG) in a stated window, build_images_index
# NIfTI volumes <images>/<name>.nii[.gz] with bleed masks of the same name in <masks>/ (the first pair present is
# used). What a mask value means: "classes" = BHSD's numbering, 1..5 = SUBTYPES in this order (a dataset.json with
# "labels", as BHSD and nnU-Net ship, overrides it); "binary" = any non-zero voxel is a bleed, subtype not given.
NIFTI_FOLDERS = (("ct_scans", "masks", "binary"),  # PhysioNet CT-ICH from v1.3.1
                 ("images", "labels", "classes"),  # BHSD-style
                 ("images", "ground truths", "classes"),  # BHSD's label_192.zip as unpacked
                 ("imagesTr", "labelsTr", "classes"),  # nnU-Net raw layout (with its dataset.json)
                 ("data", "label", "binary"))  # INSTANCE 2022 training set
DATASETS = (*LAYOUTS, "nifti")


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


def detect_dataset(data_dir):
    """"rsna", "ctich", "images" or "nifti" from the files in data_dir; SystemExit saying how to get data otherwise."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: {data_dir}: no such folder; {HOW_TO_GET_DATA}")
    for dataset in DATASETS:
        if has_layout(data_dir, dataset):
            return dataset
    if not [name for name in os.listdir(data_dir) if not name.startswith(".")]:
        raise SystemExit(f"error: {data_dir}: folder is empty; {HOW_TO_GET_DATA}")
    raise SystemExit(f"error: {data_dir}: neither the RSNA layout (stage_2_train/ + stage_2_train.csv), the CT-ICH "
                     f"layout (Patients_CT/ + hemorrhage_diagnosis.csv), 2-D images (images/ + labels.csv) nor NIfTI "
                     f"volumes with masks (ct_scans/ + masks/ or images/ + labels/); {HOW_TO_GET_DATA}")


def check_dataset(data_dir, dataset):
    """The dataset to read: detected when None or "auto" (--dataset's default), else the one asked for, which must be
    there."""
    if dataset in (None, "auto"):
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


# ---------------------------------------------------------------------------------------------
# the 2-D image layout: <data_dir>/images/... (PNG, JPG, 8- or 16-bit grey or RGB) + labels.csv, in a stated window

DEFAULT_IMAGE_WINDOW = (40.0, 80.0)  # (level, width) in HU: the common brain window
IMAGE_WINDOW_FILE = "window.txt"  # optional, in data_dir: "level,width" of the folder's images (scripts/export_png.py writes it)
IMAGE_COLUMNS = ("file", "label")  # required; optional: patient, scan, slice, and any of SUBTYPES


def parse_window(text):
    """"level,width" (HU, width > 0) -> (level, width); ValueError with a one-line reason otherwise."""
    parts = str(text).replace(" ", "").split(",")
    try:
        level, width = (float(part) for part in parts)
    except ValueError:
        raise ValueError(f"expected level,width in HU (e.g. 40,80), got {text!r}")
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise ValueError(f"expected a finite level and a width above 0 (e.g. 40,80), got {text!r}")
    return level, width


def window_flag(text):
    """--image_window: "level,width", checked, as the normalised text saved with the run (e.g. "40,80")."""
    try:
        level, width = parse_window(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    return f"{level:g},{width:g}"


def stated_window(data_dir, flag=None):
    """The HU range [low, high] the 2-D images of data_dir were stored in: --image_window (flag) where given, else the
    folder's window.txt, else DEFAULT_IMAGE_WINDOW (40,80 -> 0..80 HU). A bad window.txt is a one-line error."""
    source = "--image_window"
    if flag is None:
        path = os.path.join(os.fspath(data_dir), IMAGE_WINDOW_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8-sig") as f:
                flag, source = f.read().strip(), path
    if flag is None:
        level, width = DEFAULT_IMAGE_WINDOW
    elif isinstance(flag, (tuple, list)):
        level, width = (float(v) for v in flag)
    else:
        try:
            level, width = parse_window(flag)
        except ValueError as error:
            raise SystemExit(f"error: {source}: {error}")
    return (level - width / 2, level + width / 2)


def _table_value(row, name, csv_path, line_number, binary=False):
    value = (row.get(name) or "").strip()
    if not binary:
        return value or None
    if value not in ("0", "1"):
        raise SystemExit(f"error: {csv_path}:{line_number}: {name}={value!r}, expected 0 or 1")
    return int(value)


def read_image_labels(csv_path):
    """labels.csv of the 2-D image layout -> [(line number, file, [6 labels in LABELS order], patient, scan, slice)].
    Columns file,label (0/1: any bleed) are needed; patient, scan, slice (its order in the scan) and subtype columns
    (SUBTYPES, 0/1) may be there; a missing optional value is None. A bad value, a subtype under label 0 or a file
    listed twice is a one-line error naming the line."""
    reader = csv.DictReader(io.StringIO(read_label_text(csv_path), newline=""))
    fields = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = fields
    missing = [name for name in IMAGE_COLUMNS if name not in fields]
    if missing:
        raise SystemExit(f"error: {csv_path}: missing column(s) {', '.join(missing)} (needed: file,label; optional: "
                         "patient,scan,slice and subtype columns)")
    rows, seen = [], {}
    for line_number, row in enumerate(reader, 2):
        file = _table_value(row, "file", csv_path, line_number)
        if file is None:
            raise SystemExit(f"error: {csv_path}:{line_number}: empty file name")
        if file in seen:
            raise SystemExit(f"error: {csv_path}:{line_number}: {file} is listed twice (first on line {seen[file]})")
        seen[file] = line_number
        labels = [_table_value(row, "label", csv_path, line_number, True)]
        labels += [_table_value(row, name, csv_path, line_number, True) if name in fields else 0 for name in SUBTYPES]
        if labels[0] == 0 and 1 in labels[1:]:
            raise SystemExit(f"error: {csv_path}:{line_number}: label=0 but {LABELS[labels.index(1, 1)]}=1 (the row "
                             "contradicts itself)")
        number = _table_value(row, "slice", csv_path, line_number)
        try:
            number = None if number is None else float(number)
        except ValueError:
            raise SystemExit(f"error: {csv_path}:{line_number}: slice={number!r}, expected a number")
        rows.append((line_number, file, labels, _table_value(row, "patient", csv_path, line_number),
                     _table_value(row, "scan", csv_path, line_number), number))
    return rows


def image_id(file):
    """The index id of a 2-D image: "img_" + its path under images/, less the suffix, "/" and "#" made "_"."""
    stem = os.path.splitext(file.replace("\\", "/"))[0]
    return "img_" + stem.replace("/", "_").replace("#", "_")


def build_images_index(data_dir, num_workers):
    """One row per listed image of the 2-D image layout. patient: its column, else the scan's, else the image's
    folder under images/ (the file name for a file at the top); scan: its column, else the patient's; z: the slice
    column, else the row's order in the table. Missing, unreadable or unlisted images are counted skips."""
    csv_path, image_dir = os.path.join(data_dir, "labels.csv"), os.path.join(data_dir, "images")
    skips, kept, ids, order = [], [], set(), collections.Counter()
    for line_number, file, labels, patient, scan, number in read_image_labels(csv_path):
        path = "images/" + file.replace("\\", "/").lstrip("/")
        folder = os.path.dirname(file.replace("\\", "/")) or os.path.splitext(os.path.basename(file))[0]
        patient, scan = patient or scan or folder, scan or patient or folder
        z = order[scan] if number is None else number
        order[scan] += 1
        if not path.lower().endswith(IMAGE_SUFFIXES):
            skips.append((path, f"not an image file ({', '.join(IMAGE_SUFFIXES)})"))
        elif not os.path.isfile(os.path.join(data_dir, path)):
            skips.append((path, "in labels.csv but file missing"))
        elif image_id(file) in ids:
            skips.append((path, f"same id as another image ({image_id(file)})"))
        else:
            ids.add(image_id(file))
            kept.append((image_id(file), path, patient, scan, z, labels))
    columns = {name: [] for name in INDEX_COLUMNS}
    paths = [os.path.join(data_dir, path) for _, path, *_ in kept]
    for (key, path, patient, scan, z, labels), (ok, result) in zip(kept, parallel_map(check_image, paths, num_workers, "headers")):
        if not ok:
            skips.append((path, result))
            continue
        for column, value in zip(INDEX_COLUMNS, (key, path, patient, scan, scan, z, *labels)):
            columns[column].append(value)
    if not os.path.isdir(image_dir):
        raise SystemExit(f"error: {image_dir}: no such folder")
    return columns, skips


NIFTI_PATIENT_TABLE = "patients.csv"  # optional, in data_dir: columns scan,patient (scan = volume name)
SUBTYPE_NAMES = {**{name: name for name in SUBTYPES}, **{short.lower(): name for name, short in SHORT_NAMES.items()},
                 "extradural": "epidural", "intracerebral": "intraparenchymal"}


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
            raise SystemExit(f"error: {path}: unreadable dataset.json ({one_line(error)})")
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


def read_nifti_labels(item):
    """(z [Z], labels int8 [Z, 6] in LABELS order) of one CT volume from its mask. item: (CT path, mask path,
    {mask value: subtype} or None for a 0/1 mask). The mask must have the CT's voxel grid; it is turned with the CT's
    affine, so its slices are the CT's slices."""
    ct_path, mask_path, classes = item
    try:
        ct = nibabel.load(ct_path)
        orientation = io_orientation(ct.affine)
    except Exception as error:
        raise BadFile(f"unreadable NIfTI: {one_line(error)}")
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


def slice_id(volume, k):
    """The index id of axial slice k (axial_slices' numbering) of a NIfTI volume: "<volume>#<k>"."""
    return f"{volume}#{k}"


def split_slice_id(image_id):
    """(volume, k) of a NIfTI slice id "<volume>#<k>" (slice_id); (the id, None) for a slice that is a file of its own."""
    image_id = str(image_id)
    if "#" not in image_id:
        return image_id, None
    volume, k = image_id.rsplit("#", 1)
    return volume, int(k)


def slice_number(image_id):
    """The axial slice number inside its file: k of a NIfTI slice id "<volume>#<k>", else 0."""
    k = split_slice_id(image_id)[1]
    return 0 if k is None else k


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
                                     (slice_id(volume, k), ct, patients.get(volume, volume), volume, volume, z[k])):
                columns[column].append(value)
            for column, value in zip(LABELS, labels[k]):
                columns[column].append(int(value))
    return columns, skips


def data_signature(data_dir, dataset):
    """Changes when the label file or the image folder changes (NIfTI: the image and mask folders and the optional
    patient table and dataset.json) or, for DICOM, the installed decoders: it invalidates the index cache."""
    if dataset == "nifti":
        images, masks, _ = nifti_folders(data_dir)
        names = [images, masks, NIFTI_PATIENT_TABLE, "dataset.json"]
    else:
        names = list(LAYOUTS[dataset]) + ([IMAGE_WINDOW_FILE] if dataset == "images" else [])
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
    identities = [(source_identity(os.path.join(data_dir, path)) or (-1, -1))[:2] for path in index["path"]]
    return np.array(identities, np.int64).reshape(-1, 2)


def _changed_files(data_dir, index, sources):
    """Paths of the index rows whose file is not the one the index was built from (rewritten in place, which
    leaves the folder's modification time alone): their header may now say another patient or position."""
    changed = np.flatnonzero((_sources(data_dir, index) != sources).any(axis=1))
    return [str(index["path"][k]) for k in changed]


def _folder_times(data_dir, folders):
    """{folder: modification time in ns} of these folders (-1 where one is gone). A folder's time changes when a
    file in it is added, removed, renamed or replaced by a rename (rsync, most copy tools)."""
    times = {}
    for folder in folders:
        try:
            times[str(folder)] = os.stat(os.path.join(data_dir, folder)).st_mtime_ns
        except OSError:
            times[str(folder)] = -1
    return times


def _changed_since_built(data_dir, index, cached, check_files):
    """What changed since the index was built, as one phrase, or None. By default the folders' modification times
    (one stat per folder: start-up in ~1 s at RSNA size): they see files added, removed or replaced by a rename, not
    a file rewritten in place, whose old header would stay in the index (the slice cache still notices its size and
    time, and decodes its new pixels). check_files (--verify_cache) stats every indexed file as well."""
    saved = dict(zip(cached["folders"].tolist(), cached["folder_times"].tolist()))
    changed = [folder for folder, time_ns in _folder_times(data_dir, saved).items() if saved[folder] != time_ns]
    if changed:
        return f"{len(changed)} folder(s) changed since the index was built (first: {changed[0] or '.'})"
    files = _changed_files(data_dir, index, cached["source"]) if check_files else []
    return f"{len(files)} file(s) changed since the index was built (first: {files[0]})" if files else None


def load_index(data_dir, dataset=None, cache_dir=None, num_workers=DEFAULT_WORKERS, check_files=False):
    """The slice index, a dict of equal-length arrays (INDEX_COLUMNS), rows ordered by (patient, scan, z).

    Headers are read once, in parallel, and the index is cached as .npz in cache_dir; later calls load it, unless
    the label file or a folder of indexed files changed (files added, removed or replaced by a rename), or, with
    check_files, any indexed file (size, modification time): _changed_since_built."""
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
                    index = {name: cached[name] for name in INDEX_COLUMNS}
                    changed = _changed_since_built(data_dir, index, cached, check_files)
                    if not changed:
                        print(f"index: {len(index['id'])} slices from {cache_path} ({int(cached['n_skipped'])} files skipped when built)")
                        return index
                    print(f"index: {changed}; reading the headers again")
        except (OSError, KeyError, ValueError):  # damaged or older cache: build it again
            pass
    start = time.time()
    build = {"rsna": build_rsna_index, "ctich": build_ctich_index, "images": build_images_index, "nifti": build_nifti_index}[dataset]
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
    folders = _folder_times(data_dir, np.unique([os.path.dirname(path) for path in index["path"]]))
    folder_columns = {"folders": np.array(list(folders)), "folder_times": np.array(list(folders.values()), np.int64)}
    write_atomically(cache_path, lambda f: np.savez(f, signature=signature, n_skipped=len(skips), source=sources,
                                                    **folder_columns, **index))
    print(f"index: {len(index['id'])} slices, {len(np.unique(index['patient']))} patients in {time.time() - start:.1f} s -> {cache_path}")
    return index


def neighbour_rows(index, positions):
    """int64 [N, 2]: the index rows of the slices just below and just above each position in its scan (rows of a
    scan are consecutive and ordered by z, see load_index), -1 where the position is its scan's lowest / highest."""
    scans, positions = np.asarray(index["scan"]), np.asarray(positions, np.int64).reshape(-1)
    out = np.full((len(positions), 2), -1, np.int64)
    for column, step in enumerate((-1, 1)):
        other = positions + step
        inside = (other >= 0) & (other < len(scans))
        same = np.zeros(len(positions), bool)
        same[inside] = scans[other[inside]] == scans[positions[inside]]
        out[same, column] = other[same]
    return out


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


# ---------------------------------------------------------------------------------------------
# patient-level splits

def patients_with_bleed(index):
    """(the index's patients, sorted; bool array: the patient has a hemorrhage slice) - the two strata of every split."""
    patients, inverse = np.unique(index["patient"], return_inverse=True)
    return patients, np.bincount(inverse.reshape(-1), weights=index["any"], minlength=len(patients)) > 0


def split_patients(index, seed, train_fraction=0.5):
    """{"train", "val", "test"} -> sorted patient arrays. Healthy patients (no positive slice) are
    split train / val / test; hemorrhage patients go to val / test only, half each."""
    patients, sick = patients_with_bleed(index)
    rng = np.random.default_rng(seed)
    healthy, hemorrhage = rng.permutation(patients[~sick]), rng.permutation(patients[sick])
    n_train = int(round(len(healthy) * train_fraction))
    held_out = healthy[n_train:]
    n_val_healthy, n_val_sick = (len(held_out) + 1) // 2, (len(hemorrhage) + 1) // 2
    return {"train": np.sort(healthy[:n_train]),
            "val": np.sort(np.concatenate([held_out[:n_val_healthy], hemorrhage[:n_val_sick]])),
            "test": np.sort(np.concatenate([held_out[n_val_healthy:], hemorrhage[n_val_sick:]]))}


SPLIT_NAMES = ("train", "val", "test")


def splits_record(patients, *, seed, data_dir, dataset):
    """What splits.json and every checkpoint hold: the patient lists of the run's splits as plain data (loadable
    with torch.load(weights_only=True)), fixed when training starts."""
    return {"seed": int(seed), "data_dir": os.path.abspath(os.fspath(data_dir)), "dataset": dataset,
            "patients": {name: [str(p) for p in patients[name]] for name in SPLIT_NAMES}}


def refuse_bleed_training(record, where):
    """A one-line SystemExit for a run trained with the removed --bleed_train_fraction (its saved args or splits
    record says a fraction above 0): its training split held hemorrhage patients, which nothing here reads back."""
    fraction = record.get("bleed_train_fraction") if isinstance(record, dict) else None
    if fraction:
        raise SystemExit(f"error: {where}: trained with --bleed_train_fraction {fraction:g}, an option removed in ct-pddpm; "
                         "its splits cannot be read back: use the ct-pddpm version that trained it, or train a new run")


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
            raise SystemExit(f"error: {path}: cannot read the run's saved splits ({one_line(error)})")
    if record is None:
        return None
    lists = record.get("patients") if isinstance(record, dict) else None
    if not isinstance(lists, dict) or not all(isinstance(lists.get(name), list) for name in SPLIT_NAMES):
        raise SystemExit(f"error: {checkpoint_path}: its saved splits are damaged (no train/val/test patient lists)")
    refuse_bleed_training(record, checkpoint_path)
    return record


def saved_splits(checkpoint, checkpoint_path, rank=0):
    """load_splits_record, with a note (rank 0) for a run older than saved splits (None)."""
    record = load_splits_record(checkpoint, checkpoint_path)
    if record is None and rank == 0:
        print(f"note: {checkpoint_path} holds no saved splits (trained before they were saved); the splits are drawn "
              "from the training seed again, so patients added to the folder since could move between splits")
    return record


def apply_saved_splits(index, record):
    """{"train", "val", "test"} -> patient arrays: the saved lists, less the patients no longer in the index.
    Patients in the index but in no saved list (added since training) are left out of every split; both are
    counted in one line each. A training patient is never in val or test, and a training patient whose slices
    are now labelled as a bleed is left out of training."""
    refuse_bleed_training(record, "the run's saved splits")
    lists = {name: [str(p) for p in record["patients"][name]] for name in SPLIT_NAMES}
    overlap = set(lists["train"]) & (set(lists["val"]) | set(lists["test"])) or set(lists["val"]) & set(lists["test"])
    if overlap:
        raise SystemExit(f"error: the run's saved splits put patient {sorted(overlap)[0]} in two splits (damaged splits.json?)")
    patients, has_bleed = patients_with_bleed(index)
    sick = set(patients[has_bleed].tolist())
    present, known = set(patients.tolist()), set().union(*lists.values())
    added, gone = sorted(present - known), sorted(known - present)
    if added:
        print(f"splits: {len(added)} patient(s) not in the run's saved splits are left out (added since training): "
              f"{', '.join(added[:10])}{' ...' if len(added) > 10 else ''}")
    if gone:
        counts = ", ".join(f"{name} {len(set(lists[name]) - present)}" for name in SPLIT_NAMES)
        print(f"splits: {len(gone)} patient(s) of the run's saved splits are no longer in the data ({counts})")
    now_sick = sorted(set(lists["train"]) & sick)
    if now_sick:
        print(f"splits: {len(now_sick)} training patient(s) now have a bleed label and are left out of training: "
              f"{', '.join(now_sick[:10])}")
    return {name: np.array(sorted(p for p in lists[name] if p in present and not (name == "train" and p in sick)),
                           dtype=index["patient"].dtype) for name in SPLIT_NAMES}


def draw_slices(rng, positions, n, what):
    """n of the positions, drawn without replacement and sorted; all of them when n is None or "all" or when there
    are no more than n (fewer: with a note that names `what`)."""
    if n is None or n == "all" or len(positions) <= int(n):
        if n not in (None, "all") and len(positions) < int(n):
            note(f"{what}: only {len(positions)} slices available, {n} asked for; using all")
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
            splits[name] = draw_slices(rng, rows, num_samples, "train healthy slices")
        else:
            positive = rows[index["any"][rows] == 1]
            negative = rows[index["any"][rows] == 0]
            splits[name] = np.sort(np.concatenate([draw_slices(rng, positive, eval_samples, f"{name} hemorrhage slices"),
                                                   draw_slices(rng, negative, eval_samples, f"{name} healthy slices")]))
    return splits
