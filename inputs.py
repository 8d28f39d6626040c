"""Model inputs from decoded slices: the input representation (per channel, the HU range at input -1 and +1: made
at training from the layout, native_input_hu, and saved in the checkpoint), make_input (any layout onto it), inputs
float [C, S, S] in [-1, 1], intracranial masks, and the ground-truth bleed masks resized like their slice."""
import functools
import os
import warnings

import nibabel
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cohort import nifti_volumes, split_slice_id
from readers import (BadFile, axial_slices, check_jpg, check_plausible_hu, check_size, hu_from_dicom, load_nifti,
                     read_ctich_slice, read_jpg)

WINDOWS = {"brain": (40, 80), "subdural": (80, 200), "bone": (600, 2800)}  # (level, width) in HU
# Which window each input channel shows. CT-ICH has no subdural window (its JPGs are brain and bone
# windows only), so there the subdural channel repeats the brain JPG: the 3-channel input is
# (brain, brain, bone) and channel 3 is the bone window on both layouts.
CHANNEL_WINDOWS = {1: ("brain",), 2: ("brain", "bone"), 3: ("brain", "subdural", "bone")}


# CT-ICH's JPG release stores each slice in two windows (Hssayeni et al., Data 2020, 5(1), 14: brain L40/W120,
# bone L700/W3200) as 8 bits: the HU inside a window are recoverable to 1/255 of its width, outside it they are gone.
JPG_WINDOWS = {"brain": (-20.0, 100.0), "bone": (-900.0, 2300.0)}
MIN_GREY_LEVELS = 64  # a channel rebuilt from an 8-bit JPG must keep at least this many grey levels across its range


def hu_range(name):
    """[HU at input -1, HU at input +1] of a CT window of WINDOWS."""
    level, width = WINDOWS[name]
    return [level - width / 2, level + width / 2]


def native_input_hu(dataset, channels):
    """The input representation a run trains with on this layout, per channel [HU at input -1, HU at +1]: the CT
    windows of CHANNEL_WINDOWS for DICOM and NIfTI; for CT-ICH's JPGs the windows they were stored with (the brain
    JPG stands in for the subdural window, which the release lacks). Saved in the checkpoint (models.Diffusion): new
    data of any layout is mapped onto it (make_input)."""
    if channels not in CHANNEL_WINDOWS:
        raise ValueError(f"channels must be one of {sorted(CHANNEL_WINDOWS)}, got {channels}")
    if dataset == "ctich":
        return [list(JPG_WINDOWS["bone" if name == "bone" else "brain"]) for name in CHANNEL_WINDOWS[channels]]
    return [hu_range(name) for name in CHANNEL_WINDOWS[channels]]


def jpg_source(low, high):
    """The stored JPG window a channel [low, high] HU is read from: the window itself where it is one (taken as
    stored, bit for bit), else the finest stored window that covers it with MIN_GREY_LEVELS grey levels; None when
    no window can (the range reaches where the JPGs saturate, or too few grey levels are left)."""
    for name, window in JPG_WINDOWS.items():
        if window == (low, high):
            return name
    covering = [(w[1] - w[0], name) for name, w in JPG_WINDOWS.items()
                if w[0] <= low and high <= w[1] and (high - low) / (w[1] - w[0]) * 255 >= MIN_GREY_LEVELS]
    return min(covering)[1] if covering else None


def check_input_hu(input_hu, dataset, what):
    """A one-line SystemExit when a model's input representation cannot be made from this layout's files (only
    pre-windowed JPGs can fail: DICOM and NIfTI hold the HU themselves)."""
    if dataset != "ctich":
        return
    for k, (low, high) in enumerate(input_hu):
        if jpg_source(low, high) is None:
            raise SystemExit(f"error: {what}: the model's input channel {k} is {low:g}..{high:g} HU, which CT-ICH's 8-bit "
                             f"JPGs (brain {JPG_WINDOWS['brain'][0]:g}..{JPG_WINDOWS['brain'][1]:g} HU, bone "
                             f"{JPG_WINDOWS['bone'][0]:g}..{JPG_WINDOWS['bone'][1]:g} HU) cannot give with "
                             f"{MIN_GREY_LEVELS}+ grey levels; score this model on DICOM or NIfTI data")


# ---------------------------------------------------------------------------------------------
# windows and model inputs

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


