"""The slice cache and the index serve only what is on disk now (issue 15, 21): a file emptied, rewritten, or swapped
keeping its size and time (--verify_cache), a folder whose files changed, two data folders with the same ids, two runs
filling one cache at once, a full disk."""
import contextlib
import io
import os
import shutil
import threading
import time

import numpy as np
import pydicom
import pytest

import cohort
import data
import inputs
import phantom
import runfiles
from helpers import head_hu, quiet, write_ctich

DICOM_1 = inputs.native_input_hu("rsna", 1)  # the brain window, as a DICOM-trained model has it


def small_data(tmp_path, name="data", patients=4, seed=3):
    """A fresh phantom of its own (tests below change files in it), 32 px."""
    return phantom.write_phantom(str(tmp_path / name), patients=patients, slices=3, size=32, seed=seed)


def rewrite_pixels(path, hu):
    """Give an existing DICOM other pixels (same header, ids and size), as a re-export or a second site would."""
    ds = pydicom.dcmread(path)
    ds.PixelData = np.clip(np.round(hu + 1024), -32768, 32767).astype(np.int16).tobytes()
    ds.save_as(path)


def test_a_cached_file_replaced_by_a_zero_byte_file_is_a_counted_skip(tmp_path):
    root = small_data(tmp_path)
    cache_dir = str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    victim = int(np.flatnonzero(index["path"] != "")[1])
    open(os.path.join(root, index["path"][victim]), "wb").close()  # 0 bytes, in place: the folder's mtime stays
    cache, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert cache.state[victim] == 2 and victim not in cache.ok(rows)
    assert "(1 decoded again: their file changed since it was cached)" in out
    assert f"slices: skipped 1 file(s): 1 unreadable DICOM. First: {index['path'][victim]}" in out
    # the index checks folders by default (a rewrite in place leaves the folder's time alone: issue 21, RSNA-size
    # start-up); with check_files (--verify_cache) it notices the changed file too and reads the headers again
    _, out = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    assert "changed since the index was built" not in out
    again, out = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1, check_files=True)
    assert f"index: 1 file(s) changed since the index was built (first: {index['path'][victim]})" in out
    assert index["id"][victim] not in again["id"] and "1 unreadable DICOM header" in out


def test_a_cached_file_rewritten_with_other_pixels_is_decoded_again(tmp_path):
    root = small_data(tmp_path)
    cache_dir = str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    before, _ = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    old_image = np.array(before.images[2])
    path = os.path.join(root, index["path"][2])
    rewrite_pixels(path, head_hu())
    after, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert "1 decoded again" in out and not np.array_equal(np.array(after.images[2]), old_image)
    expected, _ = inputs.load_slice(path, DICOM_1, 32)
    assert np.array_equal(np.array(after.images[2]), expected)


def test_two_data_folders_with_the_same_ids_share_no_cache_rows(tmp_path):
    first = small_data(tmp_path, "site_a")
    second = small_data(tmp_path, "site_b")  # the same seed: the same ids, patients and file names
    index, _ = quiet(cohort.load_index, first, cache_dir=str(tmp_path / "shared"), num_workers=1)
    for path in index["path"]:  # every image of the second site differs
        if os.path.getsize(os.path.join(second, path)) > 1000:
            rewrite_pixels(os.path.join(second, path), head_hu())
    shutil.rmtree(os.path.join(second, "masks"))
    caches = {}
    for root in (first, second):
        index_here, _ = quiet(cohort.load_index, root, cache_dir=str(tmp_path / "shared"), num_workers=1)
        assert np.array_equal(index_here["id"], index["id"])
        caches[root], _ = quiet(data.prepare_slices, root, index_here, np.arange(len(index["id"])), 32, DICOM_1,
                                cache_dir=str(tmp_path / "shared"), num_workers=1)
    assert caches[first].prefix != caches[second].prefix
    ok = caches[first].ok(np.arange(len(index["id"])))
    assert all(not np.array_equal(caches[first].images[k], caches[second].images[k]) for k in ok)


