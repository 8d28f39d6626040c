"""Label files and data folders that cannot be used (issue 5, 15, 21): a one-line error naming the file, the line and
the problem, never a traceback; label files in other Unicode encodings are read; a data set with no healthy (or no
hemorrhage) patient is refused (or trained with best_model.pt chosen by the validation loss)."""
import contextlib
import io
import json
import re
import shutil

import pytest
import torch

import cohort
import data
import train
from helpers import ct_file, tiny_train_args


@pytest.mark.parametrize("csv_text,problem", [
    ("ID,Probability\nID_aa_any,1\n", "expected the columns ID,Label"),
    ("ID,Label\nID_aa_any,1\nID_aa_headache,0\n", ":3: cannot parse 'ID_aa_headache,0'"),
    ("ID,Label\nID_aa_any,2\n", ":2: cannot parse 'ID_aa_any,2'"),
    ("ID,Label\nID_aa_any,yes\n", ":2: cannot parse 'ID_aa_any,yes'"),
], ids=["missing_columns", "unknown_subtype", "label_2", "label_yes"])
def test_bad_csv_is_a_one_line_error_naming_the_line(tmp_path, csv_text, problem):
    (tmp_path / "stage_2_train").mkdir()
    (tmp_path / "stage_2_train.csv").write_text(csv_text)
    with pytest.raises(SystemExit) as e:
        data.main(["index", "--data_dir", str(tmp_path), "--num_workers", "1"])
    message = str(e.value)
    assert message.startswith(f"error: {tmp_path / 'stage_2_train.csv'}") and problem in message and "\n" not in message


def test_csv_matching_no_file_is_a_one_line_error(tmp_path):
    (tmp_path / "stage_2_train").mkdir()
    ct_file(tmp_path / "stage_2_train" / "ID_only.dcm", instance=1)
    (tmp_path / "stage_2_train.csv").write_text("ID,Label\n" + "".join(f"ID_other_{n},0\n" for n in cohort.LABELS))
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
        cohort.load_index(str(tmp_path), num_workers=1)
    assert str(e.value).startswith(f"error: {tmp_path}: no usable slices (all 2 skipped): 1 of them: ")
    assert "skipped 2 file(s): 1 no row in stage_2_train.csv, 1 in stage_2_train.csv but file missing" in out.getvalue()


def test_empty_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(tmp_path / "data", tmp_path / "run"))
    assert str(e.value).startswith(f"error: {tmp_path / 'data'}: folder is empty; get the RSNA data")


def test_data_dir_without_healthy_patients(phantom_dir, tmp_path):
    root = tmp_path / "all_sick"
    shutil.copytree(phantom_dir, root, ignore=shutil.ignore_patterns(".ctpddpm_cache"))
    csv_path = root / "stage_2_train.csv"
    csv_path.write_text(csv_path.read_text().replace("_any,0", "_any,1"))
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as printed:
        train.main(tiny_train_args(root, tmp_path / "run"))
    assert str(e.value) == (f"error: {root}: no usable healthy training slices "
                            "(no patient without a hemorrhage slice to train on)")
    assert "note: train healthy slices: only 0 slices available, 12 asked for; using all" in printed.getvalue().splitlines()


def test_training_without_any_hemorrhage_patient_keeps_best_model_by_loss(phantom_dir, tmp_path, capsys, no_figures):
    root = tmp_path / "no_bleeds"
    shutil.copytree(phantom_dir, root, ignore=shutil.ignore_patterns(".ctpddpm_cache"))
    csv_path = root / "stage_2_train.csv"
    csv_path.write_text(re.sub(r",1$", ",0", csv_path.read_text(), flags=re.M))
    train.main(tiny_train_args(root, tmp_path / "run", "--epochs", "2"))
    captured = capsys.readouterr()
    assert ("warning: the validation split has no hemorrhage slice, so no ROC-AUC can be computed; best_model.pt is "
            "chosen by validation loss (as best_model_loss.pt)") in captured.err
    best = torch.load(tmp_path / "run" / "best_model.pt", weights_only=True)
    by_loss = torch.load(tmp_path / "run" / "best_model_loss.pt", weights_only=True)
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    assert [h["val_roc_auc"] for h in history] == [None, None]
    lowest = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert best["best_by"] == "val_loss" and best["epoch"] == by_loss["epoch"] == lowest


