"""Checkpoints that cannot be used (issue 5, 15): not a checkpoint, a pickled object (refused before anything in it
runs), NaN weights, a config without what builds the network: one line naming the file, and no output written.
(Resuming from a damaged last.pt: test_resume.py; load_checkpoint itself: test_models.py.)"""
import os

import pytest
import torch

import evaluate
import predict
from helpers import one_scan_folder, quiet, read_csv


def test_evaluate_refuses_a_file_that_is_not_a_checkpoint(tiny_run, tmp_path):
    torch.save(torch.load(tiny_run / "best_model.pt", weights_only=True)["model"], tmp_path / "weights_only.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "weights_only.pt")])
    assert str(e.value) == f"error: {tmp_path / 'weights_only.pt'}: not a ct-pddpm checkpoint (no 'model' and 'config' entries)"
    assert sorted(os.listdir(tmp_path)) == ["weights_only.pt"]  # refused before any output folder was made


class Payload:
    """Stands for code someone hid in a checkpoint: unpickling it would run its __reduce__."""
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickled_checkpoint_is_refused_before_anything_runs(tiny_run, tmp_path, capfd):
    checkpoint = torch.load(tiny_run / "best_model.pt", weights_only=True)
    torch.save(checkpoint | {"note": Payload()}, tmp_path / "downloaded.pt")
    for main, extra in ((evaluate.main, []), (predict.main, ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "p")])):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(tmp_path / "downloaded.pt"), *extra])
        assert str(e.value) == (f"error: {tmp_path / 'downloaded.pt'}: refused to load, it holds a pickled posix.system, not "
                                "only tensors and plain data (checkpoints are loaded with weights_only=True)")
    assert "pwned" not in capfd.readouterr().out  # nothing of it ran (a shell's echo would write to the real stdout)
    assert sorted(os.listdir(tmp_path)) == ["downloaded.pt"]  # refused before an output folder was made


def test_a_prediction_refused_for_its_checkpoint_leaves_its_folder_free(tiny_run, phantom_dir, tmp_path, no_figures):
    """The same command again with the right checkpoint is not refused for what the failed one left."""
    torch.save({"model": {}}, tmp_path / "bad.pt")
    scan = one_scan_folder(phantom_dir, tmp_path / "scan") / "stage_2_train"
    argv = ["--data_dir", str(scan), "--output_dir", str(tmp_path / "pred"), "--top", "0"]
    with pytest.raises(SystemExit, match="not a ct-pddpm checkpoint"):
        predict.main(["--checkpoint", str(tmp_path / "bad.pt"), *argv])
    quiet(predict.main, ["--checkpoint", str(tiny_run / "best_model.pt"), *argv])
    assert len(read_csv(tmp_path / "pred" / "slices.csv")) == len(os.listdir(scan))


def test_a_checkpoint_with_nan_weights_is_refused_when_loaded(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "best_model.pt", weights_only=True)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = torch.full_like(checkpoint["model"][name], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "nan.pt"), "--output_dir", str(tmp_path / "out")])
    assert str(e.value) == f"error: {tmp_path / 'nan.pt'}: non-finite weights (NaN or inf) in {name}; the checkpoint is unusable"
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_whose_config_lacks_a_key_is_one_line(tiny_run, tmp_path):
    """An older or hand-edited checkpoint without a key that builds the network: one line naming the key and the
    format that wrote it, not KeyError: 'base_channels'."""
    checkpoint = torch.load(tiny_run / "best_model.pt", weights_only=True)
    del checkpoint["config"]["base_channels"]
    checkpoint["config"].pop("format", None)
    torch.save(checkpoint, tmp_path / "old.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "old.pt"), "--output_dir", str(tmp_path / "out")])
    message = str(e.value)
    assert message.startswith(f"error: {tmp_path / 'old.pt'}: its model config lacks base_channels (written by a ct-pddpm before")
    assert "\n" not in message and not (tmp_path / "out").exists()
