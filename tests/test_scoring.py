"""scoring.py: the settings and their flags, the sliding-window anomaly map (against an independent
one-window-at-a-time reference), its speed options, slice scores, smoothing and score_split."""
import dataclasses

import numpy as np
import pytest
import torch

import config
import scoring
from helpers import HealthyTissue, as_diffusion, disc_slice as phantom, make_scheduler, tiny_unet

# what anomaly_maps computes with every speed option off: the reference the options are compared with
PLAIN = scoring.ScoringSettings(eval_t=(150,), eval_batch_size=16, residual="abs", pack_windows=False, channels_last=False,
                                median_size=0, smooth_slices=0)


def score_maps(model, images, scheduler, seeds, brain_masks=None, autocast_dtype=None, timesteps=None, **settings):
    """scoring.anomaly_maps with PLAIN settings changed by keyword (timesteps = eval_t)."""
    if timesteps is not None:
        settings["eval_t"] = timesteps
    patch_size = settings.get("patch_size") or images.shape[-1] // 4
    diffusion = as_diffusion(model, patch_size, "bf16" if autocast_dtype is not None else "fp32", images.shape[1])
    return scoring.anomaly_maps(diffusion, images, dataclasses.replace(PLAIN, **settings), seeds, brain_masks)


def test_window_grid_covers_the_image():
    assert len(scoring.window_grid(256, 64, 32)) == 49  # the spec's 49 windows per slice
    grid = scoring.window_grid(30, 8, 8)
    assert grid[-1] == (22, 22)  # last window flush with the border
    covered = np.zeros((30, 30), bool)
    for top, left in grid:
        covered[top:top + 8, left:left + 8] = True
    assert covered.all()


def one_window_at_a_time(model, images, scheduler, patch_size, stride, t, seeds):
    """Reference: the spec's loop, one window and one forward at a time, written independently."""
    N, C, H, W = images.shape
    total, count = torch.zeros(N, H, W), torch.zeros(N, H, W)
    for i in range(N):
        for k, (top, left) in enumerate(scoring.window_grid(H, patch_size, stride)):
            x_t = images[i:i + 1].clone()
            noise = scoring.window_noise(seeds[i], k, t, (C, patch_size, patch_size))
            a = scheduler.alphas_cumprod[t]
            x_t[0, :, top:top + patch_size, left:left + patch_size] = (
                a.sqrt() * x_t[0, :, top:top + patch_size, left:left + patch_size] + (1 - a).sqrt() * noise)
            with torch.no_grad():
                x0_hat = model(x_t, t)
            error = (images[i] - x0_hat[0]).abs().mean(dim=0)
            total[i, top:top + patch_size, left:left + patch_size] += error[top:top + patch_size, left:left + patch_size]
            count[i, top:top + patch_size, left:left + patch_size] += 1
    return total / count


def test_batched_map_equals_one_window_at_a_time():
    model, scheduler = tiny_unet(), make_scheduler()
    images = torch.cat([phantom(32, blob=b, seed=s)[0] for s, b in [(0, False), (1, True)]])
    reference = one_window_at_a_time(model, images, scheduler, 16, 8, 150, seeds=[3, 4])
    for batch_size in (1, 7, 64):  # 7 splits windows of one slice across batches
        maps = score_maps(model, images, scheduler, patch_size=16, stride=8, seeds=[3, 4],
                                   eval_batch_size=batch_size)
        assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
        torch.testing.assert_close(maps, reference, atol=1e-5, rtol=0)


def test_map_independent_of_batch_composition_and_deterministic():
    model, scheduler = tiny_unet(), make_scheduler()
    images = torch.cat([phantom(32, seed=s)[0] for s in range(3)])
    kw = dict(patch_size=16, stride=8, timesteps=(150, 300))
    together = score_maps(model, images, scheduler, seeds=[5, 6, 7], eval_batch_size=16, **kw)
    alone = score_maps(model, images[1:2], scheduler, seeds=[6], eval_batch_size=3, **kw)
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=0)
    again = score_maps(model, images, scheduler, seeds=[5, 6, 7], eval_batch_size=16, **kw)
    assert torch.equal(together, again)
    masks = torch.ones(3, 32, 32, dtype=torch.bool)
    scores, scores_again = scoring.slice_scores(together, masks, 3), scoring.slice_scores(again, masks, 3)
    for name in ("mean", "brain_mean", "brain_p99"):
        assert np.array_equal(scores[name], scores_again[name])
    other_seed = score_maps(model, images, scheduler, seeds=[8, 6, 7], eval_batch_size=16, **kw)
    assert not torch.equal(other_seed[0], together[0]) and torch.equal(other_seed[1], together[1])


