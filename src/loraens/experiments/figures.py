"""The report's plots: one function per paper figure, each returning a matplotlib Figure.

The functions take plain numbers (arrays, dicts, the small dataclasses below) and know nothing
about run directories: ``sections.py`` decides which runs feed which figure. Figures are built
on an Agg canvas directly, never through pyplot, so no global backend state is touched and
nothing accumulates between figures of a long report.

Every figure gets a title, a legend below the axes (never over the data) and a grey footer
naming the model, data, budget and seeds it was made from (``footer``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from loraens.evaluation.metrics import ReliabilityBins
from loraens.io import atomic_path

__all__ = [
    "FAMILY_COLORS",
    "Arrow",
    "Bar",
    "ConfidenceSet",
    "Series",
    "arrows_figure",
    "confidence_figure",
    "decay_target_figure",
    "dropout_figure",
    "ensemble_size_figure",
    "family_color",
    "ood_figure",
    "randomness_figure",
    "reliability_figure",
    "risk_coverage_figure",
    "save_png",
    "training_curves_figure",
]

DPI = 120
# Regulariser families keep one colour across every figure, so a reader learns it once.
FAMILY_COLORS = {
    "none": "#333333",
    "KL": "#1f77b4",
    "B-decay": "#ff7f0e",
    "A-decay": "#2ca02c",
    "all-decay": "#9467bd",
    "early stop": "#d62728",
    "patience": "#8c564b",
}
_OTHER_COLORS = ("#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#8c564b", "#9467bd")
METRIC_LABELS = {
    "accuracy": "Accuracy",
    "nll": "NLL",
    "ece": "ECE",
    "brier": "Brier",
    "neg_max_prob": "AUROC (−max p)",
}


def family_color(family: str) -> str:
    """A regulariser family's colour; unknown (combined) families get a stable other colour."""
    if family in FAMILY_COLORS:
        return FAMILY_COLORS[family]
    return _OTHER_COLORS[sum(map(ord, family)) % len(_OTHER_COLORS)]


# ----------------------------------------------------------------------------- data holders


@dataclass(frozen=True)
class Series:
    """One line of an epoch plot: ``values[metric][i]`` belongs to ``epochs[i]``."""

    label: str
    color: str
    epochs: Sequence[int]
    values: Mapping[str, Sequence[float]]
    dashed: bool = False  # dashed = single-member mean, solid = ensemble (the paper's code)


@dataclass(frozen=True)
class ConfidenceSet:
    """Confidences of one method's wrong answers (Fig. 1a), with its headline numbers."""

    label: str
    color: str
    wrong_confidence: np.ndarray
    accuracy: float
    ece: float
    dashed: bool = False


@dataclass(frozen=True)
class Arrow:
    """Fig. 2: single-member mean (tail) to ensemble (head), both (accuracy, ECE)."""

    family: str
    strength: float | None  # orders opacity within a family; None = unregularised
    strength_text: str
    single: tuple[float, float]
    ensemble: tuple[float, float]
    members: int | None = None  # the run's ensemble size; None for early-stop (epoch) arrows


