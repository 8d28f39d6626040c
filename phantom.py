"""A synthetic head-CT phantom written as real CT DICOM in the RSNA layout, with ground-truth bleed masks.

    python phantom.py --out DIR [--patients 40 --slices 20 --size 256 --seed 0]

It stands in for RSNA where the real data is not at hand (tests, the demo, bench.py) and runs the
same loading code: <out>/stage_2_train/ID_<hex>.dcm + <out>/stage_2_train.csv, plus
<out>/masks/ID_<hex>.npy (the bleed mask of each positive slice, which inputs.load_gt_mask reads
for the pixel metrics). Heads are drawn at random per patient (skull, brain, ventricles, sulci,
scalp, a scanner table and field-of-view edge); hemorrhage patients get one or two bleeds of the
five RSNA subtypes, extending over several slices. Values are Hounsfield units.
"""
import argparse
import collections
import os
import time

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from cohort import LABELS, SUBTYPES

AIR_HU = -1000.0


def _bump(x, centre, half_width):
    """1 at centre, falling to 0 at centre +- half_width (how big a structure is at a slice level)."""
    return float(np.sqrt(np.clip(1 - ((x - centre) / half_width) ** 2, 0, 1)))


def _ellipse(x, y, centre_x, centre_y, half_x, half_y, tilt):
    """Inside an ellipse whose long (y) axis leans `tilt` radians from the head's front-back axis towards +x."""
    dx, dy = x - centre_x, y - centre_y
    along = dx * np.sin(tilt) + dy * np.cos(tilt)
    across = dx * np.cos(tilt) - dy * np.sin(tilt)
    return (along / max(half_y, 1e-6)) ** 2 + (across / max(half_x, 1e-6)) ** 2 < 1


def _smooth_noise(rng, size, sigma):
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return field / (field.std() + 1e-8)


def _angle_difference(theta, centre):
    return np.mod(theta - centre + np.pi, 2 * np.pi) - np.pi


def random_head(rng, size):
    """One patient's anatomy parameters (sizes in pixels or as fractions of the head radius)."""
    return {"cx": rng.uniform(-0.04, 0.04) * size, "cy": rng.uniform(-0.04, 0.04) * size,
            "a": rng.uniform(0.28, 0.34) * size,  # half-width of the skull, px
            "aspect": rng.uniform(1.12, 1.25),  # front-back / left-right
            "rotation": np.deg2rad(rng.uniform(-12, 12)),
            "taper": rng.uniform(0.04, 0.12),  # the front of the head is narrower than the back
            "wobble": rng.normal(0, 0.008, 3), "wobble_phase": rng.uniform(0, 2 * np.pi, 3),
            "skull": rng.uniform(0.035, 0.055), "scalp": rng.uniform(0.05, 0.08),
            "atrophy": rng.uniform(0, 1) ** 2,  # wider sulci and ventricles
            "gyri": int(rng.integers(24, 34)), "gyri_phase": rng.uniform(0, 2 * np.pi, 3),
            "grey": rng.uniform(32, 37), "white": rng.uniform(24, 29), "csf": rng.uniform(2, 10),
            "diploe": rng.uniform(650, 950), "table": rng.uniform(1450, 1800),
            "plexus_calcified": rng.random() < 0.5,  # common, harmless, and bright: a false-positive lure
            "fov_circle": rng.random() < 0.5,  # scanners pad outside the reconstruction circle with -2000
            "z_low": rng.uniform(0.08, 0.16), "z_high": rng.uniform(0.82, 0.92),
            "z_start": rng.uniform(-40, 40)}


BLEED_LEVELS = {"epidural": (0.25, 0.8), "subdural": (0.25, 0.85), "intraparenchymal": (0.25, 0.7),
                "intraventricular": (0.38, 0.5), "subarachnoid": (0.3, 0.85)}