def test_several_timesteps_average_the_maps():
    model, scheduler = tiny_unet(), make_scheduler()
    images = phantom(32)[0]
    kw = dict(patch_size=16, stride=8, seeds=[1])
    both = score_maps(model, images, scheduler, timesteps=(150, 500), **kw)
    single = [score_maps(model, images, scheduler, timesteps=(t,), **kw) for t in (150, 500)]
    torch.testing.assert_close(both, (single[0] + single[1]) / 2, atol=1e-5, rtol=0)


def test_bright_blob_scores_higher_under_brain_p99():
    healthy, mask = phantom(64, blob=False)
    bleed, _ = phantom(64, blob=True)
    model, scheduler = HealthyTissue(0.2), make_scheduler()
    maps = score_maps(model, torch.cat([healthy, bleed]), scheduler, patch_size=16,
                               stride=8, seeds=[0, 0], brain_masks=mask.expand(2, -1, -1))
    scores = scoring.slice_scores(maps, mask.expand(2, -1, -1), median_size=3)
    assert scores["brain_p99"][1] > scores["brain_p99"][0] + 0.3
    assert scores["brain_mean"][1] > scores["brain_mean"][0]


def test_positive_residual_keeps_only_what_is_brighter_than_the_rebuild():
    model, scheduler = HealthyTissue(0.2), make_scheduler()
    images = torch.cat([torch.full((1, 1, 32, 32), -0.5), torch.full((1, 1, 32, 32), 0.9)])  # darker, brighter
    kw = dict(patch_size=8, stride=8, seeds=[0, 1])
    abs_maps = score_maps(model, images, scheduler, **kw)
    positive = score_maps(model, images, scheduler, residual="positive", **kw)
    assert torch.allclose(abs_maps[0], torch.full((32, 32), 0.7)) and torch.allclose(abs_maps[1], torch.full((32, 32), 0.7))
    assert torch.all(positive[0] == 0)                 # darker than expected: not an anomaly of this kind
    assert torch.allclose(positive[1], abs_maps[1])    # brighter: the same as |x - x0_hat|
    with pytest.raises(ValueError, match="residual"):
        score_maps(model, images, scheduler, residual="squared", **kw)


def test_skip_outside_mask_runs_only_windows_with_brain():
    images = phantom(64)[0]
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 24:40, 20:40] = True  # touches 4 of the 16 windows
    scheduler = make_scheduler()
    kw = dict(patch_size=16, stride=16, seeds=[0], brain_masks=mask)
    model = HealthyTissue()
    full = score_maps(model, images, scheduler, **kw)
    assert model.input_shapes == [(16, 1, 64, 64)]  # 16 windows, one batch

    model = HealthyTissue()
    skipped = score_maps(model, images, scheduler, skip_outside_mask=True, **kw)
    run = np.zeros((64, 64), bool)
    for top, left in scoring.window_grid(64, 16, 16):
        run[top:top + 16, left:left + 16] = bool(mask[0, top:top + 16, left:left + 16].any())
    assert run.mean() == 4 / 16
    assert model.input_shapes == [(4, 1, 64, 64)]
    assert (skipped[0][~torch.from_numpy(run)] == 0).all()
    torch.testing.assert_close(skipped[0][run], full[0][run])
    nothing = score_maps(HealthyTissue(), images, scheduler, skip_outside_mask=True,
                                  **(kw | {"brain_masks": torch.zeros_like(mask)}))
    assert (nothing == 0).all()