def window_hu(hu, low, high):
    """HU -> [-1, 1] over [low, high], clipped."""
    return (np.clip((np.asarray(hu, np.float32) - low) / (high - low), 0, 1) * 2 - 1).astype(np.float32)


def channel_input(pixels, low, high):
    """One input channel [H, W] in [-1, 1]: HU windowed to [low, high], or a stored JPG window (pixels: dict of
    window name -> image in [-1, 1]) taken as it is or mapped back to HU and windowed again."""
    if not isinstance(pixels, dict):
        return window_hu(pixels, low, high)
    name = jpg_source(low, high)
    if name is None:
        raise ValueError(f"no stored JPG window gives {low:g}..{high:g} HU (check_input_hu)")
    stored_low, stored_high = JPG_WINDOWS[name]
    if (stored_low, stored_high) == (low, high):
        return pixels[name]
    return window_hu(stored_low + (pixels[name] + 1) / 2 * (stored_high - stored_low), low, high)


def make_input(pixels, input_hu, image_size):
    """Model input, float32 [C, S, S] in [-1, 1], in the representation input_hu (native_input_hu).

    pixels: a 2-D HU slice (DICOM, NIfTI, the phantom), or CT-ICH's dict of pre-windowed images in [-1, 1] keyed by
    JPG_WINDOWS name. Non-square slices are padded with air (-1)."""
    stack = [channel_input(pixels, low, high) for low, high in input_hu]
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


# ---------------------------------------------------------------------------------------------
# intracranial masks

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


# A mask found without a closed skull is kept only when bone lies along this much of its outline. On the 1,768
# CT-ICH slices, such masks of a brain with a fracture or craniectomy had bone along >= 84 % of their outline, those
# that landed on the soft tissue of the face or neck (the lowest slices) <= 59 %.
MIN_BONE_OUTLINE = 0.7


def bone_along_outline(region, bone, reach):
    """The fraction of region's outline pixels within reach pixels of bone."""
    outline = region & ~ndimage.binary_erosion(region)
    return (outline & ndimage.binary_dilation(bone, iterations=reach)).sum() / max(outline.sum(), 1)


def intracranial_mask(bone, tissue):
    """Inside the skull, bone and air/fat excluded, eroded a little.

    bone: pixels dense enough to be skull; tissue: pixels that are not air or fat. The skull is
    closed (to bridge sutures and foramina), its holes filled, the skull and non-tissue removed, the
    largest piece kept, and its holes filled again so bright islands inside (bleeds, calcifications)
    count as brain. Where the skull does not close even after a wide closing (skull base, fracture,
    craniectomy), the tissue inside minus what a wide opening strips off is used instead: the scalp is a
    thin band that the opening removes, the brain is not. That piece is kept only if bone runs along most
    of its outline (MIN_BONE_OUTLINE): below the skull base the largest piece of tissue is the face or the
    neck, which no bone encloses, and the slice gets an empty mask."""
    size = min(bone.shape)
    close_px, erode_px = max(1, round(size / 100)), max(1, round(size / 128))
    for radius in (close_px, 3 * close_px):
        skull = _closing(bone, radius)
        inside = _largest_component(_fill_holes(skull) & ~skull & tissue)
        if inside.sum() > 0.005 * bone.size:
            break
    else:
        inside = _fill_holes(_largest_component(ndimage.binary_opening(tissue & ~bone, iterations=4 * close_px)))
        if bone_along_outline(inside, bone, 3 * close_px) < MIN_BONE_OUTLINE:
            return np.zeros_like(inside)
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


# ---------------------------------------------------------------------------------------------
# one slice: file -> (model input, brain mask)

def load_slice(path, input_hu, image_size):
    """Decode one slice: (image float16 [C, S, S] in [-1, 1] in the representation input_hu, anatomy code uint8
    [S, S] (anatomy_code))."""
    if path.endswith(".jpg"):  # {"brain": ..., "bone": ...}, already windowed; the bone JPG finds bone (anatomy_code)
        pixels = read_ctich_slice(path, with_bone=True)
    else:
        with warnings.catch_warnings():  # pydicom's warnings on odd files: such a file is kept or skipped, and counted
            warnings.simplefilter("ignore")
            pixels = hu_from_dicom(path)
    return input_and_brain_mask(pixels, input_hu, image_size)