def random_bleed(rng, kind, levels):
    """One bleed: its kind, the slice it is largest on, how many slices it reaches either side, its shape."""
    low, high = BLEED_LEVELS[kind]
    candidates = np.flatnonzero((levels >= low) & (levels <= high))
    if not len(candidates):
        candidates = [int(np.abs(levels - (low + high) / 2).argmin())]
    side = rng.choice([-1.0, 1.0])
    bleed = {"kind": kind, "centre": int(rng.choice(candidates)), "reach": int(rng.integers(1, 4)),
             "hu": rng.uniform(50, 90), "side": side}
    lateral = 0.0 if side > 0 else np.pi
    if kind == "epidural":  # lens against the inner table, temporal/parietal
        bleed.update(theta=lateral + rng.uniform(-0.6, 0.6), width=rng.uniform(0.25, 0.45), thickness=rng.uniform(0.07, 0.18))
    elif kind == "subdural":  # long thin crescent along the convexity
        bleed.update(theta=lateral + rng.uniform(-0.5, 0.5), width=rng.uniform(0.7, 1.3), thickness=rng.uniform(0.04, 0.14))
    elif kind == "intraparenchymal":  # irregular blob in the deep white matter / basal ganglia, with oedema
        bleed.update(x=side * rng.uniform(0.12, 0.4), y=rng.uniform(-0.35, 0.35), radius=rng.uniform(0.04, 0.14),
                     shape=rng.normal(0, 0.12, 3), shape_phase=rng.uniform(0, 2 * np.pi, 3))
    elif kind == "intraventricular":  # layering in the dependent (posterior) part of one or both ventricles
        bleed.update(both=rng.random() < 0.4, level_y=rng.uniform(-0.15, 0.05))
    else:  # subarachnoid: blood filling the sulci of one region
        bleed.update(hu=rng.uniform(50, 75), theta=rng.uniform(0, 2 * np.pi), width=rng.uniform(0.4, 1.1))
    return bleed


# pixel coordinates of a slice in the head's frame (_head_frame)
Frame = collections.namedtuple("Frame", "u xn yn theta rho pixel")


def _head_frame(head, level, size):
    """Pixel coordinates in the head's frame: u (px, left-right), xn/yn normalised to the skull,
    theta around it, rho (1 at the outer surface of the skull) and one pixel in units of rho."""
    row, col = np.mgrid[0:size, 0:size].astype(np.float32)
    x = col - (size - 1) / 2 - head["cx"]
    y = (size - 1) / 2 + head["cy"] - row  # +y = front of the head = top of the image (radiological view)
    cos_r, sin_r = np.cos(head["rotation"]), np.sin(head["rotation"])
    u, v = cos_r * x + sin_r * y, -sin_r * x + cos_r * y  # head frame: u left-right, v back-front
    a = head["a"] * np.sqrt(np.clip(1 - ((level - 0.3) / 0.95) ** 2, 0.25, 1))  # smaller towards the vertex
    yn = v / (a * head["aspect"])
    xn = u / (a * (1 - head["taper"] * np.clip(yn, -1, 1)))
    theta = np.arctan2(yn, xn)
    outline = 1 + sum(w * np.cos((k + 3) * theta + p) for k, (w, p) in enumerate(zip(head["wobble"], head["wobble_phase"])))
    rho = np.hypot(xn, yn) / outline  # 1 at the outer surface of the skull
    pixel = 1.0 / a  # one pixel in units of rho (at most)
    return Frame(u, xn, yn, theta, rho, pixel)


def _scalp_and_skull(head, level, theta, rho, pixel, size):
    """Air, scalp and skull HU, the inner table's rho and the bone mask."""
    # scalp (skin, a fat layer, temporal muscle at the sides low down) and skull (two tables, diploe between)
    scalp = np.maximum(head["scalp"] * (1 + 1.5 * np.cos(theta) ** 2 * max(0.0, 1 - 1.6 * level)), 1.5 * pixel)
    skull = head["skull"] * (1 + 0.4 * np.clip(-np.sin(theta), 0, None) ** 2 - 0.25 * np.cos(theta) ** 2)
    skull = np.maximum(skull * (1 + 2.5 * max(0.0, level - 0.75)), 1.6 * pixel)  # the cut is tangential near the top
    inner = 1 - skull
    hu = np.full((size, size), AIR_HU, np.float32)
    depth = (rho - 1) / scalp
    in_scalp = (depth > 0) & (depth <= 1)
    hu[in_scalp] = np.where(depth < 0.5, 15.0, 40.0)[in_scalp]  # galea and fat inside, skin outside
    in_bone = (rho > inner) & (rho <= 1)
    across = (1 - rho) / skull  # 0 at the outer table, 1 at the inner table
    hu[in_bone] = (head["diploe"] + (head["table"] - head["diploe"]) * np.abs(2 * across - 1) ** 1.5)[in_bone]
    return hu, inner, in_bone