@dataclass(frozen=True)
class Bar:
    """Fig. 7: one randomness setting of one regulariser; values are (mean, std over seeds)."""

    randomness: str
    regulariser: str
    color: str
    ensemble: Mapping[str, tuple[float, float]]
    single: Mapping[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- layout


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _finish(
    fig: Figure,
    title: str,
    footer: str,
    handles: Sequence[object] = (),
    ncol: int = 4,
) -> Figure:
    """Grow the figure to make room for title, legend and footer below the axes, then lay out.

    Space is added in inches rather than taken from the axes, so crowded legends never shrink
    or cover the data.
    """
    width, height = fig.get_size_inches()
    # ~17 characters per inch at 7 pt keeps the footer inside the figure.
    footer_lines = textwrap.wrap(footer, width=max(40, int(width * 17))) if footer else []
    footer_h = 0.13 * len(footer_lines) + 0.08
    legend_rows = math.ceil(len(handles) / ncol) if handles else 0
    legend_h = 0.2 * legend_rows + 0.15 if legend_rows else 0.0
    title_h = 0.15
    total = height + footer_h + legend_h + title_h
    fig.set_size_inches(width, total)
    fig.suptitle(title, y=1 - 0.08 / total, va="top", fontsize=11)
    fig.tight_layout(rect=(0, (footer_h + legend_h) / total, 1, 1 - title_h / total))
    if handles:
        fig.legend(
            handles=list(handles),
            loc="lower center",
            bbox_to_anchor=(0.5, footer_h / total),
            ncol=min(ncol, len(handles)),
            frameon=False,
            fontsize=8,
        )
    if footer_lines:
        fig.text(
            0.01, 0.04 / total, "\n".join(footer_lines), fontsize=7, color="#555555", va="bottom"
        )
    return fig


def save_png(fig: Figure, path: str | Path) -> None:
    """Write the figure as PNG atomically (temporary sibling, then os.replace)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _grid(n_rows: int, n_cols: int, cell_w: float, cell_h: float):
    fig = _new_figure(cell_w * n_cols, cell_h * n_rows)
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    return fig, axes


# ----------------------------------------------------------------------------- reliability


def reliability_figure(
    task: str,
    panels: Sequence[tuple[str, ReliabilityBins, Mapping[str, float]]],
    footer: str,
) -> Figure:
    """Reliability diagrams side by side: accuracy per confidence bin over its count.

    ``panels`` holds (name, bins, {"accuracy", "ece"}) per model, e.g. member 0 and ensemble.
    """
    fig = _new_figure(3.6 * len(panels), 4.6)
    grid = fig.add_gridspec(2, len(panels), height_ratios=(3, 1))
    for col, (name, bins, stats) in enumerate(panels):
        top = fig.add_subplot(grid[0, col])
        bottom = fig.add_subplot(grid[1, col], sharex=top)
        centers = (bins.lower + bins.upper) / 2
        width = bins.upper - bins.lower
        filled = bins.count > 0
        top.bar(
            centers[filled],
            bins.accuracy[filled],
            width=width[filled],
            color="#1f77b4",
            edgecolor="white",
            label="accuracy in bin",
        )
        top.plot(
            centers[filled], bins.confidence[filled], "o", color="#d62728", ms=3, label="mean conf."
        )
        top.plot([0, 1], [0, 1], "--", color="#555555", lw=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy")
        top.set_title(f"{name}\nacc {stats['accuracy']:.3f}, ECE {stats['ece']:.3f}", fontsize=9)
        top.tick_params(labelbottom=False)
        bottom.bar(centers, bins.count, width=width, color="#7f7f7f", edgecolor="white")
        bottom.set(xlabel="Confidence (max p)", ylabel="Count")
    handles = [
        Patch(color="#1f77b4", label="accuracy per bin"),
        Line2D([], [], marker="o", ls="", color="#d62728", label="mean confidence per bin"),
        Line2D([], [], ls="--", color="#555555", label="perfect calibration"),
    ]
    return _finish(fig, f"Reliability diagrams: {task}", footer, handles, ncol=3)


# ----------------------------------------------------------------------------- Fig. 1a


def confidence_figure(panels: Mapping[str, Sequence[ConfidenceSet]], footer: str) -> Figure:
    """Fig. 1a: density of the confidence on wrongly answered questions, one panel per task.

    Each panel's legend sits under its axes: it carries that task's accuracy and ECE, and an
    overconfident model's mass near 1 would be hidden by a legend inside the axes.
    """
    n_cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig = _new_figure(4.4 * n_cols, 4.2 * n_rows)
    # Each row of histograms gets a row of its own under it for the tasks' legends.
    grid = fig.add_gridspec(2 * n_rows, n_cols, height_ratios=(3.0, 1.2) * n_rows)
    bins = np.linspace(0.0, 1.0, 21)  # shared bins, so the densities compare directly
    for i, (task, sets) in enumerate(panels.items()):
        row, col = divmod(i, n_cols)
        ax = fig.add_subplot(grid[2 * row, col])
        handles = []
        for s in sets:
            style = "--" if s.dashed else "-"
            label = f"{s.label}\n  acc {s.accuracy:.3f}, ECE {s.ece:.3f}"
            if len(s.wrong_confidence):
                ax.hist(
                    s.wrong_confidence,
                    bins=list(bins),
                    density=True,
                    histtype="step",
                    color=s.color,
                    ls=style,
                    lw=1.6,
                )
            else:
                label += " (no wrong answers)"
            handles.append(Line2D([], [], color=s.color, ls=style, lw=1.6, label=label))
        ax.set(xlim=(0, 1), xlabel="Confidence (max p) on wrong answers", ylabel="Density")
        ax.set_title(task, fontsize=10)
        legend_ax = fig.add_subplot(grid[2 * row + 1, col])
        legend_ax.axis("off")
        legend_ax.legend(handles=handles, fontsize=7, loc="upper center", frameon=False)
    return _finish(fig, "Fig. 1a: confidence on incorrect answers", footer)


# ----------------------------------------------------------------------------- Fig. 2


def _alphas(arrows: Sequence[Arrow]) -> list[float]:
    """Opacity grows with strength rank inside each family (the paper's encoding)."""
    out = []
    for a in arrows:
        strengths = sorted(
            {b.strength for b in arrows if b.family == a.family and b.strength is not None}
        )
        if a.strength is None or len(strengths) < 2:
            out.append(1.0)
        else:
            out.append(0.35 + 0.65 * strengths.index(a.strength) / (len(strengths) - 1))
    return out


def arrows_figure(panels: Mapping[str, Sequence[Arrow]], footer: str) -> Figure:
    """Fig. 2: per task, arrows from single-member (accuracy, ECE) to the ensemble's."""
    n_cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = _grid(n_rows, n_cols, 4.0, 3.4)
    families: dict[str, None] = {}
    for ax, (task, arrows) in zip(axes.flat, panels.items(), strict=False):
        points = [p for a in arrows for p in (a.single, a.ensemble)]
        for i, (a, alpha) in enumerate(zip(arrows, _alphas(arrows), strict=True)):
            families.setdefault(a.family)
            color = family_color(a.family)
            ax.annotate(
                "",
                xy=a.ensemble,
                xytext=a.single,
                arrowprops={"arrowstyle": "->", "color": color, "alpha": alpha, "lw": 1.6},
            )
            ax.plot(*a.single, "o", color=color, alpha=alpha, ms=3)
            if a.strength_text:
                ax.annotate(
                    a.strength_text,
                    xy=a.ensemble,
                    # Alternate above/below the head: clustered arrowheads are common.
                    xytext=(3, 3 if i % 2 else -9),
                    textcoords="offset points",
                    fontsize=6,
                    color=color,
                )
        _pad_limits(ax, points)
        ax.set(xlabel="Accuracy", ylabel="ECE")
        ax.set_title(task, fontsize=10)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=family_color(f), lw=2, label=f) for f in families]
    sizes = sorted(
        {a.members for arrows in panels.values() for a in arrows if a.members is not None}
    )
    members = "ensemble (M=" + "/".join(map(str, sizes)) + ")"
    handles.append(
        Line2D(
            [],
            [],
            marker="o",
            ls="-",
            color="#999999",
            label=f"tail: single (mean) → head: {members}",
        )
    )
    return _finish(
        fig,
        "Fig. 2: single member → ensemble, per regulariser (opacity = strength)",
        footer,
        handles,
        ncol=4,
    )