def input_and_brain_mask(pixels, input_hu, image_size):
    """(image float16 [C, S, S] in [-1, 1], anatomy code uint8 [S, S]) of one decoded slice (HU, or CT-ICH's
    dict)."""
    check_size(pixels["brain"].shape if isinstance(pixels, dict) else pixels.shape)
    image = make_input(pixels, input_hu, image_size)
    return image.astype(np.float16), anatomy_code(pixels, image_size)


# ---------------------------------------------------------------------------------------------
# the anatomy code: what each pixel of a slice is, kept in the slice cache next to the input

# bits of the code: the intracranial mask (what is scored by default), bone and non-tissue (air, fat: sinuses,
# mastoid cells, orbits) anywhere, and the head. The scored region leaves bone, non-tissue and a band around them
# out of the intracranial mask (scoring.scored_masks); the level of a slice is its intracranial area over its head
# area (scoring.slice_levels).
INTRACRANIAL, BONE, NON_TISSUE, HEAD = 1, 2, 4, 8
# the one bit that needs the scan: bone at this pixel in the slice above or below (add_neighbour_bone). It is not
# cached: the dataset sets it when it reads a slice beside its neighbours (data.SliceDataset, data.ArrayDataset).
NEAR_BONE = 16
BONE_HU = 120.0  # above any acute or clotted blood (50-100 HU), below cortical bone; partial-volume bone is caught
# by the band scoring.scored_masks draws around it
NON_TISSUE_HU = -20.0  # below CSF (0-15 HU): air and fat; CT-ICH's brain JPG bottoms out here
PART_OF_PIXEL = 0.25  # a resized pixel is bone / non-tissue when a quarter of it is (partial volume counts)


def intracranial(code):
    """The intracranial mask (bool) of anatomy codes (array or tensor)."""
    return (code & INTRACRANIAL) > 0


RIDGE_REACH = 4  # pixels (of a 128^2 slice): bays of the intracranial outline narrower than about twice this are
# where a ridge of bone pokes in (petrous ridge, clinoids, sphenoid wing), not the smooth inner table


def _without_bone_islands(codes, bone_margin):
    """bool [..., S, S]: the pixels of anatomy codes [..., S, S] that are not bone or air/fat inside the intracranial
    mask (islands: calcifications, clinoids, sinuses), not in a bay of its outline where a ridge of bone pokes in
    (the intracranial mask closed over RIDGE_REACH, less the mask), and not within bone_margin pixels (of a 128^2
    slice, scaled to S) of either: the part of no_bone_3d that reads the slice alone. It draws no band along the
    smooth inner table, where epidurals and subdurals lie."""
    codes = np.asarray(codes)
    scale = codes.shape[-1] / 128
    margin, reach = round(bone_margin * scale), max(1, round(RIDGE_REACH * scale))
    kept = []
    for code in codes.reshape(-1, *codes.shape[-2:]):
        inside = (code & INTRACRANIAL) > 0
        excluded = (inside & ((code & (BONE | NON_TISSUE)) > 0)) | (_closing(inside, reach) & ~inside)
        if margin and excluded.any():
            excluded = ndimage.binary_dilation(excluded, iterations=margin)
        kept.append(~excluded)
    return np.stack(kept).reshape(codes.shape) if kept else np.ones(codes.shape, bool)


def add_neighbour_bone(code, neighbours):
    """code (uint8 [S, S]) with its NEAR_BONE bit set where any of `neighbours` (the codes of the slices above and
    below it in the scan, those that decoded) is bone, and cleared elsewhere."""
    near = np.zeros(np.shape(code), bool)
    for other in neighbours:
        near |= (np.asarray(other) & BONE) > 0
    return ((np.asarray(code) & ~np.uint8(NEAR_BONE)) | (near.astype(np.uint8) * NEAR_BONE)).astype(np.uint8)


Z_RIM = 4  # pixels (of a 128^2 slice) inside the intracranial outline where no_bone_3d keeps scoring: near the vertex
# the inner table of the slice above lies under this rim (CT-ICH: 5 % of a vertex slice's mask within 2 px of the
# outline, 0.4 % beyond 4), and it is where subdurals and epidurals lie