def _grey_and_white_matter(rng, head, level, f, q, size):
    """White matter, a grey cortex that folds around sulci, and the deep grey nuclei; also the sulcus
    mask and the sulcus geometry (the subarachnoid bleeds fill it). Draws one noise field from rng."""
    xn, yn, theta, pixel = f.xn, f.yn, f.theta, f.pixel
    scale = size / 256  # structure widths below are in pixels at 256^2 (about 0.94 mm)
    phase = head["gyri_phase"]
    psi = head["gyri"] * theta + phase[0] + 0.8 * np.sin(2 * theta + phase[1])
    # sulci: the zero lines of a smooth random field, biased to run radially; |f| / |grad f| is the
    # distance to the nearest line in pixels, so every sulcus has the same width wherever it bends
    field = 0.8 * np.cos(psi) + 0.8 * _smooth_noise(rng, size, 3.5 * scale)
    gradient_rows, gradient_cols = np.gradient(field)
    sulcus_px = np.abs(field) / (np.hypot(gradient_rows, gradient_cols) + 1e-6)
    sulcus_half = 0.5 * (1.0 + 1.3 * head["atrophy"]) * scale
    sulcus_depth = 0.11 + 0.06 * (0.5 + 0.5 * np.sin(3 * theta + phase[2])) + 0.06 * level
    rim = max(0.012 + 0.02 * head["atrophy"], 0.7 * pixel)
    in_sulcus = (sulcus_px < sulcus_half) & (q > 1 - sulcus_depth)
    ribbon = 0.9 - 0.06 * level + 0.03 * (0.5 + 0.5 * np.cos(psi))
    cortex = (q > ribbon) | ((sulcus_px < sulcus_half + 2.0 * scale) & (q > 1 - sulcus_depth - 0.02))
    brain = np.where(cortex, head["grey"], head["white"]).astype(np.float32)
    nuclei = _bump(level, 0.33, 0.14)
    if nuclei > 0:  # caudate/lentiform and thalamus, a little denser than white matter
        for side in (-1, 1):
            brain[_ellipse(xn, yn, side * 0.2, 0.06, 0.07 * nuclei, 0.13 * nuclei, side * 0.2)] = head["grey"] - 1
            brain[_ellipse(xn, yn, side * 0.08, -0.1, 0.06 * nuclei, 0.08 * nuclei, 0.0)] = head["grey"] - 2
    sulci = {"px": sulcus_px, "half": sulcus_half, "depth": sulcus_depth, "rim": rim}
    return brain, in_sulcus, sulci


def _csf_spaces(head, level, f, q, size, in_sulcus, rim):
    """CSF outside the ventricles (the rim, sulci, interhemispheric and sylvian fissures, cisterns) and the falx."""
    u, xn, yn, pixel = f.u, f.xn, f.yn, f.pixel
    scale = size / 256  # widths in pixels at 256^2, as in _grey_and_white_matter
    corpus_callosum = 0.42 * _bump(level, 0.42, 0.25)  # the interhemispheric fissure stops where the hemispheres join
    fissure = (np.abs(u) < max(1.0, 1.2 * scale)) & (np.abs(yn) > corpus_callosum)
    csf = (q > 1 - rim) | in_sulcus | fissure
    low = _bump(level, 0.1, 0.2)
    if low > 0:  # sylvian fissures (curved, opening towards the surface) and the cisterns around the midbrain
        lateral = np.abs(xn)
        centre_y = 0.1 + 0.5 * (lateral - 0.55) ** 2
        half = (0.012 + 0.03 * np.clip((lateral - 0.4) / 0.5, 0, 1)) * (1 + head["atrophy"]) * low + pixel
        csf |= (lateral > 0.9 - 0.55 * low) & (np.abs(yn - centre_y) < half)
        angle = np.arctan2(yn + 0.08, xn)
        midbrain = np.hypot(xn, yn + 0.08) / (0.12 * (1 + 0.18 * np.cos(2 * angle)))  # heart-ish, wider than deep
        csf |= (midbrain > 1) & (midbrain < 1 + 0.3 * low + pixel / 0.12) & (yn < 0.05)
    falx = fissure & (np.abs(u) < 0.45 * max(1.0, scale))
    return csf, falx


