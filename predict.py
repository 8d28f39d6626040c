"""Score new, unlabelled head CT with a trained checkpoint: slice and scan scores, overlays, the anomaly maps.

    python predict.py --checkpoint runs/scratch/best_model.pt --data_dir new_scans/ --output_dir predictions/

--data_dir holds DICOM files (any names, any folder depth, compressed or not, with or without the preamble;
grouped into scans by SeriesInstanceUID and ordered by slice position) and/or NIfTI volumes (*.nii, *.nii.gz: one
volume is one scan; where the folder has a NIfTI layout with masks, only its CT folder is read). No labels are read.
Each scan is scored as evaluate.py scores a split, by the one scoring path (scoring.score_split), with the training
run's scoring settings or the flags given here (every scoring flag means what it means in evaluate.py); slices with
less brain than the run's --min_brain_fraction are left unscored. Inputs are made in the checkpoint's own input
representation (the windows the model was trained on), whatever the layout of --data_dir. A scan's score is the max of its slice scores, as evaluate.py's scan
metric. Scores are relative: compare them between scans scored by the same checkpoint.

Writes into --output_dir (refused if it holds files, unless --overwrite):
  slices.csv            one row per slice: scan, slice (0 = lowest), z (mm), source, brain fraction, every score
  scans.csv             one row per scan, highest score first: scan, slices, score, top slice, source
  overlays/<scan>.png   the scan's --top highest-scoring slices, the anomaly map over the brain window
  maps/<scan>.nii.gz    NIfTI input: the anomaly map, float32, with the input's shape and affine (opens on the CT in
                        any NIfTI viewer)
  maps/<scan>.npy       DICOM input: the anomaly maps, float32 [slices, rows, columns] on each slice's own pixels,
                        in slices.csv order (lowest slice first); a series whose slices differ in size gets
                        maps/<scan>.npz instead, one array per slice (slice_0000, ...)
  maps/<scan>.nii.gz    DICOM input too, where one affine describes the series: the same maps on the series' own
                        voxel grid, with the affine from its headers (as dcm2niix builds it), so they open over the
                        series in 3D Slicer / ITK-SNAP; a gantry-tilted or unevenly spaced series gets a note in
                        scans.csv and on stdout instead, never a wrong affine
  maps/<scan>_map.dcm   DICOM input: a DICOM Parametric Map of the same maps (float), one frame per decoded source
                        slice at its position, referencing the source series (highdicom): opens over the series in
                        3D Slicer's DICOM module, OHIF or a PACS, tilted series included
  maps/<scan>_seg.dcm   DICOM input: a DICOM Segmentation of the map above the run's threshold (TrainedRun.map_threshold:
                        the reference's brain_p99 mean + 2 std); none where the run has no reference at hand
The maps are the ones the slice scores saw (median-filtered with --median_size), 0 where a slice was not scored.
"""
import argparse
import csv
import functools
import gzip
import io
import os
import re
import time
import warnings

import nibabel
import numpy as np

import cohort
import data
import dicom_outputs
import inputs
import models
import plots
import readers
import runfiles
import scoring
import trained

NOT_DICOM = (".csv", ".json", ".txt", ".md", ".png", ".jpg", ".jpeg", ".npy", ".npz", ".pt", ".zip", ".gz", ".xml", ".html")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    trained.add_run_flags(p, "a .pt written by train.py (best_model.pt, ...), or a CV run folder (train.py --folds): its "
                             "fold models as one (the mean of their z-scored slice scores)")
    p.add_argument("--data_dir", required=True, help="DICOM series and/or NIfTI volumes, no labels needed")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="write into an --output_dir that already holds files")
    p.add_argument("--top", type=int, default=4, help="highest-scoring slices shown per scan in overlays/")
    p.add_argument("--num_workers", type=int, default=readers.DEFAULT_WORKERS, help="processes reading DICOM headers and slices")
    scoring.add_scoring_flags(p.add_argument_group("anomaly scoring (default: the training run's values)"), from_checkpoint=True)
    args = p.parse_args(argv)
    if args.top < 0:
        raise SystemExit(f"error: --top {args.top}: must be 0 or more")
    return args


