"""The head's own midline in an axial slice, and mirror images about it (--asymmetry).

Most bleeds are one-sided, while much of what a healthy head's map gets wrong (the skull base, the ventricles, the
falx) is close to a mirror image of itself. The mirror line is the head's, not the image's: a line through the
centroid of the intracranial mask at the angle (within MAX_TILT_DEGREES of the image's vertical axis) at which the
mask best overlaps its own reflection. Patients lie tilted in the gantry and exports crop off-centre, so the image
centre is not the midline.

Torch-free: numpy and scipy.ndimage.
"""
import numpy as np
import scipy.ndimage

MAX_TILT_DEGREES = 25  # a head rolled further than this in the slice plane is rare; the search covers +-25 deg
ANGLE_STEP = 1.0  # degrees
MIN_PIXELS = 50  # an intracranial mask smaller than this (the vertex, a neck slice) has no midline worth finding


def reflect(points, centre, angle):
    """points [N, 2] (row, col) reflected about the line through centre at `angle` radians from the image's vertical
    (row) axis."""
    u = np.array([np.cos(angle), np.sin(angle)])
    d = points - centre
    return centre + 2 * (d @ u)[:, None] * u - d


def find_midline(mask):
    """(centre (row, col), angle in radians) of the mirror line of a bool mask [H, W], or None where the mask is too
    small. The angle maximises the share of the mask's pixels whose reflection lands inside the mask."""
    points = np.argwhere(mask).astype(np.float64)
    if len(points) < MIN_PIXELS:
        return None
    centre = points.mean(axis=0)
    best, best_overlap = 0.0, -1.0
    h, w = mask.shape
    # nearest the vertical first, so that of equally good angles (a round mask) the least tilted wins
    for degrees in sorted(np.arange(-MAX_TILT_DEGREES, MAX_TILT_DEGREES + ANGLE_STEP / 2, ANGLE_STEP), key=abs):
        angle = np.deg2rad(degrees)
        r = np.rint(reflect(points, centre, angle)).astype(np.int64)
        ok = (r[:, 0] >= 0) & (r[:, 0] < h) & (r[:, 1] >= 0) & (r[:, 1] < w)
        overlap = mask[r[ok, 0], r[ok, 1]].sum() / len(points)
        if overlap > best_overlap + 1e-12:
            best, best_overlap = angle, overlap
    return centre, best


def mirrored(image, midline):
    """image [H, W] reflected about midline (find_midline's), bilinear; pixels whose mirror falls outside the image
    keep their own value (so they add no asymmetry)."""
    h, w = image.shape
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2).astype(np.float64)
    source = reflect(grid, *midline).T.reshape(2, h, w)
    out = scipy.ndimage.map_coordinates(image, source, order=1, mode="constant", cval=np.nan)
    return np.where(np.isnan(out), image, out).astype(image.dtype)


def asymmetry(error_map, mask, midline=False):
    """What the map holds that its mirror image about the head's midline does not: max(map - mirrored map, 0), [H, W];
    where no midline is found (a tiny mask), the map itself. midline: find_midline(mask) where the caller has it."""
    midline = find_midline(mask) if midline is False else midline
    if midline is None:
        return error_map
    return np.maximum(error_map - mirrored(error_map, midline), 0)
