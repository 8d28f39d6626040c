"""Files -> pixels: a CT slice's Hounsfield units from DICOM (compressed, or without the preamble) or from a NIfTI
volume's axial slices, CT-ICH's already windowed JPGs, 2-D slice images (PNG/JPG, read_image), and the checks that make an unusable file a BadFile with its
reason. parallel_map reads many files in worker processes and counts the bad ones instead of stopping."""
import collections
import functools
import hashlib
import math
import multiprocessing
import os
import signal

import nibabel
import numpy as np
import pydicom
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from tqdm import tqdm


class BadFile(Exception):
    """A slice that cannot be used; the message is the reason ("category: detail")."""


MIN_SLICE_SIDE = 16  # pixels; real head CT is 512 (RSNA) or 650 (CT-ICH), the tests' phantoms 32 and up
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# reading many files: in worker processes, a bad file counted and named, never the end of a run

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


def one_line(error):
    return " ".join(f"{type(error).__name__}: {error}".split())


def _skip_bad(fn, item):
    try:
        return True, fn(item)
    except BadFile as error:
        return False, str(error)
    except Exception as error:  # a file nobody foresaw must not end an hours-long run: count it, name it, go on
        return False, f"unexpected error: {one_line(error)}"


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
# DICOM -> Hounsfield units

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
        raise BadFile(f"{unreadable}: {one_line(error)}")
    try:
        ds = pydicom.dcmread(path, force=True, **kwargs)
    except Exception as error:
        raise BadFile(f"{unreadable}: {one_line(error)}")
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


GEOMETRY_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"]


def read_geometry(path):
    """(ImagePositionPatient [3], ImageOrientationPatient [6], PixelSpacing [row, column], (Rows, Columns)) of one
    DICOM slice, in mm, or None when the header lacks one of them."""
    try:
        ds = read_dicom(path, "unreadable DICOM header", stop_before_pixels=True, specific_tags=GEOMETRY_TAGS)
        values = [np.array(ds[name].value, np.float64) for name in GEOMETRY_TAGS[:3]]
        shape = (int(ds.Rows), int(ds.Columns))
    except (BadFile, KeyError, TypeError, ValueError):
        return None
    if [len(v) for v in values] != [3, 6, 2] or not all(np.isfinite(v).all() for v in values):
        return None
    return (*values, shape)


MAX_TILT_DEGREES = 0.1  # slice direction off the orientation normal: more is a gantry tilt (dcm2niix also ~0.1 deg)
MAX_SPACING_SPREAD = 0.01  # relative: slice distances differing by more are uneven (a missing or stray slice)