def _pad_limits(ax, points: Sequence[tuple[float, float]]) -> None:
    """Arrows are annotations, which do not move the autoscale: set the limits from the data."""
    if not points:
        return
    xs, ys = np.asarray(points, dtype=float).T
    for lo, hi, setter in ((xs.min(), xs.max(), ax.set_xlim), (ys.min(), ys.max(), ax.set_ylim)):
        pad = max((hi - lo) * 0.12, 0.005)
        setter(lo - pad, hi + pad)


# ----------------------------------------------------------------------------- epoch grids


def _epoch_grid(
    rows: Mapping[str, Sequence[Series]],
    metrics: Sequence[str],
    title: str,
    footer: str,
) -> Figure:
    """Rows = tasks, columns = metrics, x = epoch; colour = setting, dashed = single mean."""
    fig, axes = _grid(len(rows), len(metrics), 3.2, 2.5)
    colors: dict[str, str] = {}
    for r, (task, series) in enumerate(rows.items()):
        for c, metric in enumerate(metrics):
            ax = axes[r, c]
            for s in series:
                if metric not in s.values:
                    continue
                colors.setdefault(s.label, s.color)
                ax.plot(
                    s.epochs,
                    s.values[metric],
                    color=s.color,
                    ls="--" if s.dashed else "-",
                    marker="." if len(s.epochs) < 3 else None,
                    lw=1.5,
                )
            ax.set_xlabel("Epoch")
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            # Row names can carry the chosen strengths: wrap rather than run into the next axes.
            ax.set_title("\n".join(textwrap.wrap(task, 36)), fontsize=9)
            ax.xaxis.get_major_locator().set_params(integer=True)
    handles = [Line2D([], [], color=col, lw=2, label=label) for label, col in colors.items()]
    handles += [
        Line2D([], [], color="#777777", ls="-", label="ensemble"),
        Line2D([], [], color="#777777", ls="--", label="single member (mean)"),
    ]
    return _finish(fig, title, footer, handles, ncol=4)


