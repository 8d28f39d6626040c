"""What each scored region (--scored_region) leaves out, the figures RESULTS.md quotes for issue 20.

    python scripts/region_costs.py                          # phantom bleeds only
    python scripts/region_costs.py --data_dir CTICH_DIR     # and the share of a real data set's masks, by level

1. Phantom: bleeds of each subtype drawn at 128 px, with the slices just below and above each bleed's centre
   (so no_bone_3d sees the bone of its neighbours); the share of each subtype's bleed pixels inside the
   intracranial mask that a region leaves out. A region that hides thin extra-axial bleeds hides them from the
   pixel map and from every slice score.
2. --data_dir: the share of the intracranial mask each region leaves out, by height in the scan, over the slices
   that pass the brain-area filter, read through data.SliceDataset as evaluate.py reads them.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cohort  # noqa: E402
import data  # noqa: E402
import inputs  # noqa: E402
import phantom  # noqa: E402

REGIONS = [("no_bone_3d", 1), ("no_bone_3d", 2), ("no_bone_3d", 3)]
LEVELS = [(0.0, 0.35), (0.35, 0.5), (0.5, 0.7), (0.7, 0.85), (0.85, 1.0)]


def phantom_costs(bleeds_per_kind, size, seed):
    """{kind: {region: share of its bleed pixels left out}}."""
    rng = np.random.default_rng(seed)
    lost = {kind: {region: [0, 0] for region in REGIONS} for kind in phantom.BLEED_LEVELS}
    for kind in phantom.BLEED_LEVELS:
        for _ in range(bleeds_per_kind):
            head = phantom.random_head(rng, size)
            levels = np.linspace(head["z_low"], head["z_high"], 20)
            bleed = phantom.random_bleed(rng, kind, levels)
            centre = bleed["centre"]
            codes, truth = {}, None
            for k in (centre - 1, centre, centre + 1):
                if 0 <= k < len(levels):
                    hu, masks = phantom.draw_slice(rng, head, levels[k], k, [bleed], size)
                    codes[k] = inputs.anatomy_code(hu, size)
                    truth = masks[kind] if k == centre else truth
            code = inputs.add_neighbour_bone(codes[centre], [c for k, c in codes.items() if k != centre])
            blood = truth & inputs.intracranial(code)
            for name, margin in REGIONS:
                kept = inputs.region_mask(code, name, margin)
                lost[kind][(name, margin)][0] += int((blood & ~kept).sum())
                lost[kind][(name, margin)][1] += int(blood.sum())
    return {kind: {region: a / max(b, 1) for region, (a, b) in row.items()} for kind, row in lost.items()}


def data_shares(data_dir, image_size, min_brain_fraction):
    """{(low, high): (n slices, {region: mean share of the intracranial mask left out})}."""
    index = cohort.load_index(data_dir)
    dataset_name = cohort.detect_dataset(data_dir)
    input_hu = inputs.native_input_hu(dataset_name, 1)
    cache = data.prepare_slices(data_dir, index, np.arange(len(index["id"])), image_size, input_hu)
    dataset = data.SliceDataset(cache, index, cache.ok(np.arange(len(index["id"])), min_brain_fraction))
    heights = cohort.relative_heights(index)[dataset.positions]
    shares = {region: np.zeros(len(dataset)) for region in REGIONS}
    for i in range(len(dataset)):
        code = dataset[i]["anatomy"].numpy()
        inside = inputs.intracranial(code)
        for name, margin in REGIONS:
            shares[(name, margin)][i] = (inside & ~inputs.region_mask(code, name, margin)).sum() / inside.sum()
    out = {}
    for low, high in LEVELS:
        rows = (heights >= low) & ((heights < high) | (high == 1.0))
        out[(low, high)] = (int(rows.sum()), {region: float(s[rows].mean()) if rows.any() else 0.0 for region, s in shares.items()})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="a data folder (RSNA, CT-ICH or NIfTI layout) to measure the regions on")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--min_brain_fraction", type=float, default=0.15)
    p.add_argument("--bleeds", type=int, default=20, help="phantom bleeds per subtype")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    names = [f"{name}:{margin}" for name, margin in REGIONS]
    print(f"phantom, {args.bleeds} bleeds per subtype at {args.image_size} px: share of bleed pixels left out")
    print(f"{'':18s}" + "".join(f"{n:>18s}" for n in names))
    for kind, row in phantom_costs(args.bleeds, args.image_size, args.seed).items():
        print(f"{kind:18s}" + "".join(f"{v:18.3f}" for v in row.values()))
    if args.data_dir:
        shares = data_shares(args.data_dir, args.image_size, args.min_brain_fraction)
        print(f"\n{args.data_dir}: share of the intracranial mask left out, by height in the scan")
        print(f"{'height':18s}" + "".join(f"{n:>18s}" for n in names))
        for (low, high), (n, row) in shares.items():
            print(f"{f'{low:.2f}-{high:.2f} (n={n})':18s}" + "".join(f"{v:18.3f}" for v in row.values()))


if __name__ == "__main__":
    main()
