"""2.5-D (--context_slices 1, issue 29 (c)): the slices just below and above as extra input channels, noised in the
same box as the slice, and only the slice's own channels scored; the same neighbours through every path."""
import csv
import os

import numpy as np
import pytest
import torch

import data
import evaluate
import models
import predict
import scoring
import train
import trained
from helpers import as_diffusion, one_scan_folder, quiet, tiny_train_args

SETTINGS = scoring.ScoringSettings(eval_t=(150,), eval_batch_size=16, residual="abs", pack_windows=False,
                                   channels_last=False, median_size=0, smooth_slices=0, patch_size=8, stride=8)


def test_with_context_puts_the_slice_first_then_below_then_above_and_repeats_it_at_a_scans_end():
    image, below, above = (np.full((1, 4, 4), v, np.float32) for v in (0.0, -1.0, 1.0))
    assert data.with_context(image, below, above)[:, 0, 0].tolist() == [0, -1, 1]
    assert data.with_context(image, None, above)[:, 0, 0].tolist() == [0, 0, 1]


def test_an_array_dataset_finds_a_slices_neighbours_by_position_and_in_its_own_scan():
    images = [np.full((1, 8, 8), float(k), np.float32) for k in range(4)]
    dataset = data.ArrayDataset(images, [np.ones((8, 8), np.uint8)] * 4, [10, 11, 12, 13], [0, 0, 0, 1], [0, .5, 1, 0])
    assert dataset[1]["image"].shape == (1, 8, 8)  # the 2-D model's input: the slice alone
    dataset.context_slices = 1
    assert [dataset[i]["image"][:, 0, 0].tolist() for i in range(4)] == [[0, 0, 1], [1, 0, 2], [2, 1, 2], [3, 3, 3]]


def test_a_chunk_of_a_dataset_passes_the_context_on():
    """A CV run scores an external set in chunks of whole scans (trained.ChunkOf): score_split's context reaches
    the dataset underneath."""
    images = [np.full((1, 8, 8), float(k), np.float32) for k in range(3)]
    chunk = trained.ChunkOf(data.ArrayDataset(images, [np.ones((8, 8), np.uint8)] * 3, [0, 1, 2], [0] * 3, [0, .5, 1]), 1, 3)
    chunk.context_slices = 1
    assert chunk[0]["image"][:, 0, 0].tolist() == [1, 0, 2]


class ZeroRebuild(torch.nn.Module):
    """A stand-in network that rebuilds every channel as 0: the error is |x0| where scored."""
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        return torch.zeros_like(x) + 0 * self.weight


def test_only_the_slices_own_channels_are_scored():
    diffusion = as_diffusion(ZeroRebuild(), patch_size=8)
    diffusion.context_slices = 1
    centre = torch.rand(2, 1, 32, 32) * 2 - 1
    quiet_neighbours = torch.cat([centre, torch.zeros(2, 2, 32, 32)], dim=1)
    loud_neighbours = torch.cat([centre, torch.ones(2, 2, 32, 32)], dim=1)
    maps = [scoring.anomaly_maps(diffusion, x, SETTINGS, [1, 2]) for x in (quiet_neighbours, loud_neighbours)]
    assert torch.equal(maps[0], maps[1])
    torch.testing.assert_close(maps[0], centre[:, 0].abs())


def test_the_box_is_noised_through_the_neighbours_too():
    diffusion = as_diffusion(ZeroRebuild(), patch_size=8)
    x0 = torch.zeros(1, 3, 32, 32)
    boxes = torch.tensor([[8, 16]])
    x_t = diffusion.noise(x0, boxes, torch.tensor([500]), torch.randn(1, 3, 8, 8))
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:16, 16:24] = True
    assert (x_t[0][:, inside] != 0).all() and (x_t[0][:, ~inside] == 0).all()  # every channel, the box only


@pytest.fixture(scope="module", params=["none", "head"])
def context_run(request, phantom_dir, tmp_path_factory):
    """A 2.5-D run per framing: with "head" each slice has its own frame and its neighbours are brought into it
    (inputs.reframe) by the slice cache's dataset and by predict.py's alike."""
    out = tmp_path_factory.mktemp("context") / "run"
    quiet(train.main, tiny_train_args(phantom_dir, out, "--context_slices", "1", "--framing", request.param))
    return out


def test_a_25d_run_trains_records_its_context_and_scores_a_scan_alike_through_predict_and_evaluate(
        context_run, phantom_dir, tmp_path, no_figures, monkeypatch):
    moved = []  # neighbours brought from another frame into the slice's: with --framing head, not with none
    reframe = data.reframe
    monkeypatch.setattr(data, "reframe", lambda square, source, target, pad: (
        moved.append(tuple(source) != tuple(target)), reframe(square, source, target, pad))[1])
    diffusion, checkpoint = models.load_checkpoint(str(context_run / "best_model.pt"))
    assert diffusion.context_slices == 1 and diffusion.network.conv_in.in_channels == 3
    assert checkpoint["args"]["context_slices"] == 1
    # one scan through predict.py (in-memory slices, neighbours by slice number) and evaluate.py (the slice cache,
    # neighbours by index row): the same neighbours in the same order give each slice the same score
    scan = one_scan_folder(phantom_dir, tmp_path / "scan")
    quiet(predict.main, ["--checkpoint", str(context_run / "best_model.pt"), "--data_dir", str(scan / "stage_2_train"),
                         "--output_dir", str(tmp_path / "pred"), "--top", "0"])
    quiet(evaluate.main, ["--checkpoint", str(context_run / "best_model.pt"), "--split", "all", "--data_dir", str(scan),
                          "--n_boot", "0", "--output_dir", str(tmp_path / "ev")])
    evaluated = {row["id"]: row for row in csv.DictReader((tmp_path / "ev" / "scores.csv").open())}
    predicted = {os.path.basename(row["source"])[:-4]: row for row in csv.DictReader((tmp_path / "pred" / "slices.csv").open())
                 if row["brain_p99"]}
    assert len(evaluated) >= 4 and set(predicted) == set(evaluated)
    for image_id, row in evaluated.items():
        assert float(predicted[image_id]["brain_p99"]) == pytest.approx(float(row["brain_p99"]), rel=1e-5, abs=1e-6)
    assert any(moved) == (diffusion.framing == "head")


def test_context_needs_the_scratch_unet(phantom_dir, tmp_path):
    with pytest.raises(SystemExit, match="--context_slices 1: needs the scratch UNet"):
        train.main(tiny_train_args(phantom_dir, tmp_path / "r", "--context_slices", "1", "--pretrained"))