# ---------------------------------------------------------------------------------------------
# finding the scans

def find_files(data_dir):
    """(NIfTI volume paths, other file paths) under data_dir, sorted; hidden files and folders (the caches) are left
    out, and in a NIfTI layout with masks only the CT folder is read."""
    layout = cohort.nifti_folders(data_dir)
    if layout:
        folder = os.path.join(data_dir, layout[0])
        return sorted(os.path.join(folder, name) for name in os.listdir(folder) if readers.is_nifti(name)), []
    volumes, others = [], []
    for root, folders, names in os.walk(data_dir):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            if readers.is_nifti(name):
                volumes.append(path)
            elif not name.lower().endswith(NOT_DICOM):
                others.append(path)
    return sorted(volumes), sorted(others)


def dicom_series(paths, num_workers):
    """{series UID: [(z, file path)] ordered by slice position} from the headers of the DICOM files among `paths`;
    files that are no usable CT slice are counted. -> (series, skips)."""
    found, skips = {}, []
    read = functools.partial(readers.read_header, need_patient=False)
    for path, (ok, result) in zip(paths, readers.parallel_map(read, paths, num_workers, "headers")):
        if ok:
            _, _, series, z = result
            found.setdefault(series, []).append((z, path))
        else:
            skips.append((path, result))
    return {series: sorted(files) for series, files in found.items()}, skips


def scan_name(text, used):
    """A file-name-safe, unique name for a scan's outputs."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "scan"
    unique, n = name, 1
    while unique in used:
        n += 1
        unique = f"{name}_{n}"
    used.add(unique)
    return unique


# ---------------------------------------------------------------------------------------------
# decoding and scoring one scan

def decode_dicom(path, input_hu, image_size):
    """(model input, brain mask, its inputs.Frame: the square of the slice's own [H, W] pixels the input was made
    from, which maps its anomaly map back) of one DICOM slice, as the slice cache has it."""
    with warnings.catch_warnings():  # pydicom's warnings on odd files: such a file is kept or skipped, and counted
        warnings.simplefilter("ignore")
        hu = readers.hu_from_dicom(path)
    return inputs.decode_pixels(hu, input_hu, image_size)


def decode_scan(scan, input_hu, image_size, num_workers):
    """[(source, z, (input, brain mask, inputs.Frame) or a BadFile reason)] for the slices of one scan, lowest first,
    in the model's input representation and framing input_hu."""
    if scan["kind"] == "nifti":
        image, hu = readers.load_nifti(scan["path"])  # BadFile: the caller counts the whole volume
        slices, z = readers.axial_slices(hu, image.affine)
        out = []
        for k, (one, height) in enumerate(zip(slices, z)):
            source = cohort.slice_id(os.path.basename(scan["path"]), k)
            try:
                out.append((source, float(height), inputs.nifti_slice_input(one, input_hu, image_size, with_frame=True)))
            except readers.BadFile as error:
                out.append((source, float(height), str(error)))
        return out
    decode = functools.partial(decode_dicom, input_hu=input_hu, image_size=image_size)
    paths = [path for _, path in scan["files"]]
    results = readers.parallel_map(decode, paths, num_workers, "decode")
    return [(path, z, result) for (z, path), (ok, result) in zip(scan["files"], results)]


def score_scan(run, rows, n_slices, offset):
    """Score a scan's decoded slices (rows with input and brain mask) as one scan, by every model of the run
    (TrainedRun.score_dataset: scoring.score_split, then the fold models on one scale and averaged): noise positions
    offset + slice number, relative heights over all of the scan's slices.
    -> (maps float32 [N, S, S] as scored, {score name: float64 [N]}) in row order."""
    heights = cohort.relative_heights({"scan": np.zeros(n_slices)})
    scan = data.ArrayDataset([row["input"] for row in rows], [row["brain"] for row in rows],
                             [offset + row["slice"] for row in rows], np.zeros(len(rows), np.int64),
                             heights[[row["slice"] for row in rows]], frames=[row["frame"] for row in rows])
    result = run.score_dataset(scan)  # rows are in slice order, so in position order too
    return result["maps"], result["scores"]


