"""Anomaly maps as DICOM objects a radiology viewer opens (OHIF, a PACS, 3D Slicer's DICOM module), built with highdicom
from the source series' own datasets: a Parametric Map (the map, float, one frame per source slice) and a Segmentation
(the map above a threshold), both referencing the source series, in its frame of reference, each frame at its source
slice's position and orientation (so a gantry-tilted or unevenly spaced series needs no common affine). No project
imports: predict.py hands it the files and the maps.
"""
import warnings

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import highdicom as hd

SOFTWARE = "ct-pddpm"
SERIES_NUMBERS = {"map": 9101, "seg": 9102}  # the derived series, after the scanner's own numbers


def _equipment():
    return {"manufacturer": SOFTWARE, "manufacturer_model_name": "pDDPM anomaly map", "software_versions": SOFTWARE,
            "device_serial_number": "0"}


# Type 2 attributes (present, possibly empty) that the derived objects copy from their sources; anonymised exports
# (RSNA's) leave many of them out altogether
COPIED_EMPTY_IF_MISSING = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                           "AccessionNumber", "ReferringPhysicianName")


def read_sources(paths):
    """The source slices' datasets without their pixel data (what highdicom needs: UIDs, geometry, patient), with
    what an anonymised export left out filled in on these copies (never in the files): the type 2 attributes empty,
    and a frame of reference, where the series has none, made from its SeriesInstanceUID (one for all its slices)."""
    sources = [pydicom.dcmread(path, stop_before_pixels=True, force=True) for path in paths]
    for ds in sources:
        for keyword in COPIED_EMPTY_IF_MISSING:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if "FrameOfReferenceUID" not in ds:
            ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), "frame of reference"])
    return sources


def parametric_map(sources, maps, description):
    """A Parametric Map of maps [slices, rows, columns] (float32, on each source slice's own pixels, in the sources'
    order), unit-less values: the pDDPM reconstruction error as scored."""
    top = float(max(np.max(maps), 1e-6))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="anomaly", lut_explanation=description[:64], unit=codes.UCUM.NoUnits, value_range=(0.0, top),
        slope=1, intercept=0)
    window = hd.VOILUTTransformation(window_center=top / 2, window_width=top, window_explanation="the whole map")
    return hd.pm.ParametricMap(
        source_images=sources, pixel_array=np.asarray(maps, np.float32), series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBERS["map"], sop_instance_uid=generate_uid(), instance_number=1,
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping], voi_lut_transformations=[window],
        content_description=description[:64], content_label="ANOMALY", **_equipment())


def segmentation(sources, mask, label):
    """A binary Segmentation of mask [slices, rows, columns] (bool), one segment: what the map marks as anomalous."""
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=SOFTWARE, version=SOFTWARE, family=codes.cid7162.ArtificialIntelligence))
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=np.asarray(mask, bool), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=generate_uid(), instance_number=1, omit_empty_frames=False, **_equipment())


def map_and_seg(paths, maps, threshold, description):
    """The Parametric Map and (with a threshold) the Segmentation of the map above it, for the series of `paths` (its
    slices, in the order of maps [slices, rows, columns]). -> {"map": dataset, "seg": dataset or None}."""
    sources = read_sources(paths)
    with warnings.catch_warnings():  # highdicom's notes on the sources' own values (e.g. a PatientName's form)
        warnings.simplefilter("ignore")
        seg = None
        if threshold is not None:
            seg = segmentation(sources, np.asarray(maps) > threshold, f"anomaly map above {threshold:.4g}")
        return {"map": parametric_map(sources, maps, description), "seg": seg}
