"""--framing: the head brought to the frame and size the model was trained at (inputs.slice_frame), so that padding,
a tight crop or another scale of the same slice give the same intracranial mask and closely the same model input;
the framing recorded in the model config, the slice cache keyed by it, maps mapped back through it."""
import argparse
import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cohort
import config as config_module
import data
import inputs
import models
import phantom
import predict
import readers
import trained
from helpers import tiny_unet

SIZE, INPUT = 192, 64  # the source slice and the model's input, px
HEAD = inputs.InputHU(inputs.native_input_hu("rsna", 1), "head")
CTICH_HEAD = inputs.InputHU(inputs.native_input_hu("ctich", 1), "head")
# What the property tests allow (stated in docs/data.md): the intracranial mask, on the model's grid and mapped back
# onto the slice, Dice >= MIN_DICE with the original slice's; the model inputs (units of [-1, 1]; 0.03 is 1.2 HU of
# the brain window): the same to EXACT after padding or a tight crop (whole pixels: the frame moves with the head);
# after a rescale, mean |difference| <= FRAME_TOLERANCE over the frame (the skull's edges resampled) and
# <= INSIDE_TOLERANCE inside the intracranial mask. Measured at 192 -> 64 px: rescales 0.025-0.049 over the frame,
# 0.009-0.025 inside; masks Dice 0.98-1.0.
MIN_DICE, EXACT, FRAME_TOLERANCE, INSIDE_TOLERANCE = 0.95, 1e-3, 0.06, 0.03


def dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def phantom_hu(level=0.55, seed=1):
    rng = np.random.default_rng(seed)
    head = phantom.random_head(rng, SIZE)
    head["fov_circle"] = False
    return phantom.draw_slice(rng, head, level, 0, [], SIZE)[0]


def ctich_like(hu):
    """The slice as CT-ICH's brain JPG holds it: -20..100 HU in 8 bits, as [-1, 1]."""
    return {"brain": (np.round(np.clip((hu + 20) / 120, 0, 1) * 255) / 127.5 - 1).astype(np.float32)}


def rescale(image, factor, air):
    tensor = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    size = int(round(image.shape[0] * factor))
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
    return np.maximum(out, air)


def head_box(pixels):
    head = inputs.tissue_classes(pixels)[3]
    rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def variants(image, air, box):
    """{name: (the slice's image changed, the map of a mask on its grid back onto the original grid)}."""
    top, bottom, left, right = box
    pad = int(round(0.15 * image.shape[0]))

    def from_padded(mask):
        return mask[pad:-pad, pad:-pad]

    def from_tight(mask):
        out = np.zeros(image.shape, bool)
        out[top:bottom, left:right] = mask
        return out

    def from_scaled(mask):
        return rescale(mask.astype(np.float32), image.shape[0] / mask.shape[0], 0) >= 0.5

    return {"pad30": (np.pad(image, pad, constant_values=air), from_padded),
            "tight": (image[top:bottom, left:right], from_tight),
            "x0.7": (rescale(image, 0.7, air), from_scaled), "x1.4": (rescale(image, 1.4, air), from_scaled)}


def decoded(pixels, input_hu):
    image, code, frame = inputs.decode_pixels(pixels, input_hu, INPUT)
    inside = inputs.intracranial(code)
    back = inputs.to_slice_shape(inside.astype(np.float32), frame) >= 0.5
    return image.astype(np.float32), inside, back


@pytest.mark.parametrize("kind", ["dicom", "ctich"])
def test_padding_a_tight_crop_or_another_scale_gives_the_same_mask_and_input(kind):
    hu = phantom_hu()
    air, key = (-1000.0, None) if kind == "dicom" else (-1.0, "brain")
    image = hu if kind == "dicom" else ctich_like(hu)["brain"]
    wrap = (lambda x: x) if kind == "dicom" else (lambda x: {key: x})
    input_hu = HEAD if kind == "dicom" else CTICH_HEAD
    reference, inside, back = decoded(wrap(image), input_hu)
    assert inside.mean() > 0.3  # the head fills the frame: framing "head" did its work
    for name, (changed, to_original) in variants(image, air, head_box(wrap(image))).items():
        other, other_inside, other_back = decoded(wrap(changed), input_hu)
        assert dice(other_inside, inside) >= MIN_DICE, (kind, name, dice(other_inside, inside))
        assert dice(to_original(other_back), back) >= MIN_DICE, (kind, name)
        difference = np.abs(other - reference)[0]
        if name in ("pad30", "tight"):
            assert difference.max() <= EXACT, (kind, name, difference.max())
        assert difference.mean() <= FRAME_TOLERANCE, (kind, name, difference.mean())
        assert difference[inside & other_inside].mean() <= INSIDE_TOLERANCE, (kind, name)