def test_a_second_run_waits_while_another_fills_the_slice_cache(tmp_path):
    """Two runs (not torchrun ranks) on the same data: the second waits for the first's lock, then finds the rows
    filled and decodes nothing."""
    root, cache_dir = small_data(tmp_path), str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    quiet(data.prepare_slices, root, index, rows[:2], 32, DICOM_1, cache_dir=cache_dir, num_workers=1)  # makes the files
    prefix = data.slice_cache_prefix(root, "rsna", index, 32, DICOM_1, cache_dir)
    printed = io.StringIO()  # the second run's stdout (redirect_stdout is process-wide: the main thread stays quiet)

    def second_run():
        with contextlib.redirect_stdout(printed):
            data.prepare_slices(root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    with runfiles.cache_lock(f"{prefix}.lock", "the slice cache"):  # "the first run", mid-fill
        thread = threading.Thread(target=second_run)
        thread.start()
        deadline = time.time() + 60
        while "waiting for it to finish" not in printed.getvalue() and time.time() < deadline:
            time.sleep(0.01)
        assert printed.getvalue().startswith("note: another run is filling the slice cache (")  # and it waits
        time.sleep(0.1)
        assert thread.is_alive() and "slices:" not in printed.getvalue()  # waiting, not writing
        quiet(data._fill_cache, prefix, root, index, rows, 32, DICOM_1, 1, False)  # the first run fills it
    thread.join(60)
    assert f"slices: {len(rows)} requested, {len(rows)} were cached" in printed.getvalue()


def test_a_full_disk_is_one_line_before_any_row_is_written(tmp_path, monkeypatch):
    root, cache_dir = small_data(tmp_path), str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    quiet(data.prepare_slices, root, index, rows[:3], 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SystemExit) as e:
        quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    needed = (len(rows) - 3) * data.row_bytes(1, 32)
    assert str(e.value).startswith(f"error: --cache_dir {cache_dir}: not enough free space for the slice cache: "
                                   f"{len(rows) - 3} slices need {needed} bytes")
    monkeypatch.undo()  # space again: the three rows cached before are still served, the rest decoded
    cache, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert f"{len(rows)} requested, 3 were cached" in out and len(cache.ok(rows)) > 3


def test_verify_cache_decodes_a_file_swapped_with_the_same_size_and_mtime(tmp_path):
    root, cache_dir = small_data(tmp_path), str(tmp_path / "cache")
    index, _ = quiet(cohort.load_index, root, cache_dir=cache_dir, num_workers=1)
    rows = np.arange(len(index["id"]))
    quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1, verify_cache=True)
    path = os.path.join(root, index["path"][2])
    stat = os.stat(path)
    rewrite_pixels(path, head_hu())  # same size; then the old modification time back, as `cp -p` or rsync -t keep it
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(path) == stat.st_size
    _, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1)
    assert "decoded again" not in out  # the default check (size + mtime) cannot see it
    cache, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1,
                       verify_cache=True)
    assert "(1 decoded again: their file changed since it was cached)" in out
    assert np.array_equal(np.array(cache.images[2]), inputs.load_slice(path, DICOM_1, 32)[0])
    _, out = quiet(data.prepare_slices, root, index, rows, 32, DICOM_1, cache_dir=cache_dir, num_workers=1, verify_cache=True)
    assert f"{len(rows)} requested, {len(rows)} were cached" in out and "decoded again" not in out


def test_the_index_notices_a_folder_whose_files_changed(tmp_path):
    """Start-up checks the folders of indexed files (one stat each, issue 21): a file removed (or added, or replaced
    by a rename) deep in a CT-ICH patient folder, which the layout's own signature does not see, rebuilds the index."""
    root = str(tmp_path / "ctich")
    rows = write_ctich(root)
    with open(os.path.join(root, "hemorrhage_diagnosis.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    index, _ = quiet(cohort.load_index, root, cache_dir=str(tmp_path / "cache"), num_workers=1)
    gone = next(path for path in index["path"] if path.startswith("Patients_CT/050/brain/"))
    os.remove(os.path.join(root, gone))
    again, out = quiet(cohort.load_index, root, cache_dir=str(tmp_path / "cache"), num_workers=1)
    assert "index: 1 folder(s) changed since the index was built (first: Patients_CT/050/brain); reading the headers again" in out
    assert gone not in again["path"] and len(again["path"]) == len(index["path"]) - 1