def _ventricles(head, level, f, q, size):
    """Ventricle mask and how large the lateral ventricles are at this level (0 .. 1)."""
    xn, yn, pixel = f.xn, f.yn, f.pixel
    # lateral ventricles: two bananas concave outwards ")(" with a thin septum between them,
    # wider at the frontal horns and atria; the third ventricle is a midline slit lower down
    widen = 1 + 0.9 * head["atrophy"]
    size_v = _bump(level, 0.45, 0.17)
    ventricles = np.zeros((size, size), bool)
    if size_v > 0:
        front, back = 0.3 * size_v, (-0.32 * size_v if level > 0.36 else -0.04)
        t = (yn - front) / (back - front)  # 0 at the frontal tip, 1 at the back
        centre_x = 0.05 + 0.12 * (2 * t - 1) ** 2 * size_v
        half_width = (0.018 + 0.03 * np.exp(-((t - 0.2) / 0.15) ** 2) + 0.04 * np.exp(-((t - 0.85) / 0.12) ** 2)) * widen
        half_width = np.minimum(half_width * size_v + pixel, centre_x - 0.012)  # keep the septum
        ventricles = (t > 0) & (t < 1) & (np.abs(np.abs(xn) - centre_x) < half_width)
    third = _bump(level, 0.29, 0.08)
    if third > 0:
        ventricles |= _ellipse(xn, yn, 0.0, -0.02, 0.012 * widen + pixel, 0.08 * third, 0.0)
    ventricles &= q < 0.8
    return ventricles, size_v


def _brain(rng, head, level, f, q, size):
    """Brain HU (valid inside the skull), the ventricle mask and the sulcus geometry."""
    xn, yn, pixel = f.xn, f.yn, f.pixel
    brain, in_sulcus, sulci = _grey_and_white_matter(rng, head, level, f, q, size)
    csf, falx = _csf_spaces(head, level, f, q, size, in_sulcus, sulci["rim"])
    brain[csf] = head["csf"]
    brain[falx] = 48.0  # the falx, slightly dense
    ventricles, size_v = _ventricles(head, level, f, q, size)
    brain[ventricles] = head["csf"]
    if head["plexus_calcified"] and size_v > 0.6 and level > 0.36:
        for side in (-1, 1):  # in the atria
            brain[_ellipse(xn, yn, side * 0.16, -0.22 * size_v, max(0.02, pixel), max(0.02, pixel), 0.0)] = 150.0
    return brain, ventricles, sulci


def _draw_bleeds(hu, head, bleeds, slice_number, f, q, regions):
    """Paints the bleeds that reach this slice into hu (in place); returns {subtype: bleed mask}. regions: the slice's
    inside (of the skull), ventricles and sulci."""
    xn, yn, theta, pixel = f.xn, f.yn, f.theta, f.pixel
    inside, ventricles, sulci = regions["inside"], regions["ventricles"], regions["sulci"]
    size = hu.shape[0]
    # bleeds: each is largest on its centre slice and tapers off over `reach` slices either side
    masks = {}
    for bleed in bleeds:
        offset = slice_number - bleed["centre"]
        if abs(offset) > bleed["reach"]:
            continue
        taper = np.sqrt(1 - (offset / (bleed["reach"] + 1)) ** 2)
        kind = bleed["kind"]
        if kind in ("epidural", "subdural"):
            width = bleed["width"] * (0.5 + 0.5 * taper if kind == "epidural" else 0.7 + 0.3 * taper)
            off = _angle_difference(theta, bleed["theta"])
            profile = np.clip(1 - (off / width) ** 2, 0, 1)
            profile = np.sqrt(profile) if kind == "epidural" else profile ** 0.7  # lens bulges, crescent hugs
            thickness = max(bleed["thickness"] * taper, 2 * pixel) * profile
            region = inside & (q > 1 - thickness) & (profile > 0)
        elif kind == "intraparenchymal":
            dx, dy = xn - bleed["x"], yn - bleed["y"]
            angle = np.arctan2(dy, dx)
            edge = bleed["radius"] * taper * (1 + sum(s * np.cos((k + 2) * angle + p) for k, (s, p) in
                                                      enumerate(zip(bleed["shape"], bleed["shape_phase"]))))
            distance = np.hypot(dx, dy)
            region = inside & (distance < np.maximum(edge, 1.5 * pixel))
            oedema = inside & (distance < 1.4 * edge) & ~region & ~ventricles
            hu[oedema] = head["white"] - 9
        elif kind == "intraventricular":
            sides = (xn * bleed["side"] > 0) | bleed["both"]
            region = ventricles & sides & (yn < bleed["level_y"] + 0.1 * (1 - taper))
        else:
            off = _angle_difference(theta, bleed["theta"])
            sector = np.abs(off) < bleed["width"] * (0.4 + 0.6 * taper)
            in_sulci = (sulci["px"] < max(1.6 * sulci["half"], 0.9)) & (q > 1 - 1.1 * sulci["depth"])
            region = inside & sector & (in_sulci | (q > 1 - 1.5 * sulci["rim"]))
        hu[region] = bleed["hu"]
        masks[kind] = masks.get(kind, np.zeros((size, size), bool)) | region
    return masks