def test_framing_none_is_todays_padding_and_head_framing_differs_only_where_asked():
    hu = np.full((40, 64), -1000.0, np.float32)
    hu[8:32, 10:50] = 30.0
    plain = inputs.make_input(hu, inputs.native_input_hu("rsna", 1), 32)
    padded = np.full((64, 64), -1000.0, np.float32)
    padded[12:52] = hu
    assert np.allclose(plain, inputs.make_input(padded, [[0.0, 80.0]], 32))
    assert np.allclose(plain, inputs.make_input(hu, inputs.InputHU([[0.0, 80.0]], "none"), 32))
    assert inputs.slice_frame((40, 64)) == inputs.Frame(40, 64, -12, 0, 64)
    framed = inputs.slice_frame((40, 64), hu > -100, "head")
    assert framed.side == round(40 * (1 + 2 * inputs.FRAME_MARGIN)) and framed.left < 10 and framed.top < 8
    with pytest.raises(ValueError, match="framing must be one of none, head"):
        inputs.InputHU([[0.0, 80.0]], "skull")


def test_a_skull_ring_cut_by_the_border_still_gets_a_mask():
    hu = phantom_hu()
    top, bottom, left, right = head_box(hu)
    cut = (bottom - top) // 8  # through the scalp and the skull at the front and at one side
    for changed, keep in ((hu[top + cut:bottom, left:right], (slice(top + cut, bottom), slice(left, right))),
                          (hu[top:bottom, left + cut:right - cut], (slice(top, bottom), slice(left + cut, right - cut)))):
        inside = inputs.tissue_classes(changed)[0]
        whole = inputs.tissue_classes(hu)[0][keep]
        assert inside.any() and dice(inside, whole) >= 0.9, dice(inside, whole)
        windowed = inputs.tissue_classes(ctich_like(changed))[0]
        assert dice(windowed, whole) >= 0.9


def test_the_framing_is_recorded_in_the_checkpoint_and_old_ones_mean_none(tmp_path):
    network = tiny_unet()
    d = config_module.DEFAULTS
    config = models.diffusion_config(models.model_config(pretrained=False, in_channels=1, image_size=32, base_channels=8,
                                                         channel_mults=d.channel_mults, dropout=d.dropout, hf_model=""),
                                     patch_size=8, input_hu=[[0.0, 80.0]], framing="head")
    diffusion = models.Diffusion(network, config)
    assert diffusion.framing == "head" and inputs.framing_of(diffusion.input_hu) == "head"
    assert diffusion.input_hu == [[0.0, 80.0]]  # still the list of pairs every caller reads
    path = str(tmp_path / "m.pt")
    models.save_checkpoint(path, diffusion)
    loaded, _ = models.load_checkpoint(path)
    assert inputs.framing_of(loaded.input_hu) == "head"
    old = dict(config)
    del old["framing"]
    torch.save({"model": network.state_dict(), "config": old}, path)
    loaded, _ = models.load_checkpoint(path)
    assert loaded.framing == "none" and inputs.framing_of(loaded.input_hu) == "none"
    again = pickle.loads(pickle.dumps(inputs.InputHU([[0, 80]], "head", "40,80")))  # as worker processes get it
    assert again.framing == "head" and again.image_window == "40,80" and again == [[0.0, 80.0]]
    with pytest.raises(ValueError, match="framing must be one of"):
        models.diffusion_config({}, patch_size=8, input_hu=[[0, 80]], framing="skull")


def test_the_slice_cache_never_serves_a_row_of_another_framing_or_window(tmp_path):
    index = {"id": np.array(["a", "b"])}
    prefix = lambda input_hu, window=None: data.slice_cache_prefix(str(tmp_path), "images", index, 32, input_hu,  # noqa: E731
                                                                   str(tmp_path), window)
    plain = inputs.InputHU([[0.0, 80.0]])
    names = {prefix(plain), prefix(inputs.InputHU([[0.0, 80.0]], "head")), prefix(plain, (0.0, 80.0)),
             prefix(plain, (-160.0, 240.0))}
    assert len(names) == 4
    assert prefix([[0.0, 80.0]]) == prefix(plain)  # a plain list is framing "none"


