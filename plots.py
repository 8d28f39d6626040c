"""Every figure the scripts write: score histograms with ROC curves, anomaly-map overlays, training curves of one or
several runs, and the per-epoch training diagnostics panel. Each function writes one file (runfiles.save_figure,
atomically) on the Agg backend (runfiles.pyplot)."""
import matplotlib.ticker
import numpy as np
import torch
from sklearn.metrics import roc_curve

import data
import metrics
import runfiles
import scoring


def plot_scores(path, labels, scores, title):
    """Histogram of slice scores by class, and the ROC curve with its AUC."""
    plt = runfiles.pyplot()
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, np.float64)
    fig, (ax_hist, ax_roc) = plt.subplots(1, 2, figsize=(10, 4))
    bins = np.histogram_bin_edges(scores, bins=30) if len(scores) else 10
    for value, name, color in [(0, "healthy", "tab:blue"), (1, "hemorrhage", "tab:red")]:
        s = scores[labels == value]
        if len(s):
            ax_hist.hist(s, bins=bins, alpha=0.55, color=color, label=f"{name} (n={len(s)})")
    ax_hist.set_xlabel("slice anomaly score (higher = more likely hemorrhage)")
    ax_hist.set_ylabel("number of slices")
    ax_hist.set_title("Score distribution by true class")
    ax_hist.legend()
    auc = metrics.roc_auc(labels, scores)
    if auc is None:
        ax_roc.text(0.5, 0.5, "ROC curve needs both\nhealthy and hemorrhage slices", ha="center", va="center")
    else:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax_roc.plot(fpr, tpr, color="tab:red", lw=2, label=f"model (ROC-AUC = {auc:.3f})")
    ax_roc.plot([0, 1], [0, 1], "--", color="gray", label="chance (0.5)")
    ax_roc.set_xlim(0, 1)
    ax_roc.set_ylim(0, 1.01)
    ax_roc.set_xlabel("false positive rate (1 - specificity)")
    ax_roc.set_ylabel("true positive rate (sensitivity)")
    ax_roc.set_title("ROC curve, slice level")
    ax_roc.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    runfiles.save_figure(fig, path, dpi=90)
    plt.close(fig)


def plot_overlays(path, examples, title="Error maps over the brain window", label=None, legend=None):
    """One row per kind (true positive / false positive / miss): error heat-map over the input slice.

    examples: {kind: [dict(image, map, brain_mask, gt_mask or None, score, and "id" or "position")]}
    (score_split's "examples"; other kinds, e.g. predict.py's unlabelled slices, come after those, with their own
    `legend`). One colour scale for all panels, so colours compare across slices.
    """
    plt = runfiles.pyplot()
    kinds = [*scoring.EXAMPLE_KINDS, *[kind for kind in examples if kind not in scoring.EXAMPLE_KINDS]]
    rows = [(kind, examples.get(kind, [])) for kind in kinds if examples.get(kind)]
    if not rows:
        return False
    n_cols = max(len(exs) for _, exs in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(max(2.4 * n_cols + 1.5, 7.5), 2.6 * len(rows) + 1.3),
                             squeeze=False, layout="constrained")
    all_values = np.concatenate([ex["map"][ex["brain_mask"]] for _, exs in rows for ex in exs if ex["brain_mask"].any()] or [np.zeros(1)])
    vmax = max(float(np.percentile(all_values, 99.5)), 1e-6)
    heat = None
    for r, (kind, exs) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(exs):
                continue
            ex = exs[c]
            ax.imshow(ex["image"], cmap="gray", vmin=-1, vmax=1)
            # Hide the weakest errors so the anatomy under them stays visible.
            shown = np.ma.masked_less(ex["map"], 0.15 * vmax)
            heat = ax.imshow(shown, cmap="inferno", vmin=0, vmax=vmax, alpha=0.65)
            if ex["brain_mask"].any():
                ax.contour(ex["brain_mask"], levels=[0.5], colors="white", linewidths=0.8, linestyles="dashed")
            if ex.get("gt_mask") is not None and np.any(ex["gt_mask"]):
                ax.contour(ex["gt_mask"], levels=[0.5], colors="cyan", linewidths=1.0)
            name = ex.get("id", f"row {ex['position']}")
            ax.set_title(f"{kind}\n{name}  score {ex['score']:.4g}", fontsize=7)
    fig.colorbar(heat, ax=axes, shrink=0.6, aspect=30).set_label(label or scoring.RESIDUAL_LABELS["abs"], fontsize=8)
    legend = legend or ("true positive = highest-scoring hemorrhage slices; false positive = highest-scoring healthy "
                        "slices;\nmiss = lowest-scoring hemorrhage slices. Cyan outline = ground-truth bleed (where known), "
                        "dashed white = brain mask")
    fig.suptitle(f"{title}\n{legend}", fontsize=8)
    runfiles.save_figure(fig, path, dpi=90)
    plt.close(fig)
    return True