def series_affine(geometries):
    """(NIfTI affine (RAS+, mm), None) of a DICOM series' volume stored as [columns, rows, slices] in the given slice
    order, as dcm2niix builds it: the columns of the DICOM (LPS) affine are the row direction x column spacing, the
    column direction x row spacing and the step between slice positions, its origin the first slice's position;
    LPS -> RAS flips x and y. (None, the reason) when no single affine describes the series: a slice without
    geometry, slices of other size, orientation or pixel spacing, a gantry tilt (slices stacked off the orientation
    normal) or uneven spacing; a wrong affine would put the map beside the anatomy in a viewer."""
    if len(geometries) < 2 or any(g is None for g in geometries):
        return None, ("a single slice has no slice direction" if len(geometries) < 2 else
                      "a slice lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
    positions = np.array([g[0] for g in geometries])
    orientation, spacing = geometries[0][1], geometries[0][2]
    if any(g[3] != geometries[0][3] or not np.allclose(g[1], orientation, atol=1e-4) or not np.allclose(g[2], spacing)
           for g in geometries):
        return None, "its slices differ in size, orientation or pixel spacing"
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    steps = np.diff(positions, axis=0)
    distances = steps @ normal
    if (distances <= 0).any() and (distances >= 0).any():
        return None, "its slice positions are not in one order along the slice normal (a repeated or stray slice?)"
    mean_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    tilt = np.degrees(np.arccos(min(1.0, abs(mean_step @ normal) / np.linalg.norm(mean_step))))
    if tilt > MAX_TILT_DEGREES:
        return None, f"gantry tilt of {tilt:.1f} degrees (slices not stacked along the orientation normal)"
    if np.ptp(distances) > MAX_SPACING_SPREAD * abs(distances.mean()):
        return None, (f"uneven slice spacing ({abs(distances).min():.3g} to {abs(distances).max():.3g} mm: a missing "
                      "or stray slice?)")
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_direction * spacing[1], column_direction * spacing[0]
    lps[:3, 2], lps[:3, 3] = mean_step, positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, None


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
    complete_pixel_module(ds)
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as error:
        raise BadFile(f"truncated or undecodable pixel data: {ds.file_meta.TransferSyntaxUID.name}: {one_line(error)}")
    if pixels.ndim != 2:
        raise BadFile(f"pixel array of shape {pixels.shape}, not one 2-D slice")
    try:
        slope = header_number(ds, "RescaleSlope", 1.0)
        intercept = header_number(ds, "RescaleIntercept", 0.0)
    except (TypeError, ValueError) as error:
        raise BadFile(f"unreadable RescaleSlope/RescaleIntercept: {one_line(error)}")
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


def complete_pixel_module(ds):
    """Fill in the Image Pixel elements an ACR-NEMA-era file may lack (the old standard did not require them, and
    pydicom needs every one to decode), from what the file itself implies; BadFile where it implies nothing certain.
    - BitsAllocated and SamplesPerPixel: from the length of uncompressed pixel data over Rows x Columns (2 bytes a
      pixel: one 16-bit sample, 1 byte: one 8-bit sample; anything else is no CT slice);
    - PhotometricInterpretation: MONOCHROME2 for one sample (CT is grey by definition);
    - BitsStored: BitsAllocated; HighBit: BitsStored - 1;
    - PixelRepresentation: unsigned (ACR-NEMA's default), unless 16-bit values with the sign bit set are common
      (over 0.5 % of pixels): unsigned they would be above 31,000 HU, signed they are the padding of negative HU."""
    rows, columns = int(header_number(ds, "Rows", 0)), int(header_number(ds, "Columns", 0))
    missing = [name for name in ("BitsAllocated", "SamplesPerPixel") if name not in ds]
    if missing:
        if _is_encapsulated(ds):
            raise BadFile(f"compressed pixel data without {' and '.join(missing)}: cannot tell how to decode it")
        n = rows * columns
        per_pixel = {n: 1, n + n % 2: 1, 2 * n: 2}.get(len(ds.PixelData)) if n else None  # odd lengths are padded
        samples = int(header_number(ds, "SamplesPerPixel", 1))
        bits = int(header_number(ds, "BitsAllocated", 8 * (per_pixel or 2)))
        if per_pixel is None or samples != 1 or per_pixel * 8 != bits:
            raise BadFile(f"no {' or '.join(missing)}, and {len(ds.PixelData)} bytes of pixel data for {rows} x {columns} "
                          "pixels fit no single-sample slice")
        ds.BitsAllocated, ds.SamplesPerPixel = bits, samples
    if "PhotometricInterpretation" not in ds and int(ds.SamplesPerPixel) == 1:
        ds.PhotometricInterpretation = "MONOCHROME2"
    if "BitsStored" not in ds:
        ds.BitsStored = int(ds.BitsAllocated)
    if "HighBit" not in ds:
        ds.HighBit = int(ds.BitsStored) - 1
    if "PixelRepresentation" not in ds:
        ds.PixelRepresentation = 0
        if int(ds.BitsAllocated) == 16 and int(ds.BitsStored) == 16 and not _is_encapsulated(ds):
            little = ds.file_meta.TransferSyntaxUID.is_little_endian
            raw = np.frombuffer(bytes(ds.PixelData)[:2 * rows * columns], "<u2" if little else ">u2")
            ds.PixelRepresentation = int(np.mean(raw >= 32768) > 0.005)


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


SOFT_TISSUE_HU = (-100, 100)  # fat, CSF, brain, blood, scalp: most of a head inside its skull and around it


def check_plausible_hu(hu, has_intercept):
    """BadFile for HU that no head CT has: a wrong slope/intercept (or an image that is not in HU) puts the slice
    far outside the CT range, and windowing would turn it into a flat square or noise.
    - mostly outside -1100..3000 HU: padding outside the field of view (-2000 or -3024 HU on many scanners)
      covers at most ~21 % of a slice, so a real slice is mostly inside;
    - over 5 % above 3000 HU: denser than any bone, more than metal implants cover; typically signed pixels
      read as unsigned (negative padding turned into ~63000);
    - no air (under 1 % below -200 HU): a head CT shows the air around the head; typically pixels stored as
      HU + 1024 without their RescaleIntercept, so air reads ~0 and brain ~1060;
    - soft tissue at +1024 HU: more of the slice in 924..1124 HU (brain, blood, scalp moved up by 1024) than in
      air (-1100..-200 HU), and at least 5 %: the same HU + 1024 file when its padding outside the field of view
      (below -1100 HU) passed as air above. A head CT is mostly 0-80 HU soft tissue in air; on real slices (CQ500,
      the phantom) air is 29 % or more of the pixels and 924..1124 HU (dense bone) 2.5 % or less."""
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
    air_in_range = np.mean((hu >= -1100) & (hu < -200))
    shifted_tissue = np.mean((hu >= SOFT_TISSUE_HU[0] + 1024) & (hu <= SOFT_TISSUE_HU[1] + 1024))
    if shifted_tissue >= 0.05 and shifted_tissue > air_in_range:
        hint = "check RescaleIntercept" if has_intercept else "stored as HU + 1024 without RescaleIntercept?"
        raise BadFile(f"implausible HU values: soft tissue at +1024 HU ({shifted_tissue:.0%} of pixels in "
                      f"{SOFT_TISSUE_HU[0] + 1024}..{SOFT_TISSUE_HU[1] + 1024} HU, {air_in_range:.0%} air in -1100..-200 HU); {hint}")


def installed_decoders():
    """Which compressed transfer syntaxes pydicom can decode here, as a string of 0/1: installing a decoder
    changes it, so an index that left those files out is built again."""
    def available(syntax):
        try:
            return get_decoder(syntax).is_available
        except NotImplementedError:
            return False
    return "".join("1" if available(syntax) else "0" for syntax in sorted(DECODER_PACKAGES))


# ---------------------------------------------------------------------------------------------
# CT-ICH JPG -> windowed image

def read_jpg(path):
    """uint8 2-D grayscale image; BadFile when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except (OSError, SyntaxError, ValueError) as error:  # PIL: unidentified, truncated or broken JPGs
        raise BadFile(f"unreadable JPG: {one_line(error)}")


def check_jpg(path):
    """Header-only check of a JPG (the CT-ICH counterpart of read_header)."""
    return check_image(path, kind="JPG")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # the 2-D image layout's slices (PIL reads them)


def grey_levels(values, mode):
    """An image's pixels as float32 grey levels in [0, 1]: 8-bit over 255, 16-bit over 65535 (PIL's "I;16" modes;
    a 32-bit "I" image is taken as 16-bit), a float image as stored, clipped to [0, 1]."""
    values = np.asarray(values)
    if values.dtype == np.uint8 or mode in ("L", "P", "1"):
        return values.astype(np.float32) / 255
    if mode.startswith("I") or values.dtype.kind in "iu":
        return np.clip(values.astype(np.float32) / 65535, 0, 1)
    return np.clip(values.astype(np.float32), 0, 1)


def read_image(path):
    """One 2-D slice image (PNG, JPG, TIFF, BMP; 8- or 16-bit grey, RGB or RGBA) as float32 grey levels [H, W] in
    [0, 1]. An RGB image whose channels are equal (a grey image saved as colour) gives that channel; otherwise its
    luminance (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B). Alpha is ignored. BadFile when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("P", "PA", "LA", "1"):
                image = image.convert("RGBA" if image.mode in ("P", "PA") else "L")
            values, mode = np.asarray(image), image.mode
    except (OSError, SyntaxError, ValueError) as error:  # PIL: unidentified, truncated or broken images
        raise BadFile(f"unreadable image: {one_line(error)}")
    if values.ndim == 3:
        rgb = values[..., :3].astype(np.float32)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return grey_levels(values[..., 0], "L" if values.dtype == np.uint8 else "I")
        luminance = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        return grey_levels(luminance.astype(np.float32) / (255 if values.dtype == np.uint8 else 65535), "F")
    if values.ndim != 2:
        raise BadFile(f"unreadable image: {values.ndim}-D pixel array")
    return grey_levels(values, mode)


