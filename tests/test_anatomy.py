"""The anatomy code of a slice (inputs.anatomy_code) and the scored region read off it (scoring.scored_masks): on
phantom slices whose intracranial space is known, at every level from the skull base to the vertex."""
import numpy as np
import pytest

import inputs
import phantom
import scoring

SIZE = 64


def phantom_slice(level, seed=0, island=False, size=SIZE):
    """(HU [S, S], the true intracranial space, a bone island drawn inside it or None) of one phantom slice."""
    rng = np.random.default_rng(seed)
    head = phantom.random_head(rng, size)
    hu, _ = phantom.draw_slice(rng, head, level, 0, [], size)
    u, xn, yn, theta, rho, pixel = phantom._head_frame(head, level, size)
    _, inner, _ = phantom._scalp_and_skull(head, level, theta, rho, pixel, size)
    inside = rho <= inner
    bone = None
    if island:  # a petrous-like ridge of bone inside the intracranial space, with a partial-volume rim
        bone = (np.abs(yn + 0.1) < 0.06) & (np.abs(xn) > 0.2) & (np.abs(xn) < 0.55) & inside
        hu = np.where(bone, 900.0, hu)
        rim = bone ^ np.pad(bone, 1)[2:, 1:-1] | bone ^ np.pad(bone, 1)[:-2, 1:-1]
        hu = np.where(rim & ~bone & inside, 110.0, hu)
    return hu, inside, bone


def dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("level", [0.12, 0.3, 0.5, 0.7, 0.88])  # skull base, mid-brain, high, vertex
def test_intracranial_mask_and_scored_region_at_every_level(level):
    hu, inside, _ = phantom_slice(level)
    code = inputs.anatomy_code(hu, SIZE)
    intracranial = inputs.intracranial(code)
    # the mask is the true space eroded by one pixel (inputs.intracranial_mask): inside it, and most of it
    assert (intracranial & inside).sum() > 0.97 * intracranial.sum() and intracranial.sum() > 0.75 * inside.sum(), level
    soft = scoring.scored_masks(intracranial[None], code[None], scoring.ScoringSettings(scored_region="no_bone_3d"))[0]
    assert not (soft & ~intracranial).any()  # a part of the intracranial mask
    assert soft.sum() > 0.6 * inside.sum() and (soft & inside).sum() > 0.97 * soft.sum(), level
    head = (code & inputs.HEAD) > 0
    assert (head >= intracranial).all() and 0 < scoring.slice_levels(code[None], intracranial[None])[0] < 1


def test_bone_islands_and_their_band_are_left_out_but_blood_is_not():
    hu, inside, island = phantom_slice(0.3, island=True)
    blood = (np.hypot(*np.mgrid[0:SIZE, 0:SIZE] - np.array([SIZE * 0.33, SIZE * 0.5])[:, None, None]) < 3) & inside & ~island
    hu = np.where(blood, 75.0, hu)  # acute blood, 50-90 HU
    code = inputs.anatomy_code(hu, SIZE)
    intracranial = inputs.intracranial(code)
    assert intracranial[island].mean() > 0.9  # holes filled: the plain region keeps the island in
    near = np.pad(island, 1)[2:, 1:-1] & ~island & inside  # the row next to the ridge
    for region in ("no_bone_3d",):
        for margin in (0, 2):
            settings = scoring.ScoringSettings(scored_region=region, bone_margin=margin)
            soft = scoring.scored_masks(intracranial[None], code[None], settings)[0]
            assert not (soft & island).any(), region
            assert soft[blood].mean() == 1.0, region  # blood far from bone stays scored
        assert not (soft & near).any(), region  # the band of margin 2 takes the partial-volume rim out
    plain = scoring.scored_masks(intracranial[None], code[None], scoring.ScoringSettings(scored_region="intracranial"))[0]
    assert (plain == intracranial).all()
    default = scoring.scored_masks(intracranial[None], code[None], scoring.ScoringSettings())[0]
    assert not (default & island).any() and default[blood].all()  # the default (issue 29) is no_bone_3d:2


def test_anatomy_from_ctich_style_windows_matches_hu():
    hu, inside, _ = phantom_slice(0.3, island=True)
    windowed = {name: inputs.window_hu(hu, *inputs.JPG_WINDOWS[name]) for name in ("brain", "bone")}
    from_hu, from_jpg = inputs.anatomy_code(hu, SIZE), inputs.anatomy_code(windowed, SIZE)
    for bit in (inputs.INTRACRANIAL, inputs.BONE, inputs.HEAD):
        assert dice((from_hu & bit) > 0, (from_jpg & bit) > 0) > 0.9, bit