def test_channels_last_and_bf16_autocast():
    model, scheduler = tiny_unet(), make_scheduler()
    images = phantom(32)[0]
    kw = dict(patch_size=16, stride=8, seeds=[2])
    fp32 = score_maps(model, images, scheduler, **kw)
    nhwc = score_maps(model, images, scheduler, channels_last=True, **kw)
    torch.testing.assert_close(nhwc, fp32, atol=1e-4, rtol=0)  # other conv kernels, same maths
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    bf16 = score_maps(model, images, scheduler, autocast_dtype=torch.bfloat16,
                               channels_last=True, **kw)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().mean() < 0.05 * fp32.abs().mean()


def test_anomaly_maps_restores_training_mode():
    model = tiny_unet().train()
    score_maps(model, phantom(32)[0], make_scheduler(), patch_size=16, stride=16, seeds=[0])
    assert model.training


def test_slice_scores_values():
    maps = torch.zeros(2, 8, 8)
    maps[0, 2:6, 2:6] = 1.0
    maps[1, 4, 4] = 10.0  # one hot pixel
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    scores = scoring.slice_scores(maps, masks)
    assert scores["mean"][0] == pytest.approx(16 / 64)
    assert scores["brain_mean"][0] == pytest.approx(1.0) and scores["brain_p99"][0] == pytest.approx(1.0)
    assert scores["brain_p99"][1] > 5
    assert scoring.slice_scores(maps, masks, median_size=3)["brain_p99"][1] == 0  # filtered out
    empty = scoring.slice_scores(maps, torch.zeros_like(masks))  # no brain: whole map
    assert empty["brain_mean"][0] == pytest.approx(16 / 64)


def _tiny_setup():
    model = tiny_unet(seed=0)
    torch.manual_seed(0)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    return model, make_scheduler(), images


def test_channels_last_scoring_leaves_the_weights_as_they_were():
    model, scheduler, images = _tiny_setup()
    before = score_maps(model, images, scheduler, patch_size=8, stride=8, seeds=[1, 2])
    after = score_maps(model, images, scheduler, patch_size=8, stride=8, seeds=[1, 2], channels_last=True)
    assert all(p.is_contiguous() for p in model.parameters())
    assert torch.allclose(before, after, atol=1e-5)


def test_packed_windows_are_apart_and_cover_every_window_once():
    for size, patch, stride, gap in [(128, 32, 16, 16), (60, 16, 8, 8), (64, 16, 8, 0)]:
        windows = [(k, top, left) for k, (top, left) in enumerate(scoring.window_grid(size, patch, stride))]
        groups = scoring.pack_windows(windows, patch, stride, gap)
        assert sorted(w for group in groups for w in group) == windows
        for group in groups:
            for a in group:
                for b in group:
                    assert a == b or max(abs(a[1] - b[1]), abs(a[2] - b[2])) >= patch + gap
    grid = [(k, top, left) for k, (top, left) in enumerate(scoring.window_grid(128, 32, 16))]
    assert len(scoring.pack_windows(grid, 32, 16, 16)) == 9  # every third window of every third row


def test_packing_with_one_window_per_group_is_the_plain_map():
    model, scheduler, images = _tiny_setup()
    plain = score_maps(model, images, scheduler, patch_size=8, stride=4, seeds=[1, 2], eval_batch_size=5)
    packed = score_maps(model, images, scheduler, patch_size=8, stride=4, seeds=[1, 2], eval_batch_size=5, pack_windows=True)
    assert (packed > 0).all() and not torch.allclose(plain, packed, atol=1e-5)  # an approximation, not the same map
    # a gap wider than the image puts every window in a group of its own: the plain map again
    alone = score_maps(model, images, scheduler, patch_size=8, stride=4, seeds=[1, 2], eval_batch_size=5, pack_windows=True,
                       pack_gap=1000)
    assert torch.allclose(plain, alone, atol=1e-5)
    # edge to edge (gap 0): fewer passes, and a map that differs from both
    edge = score_maps(model, images, scheduler, patch_size=8, stride=4, seeds=[1, 2], eval_batch_size=5, pack_windows=True,
                      pack_gap=0)
    assert (edge > 0).all() and not torch.allclose(edge, packed, atol=1e-5)