CTICH_HEADER = "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,No_Hemorrhage,Fracture_Yes_No\n"


@pytest.mark.parametrize("row,problem", [
    ("49,1,0,0,0,1,0,1,0", ":3: No_Hemorrhage=1 but Epidural=1 (the row contradicts itself)"),
    ("49,1,0,0,0,0,0,0,0", ":3: No_Hemorrhage=0 but no subtype column is 1 (the row contradicts itself)"),
    ("49,1,0,2,0,0,0,0,0", ":3: Intraparenchymal=2, expected 0 or 1"),
    ("49,1,0,0,0,0,0,-1,0", ":3: No_Hemorrhage=-1, expected 0 or 1"),
], ids=["no_hemorrhage_and_epidural", "hemorrhage_without_subtype", "value_2", "value_minus_1"])
def test_ctich_labels_that_contradict_themselves(tmp_path, row, problem):
    path = tmp_path / "hemorrhage_diagnosis.csv"
    path.write_text(CTICH_HEADER + "49,2,0,0,0,0,0,1,0\n" + row + "\n")
    with pytest.raises(SystemExit) as e:
        cohort.read_ctich_labels(str(path))
    assert str(e.value) == f"error: {path}{problem}"


def test_rsna_labels_that_contradict_each_other(tmp_path):
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ID,Label\nID_aa_any,0\nID_aa_epidural,0\nID_aa_subdural,1\n")
    with pytest.raises(SystemExit) as e:
        cohort.read_rsna_labels(str(path))
    assert str(e.value) == f"error: {path}:4: ID_aa has any=0 but subdural=1 (its label rows contradict each other)"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig", "utf-32"])
def test_label_csvs_in_other_unicode_encodings_are_read(tmp_path, encoding):
    def excel_export(text):  # with one byte-order mark, as Excel's "Unicode text" and "CSV UTF-8" write them
        return ("\ufeff" + text).encode(encoding) if encoding == "utf-16-be" else text.encode(encoding)
    text = CTICH_HEADER + "49,1,0,0,0,1,0,0,0\n49,2,0,0,0,0,0,1,0\n"
    (tmp_path / "ctich.csv").write_bytes(excel_export(text))
    assert cohort.read_ctich_labels(str(tmp_path / "ctich.csv")) == {(49, 1): [1, 1, 0, 0, 0, 0], (49, 2): [0, 0, 0, 0, 0, 0]}
    rsna = "ID,Label\n" + "".join(f"ID_aa_{name},0\n" for name in cohort.LABELS)
    (tmp_path / "rsna.csv").write_bytes(excel_export(rsna))
    assert cohort.read_rsna_labels(str(tmp_path / "rsna.csv")) == {"ID_aa": [0] * 6}


@pytest.mark.parametrize("content,problem", [
    ("ID,Label\nID_aa_any,0\n".encode("cp1252") + b"\xe9\n", "not UTF-8 text (byte 0xe9 at offset 21); save it as CSV UTF-8"),
    ("ID,Label\n".encode("utf-16-le"), "holds NUL characters (UTF-16 without a byte-order mark?); save it as CSV UTF-8"),
    (b"PK\x03\x04rest of a workbook", "a zip or Excel workbook, not a CSV text file (save it as CSV)"),
], ids=["latin1", "utf16_no_bom", "xlsx"])
def test_label_csvs_that_are_not_text_are_one_line_errors(tmp_path, content, problem):
    (tmp_path / "stage_2_train").mkdir()
    (tmp_path / "stage_2_train.csv").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        data.main(["index", "--data_dir", str(tmp_path), "--num_workers", "1"])
    assert str(e.value) == f"error: {tmp_path / 'stage_2_train.csv'}: {problem}"