def check_image(path, kind="image"):
    """Header-only check of a 2-D slice image: (width, height); BadFile ("unreadable <kind>") when it cannot be
    opened."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as error:  # PIL: unidentified, truncated or broken files
        raise BadFile(f"unreadable {kind}: {one_line(error)}")


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


def source_identity(path, content=False):
    """(size, mtime_ns, content hash) of the file(s) a slice is decoded from (a CT-ICH slice: its brain and bone
    JPG), or None when a file cannot be read. The hash (blake2b of the bytes, as an int64) is computed only with
    content=True (--verify_cache: for copies that keep sizes and modification times), else 0. A cache row is served
    only while this is what it was when the row was decoded."""
    paths = [path]
    if path.endswith(".jpg"):
        bone = os.path.join(os.path.dirname(os.path.dirname(path)), "bone", os.path.basename(path))
        paths += [bone] if os.path.exists(bone) else []
    try:
        stats = [os.stat(p) for p in paths]
        digest = content_hash(paths) if content else 0
    except OSError:
        return None
    return sum(s.st_size << (32 * k) for k, s in enumerate(stats)), max(s.st_mtime_ns for s in stats), digest


def content_hash(paths):
    """blake2b of the files' bytes as a nonzero int64 (0 means "not hashed")."""
    digest = hashlib.blake2b(digest_size=8)
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return int.from_bytes(digest.digest(), "little", signed=True) or 1