def test_smooth_along_scans_averages_scored_neighbours_of_the_same_scan_only():
    # rows 0-3 are scan A, rows 4-6 scan B; row 2 was not scored (left out), row 4 borders scan A
    positions = np.array([5, 0, 1, 3, 4, 6])  # any order
    scans = np.array(["B", "A", "A", "A", "B", "B"])
    scores = np.array([6.0, 0.0, 1.0, 3.0, 4.0, 8.0])
    smoothed = scoring.smooth_along_scans(positions, scans, scores, width=1)
    by_row = dict(zip(positions.tolist(), smoothed.tolist()))
    assert by_row[0] == pytest.approx(0.5)          # rows 0, 1
    assert by_row[1] == pytest.approx(0.5)          # rows 0, 1 (row 2 not scored)
    assert by_row[3] == pytest.approx(3.0)          # alone: row 2 missing, row 4 is scan B
    assert by_row[4] == pytest.approx(5.0)          # rows 4, 5 (row 3 is scan A)
    assert by_row[6] == pytest.approx(7.0)          # rows 5, 6
    assert np.array_equal(scoring.smooth_along_scans(positions, scans, scores, width=0), scores)
    wide = dict(zip(positions.tolist(), scoring.smooth_along_scans(positions, scans, scores, width=2).tolist()))
    assert wide[1] == pytest.approx((0 + 1 + 3) / 3)  # rows 0, 1, 3 (two above: row 3)


def test_smoothing_note_only_when_slices_are_sampled():
    assert scoring.smoothing_note(2, 50) and "--eval_samples all" in scoring.smoothing_note(2, 50)
    assert scoring.smoothing_note(2, "all") is None
    assert scoring.smoothing_note(0, 50) is None


# ---- score_split on a tiny model ---------------------------------------------------------------

class TinySlices(torch.utils.data.Dataset):
    """Items shaped like data.SliceDataset's; bright discs stand in for bleeds."""

    def __init__(self, n=10, size=32, seed=0):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size]
        self.brain = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
        self.labels = np.arange(n) % 2
        self.images = np.where(self.brain, 0.0, -1.0)[None].repeat(n, 0) + rng.normal(0, 0.05, (n, size, size))
        self.gts = np.zeros((n, size, size), bool)
        for i in np.flatnonzero(self.labels):
            self.gts[i] = ((yy - 12 - i % 5) ** 2 + (xx - 14) ** 2) < 12
            self.images[i][self.gts[i]] = 0.9
        self.positions = np.arange(100, 100 + n)  # rows in a pretend index
        self.patients = np.array([f"P{p // 3}" for p in self.positions])
        self.scans = np.array([f"S{p // 3}" for p in self.positions])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": torch.tensor(self.images[i][None], dtype=torch.float32), "mask": torch.from_numpy(self.brain.copy()),
                "label": int(self.labels[i]), "position": int(self.positions[i])}


