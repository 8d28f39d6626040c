"""Model inputs from decoded slices: the input representation (per channel, the HU range at input -1 and +1: made
at training from the layout, native_input_hu, and saved in the checkpoint, with the framing: InputHU), make_input (any
layout onto it, pre-windowed images bridged by their stored or stated windows), the frame of a slice (slice_frame:
--framing), inputs float [C, S, S] in [-1, 1], intracranial masks (skull rings cut by the border, or saturated with
blood: skull_ring), and the ground-truth bleed masks framed and resized like their slice."""
import collections
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
                     read_ctich_slice, read_image, read_jpg)

WINDOWS = {"brain": (40, 80), "subdural": (80, 200), "bone": (600, 2800)}  # (level, width) in HU
# Which window each input channel shows. CT-ICH has no subdural window (its JPGs are brain and bone
# windows only), so there the subdural channel repeats the brain JPG: the 3-channel input is
# (brain, brain, bone) and channel 3 is the bone window on both layouts.
CHANNEL_WINDOWS = {1: ("brain",), 2: ("brain", "bone"), 3: ("brain", "subdural", "bone")}


# CT-ICH's JPG release stores each slice in two windows (Hssayeni et al., Data 2020, 5(1), 14: brain L40/W120,
# bone L700/W3200) as 8 bits: the HU inside a window are recoverable to 1/255 of its width, outside it they are gone.
JPG_WINDOWS = {"brain": (-20.0, 100.0), "bone": (-900.0, 2300.0)}
MIN_GREY_LEVELS = 64  # a channel rebuilt from an 8-bit JPG must keep at least this many grey levels across its range
STATED = "image"  # the key of a 2-D image read in the window its user stated (the images layout; Windowed)
MIN_OVERLAP = 0.5  # a stated window that does not cover a channel must cover this fraction of its range (jpg_source)
FRAMINGS = ("none", "head")  # --framing: how a slice is brought to the model's frame (slice_frame)


class InputHU(list):
    """The input representation as the scripts pass it: per channel [HU at input -1, HU at +1] (the list the
    checkpoint's config["input_hu"] holds) with the framing the model was trained at (.framing, FRAMINGS; the
    checkpoint's config["framing"]). A plain list of pairs means framing "none" (framing_of). .image_window: the
    run's --image_window ("level,width"), which 2-D images are read in (data.stated_window_of), or None."""

    def __init__(self, pairs, framing="none", image_window=None):
        super().__init__([float(low), float(high)] for low, high in pairs)
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")
        self.framing, self.image_window = framing, image_window


def framing_of(input_hu):
    return getattr(input_hu, "framing", "none")


class Windowed(dict):
    """Pre-windowed images {name: image in [-1, 1]} with the HU window each was stored with (.windows: {name: (low,
    high)}): CT-ICH's JPGs (a plain dict means JPG_WINDOWS), or one 2-D image {STATED: ...} in the window its user
    stated. make_input bridges either onto a model's representation (channel_input)."""

    def __init__(self, images, windows):
        super().__init__(images)
        self.windows = {name: (float(low), float(high)) for name, (low, high) in windows.items()}


def windows_of(pixels):
    return getattr(pixels, "windows", JPG_WINDOWS)


def hu_range(name):
    """[HU at input -1, HU at input +1] of a CT window of WINDOWS."""
    level, width = WINDOWS[name]
    return [level - width / 2, level + width / 2]


def native_input_hu(dataset, channels, window=None):
    """The input representation a run trains with on this layout, per channel [HU at input -1, HU at +1]: the CT
    windows of CHANNEL_WINDOWS for DICOM and NIfTI; for CT-ICH's JPGs the windows they were stored with (the brain
    JPG stands in for the subdural window, which the release lacks); for 2-D images (the images layout) their stated
    window (low, high) on every channel. Saved in the checkpoint (models.Diffusion): new data of any layout is mapped
    onto it (make_input)."""
    if channels not in CHANNEL_WINDOWS:
        raise ValueError(f"channels must be one of {sorted(CHANNEL_WINDOWS)}, got {channels}")
    if dataset == "images":
        return [[float(v) for v in (window or stated_range(None))] for _ in CHANNEL_WINDOWS[channels]]
    if dataset == "ctich":
        return [list(JPG_WINDOWS["bone" if name == "bone" else "brain"]) for name in CHANNEL_WINDOWS[channels]]
    return [hu_range(name) for name in CHANNEL_WINDOWS[channels]]


