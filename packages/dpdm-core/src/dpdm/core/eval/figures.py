"""PNG figures of a run: sample panels per NFE, the metric-vs-NFE curve, recovery panels.

Needs matplotlib (dpdm-core's ``plots`` extra, or ``pip install matplotlib``); imported lazily with the Agg
backend. Each figure has a builder that returns the matplotlib ``Figure`` (``nfe_curve``, ``grid``, ``recovery``;
tests read them) and a ``*_figure`` function that saves it. Samples are in model space: 2-D vectors are scattered,
images are tiled into grids. Every figure colours a model/sampler the same way (``colour``); every metric is
lower-is-better (``metric_label``).
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


def _save(fig, path) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": a legend beside the axes is kept
    _plt().close(fig)


# The one palette: a model/sampler has this colour in every figure (lines, scatters, legends).
DATA_COLOUR = "0.35"  # real data
ROLE_COLOURS = {"student": "tab:blue", "undistilled": "tab:purple"}  # undistilled: the teacher, student's sampling
# the teacher per sampler; "": the teacher as a denoiser (recovery); with the student's sampler it is the undistilled
TEACHER_COLOURS = {"": "tab:brown", "euler": "tab:green", "heun": "tab:orange", "dpmpp-2m": "tab:red",
                   "dpm-solver++": "tab:red", "dpdm": ROLE_COLOURS["undistilled"]}
_EXTRA = ["tab:pink", "tab:olive", "tab:cyan", "tab:gray"]  # other samplers, baselines: by name
ROLE_STYLES = {"student": "o-", "undistilled": "^:", "teacher": "s--"}  # baselines: "d-."


def colour(role: str, sampler: str = "") -> str:
    """The colour of ``role`` (``data``, ``student``, ``undistilled``, ``teacher`` or a baseline's name) sampled with
    ``sampler``: the student and the undistilled teacher one colour each, the teacher one per sampler, a baseline
    one per name (the same in every process: not Python's salted ``hash``)."""
    if role == "data":
        return DATA_COLOUR
    if role in ROLE_COLOURS:
        return ROLE_COLOURS[role]
    key = sampler if role == "teacher" else role
    if role == "teacher" and sampler in TEACHER_COLOURS:
        return TEACHER_COLOURS[sampler]
    return _EXTRA[sum(map(ord, key)) % len(_EXTRA)]


def metric_label(metric: str) -> str:
    """The y-axis label of a metric: its name and direction (every dpdm metric is a distance)."""
    return f"{metric} ↓ (lower is better)"

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


def save_samples(x: torch.Tensor, path, *, cols: int | None = None, limit: float = 1.6,
                 title: str = "samples") -> None:
    """One grid PNG of model-space samples: images tiled (PIL, no matplotlib needed), 2-D vectors scattered."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        from PIL import Image

        Image.fromarray(image_grid(x, cols)).save(path)
        return
    fig, ax = _plt().subplots(figsize=(3.3, 3.3))
    _draw(ax, x, "vector", limit, len(x))
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def _draw(ax, x: torch.Tensor, kind: str, limit: float, max_images: int, cols: int | None = None,
          colour: str = ROLE_COLOURS["student"]):
    if kind == "image":
        img = image_grid(x[:max_images], cols)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    pts = x.reshape(len(x), -1)[:, :2].numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color=colour)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=6)  # model-space coordinates: the noised panels' ranges differ from the others'
    ax.set_xlabel("x₁", fontsize=7, labelpad=1)
    ax.set_ylabel("x₂", fontsize=7, labelpad=1)


def samples_figure(panels: dict[str, torch.Tensor], kind: str, path, title: str = "", limit: float = 1.6,
                   max_images: int = 64, colours: dict[str, str] | None = None) -> None:
    """One panel per entry (e.g. ``{"NFE 1": x, "NFE 2": x}``) side by side: one row of ``panel_grid``;
    ``colours[label]``: a panel's scatter colour (``colour``; default the student's)."""
    colours = colours or {}
    panel_grid({"": {label: (label, x, colours.get(label, ROLE_COLOURS["student"])) for label, x in panels.items()}},
               kind, path, title=title, limit=limit, max_images=max_images)


def grid(panels: dict[str, dict[str, tuple]], kind: str, title: str = "", limit: float = 1.6, max_images: int = 64):
    """The ``Figure`` of ``panel_grid``."""
    rows = list(panels)
    cols = list(dict.fromkeys(c for r in rows for c in panels[r]))
    lines = max((p[0].count("\n") + 1 for r in rows for p in panels[r].values()), default=1)
    title = title or "samples"
    height = (3.0 + 0.25 * lines) * len(rows) + 0.3 * (title.count("\n") + 1)
    fig, axes = _plt().subplots(len(rows), len(cols), squeeze=False, figsize=(3 * len(cols), height))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            if c not in panels[r]:
                ax.axis("off")
                continue
            label, x, *rest = panels[r][c]
            _draw(ax, x, kind, limit, max_images, **({"colour": rest[0]} if rest else {}))
            ax.set_title(label, fontsize=9)
    fig.suptitle(title)
    return fig


def panel_grid(panels: dict[str, dict[str, tuple]], kind: str, path, title: str = "", limit: float = 1.6,
               max_images: int = 64) -> None:
    """Panels in rows and columns: ``panels[row][column] = (panel title, samples[, colour])`` (e.g. Figure 6's
    models × samplers), with ``title`` above them all."""
    _save(grid(panels, kind, title=title, limit=limit, max_images=max_images), path)


def noise_floor(floor: dict | None, values: list[float]) -> tuple[float | None, str]:
    """Where ``nfe_curve`` draws the floor and its legend text. ``floor`` (``protocols.real_data_noise``): two sets of
    real data score ``a`` and ``b``; a model scoring at most max(a, b, |a − b|) cannot be told from real data at this
    sample size. Without ``floor``, values ≤ 0 (unbiased estimates can be) sit on a line below the smallest positive
    value. ``(None, "")`` when nothing needs a floor."""
    if floor:
        level = max(floor["a"], floor["b"], abs(floor["a"] - floor["b"]))
        if level > 0:
            return level, (f"estimator noise floor: real data ({floor['num']} items)\nscores {floor['a']:.3g} and "
                           f"{floor['b']:.3g}; hollow points: at or below it")
    if all(v > 0 for v in values):
        return None, ""
    positive = [v for v in values if v > 0]
    text = "≤ 0: below what a log axis shows\n(hollow points; no noise floor measured)"
    return (min(positive) / 10 if positive else 1.0), text


def nfe_curve(sweep: dict, metric: str, *, floor: dict | None = None, title: str = ""):
    """Metric vs NFE, log-log, one line per model/sampler (``report.json``'s ``sweep``): the colour names the model
    and sampler (``colour``), the line style the model (student solid, the undistilled teacher dotted, the teacher
    dashed, baselines dash-dotted). Values at or below the estimator's noise floor (``noise_floor``) are drawn as
    hollow markers on the labelled floor line, in the shaded band below it: never as a plunge towards zero."""
    from matplotlib.ticker import FixedLocator, NullLocator

    from .report import role_label, sweep_roles

    fig, ax = _plt().subplots(figsize=(7, 4.5))
    values = [v for by in sweep.values() for vals in by.values() for v in vals.values()]
    level, floor_text = noise_floor(floor, values)
    for model in sweep_roles(sweep):
        for sampler, vals in sweep[model].items():
            nfe = sorted(int(k) for k in vals)
            if not nfe:
                continue
            y = [vals[str(k)] for k in nfe]
            shown = y if level is None else [max(v, level) for v in y]
            c = colour(model, sampler)
            ax.plot(nfe, shown, ROLE_STYLES.get(model, "d-."), color=c, label=role_label(model, sampler),
                    markersize=4)
            low = [(k, level) for k, v in zip(nfe, y) if level is not None and v <= level]
            if low:
                ax.plot(*zip(*low), ROLE_STYLES.get(model, "d-.")[0], color=c, markerfacecolor="white",
                        markersize=7, linestyle="none")
    ax.set_xscale("log")
    ax.set_yscale("log")  # every value drawn is positive: those at or below the floor sit on it
    if level is not None:
        ax.axhline(level, color="0.3", lw=1.2, label=floor_text)
        top = max([level, *values])
        ax.set_ylim(level / 3, top * 2)
        ax.axhspan(level / 3, level, color="0.6", alpha=0.3, lw=0)
    ticks = sorted({int(k) for by in sweep.values() for vals in by.values() for k in vals})
    if ticks:  # the NFEs measured, written as plain integers (not 2×10⁰)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in ticks], fontsize=8)
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(title or f"{metric} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
    return fig


def curve_figure(sweep: dict, metric: str, path, *, floor: dict | None = None, title: str = "") -> None:
    """Save ``nfe_curve`` to ``path``."""
    _save(nfe_curve(sweep, metric, floor=floor, title=title), path)


RECOVERY_HEADS = {"noisy": "noised x₀ + σε", "teacher": "teacher D(x, σ) (DM)", "student": "student d(x, σ) (DPDM)"}


def recovery(clean: torch.Tensor, examples: dict, kind: str, limit: float = 1.6, max_images: int = 16,
             title: str = ""):
    """The paper's Figure 4: the clean items once on top, then one row per σ with the noised items, the teacher's
    denoised ones (DM) and the student's (DPDM); images as one strip of the same items per cell."""
    sigmas = list(examples)
    cols = list(RECOVERY_HEADS)
    strip = kind == "image"
    n = min(len(clean), max_images)
    width = (0.42 * n + 0.3) if strip else 2.6
    height = 0.62 if strip else 2.6
    fig, axes = _plt().subplots(len(sigmas) + 1, len(cols), squeeze=False,
                                figsize=(width * len(cols) + 0.8, height * (len(sigmas) + 1) + 0.8))
    _draw(axes[0][0], clean, kind, limit, max_images, cols=n if strip else None, colour=DATA_COLOUR)
    axes[0][0].set_title("clean training items x₀", fontsize=9)
    if strip:
        axes[0][0].set_ylabel("clean", fontsize=8, rotation=0, ha="right", va="center")
    for ax in axes[0][1:]:
        ax.axis("off")
    palette = {"noisy": DATA_COLOUR, "teacher": colour("teacher"), "student": colour("student")}
    for i, sigma in enumerate(sigmas, start=1):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            lim = limit + (3 * sigma if col == "noisy" else 0)
            _draw(ax, examples[sigma][col], kind, lim, max_images, cols=n if strip else None, colour=palette[col])
            if not strip:  # a scatter's y axis carries x₂: σ goes into every panel's title
                ax.set_title(f"{RECOVERY_HEADS[col]}\nσ = {sigma:g}", fontsize=9)
                continue
            if i == 1:
                ax.set_title(RECOVERY_HEADS[col], fontsize=9)
            if j == 0:
                ax.set_ylabel(f"σ = {sigma:g}", fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title or "Recovery of noised data (Section 5.1)")
    return fig


def recovery_figure(clean: torch.Tensor, examples: dict, kind: str, path, limit: float = 1.6,
                    max_images: int = 16, title: str = "") -> None:
    """Save ``recovery`` to ``path``."""
    _save(recovery(clean, examples, kind, limit=limit, max_images=max_images, title=title), path)