def test_score_split_streams_scores_keeps_few_examples_and_pixels():
    model = tiny_unet(seed=0)
    dataset = TinySlices()
    settings = dataclasses.replace(PLAIN, patch_size=16, stride=8, score="brain_mean")
    gt_of = {int(p): dataset.gts[i] for i, p in enumerate(dataset.positions)}
    result = scoring.score_split(as_diffusion(model), dataset, settings, seed=1,
                                  keep_examples=2, gt_masks_fn=lambda pos: gt_of[pos] if gt_of[pos].any() else None)
    assert list(result["positions"]) == list(dataset.positions)
    assert list(result["labels"]) == list(dataset.labels)
    assert result["patients"][0] == "P33" and result["scans"][-1] == "S36" and set(result["scores"]) == set(scoring.SCORES)
    assert all(len(v) == 10 and np.isfinite(v).all() for v in result["scores"].values())
    assert [len(result["examples"][k]) for k in scoring.EXAMPLE_KINDS] == [2, 2, 2]
    tp, miss = result["examples"]["true positive"], result["examples"]["miss"]
    assert tp[0]["score"] >= tp[1]["score"] and miss[0]["score"] <= miss[1]["score"]
    assert tp[0]["score"] == result["scores"]["brain_mean"][dataset.labels == 1].max()
    assert miss[0]["score"] == result["scores"]["brain_mean"][dataset.labels == 1].min()
    assert tp[0]["gt_mask"].any() and result["examples"]["false positive"][0]["gt_mask"].sum() == 0
    pixel = result["pixel"]
    assert pixel["slices"] == 10 and pixel["pos"].sum() == sum(g[dataset.brain].sum() for g in dataset.gts)

    # Scores of a slice depend on (seed, position) only: a subset in another batch gives the same numbers.
    subset = torch.utils.data.Subset(dataset, [7, 3])
    subset.positions, subset.patients, subset.scans = (a[[7, 3]] for a in (dataset.positions, dataset.patients, dataset.scans))
    again = scoring.score_split(as_diffusion(model), subset, dataclasses.replace(settings, eval_batch_size=5), seed=1,
                                keep_examples=0, keep_maps=True)
    assert again["maps"].shape == (2, 32, 32) and again["maps"].dtype == np.float32
    assert list(again["positions"]) == [103, 107] and again["pixel"] is None
    for name, values in again["scores"].items():
        np.testing.assert_allclose(values, result["scores"][name][[3, 7]], rtol=1e-5, atol=1e-7)




# ---- the issue-13 options (all off by default) ---------------------------------------------------