def stated_range(window):
    """(low, high) HU of a stated window: (low, high) itself, or the default brain window 40,80 when None."""
    if window is None:
        level, width = WINDOWS["brain"]
        return (level - width / 2, level + width / 2)
    return (float(window[0]), float(window[1]))


def jpg_source(low, high, windows=None):
    """The stored window (of windows, default CT-ICH's JPG_WINDOWS) a channel [low, high] HU is read from: the window
    itself where it is one (taken as stored, bit for bit), else the finest stored window that covers it with
    MIN_GREY_LEVELS grey levels; for a stated window (STATED, the images layout) also one that covers MIN_OVERLAP of
    the channel with MIN_GREY_LEVELS grey levels there (its saturated pixels are filled from the anatomy,
    channel_input). None when no window can."""
    windows = JPG_WINDOWS if windows is None else windows
    for name, window in windows.items():
        if tuple(window) == (low, high):
            return name
    covering = [(w[1] - w[0], name) for name, w in windows.items()
                if w[0] <= low and high <= w[1] and (high - low) / (w[1] - w[0]) * 255 >= MIN_GREY_LEVELS]
    if covering:
        return min(covering)[1]
    if STATED in windows:
        w_low, w_high = windows[STATED]
        overlap = min(high, w_high) - max(low, w_low)
        if overlap >= MIN_OVERLAP * (high - low) and overlap / (w_high - w_low) * 255 >= MIN_GREY_LEVELS:
            return STATED
    return None


def check_input_hu(input_hu, dataset, what, window=None):
    """A one-line SystemExit when a model's input representation cannot be made from this layout's files (only
    pre-windowed images can fail: DICOM and NIfTI hold the HU themselves). window: the stated window (low, high) of
    the images layout."""
    if dataset not in ("ctich", "images"):
        return
    windows = {STATED: stated_range(window)} if dataset == "images" else JPG_WINDOWS
    for k, (low, high) in enumerate(input_hu):
        if jpg_source(low, high, windows) is not None:
            continue
        if dataset == "images":
            w_low, w_high = windows[STATED]
            raise SystemExit(f"error: {what}: the model's input channel {k} is {low:g}..{high:g} HU, which images in the "
                             f"stated window {w_low:g}..{w_high:g} HU (level {(w_low + w_high) / 2:g}, width "
                             f"{w_high - w_low:g}) cannot give: they must cover {MIN_OVERLAP:.0%} of it with "
                             f"{MIN_GREY_LEVELS}+ grey levels (check --image_window / window.txt)")
        raise SystemExit(f"error: {what}: the model's input channel {k} is {low:g}..{high:g} HU, which CT-ICH's 8-bit "
                         f"JPGs (brain {JPG_WINDOWS['brain'][0]:g}..{JPG_WINDOWS['brain'][1]:g} HU, bone "
                         f"{JPG_WINDOWS['bone'][0]:g}..{JPG_WINDOWS['bone'][1]:g} HU) cannot give with "
                         f"{MIN_GREY_LEVELS}+ grey levels; score this model on DICOM or NIfTI data")


# ---------------------------------------------------------------------------------------------
# windows and model inputs

# The square of a slice's pixels that becomes the model's S x S input: rows [top, top + side), columns [left, left +
# side) of the slice's own height x width grid; it may reach outside the slice (air there). slice_frame makes it.
Frame = collections.namedtuple("Frame", "height width top left side")
FRAME_MARGIN = 0.08  # --framing head: air added on each side of the head's bounding box, as a fraction of its larger side