# ---------------------------------------------------------------------------------------------
# NIfTI volume -> axial slices of Hounsfield units

def is_nifti(path):
    return str(path).endswith((".nii", ".nii.gz"))


def nifti_name(filename):
    """A volume's name: the file name without .nii / .nii.gz."""
    return filename[:-7] if filename.endswith(".nii.gz") else filename[:-4]


def load_nifti(path, mask=False):
    """(nibabel image, its 3-D values): HU as float32 with the header's scl_slope / scl_inter applied (get_fdata),
    or for a mask the stored values. BadFile when the file cannot be read or is not one 3-D volume."""
    try:
        image = nibabel.load(path)
        values = np.asanyarray(image.dataobj) if mask else image.get_fdata(dtype=np.float32)
        io_orientation(image.affine)  # a degenerate affine fails here, not half-way through a run
    except Exception as error:  # nibabel raises many types on damaged files; all mean "unusable"
        raise BadFile(f"unreadable NIfTI: {one_line(error)}")
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


def read_nifti_slices(path, numbers):
    """HU float32 [len(numbers), H, W] of the given axial slices (axial_slices' numbering) of one CT volume,
    read once for all of them."""
    image, hu = load_nifti(path)
    slices, _ = axial_slices(hu, image.affine)
    if numbers and max(numbers) >= len(slices):
        raise BadFile(f"NIfTI volume has {len(slices)} axial slices, slice {max(numbers)} asked for (file changed?)")
    return slices[list(numbers)]
