"""scoring.fit_normative / normative_maps (issue 29 b): the map z-scored against the healthy error at each position."""
import numpy as np

import scoring


def healthy_maps(n, rng, size=48):
    """Maps whose healthy error depends on position (a bright 'skull base' band at the bottom) and level."""
    rows = np.arange(size)[:, None] * np.ones((1, size))
    mask = np.zeros((size, size), bool)
    mask[6:-6, 6:-6] = True
    levels = rng.uniform(0.2, 1.0, n)
    base = np.where(rows > size * 0.7, 1.0, 0.2)[None] * (1.5 - levels)[:, None, None]  # lower slices err more there
    maps = base + 0.05 * rng.standard_normal((n, size, size))
    return np.clip(maps, 0, None).astype(np.float32), np.repeat(mask[None], n, 0), levels


def test_a_healthy_slice_of_the_fitted_data_scores_about_zero_and_a_bleed_stands_out():
    rng = np.random.default_rng(0)
    maps, masks, levels = healthy_maps(200, rng)
    normative = scoring.fit_normative(maps, masks, levels)
    z = scoring.normative_maps(maps, levels, normative)
    inside = z[masks]
    assert abs(inside.mean()) < 0.15 and inside.std() < 1.5
    plain = scoring.slice_scores(maps, masks)["brain_p99"]
    scored = scoring.slice_scores(z, masks)["brain_p99"]
    # the healthy 'skull base' no longer makes the lowest slices score highest
    assert np.corrcoef(plain, levels)[0, 1] < -0.5 and abs(np.corrcoef(scored, levels)[0, 1]) < 0.4
    bleed = maps[:1].copy()
    bleed[0, 15:20, 15:20] += 0.5  # in the quiet upper half: small in the plain map, large against its own healthy error
    z_bleed = scoring.normative_maps(bleed, levels[:1], normative)
    assert z_bleed[0, 15:20, 15:20].min() > 4 and scoring.slice_scores(z_bleed, masks[:1])["brain_p99"][0] > scored.max()


def test_a_rare_pixel_cannot_blow_up():
    rng = np.random.default_rng(1)
    maps, masks, levels = healthy_maps(60, rng)
    masks[:, 6, 6] = False
    masks[0, 6, 6] = True  # covered by one slice only
    normative = scoring.fit_normative(maps, masks, levels)
    assert np.isfinite(normative["mean"]).all() and (normative["std"] > 0).all()
    assert np.abs(scoring.normative_maps(maps, levels, normative)[masks]).max() < 50