def test_simplex_noise():
    smooth = scoring.window_noise(5, 3, 150, (2, 32, 32), noise="simplex")
    assert smooth.shape == (2, 32, 32)
    torch.testing.assert_close(smooth.mean(dim=(1, 2)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(smooth.std(dim=(1, 2)), torch.ones(2), atol=1e-4, rtol=0)
    neighbours = lambda n: float(torch.corrcoef(torch.stack([n[0, :, :-1].reshape(-1), n[0, :, 1:].reshape(-1)]))[0, 1])
    assert neighbours(smooth) > 0.8 and abs(neighbours(torch.randn(1, 32, 32))) < 0.2  # structure wider than a pixel

    model, scheduler = tiny_unet(), make_scheduler()
    images = phantom(32)[0]
    kw = dict(patch_size=16, stride=8, seeds=[1])
    one = score_maps(model, images, scheduler, **kw)
    simplex = score_maps(model, images, scheduler, noise="simplex", **kw)
    assert not torch.allclose(one, simplex)


def test_blood_weight_and_hyperdensity_prior():
    ctich = (-20.0, 100.0)  # CT-ICH's brain JPG
    hu = np.array([30.0, 50.0, 70.0, 95.0, 100.0])
    weight = scoring.blood_weight(((hu + 20) / 120 * 2 - 1)[None, None], ctich)[0]
    np.testing.assert_allclose(weight, [0, 0.5, 1, 0.5, 0], atol=1e-6)  # brain 0, acute blood 1, bone 0
    maps = torch.rand(1, 16, 16)
    off = dataclasses.replace(PLAIN)
    assert scoring.adjust_maps(maps, torch.zeros(1, 1, 16, 16), off) is maps
    blood = torch.full((1, 1, 16, 16), (70.0 + 20) / 120 * 2 - 1)  # 70 HU everywhere: weight 1
    prior = dataclasses.replace(PLAIN, hyperdensity_prior=True)
    torch.testing.assert_close(scoring.adjust_maps(maps, blood, prior, ctich), maps)
    torch.testing.assert_close(scoring.adjust_maps(maps, torch.zeros(1, 1, 16, 16), prior, ctich), torch.zeros_like(maps))


def test_relative_heights():
    import cohort
    index = {"scan": np.array(["a", "a", "a", "b", "b"])}
    np.testing.assert_allclose(cohort.relative_heights(index), [0, 0.5, 1, 0, 1])


# ---- one set of defaults ------------------------------------------------------------------------

def scoring_fields(namespace):
    return {name: getattr(namespace, name) for name in scoring.FIELDS}


def test_every_script_takes_its_scoring_defaults_from_the_settings_object(phantom_dir):
    import bench
    import evaluate
    import sweep
    import train
    expected = scoring.DEFAULTS.for_image(256).as_dict()
    assert scoring_fields(train.get_args(["--data_dir", phantom_dir])) == expected
    assert scoring_fields(bench.get_args([])) | {"patch_size": None, "stride": None} == scoring.DEFAULTS.as_dict()
    flags = evaluate.get_args(["--checkpoint", "c.pt"])
    assert all(value is None for value in scoring_fields(flags).values())  # None: the run's value
    resolved, missing = config.resolve(scoring.ScoringSettings, {}, flags)
    assert resolved == scoring.DEFAULTS and set(missing) == set(scoring.FIELDS) - {"patch_size", "stride", "pack_gap"}
    grid = sweep.get_args(["--checkpoint", "c.pt"])
    d = scoring.DEFAULTS  # the default setting is one point of the default grid
    assert set(d.eval_t) <= set(grid.eval_t) and d.residual in grid.residuals
    assert d.median_size in grid.median_sizes and d.smooth_slices in grid.smooth_slices
    assert grid.pack_windows is None and grid.noise is None  # every other scoring flag: the run's value unless given


def test_settings_window_rule_pack_gap_noise_seed_and_resolve():
    s = scoring.DEFAULTS.for_image(128)
    assert (s.patch_size, s.stride, s.pack_gap) == (32, 16, 16)
    assert scoring.DEFAULTS.for_image(256).patch_size == 64 and scoring.DEFAULTS.for_image(256).pack_gap == 32
    assert scoring.ScoringSettings(pack_gap=0).for_image(128).pack_gap == 0  # 0 is a gap, not "the default"
    passes = {gap: scoring.passes_per_slice(dataclasses.replace(s, pack_gap=gap), 128) for gap in (16, 0)}
    assert passes == {16: 9, 0: 4} and scoring.passes_per_slice(dataclasses.replace(s, pack_windows=False), 128) == 49
    assert scoring.ScoringSettings(patch_size=20).for_image(256).stride == 10
    assert scoring.noise_seed(3, 7) == 3 * 1_000_003 + 7
    saved = {"patch_size": 16, "stride": 8, "eval_t": [150], "residual": "abs", "score": "mean", "median_size": 0}
    resolved, missing = config.resolve(scoring.ScoringSettings, saved, {"score": "brain_p99", "median_size": None})
    assert (resolved.score, resolved.residual, resolved.median_size, resolved.eval_t) == ("brain_p99", "abs", 0, (150,))
    issue13_options = set(scoring.FIELDS[scoring.FIELDS.index("noise"):])  # newer than the saved args
    assert set(missing) == {"eval_batch_size", "smooth_slices", "skip_outside_mask", "pack_windows", "channels_last"} | issue13_options
    assert resolved.smooth_slices == scoring.DEFAULTS.smooth_slices
    assert scoring.ScoringSettings.from_flags(resolved.as_dict()) == resolved  # what args.json holds reads back
    assert resolved.for_image(64).pack_gap == 8  # a run saved before --pack_gap scores with the gap it had: patch / 2


def test_a_saved_reference_is_not_read_for_another_pack_gap():
    import types
    import cv
    run, checkpoint = types.SimpleNamespace(min_brain_fraction=0.15), {"epoch": 3, "metrics": {}}
    settings = scoring.DEFAULTS.for_image(128)
    keys = [cv.reference_key(dataclasses.replace(settings, pack_gap=gap), 1, run, checkpoint) for gap in (16, 0)]
    assert keys[0] != keys[1]


def test_every_residual_and_score_has_a_label_and_a_flag_choice():
    assert set(scoring.RESIDUAL_LABELS) == set(scoring.RESIDUALS)
    import argparse
    parser = argparse.ArgumentParser()
    scoring.add_scoring_flags(parser)
    for name in scoring.RESIDUALS:
        assert parser.parse_args(["--residual", name]).residual == name
    for name in scoring.SCORES:
        assert parser.parse_args(["--score", name]).score == name