def test_maps_and_ground_truth_masks_go_through_the_slices_frame(tmp_path):
    hu = np.pad(phantom_hu(), ((30, 10), (0, 50)), constant_values=-1000.0)  # off-centre, not square
    image, code, frame = inputs.decode_pixels(hu, HEAD, INPUT)
    assert frame != inputs.centred_frame(hu.shape)
    inside = inputs.tissue_classes(hu)[0]
    back = inputs.to_slice_shape(inputs.intracranial(code).astype(np.float32), frame) >= 0.5
    assert back.shape == hu.shape and dice(back, inside) >= MIN_DICE  # predict.py's maps land on their slice
    masks = tmp_path / "masks"
    masks.mkdir()
    np.save(masks / "ID_x.npy", inside)
    truth = inputs.load_gt_mask(str(tmp_path), "ID_x", INPUT, frame)
    assert dice(truth, inputs.intracranial(code)) >= MIN_DICE  # ground truth framed as its slice
    with pytest.raises(inputs.BadFile, match="mask of"):
        inputs.load_gt_mask(str(tmp_path), "ID_x", INPUT, frame._replace(height=10))


def test_a_run_trained_with_head_framing_scores_and_predicts_through_it(phantom_dir, tmp_path, no_figures):
    """train.py --framing head records it; evaluate.py reads it from the checkpoint (its slice cache is the framed
    one) and scores a PNG export of the phantom at 40,80 (--split all); predict.py's maps lie on the slices' pixels."""
    import evaluate
    import train
    from helpers import one_scan_folder, quiet, tiny_train_args
    out = tmp_path / "run"
    quiet(train.main, tiny_train_args(phantom_dir, out, "--framing", "head", "--cache_dir", tmp_path / "cache"))
    checkpoint = torch.load(out / "best_model.pt", weights_only=True)
    assert checkpoint["config"]["framing"] == "head" and checkpoint["args"]["framing"] == "head"
    assert any("_head_v" in name for name in os.listdir(tmp_path / "cache"))
    index = cohort.load_index(phantom_dir, num_workers=1)
    # the pixel metrics' bleed masks go through each slice's frame: they lie on the framed slice's bleed
    rows_with_bleed = np.flatnonzero(index["any"] == 1)[:6]
    reading = inputs.InputHU([[-20.0, 100.0]], "head")
    cache = data.prepare_slices(phantom_dir, index, rows_with_bleed, 64, reading, cache_dir=tmp_path / "cache2")
    run = argparse.Namespace(data_dir=phantom_dir, image_size=64)
    gt_masks_fn, unusable = trained.mask_reader(run, index, cache)
    on_bleed, unframed = [], []
    for position in cache.ok(rows_with_bleed):
        truth = gt_masks_fn(position)
        assert truth is not None and not unusable
        bright = cache.images[position][0] > 0.2  # the phantom's bleeds are bright in the brain window
        on_bleed.append(bright[truth])
        unframed.append(bright[inputs.load_gt_mask(phantom_dir, index["id"][position], 64)])
    assert np.concatenate(on_bleed).mean() > 0.6 > np.concatenate(unframed).mean()  # measured 0.80 and 0.03
    png = tmp_path / "png"
    rows = [["file", "label", "patient", "slice"]]
    for k, (path, patient) in enumerate(zip(index["path"], index["patient"])):
        try:
            hu = readers.hu_from_dicom(os.path.join(phantom_dir, path))
        except readers.BadFile:
            continue
        (png / "images" / f"x{patient}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(np.clip(hu / 80, 0, 1) * 255).astype(np.uint8)).save(png / "images" / f"x{patient}" / f"{k}.png")
        rows.append([f"x{patient}/{k}.png", int(index["any"][k]), f"x{patient}", k])
    with open(png / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    quiet(evaluate.main, ["--checkpoint", str(out / "best_model.pt"), "--data_dir", str(png), "--split", "all",
                          "--output_dir", str(tmp_path / "eval"), "--n_boot", "0"])
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["counts"]["slices"] == len(rows) - 1
    assert any("_head_v" in name for name in os.listdir(png / ".ctpddpm_cache"))  # the checkpoint's framing, read back
    scan = one_scan_folder(phantom_dir, tmp_path / "scan")
    quiet(predict.main, ["--checkpoint", str(out / "best_model.pt"), "--data_dir", str(scan / "stage_2_train"),
                         "--output_dir", str(tmp_path / "pred")])
    maps = [name for name in os.listdir(tmp_path / "pred" / "maps") if name.endswith(".npy")]
    volume = np.load(tmp_path / "pred" / "maps" / maps[0])
    assert volume.shape[1:] == (64, 64) and np.isfinite(volume).all() and volume.any()


def test_reframe_brings_a_slice_made_through_one_frame_into_another():
    """A neighbour's input (or bone) is read in the slice's own frame (2.5-D, no_bone_3d): the same pixels made
    through frame A and reframed to B match what B makes of them; equal frames give the array back as it is."""
    hu = phantom_hu()
    head = inputs.tissue_classes(hu)[3]
    a = inputs.slice_frame(hu.shape, head, "head")
    b = inputs.Frame(a.height, a.width, a.top + 9, a.left - 6, a.side + 14)  # moved and larger, as a neighbour's is
    made_a, made_b = (inputs.make_input(hu, HEAD, INPUT, frame) for frame in (a, b))
    assert inputs.reframe(made_a, a, a, -1.0) is made_a
    brought = inputs.reframe(made_a, a, b, -1.0)
    assert brought.shape == made_b.shape
    assert np.abs(brought - made_b).mean() < 0.02 < np.abs(made_a - made_b).mean() / 3  # the shift is undone
    bone = (inputs.tissue_classes(hu)[1]).astype(np.float32)
    bone_a, bone_b = (inputs.resize_mask(bone, INPUT, frame) for frame in (a, b))
    code_a = bone_a.astype(np.uint8) * np.uint8(inputs.BONE)
    moved = (inputs.bone_in_frame(code_a, a, b) & inputs.BONE) > 0
    # the skull is a 2-3 px ring at 64 px, resampled twice here: 0.90 measured, 0.08 without reframing
    assert dice(moved, bone_b) >= 0.85 and dice(bone_a, bone_b) < 0.2
    assert np.array_equal(inputs.bone_in_frame(code_a, a, a), code_a)


def test_a_cached_slice_reads_its_neighbours_bone_in_its_own_frame(tmp_path):
    """SliceDataset sets NEAR_BONE from the neighbours' bone brought into the slice's frame (bone_in_frame)."""
    rows = {"images": np.zeros((3, 1, 16, 16), np.float16), "masks": np.zeros((3, 16, 16), np.uint8),
            "state": np.ones(3, np.uint8), "frames": np.array([[64, 64, 0, 0, 64], [64, 64, 0, 0, 64],
                                                               [64, 64, 16, 16, 32]], np.int64)}
    rows["masks"][0, 4:8, 4:8] = inputs.BONE  # slice 0's bone at rows/cols 16..32 of the 64 px slice
    for name, array in rows.items():
        np.save(tmp_path / f"c.{name}.npy", array)
    cache = data.SliceCache(str(tmp_path / "c"))
    index = {"id": np.array(["s_0", "s_1", "s_2"]), "scan": np.array(["x"] * 3), "patient": np.array(["p"] * 3),
             "any": np.zeros(3, np.int64), "slice": np.arange(3)}
    near = lambda item: (item["anatomy"].numpy() & inputs.NEAR_BONE) > 0  # noqa: E731
    dataset = data.SliceDataset(cache, index, np.array([1]))
    assert near(dataset[0])[4:8, 4:8].all() and near(dataset[0]).sum() == 16  # same frame: where it was
    rows["masks"][:] = 0
    rows["masks"][1, 4:8, 4:8] = inputs.BONE
    np.save(tmp_path / "c.masks.npy", rows["masks"])
    moved = near(data.SliceDataset(data.SliceCache(str(tmp_path / "c")), index, np.array([2]))[0])
    # slice 2's frame is the square 16..48 of the slice at 2x: the bone at 16..32 lies at its pixels 0..8
    assert moved[0:8, 0:8].all() and moved.sum() == 64