def centred_frame(shape):
    """Framing "none": the slice padded with air to a square, centred (its aspect ratio kept)."""
    h, w = (int(v) for v in shape)
    side = max(h, w)
    return Frame(h, w, -((side - h) // 2), -((side - w) // 2), side)


def slice_frame(shape, head=None, framing="none"):
    """The Frame of a slice of this shape. "none": centred_frame (today's padding to a square). "head": the head's
    bounding box (head: bool [H, W], tissue_classes; its largest piece after an opening of 1/50 of its size, so a
    head rest or a cable touching it does not move the box), made square about its centre and widened by
    FRAME_MARGIN on each side: a head is brought to the same place and size whatever the field of view, the air
    around it or the scale it was exported at. No head found: "none"."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")
    if framing == "none" or head is None or not np.any(head):
        return centred_frame(shape)
    reach = max(1, round(np.sqrt(head.sum()) / 50))
    opened = _largest_component(ndimage.binary_opening(head, iterations=reach))
    head = opened if opened.any() else head
    rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    extent = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    side = max(2, int(round(extent * (1 + 2 * FRAME_MARGIN))))
    # floor(x + 0.5), not round(): Python rounds halves to even, which would move the box by a pixel when the slice moves
    top, left = (int(np.floor((first + last + 1 - side) / 2 + 0.5)) for first, last in ((rows[0], rows[-1]), (cols[0], cols[-1])))
    return Frame(int(shape[0]), int(shape[1]), top, left, side)


def as_frame(frame_or_shape):
    """A Frame, or the centred_frame of an (H, W) shape (what callers passed before framing existed)."""
    return frame_or_shape if isinstance(frame_or_shape, Frame) else centred_frame(tuple(frame_or_shape)[-2:])


def crop_to_frame(stack, frame, pad_value):
    """[..., H, W] -> [..., side, side]: the frame's square of the slice, pad_value where it reaches outside."""
    stack = np.asarray(stack, np.float32)
    h, w, top, left, side = frame
    if (top, left, side) == (0, 0, h) and h == w:
        return stack
    out = np.full(stack.shape[:-2] + (side, side), pad_value, np.float32)
    r0, r1, c0, c1 = max(top, 0), min(top + side, h), max(left, 0), min(left + side, w)
    if r1 > r0 and c1 > c0:
        out[..., r0 - top:r1 - top, c0 - left:c1 - left] = stack[..., r0:r1, c0:c1]
    return out


def _square_resize(stack, image_size, pad_value, mode, frame=None):
    """[C, H, W] -> [C, S, S]: the frame's square (default centred_frame: padded to a square, aspect ratio kept),
    then resized."""
    stack = np.asarray(stack, np.float32)
    stack = crop_to_frame(stack, as_frame(stack.shape) if frame is None else frame, pad_value)
    side = stack.shape[-1]
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


BEYOND_HU = (-1000.0, 3000.0)  # what a saturated pixel of a stated window is taken as where the anatomy says air/fat, bone


def channel_input(pixels, low, high, classes=None):
    """One input channel [H, W] in [-1, 1]: HU windowed to [low, high], or a stored window (pixels: dict of window
    name -> image in [-1, 1], windows_of) taken as it is or mapped back to HU and windowed again. Where a stated
    window does not cover the channel, what it saturates is filled from the anatomy (classes: tissue_classes):
    bottomed-out air and fat outside the intracranial mask at BEYOND_HU[0], saturated bone at BEYOND_HU[1]; the rest
    (saturated blood, CSF) at the window's edge."""
    if not isinstance(pixels, dict):
        return window_hu(pixels, low, high)
    windows = windows_of(pixels)
    name = jpg_source(low, high, windows)
    if name is None:
        raise ValueError(f"no stored window gives {low:g}..{high:g} HU (check_input_hu)")
    stored_low, stored_high = windows[name]
    if (stored_low, stored_high) == (low, high):
        return pixels[name]
    hu = stored_low + (pixels[name] + 1) / 2 * (stored_high - stored_low)
    if not (stored_low <= low and high <= stored_high):
        inside, bone, non_tissue, _ = tissue_classes(pixels) if classes is None else classes
        hu = np.where(bone, BEYOND_HU[1], np.where(non_tissue & ~inside, BEYOND_HU[0], hu))
    return window_hu(hu, low, high)


def make_input(pixels, input_hu, image_size, frame=None, classes=None):
    """Model input, float32 [C, S, S] in [-1, 1], in the representation input_hu (native_input_hu).

    pixels: a 2-D HU slice (DICOM, NIfTI, the phantom), CT-ICH's dict of pre-windowed images in [-1, 1] keyed by
    JPG_WINDOWS name, or a Windowed 2-D image. frame: the slice's square (slice_frame; default the one input_hu's
    framing finds); outside the slice is air (-1). classes: tissue_classes of pixels, where the caller has them."""
    if frame is None:
        frame = slice_frame(_shape_of(pixels), _head_for(pixels, input_hu, classes), framing_of(input_hu))
    stack = [channel_input(pixels, low, high, classes) for low, high in input_hu]
    return np.clip(_square_resize(np.stack(stack), image_size, -1.0, "bilinear", frame), -1, 1)


def _shape_of(pixels):
    return next(iter(pixels.values())).shape if isinstance(pixels, dict) else np.shape(pixels)


def _head_for(pixels, input_hu, classes):
    """The head mask slice_frame needs (None where the framing is "none")."""
    if framing_of(input_hu) == "none":
        return None
    return (tissue_classes(pixels) if classes is None else classes)[3]


def to_slice_shape(image, frame):
    """The inverse of make_input's framing and resize for a 2-D map [S, S] (e.g. an anomaly map): back onto its
    slice's own [H, W] pixels (bilinear), so that it lies on the slice it was computed from; 0 where the frame did not
    reach. frame: the slice's Frame, or its (H, W) shape for framing "none"."""
    h, w, top, left, side = as_frame(frame)
    tensor = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    if side != tensor.shape[-1]:
        tensor = F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False)
    square = tensor[0, 0].numpy()
    out = np.zeros((h, w), np.float32)
    r0, r1, c0, c1 = max(top, 0), min(top + side, h), max(left, 0), min(left + side, w)
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = square[r0 - top:r1 - top, c0 - left:c1 - left]
    return out


def reframe(square, source, target, pad_value):
    """[..., S, S] made through Frame source -> the same slice's pixels as Frame target makes them (bilinear;
    pad_value where source did not reach). Why: --framing head frames each slice on its own, and two adjacent
    slices' frames differ by a few pixels (CT-ICH: median 1.2 px, p90 5 px at 128 px), so a neighbour's input or
    bone is brought into the slice's own frame before it is read beside it (2.5-D, no_bone_3d). Equal frames (every
    framing "none" slice of one series): returned as it is, bit for bit."""
    source, target = Frame(*(int(v) for v in source)), Frame(*(int(v) for v in target))
    if source == target:
        return square
    array = np.asarray(square, np.float32)
    size = array.shape[-1]
    # output pixel k of the target square lies at slice row target.top + (k + 0.5) * target.side / size, which is
    # pixel u of the source square: u + 0.5 = (that row - source.top) * size / source.side; grid_sample wants
    # (u + 0.5) * 2 / size - 1 (align_corners=False)
    centres = (np.arange(size) + 0.5) * target.side / size
    rows = ((target.top - source.top + centres) / source.side) * 2 - 1
    cols = ((target.left - source.left + centres) / source.side) * 2 - 1
    grid = torch.from_numpy(np.stack(np.broadcast_arrays(cols[None, :], rows[:, None]), -1).astype(np.float32))[None]
    flat = torch.from_numpy(np.ascontiguousarray(array.reshape(-1, size, size)) - pad_value)[None]
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + pad_value
    return out.numpy().reshape(array.shape)


def resize_mask(mask, image_size, frame=None):
    """bool [H, W] -> bool [S, S], framed like make_input (default: padded to a square); a pixel is in if >= half
    covered."""
    return _square_resize(np.asarray(mask, np.float32)[None], image_size, 0.0, "area", frame)[0] >= 0.5


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


# A closed skull is taken to enclose the intracranial space only when its largest piece inside is at least this share
# of the head's area; a smaller piece is a sinus or a gap between skull-base bones, and the mask is found without a
# closed skull instead. A share of the head, not of the image, so that a tight crop or air padding (a 2-D export)
# does not change the decision: at 0.005 of the image, one CT-ICH skull-base slice exported at 40/80 and cropped to
# the head kept a 0.7 % piece (a sinus) where its JPG, with more air around, went on to the 23 % brain.
MIN_ENCLOSED = 0.02


def bone_along_outline(region, bone, reach):
    """The fraction of region's outline pixels within reach pixels of bone."""
    outline = region & ~ndimage.binary_erosion(region)
    return (outline & ndimage.binary_dilation(bone, iterations=reach)).sum() / max(outline.sum(), 1)


def border_wall(head):
    """bool [H + 2, W + 2]: a one-pixel frame around the slice, set where the head (bool [H, W]) touches the slice's
    border. A skull ring cut by the border (a tight crop) is closed along the cut by it, so that the inside of the
    head is a hole to fill; where air reaches the border, the frame stays open."""
    wall = np.zeros((head.shape[0] + 2, head.shape[1] + 2), bool)
    wall[0, 1:-1], wall[-1, 1:-1], wall[1:-1, 0], wall[1:-1, -1] = head[0], head[-1], head[:, 0], head[:, -1]
    return wall


def intracranial_mask(bone, tissue):
    """intracranial_mask_inside, with the border_wall of the head (bone | tissue) where the head touches the slice's
    border: the slice is padded by one pixel that is bone there and air elsewhere, so a skull ring cut by the border
    still closes (the pad is dropped again)."""
    wall = border_wall(bone | tissue)
    if not wall.any():
        return intracranial_mask_inside(bone, tissue)
    inside = intracranial_mask_inside(np.pad(bone, 1) | wall, np.pad(tissue, 1))
    return inside[1:-1, 1:-1]


def intracranial_mask_inside(bone, tissue):
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
    enough = MIN_ENCLOSED * _fill_holes(_largest_component(bone | tissue)).sum()
    for radius in (close_px, 3 * close_px):
        skull = _closing(bone, radius)
        inside = _largest_component(_fill_holes(skull) & ~skull & tissue)
        if inside.sum() > enough:
            break
    else:
        inside = _fill_holes(_largest_component(ndimage.binary_opening(tissue & ~bone, iterations=4 * close_px)))
        if bone_along_outline(inside, bone, 3 * close_px) < MIN_BONE_OUTLINE:
            return np.zeros_like(inside)
    return ndimage.binary_erosion(_fill_holes(inside), iterations=erode_px)


def brain_mask_from_hu(hu):
    """Intracranial mask from HU: bone >= 200 HU, tissue > -50 HU (air and fat excluded)."""
    return intracranial_mask(hu >= 200, hu > -50)


SKULL_HU = 200.0  # bone where the HU are known (brain_mask_from_hu)
TISSUE_HU = -50.0  # above air and fat (brain_mask_from_hu)
BLOOD_SATURATES_HU = 95.0  # a stated window whose saturation level (its top, less 2.5 %) is below this saturates acute
# blood (50-90 HU) as well as bone: the skull is then told from saturated blood by its shape (skull_ring)


RING_FACTOR = 1.0  # skull_ring: bone within this many median ring thicknesses (+1 px) of the outer region


def skull_ring(saturated, head):
    """The part of the saturated pixels (bool [H, W]) that is skull, where the window saturates blood as well (e.g.
    40/80 -> 0..80 HU). The skull is a ring whose outer table faces the scalp and the air around the head: a
    saturated piece that does not reach the region outside the (closed, border-walled) ring is not bone (a bleed,
    a calcification inside); in a piece that does, only what lies within RING_FACTOR ring thicknesses (+1 px) of that
    outer region is bone, the ring thickness being the median distance from it to the ring's inner edge: most of an
    epidural or subdural bleed lying on the inner table, saturated as well, stays out (on phantom slices at 40/80 the
    mask keeps 80 % of the epidural and 62 % of the subdural pixels that the mask from HU keeps, and no bone >= 200 HU;
    1.5 thicknesses kept 38 % and 17 %). A ring that does not close (skull base,
    a fracture) has no inner edge to measure; then all of its pieces that reach the outer region are bone."""
    wall = border_wall(head)
    padded = np.pad(saturated, 1) | wall
    ring = _closing(padded, max(1, round(min(saturated.shape) / 100)))
    filled = _fill_holes(ring)
    outer, interior = ~filled, filled & ~ring
    labels, _ = ndimage.label(ring)
    touching = np.unique(labels[ndimage.binary_dilation(outer) & ring])
    bone = np.isin(labels, touching[touching > 0])
    inner_edge = bone & ndimage.binary_dilation(interior)
    if inner_edge.any():
        depth = ndimage.distance_transform_edt(~outer)
        bone &= depth <= RING_FACTOR * np.median(depth[inner_edge]) + 1
    return (bone & padded & ~wall)[1:-1, 1:-1]


def brain_mask_from_windowed(brain):
    """Intracranial mask from a brain-window image in [-1, 1] (CT-ICH's JPG, L40/W120 = -20..100 HU).

    HU are gone, so the skull is what saturates the window (>= 0.95, about 97 HU and up; bleeds are
    50-90 HU and come back in anyway by the final hole filling) and air/fat is what bottoms out
    (<= -0.9, below about -14 HU; CSF at 0-15 HU stays in)."""
    return intracranial_mask(brain >= 0.95, brain > -0.9)


# ---------------------------------------------------------------------------------------------
# one slice: file -> (model input, brain mask)

def read_stated_image(path, window):
    """A 2-D slice image (readers.read_image) as Windowed {STATED: image in [-1, 1]} in its stated window (low, high)."""
    return Windowed({STATED: read_image(path) * 2 - 1}, {STATED: stated_range(window)})


def load_slice(path, input_hu, image_size, window=None, with_frame=False):
    """Decode one slice: (image float16 [C, S, S] in [-1, 1] in the representation input_hu, anatomy code uint8
    [S, S] (anatomy_code)), and its Frame with_frame. window: a 2-D image's stated window (low, high) HU (the images
    layout); without one a .jpg is a CT-ICH slice, anything else DICOM."""
    if window is not None:
        pixels = read_stated_image(path, window)
    elif path.endswith(".jpg"):  # {"brain": ..., "bone": ...}, already windowed; the bone JPG finds bone (anatomy_code)
        pixels = read_ctich_slice(path, with_bone=True)
    else:
        with warnings.catch_warnings():  # pydicom's warnings on odd files: such a file is kept or skipped, and counted
            warnings.simplefilter("ignore")
            pixels = hu_from_dicom(path)
    result = decode_pixels(pixels, input_hu, image_size)
    return result if with_frame else result[:2]


def decode_pixels(pixels, input_hu, image_size):
    """(image float16 [C, S, S] in [-1, 1], anatomy code uint8 [S, S], Frame) of one decoded slice (HU, CT-ICH's
    dict, or a Windowed image): the tissue classes once, at the slice's own resolution; the frame input_hu's framing
    finds from them; the input and the anatomy code both through that frame."""
    shape = _shape_of(pixels)
    check_size(shape)
    classes = tissue_classes(pixels)
    frame = slice_frame(shape, classes[3], framing_of(input_hu))
    image = make_input(pixels, input_hu, image_size, frame, classes)
    return image.astype(np.float16), anatomy_code(pixels, image_size, frame, classes), frame


def input_and_brain_mask(pixels, input_hu, image_size):
    """(image float16 [C, S, S] in [-1, 1], anatomy code uint8 [S, S]) of one decoded slice (HU, or CT-ICH's
    dict): decode_pixels without the frame."""
    return decode_pixels(pixels, input_hu, image_size)[:2]


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


def bone_in_frame(code, source, target):
    """The BONE bit of a neighbour's anatomy code (uint8 [S, S], made through Frame source) as Frame target, the
    slice's own, frames it (reframe; a pixel is bone when half of it is): what add_neighbour_bone reads."""
    if Frame(*(int(v) for v in source)) == Frame(*(int(v) for v in target)):
        return np.asarray(code)
    bone = reframe(((np.asarray(code) & BONE) > 0).astype(np.float32), source, target, 0.0) >= 0.5
    return bone.astype(np.uint8) * np.uint8(BONE)


def add_neighbour_bone(code, neighbours):
    """code (uint8 [S, S]) with its NEAR_BONE bit set where any of `neighbours` (the codes of the slices above and
    below it in the scan, those that decoded, in the slice's own frame: bone_in_frame) is bone, and cleared
    elsewhere."""
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


# A slice where what skull_ring leaves out of the skull (saturated, inside the mask) is more than this share of the
# intracranial mask is taken with saturated = bone after all: at the skull base the petrous bones, clinoids and
# sinus walls lie inside the ring, away from the outer table. On six CT-ICH patients exported at 40,80 that share was
# 0.002-0.05 on the slices from the lateral ventricles up and 0.1-0.9 on skull-base and face slices; on phantom bleeds
# at 40,80 (epidural, subdural, intraparenchymal) at most 0.015.
MAX_LOOSE_FRACTION = 0.1


def windowed_classes(image, low, high, bone_image=None):
    """tissue_classes of a pre-windowed image in [-1, 1] stored over [low, high] HU (CT-ICH's brain JPG, or a 2-D image
    in its stated window). The HU rules where the window shows them (bone >= SKULL_HU, tissue > TISSUE_HU, air/fat
    below NON_TISSUE_HU), else the window's edges: bone where it saturates (its top 2.5 %), tissue above its bottom
    5 %, non-tissue in its bottom 2.5 %: exactly brain_mask_from_windowed on CT-ICH's brain JPG (-20..100 HU). Where the
    window saturates blood too (top below BLOOD_SATURATES_HU), the skull is its ring (skull_ring), unless that leaves
    more than MAX_LOOSE_FRACTION of the mask saturated (the skull base). bone_image: CT-ICH's
    bone JPG, which must also say >= BONE_HU for the bone bit."""
    width = high - low
    level = lambda hu: (hu - low) / width * 2 - 1  # noqa: E731 (HU -> the image's units)
    top = min(SKULL_HU, low + 0.975 * width)
    saturated = image >= level(top)
    tissue = image > level(max(TISSUE_HU, low + 0.05 * width))
    non_tissue = image <= level(max(NON_TISSUE_HU, low + 0.025 * width))
    head = _fill_holes(_largest_component(~non_tissue | saturated))
    skull, inside = saturated, None
    if top < BLOOD_SATURATES_HU:
        skull = skull_ring(saturated, head)
        inside = intracranial_mask(skull, tissue)
        if (saturated & ~skull & inside).sum() > MAX_LOOSE_FRACTION * inside.sum():  # skull base: bone, not blood
            skull, inside = saturated, None
    inside = intracranial_mask(skull, tissue) if inside is None else inside
    bone = skull.copy()
    if bone_image is not None:
        b_low, b_high = JPG_WINDOWS["bone"]
        bone &= b_low + (bone_image + 1) / 2 * (b_high - b_low) >= BONE_HU
    elif top >= BONE_HU:  # the window shows the HU up to BONE_HU: the bone bit as for HU slices
        bone = image >= level(BONE_HU)
    return inside, bone, non_tissue, head


def tissue_classes(pixels):
    """(intracranial, bone, non_tissue, head): bool [H, W] each, of one decoded slice at its own resolution. HU
    slices: thresholds. Pre-windowed images (CT-ICH's JPGs, a Windowed 2-D image): windowed_classes of the brain JPG
    (with the bone JPG where read) or of the stated image."""
    if isinstance(pixels, dict):
        name = "brain" if "brain" in pixels else STATED
        low, high = windows_of(pixels)[name]
        return windowed_classes(pixels[name], low, high, pixels.get("bone") if name == "brain" else None)
    inside = brain_mask_from_hu(pixels)
    bone, non_tissue = pixels >= BONE_HU, pixels < NON_TISSUE_HU
    head = _fill_holes(_largest_component(~non_tissue | bone))
    return inside, bone, non_tissue, head


def anatomy_code(pixels, image_size, frame=None, classes=None):
    """uint8 [S, S] anatomy code (INTRACRANIAL | BONE | NON_TISSUE | HEAD bits) of one decoded slice, framed and resized
    like its input (frame: default padded to a square): the intracranial mask and the head as resize_mask (half a
    pixel), bone and non-tissue where PART_OF_PIXEL of a pixel is. classes: tissue_classes, where already made."""
    inside, bone, non_tissue, head = tissue_classes(pixels) if classes is None else classes
    fraction = _square_resize(np.stack([inside, bone, non_tissue, head]).astype(np.float32), image_size, 0.0, "area", frame)
    bits = (fraction[0] >= 0.5, fraction[1] >= PART_OF_PIXEL, fraction[2] >= PART_OF_PIXEL, fraction[3] >= 0.5)
    return sum(bit.astype(np.uint8) * value for bit, value in zip(bits, (INTRACRANIAL, BONE, NON_TISSUE, HEAD))).astype(np.uint8)


def nifti_slice_input(hu, input_hu, image_size, with_frame=False):
    """input_and_brain_mask of one NIfTI slice (decode_pixels with_frame), after the HU check every DICOM slice gets
    in hu_from_dicom."""
    check_plausible_hu(hu, True)
    result = decode_pixels(hu, input_hu, image_size)
    return result if with_frame else result[:2]


# ---------------------------------------------------------------------------------------------
# ground-truth bleed masks

def load_gt_mask(data_dir, image_id, image_size, frame=None):
    """Ground-truth bleed mask as bool [S, S] (framed and resized like the slice: frame, the slice's Frame as the slice
    cache records it, data.SliceCache.frame; default padded to a square, framing "none"), or None if there is none:
    the phantom's <data_dir>/masks/<id>.npy, or CT-ICH's Patients_CT/<pid>/brain/<n>_HGE_Seg.jpg. BadFile when a
    mask does not fit its slice (the caller counts it and leaves the slice out of the pixel metrics)."""
    if str(image_id).startswith("ctich_"):
        return _ctich_gt_mask(os.fspath(data_dir), str(image_id), image_size, frame)
    volume, k = split_slice_id(image_id)
    if k is not None:  # a slice of a NIfTI volume: "<volume>#<k>"
        slices = _nifti_mask_slices(os.fspath(data_dir), volume)
        return None if slices is None else resize_mask(slices[k], image_size, _checked(frame, slices[k].shape, image_id))
    path = os.path.join(os.fspath(data_dir), "masks", f"{image_id}.npy")
    if not os.path.exists(path):
        return None
    mask = np.load(path)
    return resize_mask(mask, image_size, _checked(frame, mask.shape, path))


def _checked(frame, shape, what):
    """frame, or BadFile when it was found on a slice of another shape than the mask's."""
    if frame is not None and (frame.height, frame.width) != tuple(shape):
        raise BadFile(f"{what}: mask of {shape[0]}x{shape[1]} pixels, its slice is {frame.height}x{frame.width}")
    return frame


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


def _ctich_gt_mask(data_dir, image_id, image_size, frame=None):
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
    return resize_mask(mask, image_size, frame)