# ---------------------------------------------------------------------------------------------
# writing

def write_csv(path, header, rows):
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    runfiles.write_atomically(path, lambda f: f.write(text.getvalue().encode()))


def save_maps(path_stem, scan, slice_maps):
    """The scan's maps. NIfTI input: a NIfTI volume on the input's voxels. DICOM input: a .npy [slices, H, W], and
    a NIfTI volume on the series' own voxel grid with the affine from its headers (readers.series_affine) where one
    affine describes the series. -> (paths written, a note on why no NIfTI was written, or "")."""
    if scan["kind"] == "nifti":
        image = nibabel.load(scan["path"])
        volume = readers.nifti_volume(np.stack(slice_maps), image.affine)
        return [write_nifti(path_stem, volume.reshape(image.shape[:3]), image.affine)], ""
    if len({m.shape for m in slice_maps}) > 1:  # slices of different sizes in one series: one array per slice
        arrays = {f"slice_{k:04d}": m.astype(np.float32) for k, m in enumerate(slice_maps)}
        runfiles.write_atomically(path_stem + ".npz", lambda f: np.savez_compressed(f, **arrays))
        return [path_stem + ".npz"], "no NIfTI map: its slices differ in size"
    runfiles.write_atomically(path_stem + ".npy", lambda f: np.save(f, np.stack(slice_maps).astype(np.float32)))
    affine, why_not = readers.series_affine([readers.read_geometry(path) for _, path in scan["files"]])
    if affine is None:
        return [path_stem + ".npy"], f"no NIfTI map: {why_not}"
    return [write_nifti(path_stem, np.stack(slice_maps).transpose(2, 1, 0), affine), path_stem + ".npy"], ""


def save_dicom_maps(path_stem, scan, rows, slice_maps, threshold):
    """DICOM input: the maps as a Parametric Map and (with a threshold) a Segmentation referencing the source series
    (dicom_outputs), over the slices that decoded. -> (paths written, a note on what was not written, or "")."""
    kept = [k for k, row in enumerate(rows) if "shape" in row]
    if scan["kind"] != "dicom" or not kept or len({slice_maps[k].shape for k in kept}) > 1:
        return [], "" if scan["kind"] != "dicom" else "no DICOM maps: its slices differ in size or none decoded"
    try:
        objects = dicom_outputs.map_and_seg([scan["files"][k][1] for k in kept], np.stack([slice_maps[k] for k in kept]),
                                            threshold, "pDDPM anomaly map (ct-pddpm)")
    except (ValueError, TypeError, AttributeError) as error:  # a header highdicom cannot derive from
        return [], f"no DICOM maps: {readers.one_line(error)}"
    written = []
    for kind, dataset in objects.items():
        if dataset is not None:
            written.append(f"{path_stem}_{kind}.dcm")
            runfiles.write_atomically(written[-1], lambda f, ds=dataset: ds.save_as(f))
    return written, "" if threshold is not None else "no DICOM SEG: no reference to threshold the map against"


def write_nifti(path_stem, volume, affine):
    """A float32 NIfTI volume, gzipped, written atomically. -> its path."""
    out = nibabel.Nifti1Image(np.asarray(volume, np.float32), affine)
    out.set_data_dtype(np.float32)
    runfiles.write_atomically(path_stem + ".nii.gz", lambda f: f.write(gzip.compress(out.to_bytes(), compresslevel=6)))
    return path_stem + ".nii.gz"