def test_no_intracranial_mask_on_the_neck_but_one_through_a_craniectomy():
    """Below the skull base the largest piece of tissue is the neck or the face, which no bone encloses: no mask.
    A brain whose skull is open over a quarter of its outline (craniectomy) keeps its mask."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] - SIZE / 2
    neck = np.where(np.hypot(x / 0.9, y) < SIZE * 0.38, 40.0, -1000.0)  # muscle and fat of the neck
    neck = np.where(np.hypot(x, y - SIZE * 0.12) < 4, 700.0, neck)  # a vertebral body
    neck = np.where((np.abs(np.hypot(x, y + SIZE * 0.05) - SIZE * 0.28) < 1.5) & (y < -SIZE * 0.15), 900.0, neck)  # the jaw
    assert not inputs.intracranial(inputs.anatomy_code(neck, SIZE)).any()

    hu, inside, _ = phantom_slice(0.5)
    _, _, _, theta, _, _ = phantom._head_frame(phantom.random_head(np.random.default_rng(0), SIZE), 0.5, SIZE)
    opened = (hu >= 200) & (np.abs(np.angle(np.exp(1j * (theta - 0.5)))) < np.pi / 4)  # a quarter of the skull gone
    mask = inputs.intracranial(inputs.anatomy_code(np.where(opened, 30.0, hu), SIZE))
    assert mask.sum() > 0.6 * inside.sum() and (mask & inside).sum() > 0.9 * mask.sum()


def test_a_subdural_against_the_inner_table_stays_in_no_bone_3d():
    """no_bone_3d draws its band only around bone and air inside the mask and the bays where ridges poke in, not along
    the skull, where thin subdurals and epidurals lie."""
    hu, inside, island = phantom_slice(0.5, island=True, size=128)  # the recipe's size: a 2 px band is 2 px
    rim = inside & ~np.pad(inside, 2)[4:, 2:-2]  # 2 px against the inner table, at the back of the head
    rim &= ~(np.pad(island, 3)[3:-3, 3:-3])
    code = inputs.anatomy_code(np.where(rim, 70.0, hu), 128)
    intracranial = inputs.intracranial(code)
    subdural = rim & intracranial
    assert subdural.sum() > 5
    assert inputs.region_mask(code, "no_bone_3d", 2)[subdural].mean() > 0.9
    assert not (inputs.region_mask(code, "no_bone_3d", 2) & island).any()


def test_no_bone_3d_leaves_out_what_is_bone_in_the_next_slice_but_not_the_rim():
    """A ridge of bone in the slice below (the floor of a fossa, a petrous ridge) lies partly in this slice: no_bone_3d
    leaves those pixels out, except within Z_RIM of the outline, where extra-axial bleeds lie. A slice read alone
    (no NEAR_BONE bit) loses only what it takes of the slice alone (inputs._without_bone_islands)."""
    hu, inside, _ = phantom_slice(0.5, size=128)
    code = inputs.anatomy_code(hu, 128)
    intracranial = inputs.intracranial(code)
    _, _, ridge = phantom_slice(0.5, island=True, size=128)
    rim_bone = intracranial & ~np.pad(intracranial, 2)[4:, 2:-2]  # bone under the back of the outline (the vertex cap)
    below = np.where(ridge | rim_bone, inputs.BONE, 0).astype(np.uint8)
    with_neighbours = inputs.add_neighbour_bone(code, [below, np.zeros_like(below)])
    assert (((with_neighbours & inputs.NEAR_BONE) > 0) == (ridge | rim_bone)).all()
    assert ((with_neighbours & ~np.uint8(inputs.NEAR_BONE)) == code).all()
    kept = inputs.region_mask(with_neighbours, "no_bone_3d", 2)
    assert not (kept & ridge).any() and kept[rim_bone & intracranial].mean() > 0.95
    alone = inputs.region_mask(code, "no_bone_3d", 2)
    assert (alone == (intracranial & inputs._without_bone_islands(code, 2))).all()
    assert (inputs.add_neighbour_bone(with_neighbours, []) == code).all()  # the bit is set afresh, never kept


def test_a_slice_is_read_with_its_neighbours_bone(phantom_dir, tmp_path):
    """data.SliceDataset sets NEAR_BONE from the slices just above and below in the scan; prepare_slices decodes those
    neighbours even when only the middle slice is asked for, so a slice's anatomy never depends on what was decoded
    before. ArrayDataset (predict.py, one scan) does the same by slice number."""
    import cohort
    import data
    index = cohort.load_index(phantom_dir, cache_dir=str(tmp_path))
    scan_rows = np.flatnonzero(index["scan"] == index["scan"][0])
    middle, lowest = int(scan_rows[2]), int(scan_rows[0])
    cache = data.prepare_slices(phantom_dir, index, [middle, lowest], 64, inputs.native_input_hu("rsna", 1), cache_dir=str(tmp_path),
                                num_workers=0)
    assert set(np.flatnonzero(cache.state[:] == 1)) >= {middle - 1, middle, middle + 1, lowest, lowest + 1}
    dataset = data.SliceDataset(cache, index, [lowest, middle])
    items = {int(dataset[i]["position"]): dataset[i]["anatomy"].numpy() for i in range(len(dataset))}
    near = lambda *rows: np.logical_or.reduce([(cache.masks[r] & inputs.BONE) > 0 for r in rows])
    assert (((items[middle] & inputs.NEAR_BONE) > 0) == near(middle - 1, middle + 1)).all()
    assert (((items[lowest] & inputs.NEAR_BONE) > 0) == near(lowest + 1)).all()
    assert ((items[middle] & inputs.NEAR_BONE) > 0).any()  # the skull of the next slice lies under this one's scalp
    codes = [cache.masks[r] for r in (middle - 1, middle, middle + 1)]
    images = [cache.images[r] for r in (middle - 1, middle, middle + 1)]
    scan = data.ArrayDataset(images, codes, [10, 11, 12], np.zeros(3, np.int64), np.zeros(3))
    assert (scan[1]["anatomy"].numpy() == items[middle]).all()
    assert (((scan[0]["anatomy"].numpy() & inputs.NEAR_BONE) > 0) == near(middle)).all()


def test_a_slice_whose_neighbour_was_never_decoded_is_refused(phantom_dir, tmp_path, monkeypatch):
    """Loud, not silent: were a neighbour left undecoded, the slice's region would depend on what was decoded before."""
    import cohort
    import data
    index = cohort.load_index(phantom_dir, cache_dir=str(tmp_path))
    middle = int(np.flatnonzero(index["scan"] == index["scan"][0])[2])
    with monkeypatch.context() as patch:  # a cache filled as before this rule: the requested row alone
        patch.setattr(data, "neighbour_rows", lambda index, positions: np.full((len(positions), 2), -1))
        cache = data.prepare_slices(phantom_dir, index, [middle], 64, inputs.native_input_hu("rsna", 1),
                                    cache_dir=str(tmp_path), num_workers=0)
    with pytest.raises(RuntimeError, match="neighbour is not decoded"):
        data.SliceDataset(cache, index, [middle])