def training_curves_figure(rows: Mapping[str, Sequence[Series]], footer: str) -> Figure:
    """Fig. 3: accuracy, NLL and ECE over training, unregularised vs weight decay on B."""
    return _epoch_grid(
        rows,
        ("accuracy", "nll", "ece"),
        "Fig. 3: eval metrics over epochs (regularisation keeps NLL from blowing up)",
        footer,
    )


def dropout_figure(rows: Mapping[str, Sequence[Series]], footer: str) -> Figure:
    """Fig. 4: MC dropout against an ensemble of LoRA members trained with dropout."""
    return _epoch_grid(
        rows,
        ("accuracy", "nll", "ece"),
        "Fig. 4: MC dropout vs LoRA ensemble with dropout",
        footer,
    )


def ood_figure(rows: Mapping[str, Sequence[Series]], footer: str) -> Figure:
    """Fig. 5: metrics on the OOD set and OOD-detection AUROC over epochs."""
    return _epoch_grid(
        rows,
        ("accuracy", "nll", "ece", "neg_max_prob"),
        "Fig. 5: out-of-distribution accuracy, NLL, ECE and detection AUROC",
        footer,
    )


def decay_target_figure(rows: Mapping[str, Sequence[Series]], footer: str) -> Figure:
    """Fig. 8 (App. B): very large weight decay on A only, B only or both, over epochs."""
    return _epoch_grid(
        rows,
        ("accuracy", "nll"),
        "Fig. 8: very large weight decay on A only, B only, or both",
        footer,
    )


# ----------------------------------------------------------------------------- Fig. 6


def _size_colors(sizes: Sequence[int]) -> dict[int, str]:
    """One colour per ensemble size, light to dark as M grows."""
    cmap = colormaps["viridis"]
    n = len(sizes)
    return {m: _hex(cmap(0.85 - 0.75 * i / max(n - 1, 1))) for i, m in enumerate(sorted(sizes))}


def _hex(rgba: Sequence[float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])


def ensemble_size_figure(rows: Mapping[str, Sequence[Mapping]], footer: str) -> Figure:
    """Fig. 6: ensemble metrics of random size-M subsets (mean ± std), rows = tasks.

    ``rows[task]`` are :func:`loraens.experiments.size_ablation.ablate_epoch_pools` rows. A task
    evaluated at several epochs is drawn over epochs, one line per M (the paper's view); one
    evaluated epoch (or a run with only its final predictions) is drawn against M.
    """
    metrics = ("accuracy", "nll", "ece")
    fig, axes = _grid(len(rows), len(metrics), 3.2, 2.5)
    by_epoch_tasks = [t for t, a in rows.items() if len({row["epoch"] for row in a}) >= 2]
    all_sizes = sorted({row["size"] for t in by_epoch_tasks for row in rows[t]})
    colors = _size_colors(all_sizes)
    for r, (task, ablation) in enumerate(rows.items()):
        epochs = list(dict.fromkeys(row["epoch"] for row in ablation))
        pool = ablation[0]["pool_size"] if ablation else 0
        by_epoch = task in by_epoch_tasks
        for c, metric in enumerate(metrics):
            ax = axes[r, c]
            if by_epoch:
                for size in dict.fromkeys(row["size"] for row in ablation):
                    chosen = [row for row in ablation if row["size"] == size]
                    _band(ax, [row["epoch"] for row in chosen], chosen, metric, colors[size])
                ax.set_xlabel("Epoch")
            else:
                _band(ax, [row["size"] for row in ablation], ablation, metric, "#1f77b4")
                where = "" if epochs[0] is None else f", epoch {epochs[0]}"
                ax.set_xlabel(f"Ensemble size M{where}")
            ax.set_ylabel(METRIC_LABELS[metric])
            ax.set_title("\n".join(textwrap.wrap(f"{task} (pool of {pool})", 36)), fontsize=9)
            ax.xaxis.get_major_locator().set_params(integer=True)
    handles: list[object] = []
    handles += [
        Line2D([], [], color=colors[m], marker=".", label=f"M={m}" + (" (single)" * (m == 1)))
        for m in all_sizes
    ]
    if len(by_epoch_tasks) < len(rows):
        handles.append(
            Line2D([], [], color="#1f77b4", marker="o", label="mean over subsets, against M")
        )
    handles.append(Patch(color="#777777", alpha=0.25, label="± 1 std over the random subsets"))
    return _finish(fig, "Fig. 6: ensemble size", footer, handles, ncol=4)