def overlay(path, scan, rows, top, settings):
    """The scan's `top` highest-scoring slices with their maps (plots.plot_overlays)."""
    ranked = sorted(rows, key=lambda row: -row["score"])[:top]
    if not ranked:
        return
    examples = {"highest-scoring": [{"image": row["input"][0], "map": row["map"], "brain_mask": inputs.intracranial(row["brain"]),
                                     "gt_mask": None, "score": row["score"], "id": f"slice {row['slice']}", "position": row["slice"]}
                                    for row in ranked]}
    plots.plot_overlays(path, examples, title=f"{scan['name']}: scan score {ranked[0]['score']:.4g} ({settings.score})",
                           label=scoring.map_label(settings),
                           legend="the scan's highest-scoring slices (no labels: a high score is a place to look, not a "
                                  "finding); dashed white = brain mask")


# ---------------------------------------------------------------------------------------------
# one scan, all scans

def predict_scan(trained_run, scan, offset):
    """Decode and score one scan. -> (slice rows, the full-size maps in slice order). A slice row: slice, z, source,
    brain fraction, scores (None when not scored), note, and for scored slices the input / map / brain mask that the
    overlays show. Noise seeds come from `offset` + slice number, so each slice of a run has its own."""
    run = trained_run.run
    decoded = decode_scan(scan, trained_run.folds[0].diffusion.input_hu, run.image_size, run.num_workers)
    rows, scored = [], []
    for k, (source, z, result) in enumerate(decoded):
        row = {"slice": k, "z": z, "source": source, "brain_fraction": None, "scores": None, "note": ""}
        if isinstance(result, str):
            row["note"] = result
        else:
            row["input"], row["brain"], row["frame"] = result
            row["shape"] = (row["frame"].height, row["frame"].width)
            row["brain_fraction"] = float(np.mean(inputs.intracranial(row["brain"])))
            if row["brain_fraction"] >= run.min_brain_fraction:
                scored.append(row)
            else:
                row["note"] = f"not scored: brain fraction under {run.min_brain_fraction}"
        rows.append(row)
    if scored:
        maps, scores = score_scan(trained_run, scored, len(rows), offset)
        for i, row in enumerate(scored):
            row["map"], row["scores"] = maps[i], {name: float(values[i]) for name, values in scores.items()}
            row["score"] = row["scores"][trained_run.settings.score]
    common = next((row["shape"] for row in rows if "shape" in row), (1, 1))
    # each map back onto its slice's own pixels through the frame its input was made with (framing none or head)
    full = [inputs.to_slice_shape(row["map"], row["frame"]) if "map" in row else np.zeros(row.get("shape", common), np.float32)
            for row in rows]
    return rows, full


def find_scans(data_dir, num_workers):
    """The scans under data_dir: NIfTI volumes, and DICOM series (grouped by SeriesInstanceUID, slices by position),
    each with a unique file-name-safe name. -> (scans, skipped files)."""
    volumes, others = find_files(data_dir)
    series, skips = dicom_series(others, num_workers) if others else ({}, [])
    used = set()
    scans = [{"kind": "nifti", "path": path, "name": scan_name(readers.nifti_name(os.path.basename(path)), used)}
             for path in volumes]
    scans += [{"kind": "dicom", "files": files, "name": scan_name(uid, used)} for uid, files in sorted(series.items())]
    if not scans:
        raise SystemExit(cohort.nothing_usable(data_dir, skips) if skips else f"error: {data_dir}: no DICOM or NIfTI files found")
    return scans, skips