def _scanner_effects(rng, hu, head, inside, in_bone, size):
    """Blur, texture and noise (three noise fields from rng, in this order) and the field-of-view edge."""
    # partial volume (edges of a 5 mm slice are soft), tissue texture, diploe texture, scanner noise
    hu = ndimage.gaussian_filter(hu, 0.6)
    hu += 2.0 * inside * _smooth_noise(rng, size, size / 40)
    hu += 60.0 * in_bone * _smooth_noise(rng, size, 1.0)
    hu += 3.5 * _smooth_noise(rng, size, 0.6)
    if head["fov_circle"]:
        row, col = np.mgrid[0:size, 0:size].astype(np.float32)
        hu[np.hypot(col - (size - 1) / 2, row - (size - 1) / 2) > size / 2] = -2000.0
    return hu


def draw_slice(rng, head, level, slice_number, bleeds, size):
    """HU image [size, size] of one axial slice at `level` (0 skull base .. 1 vertex) and {subtype: bleed mask}.

    The order of the rng draws is part of the output (a seed gives the same phantom): the sulcus
    field in _brain first, then the three texture/noise fields in _scanner_effects."""
    f = _head_frame(head, level, size)
    hu, inner, in_bone = _scalp_and_skull(head, level, f.theta, f.rho, f.pixel, size)
    inside = f.rho <= inner
    q = f.rho / inner  # 0 at the centre, 1 at the inner table
    brain, ventricles, sulci = _brain(rng, head, level, f, q, size)
    hu[inside] = brain[inside]
    masks = _draw_bleeds(hu, head, bleeds, slice_number, f, q, {"inside": inside, "ventricles": ventricles, "sulci": sulci})
    hu = _scanner_effects(rng, hu, head, inside, in_bone, size)
    return hu, masks


SERIES_HEADER = ("patient_id", "study_uid", "series_uid", "spacing", "slope", "intercept")  # write_ct_dicom's **series