def _band(ax, xs: Sequence[float], rows: Sequence[Mapping], metric: str, color: str) -> None:
    """A mean line with a ± 1 std band."""
    x = np.asarray(xs, dtype=float)
    mean = np.asarray([row["mean"][metric] for row in rows])
    std = np.asarray([row["std"][metric] for row in rows])
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
    ax.plot(x, mean, "o-" if len(x) < 12 else "-", color=color, ms=3, lw=1.4)


# ----------------------------------------------------------------------------- Fig. 7


def randomness_figure(panels: Mapping[str, Sequence[Bar]], footer: str) -> Figure:
    """Fig. 7: ensemble metrics per source of randomness (bars), single-member mean (markers)."""
    metrics = ("accuracy", "nll", "ece")
    fig, axes = _grid(len(panels), len(metrics), 3.4, 2.6)
    legend: dict[str, object] = {}
    for r, (task, bars) in enumerate(panels.items()):
        sources = list(dict.fromkeys(b.randomness for b in bars))
        regs = list(dict.fromkeys(b.regulariser for b in bars))
        width = 0.8 / len(regs)
        for c, metric in enumerate(metrics):
            ax = axes[r, c]
            for b in bars:
                x = (
                    sources.index(b.randomness)
                    + (regs.index(b.regulariser) - (len(regs) - 1) / 2) * width
                )
                mean, std = b.ensemble[metric]
                ax.bar(
                    x,
                    mean,
                    width=width * 0.9,
                    yerr=std or None,
                    color=b.color,
                    alpha=0.85,
                    ecolor="#888888",
                    capsize=3,
                )
                legend.setdefault(
                    b.regulariser, Patch(color=b.color, label=f"ensemble, {b.regulariser}")
                )
                if metric in b.single:
                    ax.plot(x, b.single[metric], "D", mfc="white", mec="black", ms=5)
            ax.set_xticks(range(len(sources)), sources, fontsize=8)
            ax.set(xlabel="Randomness source", ylabel=METRIC_LABELS[metric])
            ax.set_title(task, fontsize=9)
            _bar_limits(ax, bars, metric)
    handles = [
        *legend.values(),
        Line2D([], [], marker="D", ls="", mfc="white", mec="black", label="single member (mean)"),
    ]
    return _finish(fig, "Fig. 7: sources of ensemble diversity", footer, handles, ncol=3)


def _bar_limits(ax, bars: Sequence[Bar], metric: str) -> None:
    """Zoom the y axis on the bars' range: differences between sources are small."""
    values = [
        b.ensemble[metric][0] + sign * b.ensemble[metric][1] for b in bars for sign in (-1, 1)
    ]
    values += [b.single[metric] for b in bars if metric in b.single]
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.3, 0.01 * max(abs(hi), 1e-3))
    ax.set_ylim(max(0.0, lo - pad), hi + pad)


# ----------------------------------------------------------------------------- decisions

_MODEL_STYLES = {
    "single": ("#1f77b4", "--"),
    "ensemble": ("#1f77b4", "-"),
    "single + TS": ("#d62728", "--"),
    "ensemble + TS": ("#d62728", "-"),
}


def risk_coverage_figure(
    panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, float]]], footer: str
) -> Figure:
    """Risk–coverage curves, one panel per task: ``panels[task][model] = (coverage, risk,
    AURC)``, models as in :data:`loraens.decisions.tables.MODELS`."""
    # At least 6.5 inches in all, so the title fits above a single panel.
    fig, axes = _grid(1, len(panels), max(4.0, 6.5 / len(panels)), 3.4)
    for ax, (task, curves) in zip(axes[0], panels.items(), strict=True):
        for model, (coverage, risk, area) in curves.items():
            color, style = _MODEL_STYLES.get(model, ("#777777", ":"))
            (line,) = ax.step(coverage, risk, where="post", color=color, ls=style, lw=1.4)
            line.set_label(f"{model} (AURC {area:.3f})")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("coverage (share answered)")
        ax.set_ylabel("risk (error rate of the answered)")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    return _finish(fig, "Risk–coverage: answer the most confident questions first", footer)