def write_scan(trained_run, args, scan, rows, full, threshold):
    """One scored scan's maps (maps/), overlay (overlays/), and its rows of scans.csv and slices.csv."""
    stem = os.path.join(args.output_dir, "maps", scan["name"])
    maps, map_note = save_maps(stem, scan, full)
    dicom_maps, dicom_note = save_dicom_maps(stem, scan, rows, full, threshold)
    maps, map_note = maps + dicom_maps, "; ".join(note for note in (map_note, dicom_note) if note)
    if map_note:
        print(f"note: {scan['name']}: {map_note}")
    scored = [row for row in rows if row["scores"]]
    overlay(os.path.join(args.output_dir, "overlays", f"{scan['name']}.png"), scan, scored, args.top, trained_run.settings)
    top = max(scored, key=lambda row: row["score"]) if scored else None
    source = scan["path"] if scan["kind"] == "nifti" else os.path.dirname(scan["files"][0][1])
    scan_row = [scan["name"], scan["kind"], len(rows), len(scored), f"{top['score']:.6g}" if top else "",
                top["slice"] if top else "", f"{top['z']:.6g}" if top else "", source, ";".join(maps), map_note]
    slice_rows = [[scan["name"], row["slice"], f"{row['z']:.6g}", row["source"],
                   "" if row["brain_fraction"] is None else f"{row['brain_fraction']:.4f}",
                   *[f"{row['scores'][name]:.6g}" if row["scores"] else "" for name in scoring.SCORES], row["note"]]
                  for row in rows]
    return scan_row, slice_rows


def predict(trained_run, args):
    """Every scan under --data_dir -> slices.csv, scans.csv, overlays/, maps/. -> the scan rows."""
    scans, skips = find_scans(args.data_dir, trained_run.run.num_workers)
    threshold = trained_run.map_threshold() if any(scan["kind"] == "dicom" for scan in scans) else None
    slice_rows, scan_rows, offset = [], [], 0
    for scan in scans:
        try:
            rows, full = predict_scan(trained_run, scan, offset)
        except readers.BadFile as error:  # a NIfTI volume that cannot be read at all
            skips.append((scan["path"], str(error)))
            continue
        offset += len(rows)
        scan_row, rows_of_slices = write_scan(trained_run, args, scan, rows, full, threshold)
        scan_rows.append(scan_row)
        slice_rows += rows_of_slices
    readers.report_skips("predict", skips)
    if not scan_rows:
        raise SystemExit(cohort.nothing_usable(args.data_dir, skips))
    scan_rows.sort(key=lambda r: -float(r[4]) if r[4] != "" else np.inf)
    write_csv(os.path.join(args.output_dir, "slices.csv"),
              ["scan", "slice", "z", "source", "brain_fraction", *scoring.SCORES, "note"], slice_rows)
    write_csv(os.path.join(args.output_dir, "scans.csv"),
              ["scan", "kind", "slices", "scored_slices", f"score_max_{trained_run.settings.score}", "top_slice", "top_z",
               "source", "maps", "note"], scan_rows)
    return scan_rows


def main(argv=None):
    args = get_args(argv)
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: {args.data_dir}: no such folder")
    start = time.time()
    # the run's configuration and scoring, the flags given here on top (--data_dir here is the new data); opened before
    # the output folder is claimed, so a run that cannot be used leaves no folder that would refuse the next command
    run = trained.open_run(args.checkpoint, vars(args) | {"data_dir": None}, args.fold_checkpoint,
                           models.pick_device(args.device), args.precision)
    lock = runfiles.claim_output_dir(args.output_dir, "predict.py", overwrite=args.overwrite)
    try:
        for folder in ("maps", "overlays"):
            runfiles.make_dir(os.path.join(args.output_dir, folder))
        run.references()  # a CV run (or --level_norm): each model's reference statistics, before any scan
        scan_rows = predict(run, args)
    finally:
        runfiles.release_output_dir(lock)
    print(f"scored {len(scan_rows)} scan(s) in {time.time() - start:.0f} s with {args.checkpoint} (score '{run.settings.score}', "
          f"scan score = max over its slices). Highest:")
    for row in scan_rows[:5]:
        print(f"  {row[0]}: {row[4] or 'n/a'} (slice {row[5]} of {row[2]})")
    print(f"wrote {args.output_dir}/: scans.csv, slices.csv, overlays/ ({len(os.listdir(os.path.join(args.output_dir, 'overlays')))} "
          f"files), maps/ ({len(os.listdir(os.path.join(args.output_dir, 'maps')))} files)")


if __name__ == "__main__":
    main()