def no_bone_3d(codes, bone_margin):
    """bool [..., S, S]: _without_bone_islands, less the pixels that are bone in the slice above or below (NEAR_BONE) deeper
    than Z_RIM pixels inside the intracranial outline (--scored_region no_bone_3d). Why: a 5 mm slice over the floor
    of a cranial fossa, a petrous ridge or an orbital roof holds part of that bone; the partial volume is bright,
    is rebuilt darker, and is what the top false positives of the CV run were made of (RESULTS.md). Codes without
    NEAR_BONE (a slice read alone) lose only what _without_bone_islands takes."""
    codes = np.asarray(codes)
    rim = max(1, round(Z_RIM * codes.shape[-1] / 128))
    flat = codes.reshape(-1, *codes.shape[-2:])
    kept = _without_bone_islands(flat, bone_margin)
    for i, code in enumerate(flat):
        near = (code & NEAR_BONE) > 0
        if near.any():
            kept[i] &= ~(near & ndimage.binary_erosion((code & INTRACRANIAL) > 0, iterations=rim))
    return kept.reshape(codes.shape)


SCORED_REGIONS = ("intracranial", "no_bone_3d")  # --scored_region; region_mask draws each


def region_mask(codes, region, bone_margin):
    """bool [..., S, S]: the scored region (--scored_region: intracranial or no_bone_3d) of anatomy codes [..., S, S]."""
    inside = intracranial(np.asarray(codes))
    if region == "intracranial":
        return inside
    if region != "no_bone_3d":
        raise ValueError(f"unknown scored region {region!r} (one of {', '.join(SCORED_REGIONS)})")
    return inside & no_bone_3d(codes, bone_margin)


def tissue_classes(pixels):
    """(intracranial, bone, non_tissue, head): bool [H, W] each, of one decoded slice at its own resolution. HU
    slices: thresholds. CT-ICH's windowed JPGs: the intracranial mask from the brain JPG (brain_mask_from_windowed);
    bone where the brain JPG saturates (>= ~97 HU) and, where the bone JPG was read, it says >= BONE_HU as well;
    non-tissue where the brain JPG bottoms out."""
    if isinstance(pixels, dict):
        brain = pixels["brain"]
        inside = brain_mask_from_windowed(brain)
        bone = brain >= 0.95
        if "bone" in pixels:
            low, high = JPG_WINDOWS["bone"]
            bone &= low + (pixels["bone"] + 1) / 2 * (high - low) >= BONE_HU
        non_tissue = brain <= -0.95
    else:
        inside = brain_mask_from_hu(pixels)
        bone, non_tissue = pixels >= BONE_HU, pixels < NON_TISSUE_HU
    head = _fill_holes(_largest_component(~non_tissue | bone))
    return inside, bone, non_tissue, head


def anatomy_code(pixels, image_size):
    """uint8 [S, S] anatomy code (INTRACRANIAL | BONE | NON_TISSUE | HEAD bits) of one decoded slice, resized like
    its input: the intracranial mask and the head as resize_mask (half a pixel), bone and non-tissue where
    PART_OF_PIXEL of a pixel is."""
    inside, bone, non_tissue, head = tissue_classes(pixels)
    fraction = _square_resize(np.stack([inside, bone, non_tissue, head]).astype(np.float32), image_size, 0.0, "area")
    bits = (fraction[0] >= 0.5, fraction[1] >= PART_OF_PIXEL, fraction[2] >= PART_OF_PIXEL, fraction[3] >= 0.5)
    return sum(bit.astype(np.uint8) * value for bit, value in zip(bits, (INTRACRANIAL, BONE, NON_TISSUE, HEAD))).astype(np.uint8)


def nifti_slice_input(hu, input_hu, image_size):
    """input_and_brain_mask of one NIfTI slice, after the HU check every DICOM slice gets in hu_from_dicom."""
    check_plausible_hu(hu, True)
    return input_and_brain_mask(hu, input_hu, image_size)


# ---------------------------------------------------------------------------------------------
# ground-truth bleed masks

def load_gt_mask(data_dir, image_id, image_size):
    """Ground-truth bleed mask as bool [S, S] (resized like the slice), or None if there is none: the phantom's
    <data_dir>/masks/<id>.npy, or CT-ICH's Patients_CT/<pid>/brain/<n>_HGE_Seg.jpg. BadFile when a mask does not
    fit its slice (the caller counts it and leaves the slice out of the pixel metrics)."""
    if str(image_id).startswith("ctich_"):
        return _ctich_gt_mask(os.fspath(data_dir), str(image_id), image_size)
    volume, k = split_slice_id(image_id)
    if k is not None:  # a slice of a NIfTI volume: "<volume>#<k>"
        slices = _nifti_mask_slices(os.fspath(data_dir), volume)
        return None if slices is None else resize_mask(slices[k], image_size)
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