def test_region_costs_script_measures_every_region_on_phantom_bleeds():
    """scripts/region_costs.py (the bleed-pixel figures of RESULTS.md) runs, and the rule it checks holds on a few
    phantom bleeds: regions that draw no band along the inner table leave extra-axial bleed pixels in."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "region_costs.py")
    spec = importlib.util.spec_from_file_location("region_costs", path)
    region_costs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(region_costs)
    costs = region_costs.phantom_costs(bleeds_per_kind=2, size=128, seed=0)
    assert set(costs) == set(phantom.BLEED_LEVELS)
    for kind in ("epidural", "subdural"):
        assert costs[kind][("no_bone_3d", 2)] <= 0.05, costs[kind]


def test_a_small_closed_piece_does_not_win_over_the_brain_however_the_slice_is_cropped():
    """A skull-base slice whose skull does not close around the brain (a gap wider than the closing bridges) but does
    close around a sinus-sized piece: the mask is the brain, found without a closed skull, whether the slice has air
    around it or is cropped to the head (a 2-D export). A share of the image once decided it: the cropped slice kept
    the sinus (CT-ICH 052, slice 10, exported at 40/80)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] - SIZE / 2 + 0.5
    rho, theta = np.hypot(y, x), np.arctan2(y, x)
    hu = np.where(rho < 28, 20.0, -1000.0)  # scalp
    hu = np.where(rho < 27, 1000.0, hu)  # skull
    hu = np.where(rho < 24, 35.0, hu)  # brain
    gap = (np.abs(theta - 3 * np.pi / 4) < 0.3) & (rho >= 23)  # the ring open over ~17 degrees, wider than any closing
    hu = np.where(gap & (rho < 28), 20.0, hu)
    sinus = (np.abs(y + 8) <= 4) & (np.abs(x) <= 4)  # a closed 9x9 bone loop around 49 px of tissue
    hu = np.where(sinus & ~((np.abs(y + 8) <= 3) & (np.abs(x) <= 3)), 1000.0, hu)
    brain = (rho < 23) & ~sinus
    masks = {}
    for name, pad in (("tight", -4), ("air", 12)):
        slice_hu = hu[4:-4, 4:-4] if pad < 0 else np.pad(hu, pad, constant_values=-1000.0)
        mask = inputs.brain_mask_from_hu(slice_hu)
        masks[name] = mask if pad < 0 else mask[pad:-pad, pad:-pad][4:-4, 4:-4]
    cropped_brain = brain[4:-4, 4:-4]
    for name, mask in masks.items():
        assert (mask & cropped_brain).sum() > 0.7 * cropped_brain.sum(), name  # the brain, not the sinus
    assert dice(masks["tight"], masks["air"]) > 0.95
