"""PNG figures of a run: sample panels per NFE, the metric-vs-NFE curve, recovery panels.

Needs matplotlib (``pip install dpdm-core[plots]``); imported lazily with the Agg backend.
Samples are in model space: 2-D vectors are scattered, images are tiled into grids.
"""

from __future__ import annotations

import math

import torch

from ..datasets import from_model
from ..errors import DpdmError

# what a figure may be saved as: matplotlib picks the format by the file's extension (and appends .png to a name
# without one, so a name without one is refused rather than written under another name)
FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_format(path, option: str) -> None:
    """Refuse (``DpdmError`` naming ``option``) a figure path whose extension is not one of ``FORMATS``."""
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        what = f"{suffix!r} is not a figure format" if suffix else "the name needs an extension, the figure's format"
        raise DpdmError(f"{option} {path}: {what}; use one of {', '.join(FORMATS)} "
                        f"(e.g. {Path(path).with_suffix('.png')})")


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
    lines = max((label.count("\n") + 1 for r in rows for label, _ in panels[r].values()), default=1)
    title_lines = title.count("\n") + 1 if title else 0
    fig, axes = plt.subplots(len(rows), len(cols), squeeze=False,
                             figsize=(3 * len(cols), (3.0 + 0.25 * lines) * len(rows) + 0.3 * title_lines))
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


SAMPLER_COLOURS = {"dpdm": "tab:blue", "heun": "tab:orange", "euler": "tab:green", "dpmpp-2m": "tab:red",
                   "dpm-solver++": "tab:red"}
ROLE_STYLES = {"student": "o-", "undistilled": "^:", "teacher": "s--"}
_EXTRA = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]


def colour(sampler: str, role: str = "") -> str:
    """One colour per sampler in every figure (a baseline role, sampled with the student's sampler, gets a colour
    of its own)."""
    if role and role not in ROLE_STYLES:
        return _EXTRA[sum(map(ord, role)) % len(_EXTRA)]
    return SAMPLER_COLOURS.get(sampler, _EXTRA[sum(map(ord, sampler)) % len(_EXTRA)])


def curve_figure(sweep: dict, metric: str, path, *, floor: dict | None = None, title: str = "") -> None:
    """Metric vs NFE, log-log, one line per model/sampler (``report.json``'s ``sweep``): the colour names the
    sampler, the line style the model (student solid, the undistilled teacher dotted, the teacher dashed, baselines
    dash-dotted). ``floor`` (``evaluate.real_data_noise``): what real data scores at the same sample size, drawn as a
    band (its two halves) — the estimator cannot tell models apart below it. Values ≤ 0 (possible for unbiased
    two-sample estimates) cannot sit on a log axis: the axis turns symmetric-log then, never clamped."""
    from .report import role_label, sweep_roles

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lowest = math.inf
    for model in sweep_roles(sweep):
        for sampler, values in sweep[model].items():
            nfe = sorted(int(k) for k in values)
            if not nfe:
                continue
            y = [values[str(k)] for k in nfe]
            lowest = min([lowest, *y])
            ax.plot(nfe, y, ROLE_STYLES.get(model, "d-."), color=colour(sampler, model),
                    label=role_label(model, sampler), markersize=4)
    if floor:
        lo, hi = sorted((floor["a"], floor["b"]))
        lowest = min(lowest, lo)
        ax.axhspan(lo, hi if hi > lo else lo * 1.0001 + 1e-12, color="0.6", alpha=0.35)
        ax.axhline(floor["mean"], color="0.4", lw=1,
                   label=f"real data, {floor['num']} items (estimator floor, two halves)")
    ax.set_xscale("log")
    ticks = sorted({int(k) for by in sweep.values() for values in by.values() for k in values})
    if ticks:  # the NFEs measured, written as plain integers (not 2×10⁰)
        from matplotlib.ticker import FixedLocator, NullLocator

        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in ticks], fontsize=8)
    if lowest > 0:
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=max(abs(lowest), 1e-6))
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(title or f"{metric} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recovery_figure(clean: torch.Tensor, examples: dict, kind: str, path, limit: float = 1.6,
                    max_images: int = 16, title: str = "") -> None:
    """The paper's Figure 4: the clean items once on top, then one row per σ with the noised items, the teacher's
    denoised ones (DM) and the student's (DPDM); images as one strip of the same items per cell."""
    plt = _plt()
    sigmas = list(examples)
    cols = ["noisy", "teacher", "student"]
    heads = {"noisy": "noised (x0 + σε)", "teacher": "teacher D(x, σ) (DM)", "student": "student d(x, σ) (DPDM)"}
    strip = kind == "image"
    n = min(len(clean), max_images)
    width = (0.42 * n + 0.3) if strip else 2.6
    height = 0.62 if strip else 2.6
    fig, axes = plt.subplots(len(sigmas) + 1, len(cols), figsize=(width * len(cols) + 0.8,
                                                                  height * (len(sigmas) + 1) + 0.8), squeeze=False)
    _draw(axes[0][0], clean, kind, limit, max_images, cols=n if strip else None)
    axes[0][0].set_ylabel("clean", fontsize=8, rotation=0, ha="right", va="center")
    axes[0][0].set_title("clean training items", fontsize=9)
    for ax in axes[0][1:]:
        ax.axis("off")
    for i, sigma in enumerate(sigmas, start=1):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            lim = limit + (3 * sigma if col == "noisy" else 0)
            _draw(ax, examples[sigma][col], kind, lim, max_images, cols=n if strip else None)
            if i == 1:
                ax.set_title(heads[col], fontsize=9)
            if j == 0:
                ax.set_ylabel(f"σ = {sigma:g}", fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title or "Recovery of noised data (Section 5.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
