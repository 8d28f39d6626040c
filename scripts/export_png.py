"""Export a CT-ICH JPG folder into the 2-D image layout (images/ + labels.csv + window.txt) at a stated window and a
crop, so the same patients can be scored from the original JPGs and from the export (docs/data.md, "2-D images").

    python scripts/export_png.py --data_dir ../shared/data/ct-ich --out /tmp/ctich_png_40_80_tight --window 40,80 --crop tight

Each slice's brain JPG (stored at L40/W120, -20..100 HU: inputs.JPG_WINDOWS) is mapped back to HU and written as an
8-bit grey PNG in the stated window (0 = level - width/2 and below, 255 = level + width/2 and above). --crop: "none"
keeps the 650 x 650 field of view; "tight" crops every slice to its head's bounding box (inputs.tissue_classes' head
mask), so the head (and on most slices the skull ring) touches the border; "pad30" adds air around the slice, 15 % of
its side on each side (30 % in all). labels.csv has file,label,patient,scan,slice and the five subtype columns
(label = 1 - No_Hemorrhage); patient and scan are CT-ICH's patient folder (so a model trained on the JPGs leaves
out its training patients when it scores the export with evaluate.py --split all), slice its slice number. The bone
JPGs are not exported (one window per image). A slice without a label row or whose JPG does not read is skipped
and counted, with one line naming the first files.
"""
import argparse
import csv
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cohort  # noqa: E402
import inputs  # noqa: E402
import readers  # noqa: E402

CROPS = ("none", "tight", "pad30")
PAD_FRACTION = 0.15  # pad30: air added on each side, as a fraction of the slice's side


def to_window(brain, low, high):
    """CT-ICH's brain JPG as [-1, 1] (-20..100 HU) -> uint8 grey levels in the window [low, high] HU."""
    jpg_low, jpg_high = inputs.JPG_WINDOWS["brain"]
    hu = jpg_low + (brain + 1) / 2 * (jpg_high - jpg_low)
    return np.round(np.clip((hu - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def crop_slice(grey, brain, crop):
    """The exported pixels of one slice: as they are, cropped to the head's bounding box (tight), or padded with air
    (pad30). brain: the JPG in [-1, 1], where the head is found."""
    if crop == "none":
        return grey
    if crop == "pad30":
        pad = int(round(PAD_FRACTION * max(grey.shape)))
        return np.pad(grey, pad, constant_values=0)
    head = inputs.tissue_classes({"brain": brain})[3]
    if not head.any():
        return grey
    rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    return grey[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def slices_of(data_dir):
    """[(patient folder, slice number, brain JPG path)] of a CT-ICH folder, sorted."""
    patients_dir = os.path.join(data_dir, "Patients_CT")
    found = []
    for pid in sorted(os.listdir(patients_dir)):
        brain_dir = os.path.join(patients_dir, pid, "brain")
        if pid.isdigit() and os.path.isdir(brain_dir):
            found += [(pid, int(name[:-4]), os.path.join(brain_dir, name)) for name in os.listdir(brain_dir)
                      if name.endswith(".jpg") and name[:-4].isdigit()]
    return sorted(found)


def export(data_dir, out, window, crop):
    """Write out/images/<patient>/<n>.png, out/labels.csv and out/window.txt. -> (slices written, skips)."""
    level, width = window
    low, high = level - width / 2, level + width / 2
    labels = cohort.read_ctich_labels(os.path.join(data_dir, "hemorrhage_diagnosis.csv"))
    rows, skips = [], []
    for pid, n, path in slices_of(data_dir):
        if (int(pid), n) not in labels:
            skips.append((path, "no row in hemorrhage_diagnosis.csv"))
            continue
        try:
            brain = readers.read_jpg(path).astype(np.float32) / 127.5 - 1
        except readers.BadFile as error:
            skips.append((path, str(error)))
            continue
        file = f"{pid}/{n}.png"
        os.makedirs(os.path.join(out, "images", pid), exist_ok=True)
        Image.fromarray(crop_slice(to_window(brain, low, high), brain, crop)).save(os.path.join(out, "images", file))
        values = labels[(int(pid), n)]
        rows.append([file, values[0], pid, pid, n, *values[1:]])
    header = ["file", "label", "patient", "scan", "slice", *cohort.SUBTYPES]
    with open(os.path.join(out, "labels.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    with open(os.path.join(out, cohort.IMAGE_WINDOW_FILE), "w") as f:
        f.write(f"{level:g},{width:g}\n")
    return len(rows), skips


def main(argv=None):
    p = argparse.ArgumentParser(description="export a CT-ICH JPG folder into the 2-D image layout (PNG + labels.csv)")
    p.add_argument("--data_dir", required=True, help="CT-ICH folder: Patients_CT/<patient>/brain/<n>.jpg + hemorrhage_diagnosis.csv")
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.add_argument("--window", type=cohort.window_flag, default="40,80", help="level,width in HU of the PNGs (default 40,80)")
    p.add_argument("--crop", choices=CROPS, default="tight",
                   help="none: the JPG's field of view; tight: the head's bounding box; pad30: 15 %% air added on each side")
    args = p.parse_args(argv)
    if cohort.check_dataset(args.data_dir, None) != "ctich":
        raise SystemExit(f"error: {args.data_dir}: not a CT-ICH JPG folder (Patients_CT/ + hemorrhage_diagnosis.csv)")
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise SystemExit(f"error: --out {args.out}: not empty; give a new folder")
    os.makedirs(args.out, exist_ok=True)
    written, skips = export(args.data_dir, args.out, cohort.parse_window(args.window), args.crop)
    readers.report_skips("export", skips)
    print(f"export: {written} slices -> {args.out} (window {args.window}, crop {args.crop})")


if __name__ == "__main__":
    main()
