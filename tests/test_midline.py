"""midline.py and --asymmetry: the head's own mirror line, and the map less its mirror image."""
import numpy as np
import scipy.ndimage

import midline
import scoring


def head_mask(size=64, tilt_degrees=0.0, shift=(0, 0)):
    """An egg-shaped 'intracranial mask', longer front to back than side to side (so its mirror line is the long
    axis), tilted in the slice plane and moved off the image centre."""
    rows, cols = np.mgrid[:size, :size].astype(np.float64)
    r, c = rows - size / 2, cols - size / 2
    # narrower at the front (top) than at the back: symmetric about the vertical axis only
    half_width = 16 + 4 * (r / 26)
    mask = (r / 26) ** 2 + (c / np.maximum(half_width, 1)) ** 2 <= 1
    mask = scipy.ndimage.rotate(mask.astype(np.float64), tilt_degrees, reshape=False, order=1) > 0.5
    return scipy.ndimage.shift(mask.astype(np.float64), shift, order=0) > 0.5


def test_the_midline_of_a_tilted_off_centre_head_is_found():
    for tilt in (0.0, 9.0, -14.0):
        mask = head_mask(tilt_degrees=tilt, shift=(3, -6))
        centre, angle = midline.find_midline(mask)
        assert abs(abs(np.rad2deg(angle)) - abs(tilt)) <= 2.0, (tilt, np.rad2deg(angle))
        # the mask is its own mirror image about the line found
        assert (midline.mirrored(mask.astype(np.float32), (centre, angle)) > 0.5)[mask].mean() > 0.95
        # and the centre is the head's, not the image's
        assert abs(centre[1] - (32 - 6)) < 2


def test_a_symmetric_map_has_almost_no_asymmetry_and_a_one_sided_blob_keeps_its_height():
    mask = head_mask(tilt_degrees=7.0, shift=(0, 4))
    centre, angle = midline.find_midline(mask)
    # a symmetric map: a bright rim (the 'skull base'), mirror-symmetric about the head's line; smooth, as error
    # maps are, so that rasterising the tilted rim does not itself make asymmetry
    rim = (mask & ~scipy.ndimage.binary_erosion(mask, iterations=3)).astype(np.float32)
    rim = scipy.ndimage.gaussian_filter(rim, 1.0)
    assert midline.asymmetry(rim, mask)[mask].mean() < 0.1 * rim[mask].mean()
    # a one-sided 'bleed' on top of it
    bleed = np.zeros_like(rim)
    row, col = np.rint(centre + 10 * np.array([np.sin(angle), -np.cos(angle)]) + np.array([5, 0])).astype(int)
    bleed[row - 3:row + 3, col - 3:col + 3] = 2.0
    one_sided = midline.asymmetry(rim + bleed, mask)
    assert one_sided[row - 2:row + 2, col - 2:col + 2].min() > 1.5
    assert one_sided.max() == one_sided[row - 3:row + 3, col - 3:col + 3].max()


def test_the_mirrored_slice_scores_the_same():
    """A one-sided bleed scores high with --asymmetry mirror, and the slice's mirror image scores the same."""
    mask = head_mask(shift=(0, 2))
    rim = (mask & ~scipy.ndimage.binary_erosion(mask, iterations=3)).astype(np.float32)
    bleed = np.zeros_like(rim)
    bleed[26:32, 20:26] = 2.0
    maps = np.stack([rim, rim + bleed, np.fliplr(rim + bleed)]).astype(np.float32)
    masks = np.stack([mask, mask, np.fliplr(mask)])
    for asymmetry in ("mirror", "mix"):
        settings = scoring.ScoringSettings(asymmetry=asymmetry)
        out = scoring.asymmetric_maps(maps, masks, settings)
        scores = scoring.slice_scores(out, masks)["brain_p99"]
        assert scores[1] > 3 * scores[0], (asymmetry, scores)
        assert abs(scores[2] - scores[1]) <= 0.05 * scores[1], (asymmetry, scores)
    none = scoring.asymmetric_maps(maps, masks, scoring.ScoringSettings(asymmetry="none"))
    assert np.array_equal(none, maps)


def test_a_tiny_mask_has_no_midline_and_leaves_the_map_alone():
    mask = np.zeros((32, 32), bool)
    mask[10:14, 10:14] = True
    error_map = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    assert midline.find_midline(mask) is None
    assert np.array_equal(midline.asymmetry(error_map, mask), error_map)


def test_a_phantom_slice_with_a_one_sided_bleed_and_its_mirror_image_score_alike():
    """The phantom's head, one slice with an intraparenchymal bleed on one side, read as the model reads it; with the
    no-learning blood-band map (a map that sees the bleed but also the bright partial-volume rim), --asymmetry
    mirror keeps the bleed, drops most of what both sides share, and the slice flipped left-right scores the same."""
    import inputs
    import phantom
    rng = np.random.default_rng(3)
    head = phantom.random_head(rng, 64)
    bleed = {"kind": "intraparenchymal", "centre": 0, "reach": 1, "hu": 75.0, "side": 1.0, "x": 0.3, "y": 0.0,
             "radius": 0.12, "shape": np.zeros(3), "shape_phase": np.zeros(3)}
    hu, masks = phantom.draw_slice(np.random.default_rng(4), head, 0.55, 0, [bleed], 64)
    healthy, _ = phantom.draw_slice(np.random.default_rng(4), head, 0.55, 0, [], 64)
    settings = scoring.ScoringSettings(asymmetry="mirror")
    scores = []
    for slice_hu in (hu, np.fliplr(hu).copy(), healthy):
        image, code = inputs.decode_pixels(slice_hu, [[-20.0, 100.0]], 64)[:2]
        brain = inputs.intracranial(code)
        band = scoring.blood_weight(np.asarray(image, np.float32), [-20.0, 100.0])[None].astype(np.float32)
        one_sided = scoring.asymmetric_maps(band, brain[None], settings)
        scores.append(scoring.slice_scores(one_sided, brain[None])["brain_mean"][0])  # not saturated, unlike p99
    with_bleed, flipped, without = scores
    assert masks["intraparenchymal"].any()
    assert with_bleed > 0.01 and with_bleed > 3 * without, scores
    assert abs(flipped - with_bleed) <= 0.05 * with_bleed, scores
