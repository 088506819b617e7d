"""PNG figures of a run: sample panels per NFE, the metric-vs-NFE curve, recovery panels.

Needs matplotlib (``pip install dpdm-core[plots]``); imported lazily with the Agg backend.
Samples are in model space: 2-D vectors are scattered, images are tiled into grids.
"""

from __future__ import annotations

import math

import torch

from .datasets import from_model


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(x: torch.Tensor, cols: int | None = None):
    """Tile ``(N, C, H, W)`` model-space images into an ``(H', W', C)`` uint8 array."""
    x = from_model(x, "image").cpu()
    n, c, h, w = x.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((c, rows * (h + 1) + 1, cols * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    grid = grid.permute(1, 2, 0).numpy()  # (H', W', C)
    return grid[..., 0] if c == 1 else grid


def save_samples(x: torch.Tensor, path, *, cols: int | None = None, limit: float = 1.6) -> None:
    """One grid PNG of model-space samples: images tiled (PIL, no matplotlib needed), 2-D vectors scattered."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        from PIL import Image

        Image.fromarray(image_grid(x, cols)).save(path)
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.3, 3.3))
    _draw(ax, x, "vector", limit, len(x))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw(ax, x: torch.Tensor, kind: str, limit: float, max_images: int, cols: int | None = None):
    if kind == "image":
        img = image_grid(x[:max_images], cols)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    else:
        pts = x.reshape(len(x), -1)[:, :2].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def samples_figure(panels: dict[str, torch.Tensor], kind: str, path, title: str = "", limit: float = 1.6,
                   max_images: int = 64) -> None:
    """One panel per entry (e.g. ``{"NFE 1": x, "NFE 2": x}``) side by side: one row of ``panel_grid``."""
    panel_grid({"": {label: (label, x) for label, x in panels.items()}}, kind, path, title=title, limit=limit,
               max_images=max_images)


def panel_grid(panels: dict[str, dict[str, tuple[str, torch.Tensor]]], kind: str, path, title: str = "",
               limit: float = 1.6, max_images: int = 64) -> None:
    """Panels in rows and columns: ``panels[row][column] = (panel title, samples)`` (e.g. Figure 6's models ×
    samplers), with ``title`` above them all."""
    plt = _plt()
    rows = list(panels)
    cols = list(dict.fromkeys(c for r in rows for c in panels[r]))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3 * len(cols), 3.2 * len(rows) + 0.4), squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            if c not in panels[r]:
                ax.axis("off")
                continue
            label, x = panels[r][c]
            _draw(ax, x, kind, limit, max_images)
            ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_figure(sweep: dict, metric: str, path) -> None:
    """Metric vs NFE, log scale, one line per model/sampler (``report.json``'s ``sweep``; the ``undistilled`` role,
    the teacher with the student's sampler and schedule, gets its own label and style)."""
    from .report import role_label, sweep_roles

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"student": "o-", "undistilled": "^:", "teacher": "s--"}
    for model in sweep_roles(sweep):
        for sampler, values in sweep[model].items():
            nfe = sorted(int(k) for k in values)
            if not nfe:
                continue
            y = [max(values[str(k)], 1e-12) for k in nfe]
            ax.plot(nfe, y, styles.get(model, "d-."), label=role_label(model, sampler))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recovery_figure(clean: torch.Tensor, examples: dict, kind: str, path, limit: float = 1.6,
                    max_images: int = 16) -> None:
    """Rows clean / noisy / teacher / student, one column per σ (the paper's Figure 4); images are shown as one
    strip of the same items per cell."""
    plt = _plt()
    sigmas = list(examples)
    rows = ["clean", "noisy", "teacher", "student"]
    strip = kind == "image"
    n = min(len(clean), max_images)
    width = (0.55 * n + 0.3) if strip else 2.6
    height = (0.55 + 0.25) if strip else 2.6
    fig, axes = plt.subplots(len(rows), len(sigmas), figsize=(width * len(sigmas), height * len(rows) + 0.4),
                             squeeze=False)
    for j, sigma in enumerate(sigmas):
        for i, row in enumerate(rows):
            x = clean if row == "clean" else examples[sigma][row]
            lim = limit + (3 * sigma if row == "noisy" else 0)
            _draw(axes[i][j], x, kind, lim, max_images, cols=n if strip else None)
            if i == 0:
                axes[i][j].set_title(f"σ = {sigma:g}", fontsize=9)
            if j == 0:
                axes[i][j].set_ylabel(row, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