def _series(history, key):
    """Epochs and values of one metric, skipping epochs where it is missing or None."""
    points = [(h.get("epoch", i + 1), h[key]) for i, h in enumerate(history) if h.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def best_epoch(history, key, mode):
    """(epoch, value) of the best value of `key` (mode "max" or "min"), or (None, None)."""
    epochs, values = _series(history, key)
    if not values:
        return None, None
    i = int(np.argmax(values) if mode == "max" else np.argmin(values))
    return epochs[i], values[i]


def plot_runs(histories, labels, path):
    """Left: train (solid) and validation (dashed) loss. Right: validation ROC-AUC, best epoch starred."""
    plt = runfiles.pyplot()
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, (history, label) in enumerate(zip(histories, labels)):
        color = f"C{k}"
        epochs, values = _series(history, "train_loss")
        ax_loss.plot(epochs, values, "-o", ms=3, color=color, label=f"{label}: train")
        epochs, values = _series(history, "val_loss")
        ax_loss.plot(epochs, values, "--s", ms=3, color=color, label=f"{label}: validation")
        epochs, values = _series(history, "val_roc_auc")
        ax_auc.plot(epochs, values, "-o", ms=3, color=color, label=label)
        ci = [(h.get("epoch", i + 1), h["val_roc_auc_ci"]) for i, h in enumerate(history) if h.get("val_roc_auc_ci")]
        if ci:
            ax_auc.fill_between([e for e, _ in ci], [c[0] for _, c in ci], [c[1] for _, c in ci], color=color, alpha=0.12, lw=0)
        epoch, best = best_epoch(history, "val_roc_auc", "max")
        if best is not None:
            ax_auc.plot([epoch], [best], "*", ms=14, color=color, mec="black", zorder=5)
            ax_auc.annotate(f"best {best:.3f} (epoch {epoch})", (epoch, best), textcoords="offset points",
                            xytext=(6, 6 + 12 * k), fontsize=8, color=color)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("patch loss (MSE + 1 - SSIM)")
    ax_loss.set_title("Training and validation loss (healthy slices)")
    ax_loss.legend(fontsize=7)
    ax_auc.axhline(0.5, color="gray", ls=":", lw=1, label="chance (0.5)")
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation ROC-AUC (slice level)")
    ax_auc.set_title("Hemorrhage detection on validation patients\n(band = 95% patient-bootstrap CI, star = best epoch)",
                     fontsize=10)
    ax_auc.set_ylim(0, 1.05)
    ax_auc.legend(fontsize=7, loc="lower right")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    runfiles.save_figure(fig, path, dpi=90)
    plt.close(fig)


def save_diagnostics(path, diffusion, dataset, settings, seed, epoch, label):
    """Input, noised patch, one-step reconstruction and the scored anomaly map (the same noise and median filter
    as the validation scoring) for a few val slices."""
    plt = runfiles.pyplot()
    picks = list(np.flatnonzero(dataset.labels == 0)[:3]) + list(np.flatnonzero(dataset.labels == 1)[:3])
    if not picks:
        return
    items = [dataset[i] for i in picks]
    x0 = torch.stack([it["image"] for it in items]).to(diffusion.device)
    masks = torch.stack([it["mask"] for it in items]).to(diffusion.device)
    n, p, t_show = len(items), settings.patch_size, settings.eval_t[0]
    image_size = x0.shape[-1]
    # Noise the box centred on the brain (or the image centre) so the panel shows a typical window.
    boxes = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        ys, xs = torch.nonzero(masks[i].cpu(), as_tuple=True)
        cy, cx = (int(ys.float().mean()), int(xs.float().mean())) if len(ys) else (image_size // 2,) * 2
        boxes[i] = torch.tensor([min(max(c - p // 2, 0), image_size - p) for c in (cy, cx)])
    diffusion.network.eval()
    with torch.no_grad():
        step = diffusion.loss(x0, torch.Generator().manual_seed(seed), boxes=boxes, t=torch.full((n,), t_show))
    own = diffusion.image_channels  # a 2.5-D input's neighbours follow the slice's own channels: kept as they are
    shown = data.ArrayDataset([it["image"][:own].numpy() for it in items], [it["mask"].numpy() for it in items],
                              dataset.positions[picks], dataset.scans[picks], dataset.heights[picks],
                              context=[it["image"][own:].numpy() for it in items])
    scored = scoring.score_split(diffusion, shown, settings, seed=seed, keep_examples=0, keep_maps=True)
    maps = scored["maps"][np.searchsorted(scored["positions"], dataset.positions[picks])]  # back to the panel order
    # Only the box is trained and scored; outside it the network's output is unconstrained, so the
    # panel shows the input with the reconstructed box pasted in.
    inside = torch.zeros_like(x0, dtype=torch.bool)
    for i, (y, x) in enumerate(boxes.tolist()):
        inside[i, :, y:y + p, x:x + p] = True
    rebuilt = torch.where(inside, step.x0_hat.float(), x0)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    for i in range(n):
        kind = "hemorrhage" if items[i]["label"] else "healthy"
        panels = [(x0[i, 0], "input (brain window)"), (step.x_t[i, 0], f"patch noised at t={t_show}"),
                  (rebuilt[i, 0], "box rebuilt in one step"), (maps[i], f"scored map ({settings.residual} residual)")]
        for j, (img, title) in enumerate(panels):
            ax = axes[i, j]
            img = img.detach().cpu().float().numpy() if torch.is_tensor(img) else img
            im = ax.imshow(img, cmap="inferno" if j == 3 else "gray", vmin=0 if j == 3 else -1, vmax=None if j == 3 else 1)
            if j in (1, 2):
                y, x = boxes[i].tolist()
                ax.add_patch(plt.Rectangle((x, y), p, p, fill=False, ec="cyan", lw=1))
            if j == 3:
                fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(f"{kind}: {title}" if j == 0 else title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"Diagnostics after epoch {epoch} ({label})")
    fig.tight_layout()
    runfiles.save_figure(fig, path, dpi=80)
    plt.close(fig)