def write_ct_dicom(path, hu, *, instance, z, quirk12=False, **series):
    """A real CT DICOM file of one slice: int16 pixels with slope/intercept, or the RSNA 12-bit quirk when quirk12.
    series: what every slice of its series shares, SERIES_HEADER (the ids, pixel spacing in mm, slope, intercept)."""
    if sorted(series) != sorted(SERIES_HEADER):
        raise TypeError(f"write_ct_dicom needs the series header {', '.join(SERIES_HEADER)}, got {', '.join(series)}")
    patient_id, study_uid, series_uid, spacing, slope, intercept = (series[name] for name in SERIES_HEADER)
    sop_uid = generate_uid(entropy_srcs=[os.path.basename(path)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop_uid, "CT"
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient_id, study_uid, series_uid
    ds.InstanceNumber = instance
    rows, columns = hu.shape
    ds.ImagePositionPatient = [-columns * spacing / 2, -rows * spacing / 2, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], 5.0
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = [40, 40], [80, 80]  # multi-valued, as in many RSNA files
    ds.BitsAllocated = 16
    if quirk12:  # HU + 1000 wrapped modulo 4096, unsigned 12-bit, intercept 0 (see hu_from_dicom)
        stored = np.mod(np.clip(np.round(hu), -1000, 3095).astype(np.int32), 4096).astype(np.uint16)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 12, 11, 0, 0, 1
    else:
        stored = np.clip(np.round((hu - intercept) / slope), -32768, 32767).astype(np.int16)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 16, 15, 1, intercept, slope
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_phantom(out, patients=40, slices=20, size=256, seed=0):
    """Write a head-CT phantom in the RSNA layout: <out>/stage_2_train/ID_<hex>.dcm, <out>/stage_2_train.csv
    (6 rows per image, a few duplicated) and <out>/masks/ID_<hex>.npy (bool bleed mask of each positive slice).

    Half of the patients (rounded down) have bleeds; hemorrhage patient j has subtype SUBTYPES[j % 5],
    sometimes a second one. Quirks: every slice of the first hemorrhage patient uses the RSNA 12-bit
    storage; one slice of the first healthy patient is truncated in its pixel data."""
    out = os.fspath(out)
    rng = np.random.default_rng(seed)
    image_dir, mask_dir = os.path.join(out, "stage_2_train"), os.path.join(out, "masks")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    sick = np.zeros(patients, bool)
    sick[rng.permutation(patients)[:patients // 2]] = True
    quirk_patient = int(np.flatnonzero(sick)[0]) if sick.any() else None
    truncated_patient = int(np.flatnonzero(~sick)[0]) if (~sick).any() else None
    spacing = round(240.0 / size, 4)  # a 24 cm field of view
    min_pixels = max(2, round((size / 128) ** 2 * 4))  # a bleed smaller than this does not label its slice
    used_ids, label_rows, truncated_path = set(), [], None
    for p in range(patients):
        head = random_head(rng, size)
        levels = np.linspace(head["z_low"], head["z_high"], slices)
        kinds = []
        if sick[p]:
            kinds = [SUBTYPES[int(sick[:p].sum()) % len(SUBTYPES)]]
            if rng.random() < 0.3:
                kinds.append(rng.choice([k for k in SUBTYPES if k != kinds[0]]))
        bleeds = [random_bleed(rng, kind, levels) for kind in kinds]
        patient_id = f"ID_{rng.integers(16 ** 9):09x}"
        study_uid = generate_uid(entropy_srcs=[str(seed), str(p), "study"])
        series_uid = generate_uid(entropy_srcs=[str(seed), str(p), "series"])
        slope, intercept = [(1.0, -1024.0), (1.0, -1024.0), (1.0, -1000.0), (0.5, -1024.0)][rng.integers(4)]
        for k, level in enumerate(levels):
            hu, masks = draw_slice(rng, head, level, k, bleeds, size)
            image_id = f"ID_{rng.integers(16 ** 9):09x}"
            while image_id in used_ids:
                image_id = f"ID_{rng.integers(16 ** 9):09x}"
            used_ids.add(image_id)
            path = os.path.join(image_dir, f"{image_id}.dcm")
            write_ct_dicom(path, hu, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, instance=k + 1,
                           z=head["z_start"] + 5.0 * k, spacing=spacing, slope=slope, intercept=intercept,
                           quirk12=p == quirk_patient)
            present = {kind: mask for kind, mask in masks.items() if mask.sum() >= min_pixels}
            if present:
                np.save(os.path.join(mask_dir, f"{image_id}.npy"), np.logical_or.reduce(list(present.values())))
            label_rows.append((image_id, [int(bool(present))] + [int(kind in present) for kind in SUBTYPES]))
            if p == truncated_patient and k == slices // 2:
                truncated_path = path
    if truncated_path:  # cut into the pixel data: the header still reads, the pixels do not
        with open(truncated_path, "r+b") as f:
            f.truncate(os.path.getsize(truncated_path) - size * size // 2)
    lines = ["ID,Label"]
    for image_id, labels in label_rows:  # RSNA order: the five subtypes, then any
        lines += [f"{image_id}_{name},{labels[LABELS.index(name)]}" for name in SUBTYPES + ("any",)]
    lines += lines[1:4]  # RSNA's CSV has duplicated rows
    with open(os.path.join(out, "stage_2_train.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="write a head-CT DICOM phantom in the RSNA layout")
    parser.add_argument("--out", required=True)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, low in (("patients", 1), ("slices", 1), ("size", 16), ("seed", 0)):  # 16: readers.MIN_SLICE_SIDE
        if getattr(args, name) < low:
            raise SystemExit(f"error: --{name} {getattr(args, name)}: must be at least {low}")
    if os.path.exists(os.path.join(args.out, "stage_2_train.csv")):
        raise SystemExit(f"error: {args.out}: already holds a data set; choose another --out")
    start = time.time()
    write_phantom(args.out, args.patients, args.slices, args.size, args.seed)
    print(f"phantom: {args.patients} patients x {args.slices} slices at {args.size}^2 in {time.time() - start:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
