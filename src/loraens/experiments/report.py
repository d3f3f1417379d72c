"""The report: collect finished runs, rebuild the paper's figures and tables, write one HTML page.

``write_report(paths, out)`` searches ``paths`` for run directories and writes to ``out``:
``index.html`` (one static page), ``fig-*.png`` and CSV files holding the same numbers
(``runs.csv``, ``epochs.csv``, ``table1.csv``, ``size.csv``, ``decay_target.csv``,
``decisions.csv``, ``ood_decisions.csv``, ``differences.csv``; ``shift.csv`` and
``shift_differences.csv`` when runs carry OOD records, see :mod:`loraens.experiments.shift`).

This module writes the files and assembles the page, building every section the same way
(:func:`build_section`). How runs are found and classified is in :mod:`loraens.experiments.runs`;
which runs feed which figure or table, in :mod:`loraens.experiments.sections`; the plots
themselves, in :mod:`loraens.experiments.figures`.
"""

from __future__ import annotations

import csv
import html
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from loraens.evaluation.tables import METRICS
from loraens.experiments import figures
from loraens.experiments.cost import COST_SECTIONS
from loraens.experiments.runs import Run, RunSet, collect_runs, provenance
from loraens.experiments.sections import SECTIONS, Panel, SectionSpec
from loraens.experiments.shift import SHIFT_SECTIONS
from loraens.io import write_text_atomic

__all__ = ["Section", "build_section", "epoch_rows", "run_rows", "write_report"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- CSV


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    write_text_atomic(path, buffer.getvalue())


RUN_COLUMNS = [
    "path", "kind", "task", "cell", "seed", "method", "regulariser", "dropout", "randomness",
    "members", "epochs", "lr", "batch_size", "train_questions", "eval_questions", "ood_task",
] + [f"{w}_{m}" for w in ("single", "ensemble") for m in METRICS] + [
    "train_seconds", "fit_seconds", "eval_seconds_per_question", "peak_memory_gb", "device",
    "precision",
]  # fmt: skip

EPOCH_COLUMNS = [
    "path", "task", "epoch", "split", "member", *METRICS,
    "neg_max_prob", "entropy", "normalized_entropy", "mutual_information",
]  # fmt: skip
EPOCH_SPLITS = ("eval", "holdout", "ood", "ood_detection")


def run_rows(rs: RunSet) -> list[dict]:
    """runs.csv: one row per training or few-shot run."""
    rows = []
    for r in rs.train:
        row = {
            "path": str(r.path),
            "kind": "train",
            "task": r.task,
            "cell": r.cell.cell if r.cell else "",
            "seed": r.seed,
            "method": r.method,
            "regulariser": r.regulariser,
            "dropout": r.dropout,
            "randomness": r.randomness,
            "members": r.members,
            "epochs": r.epochs,
            "lr": r.lr,
            "batch_size": r.batch_size,
            "train_questions": r.summary.train_questions,
            "eval_questions": r.summary.eval_questions,
            "ood_task": r.ood_task,
        }
        for which in ("single", "ensemble"):
            row |= {f"{which}_{m}": v for m, v in r.table(which).items()}
        rows.append(row | cost_columns(r))
    for f in rs.few_shot:
        # Draws play the members' part, but their average is no method of the paper: only the
        # mean over draws is reported.
        rows.append(
            {
                "path": str(f.path),
                "kind": "few_shot",
                "task": f.task,
                "cell": f.cell.cell if f.cell else "",
                "seed": f.seed,
                "method": f"few_shot (k={f.result.k})",
                "members": f.result.draws,
                "eval_questions": f.result.eval_questions,
                **{f"single_{m}": v for m, v in f.result.mean.items()},
            }
        )
    return rows


def cost_columns(r: Run) -> dict:
    """What a run cost, as recorded (older runs lack the scoring time and the peak memory):
    training its members, fitting a posterior on them, scoring one question with every member,
    and the process's peak memory; on which device and in which precision."""
    s = r.summary
    per_question = None
    if s.eval_seconds is not None and s.eval_questions:
        per_question = s.eval_seconds / s.eval_questions
    return {
        "train_seconds": s.train_seconds,
        "fit_seconds": s.fit_seconds,
        "eval_seconds_per_question": per_question,
        "peak_memory_gb": s.peak_memory_gb,
        "device": s.device,
        "precision": s.precision,
    }


def epoch_rows(rs: RunSet) -> list[dict]:
    """epochs.csv: every per-epoch evaluation row of every run."""
    return [
        {"path": str(r.path), "task": r.task, **row}
        for r in rs.train
        for row in r.rows
        if row.get("split") in EPOCH_SPLITS
    ]


# ----------------------------------------------------------------------------- sections


@dataclass
class Section:
    """One part of the page: a paper figure or table, or why it could not be drawn."""

    key: str
    title: str
    look_for: str
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    tables: list[tuple[list[str], list[dict]]] = field(default_factory=list)  # (columns, rows)
    notes: list[str] = field(default_factory=list)  # what is missing


@dataclass
class _Folder:
    """The report folder; remembers the figures written, so older ones can be removed."""

    path: Path
    figures: set[str] = field(default_factory=set)

    def save_figure(self, fig: Figure, name: str) -> str:
        figures.save_png(fig, self.path / name)
        self.figures.add(name)
        return name

    def write_csv(self, name: str, columns: Sequence[str], rows: Iterable[dict]) -> None:
        _write_csv(self.path / name, columns, rows)


def build_section(spec: SectionSpec, rs: RunSet, folder: _Folder) -> Section:
    """Ask every task for its panel and note what it lacks, then write the section's CSV and
    draw, caption and save its figure (one per task where ``spec.image`` holds ``{task}``)."""
    section = Section(spec.key, spec.title, spec.look_for)
    panels: dict[str, Panel] = {}
    for task in rs.tasks:
        panels[task] = spec.panel(rs, task)
        section.notes += panels[task].page_notes(task)
    rows = [row for p in panels.values() for row in p.rows]
    if spec.csv and (rows or not spec.csv_if_rows):
        folder.write_csv(spec.csv, spec.columns, rows)
    elif spec.csv:  # none this time: drop one an earlier report left in the same folder
        (folder.path / spec.csv).unlink(missing_ok=True)
    if spec.draw is None:
        if rows:
            section.tables.append((list(spec.columns), rows))
        return section
    if "{task}" in spec.image:
        groups = [
            ({t: p}, spec.image.format(task=t), spec.caption.format(task=t, run=_first_run(rs, p)))
            for t, p in panels.items()
            if p.data
        ]
    else:
        groups = [(panels, spec.image, spec.caption)]
    for group, name, caption in groups:
        drawn = {p.title or t: p.data for t, p in group.items() if p.data}
        if not drawn:
            continue
        # The footer names every run a panel picked, also for a task left undrawn (Fig. 1a with
        # only one of its models, Fig. 4 without eval rows).
        footer = provenance(
            [r for p in group.values() for r in p.runs],
            [f for p in group.values() for f in p.few_shot],
        )
        fig = spec.draw(drawn, footer)
        section.images.append((folder.save_figure(fig, name), f"{caption} {footer}"))
    return section


def _first_run(rs: RunSet, panel: Panel) -> str:
    return rs.relative(panel.runs[0].path) if panel.runs else "?"


def _build(spec: SectionSpec, rs: RunSet, folder: _Folder) -> Section:
    """One section; a failure is reported on the page instead of losing the whole report."""
    try:
        return build_section(spec, rs, folder)
    except Exception as error:  # one bad run must not cost the other figures
        log.exception("report section %s failed", spec.key)
        return Section(
            spec.key, f"{spec.key}: failed", "", notes=[f"Failed: {type(error).__name__}: {error}"]
        )


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; } td.num { text-align: right; }
th { background: #f4f4f4; } .note { color: #8a5a00; } .look { font-style: italic; }
details { margin: 0.5em 0; }
"""


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return "–" if value is None or value == "" else str(value)


def _html_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            css = ' class="num"' if isinstance(value, int | float) else ""
            cells.append(f"<td{css}>{html.escape(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _header(rs: RunSet) -> str:
    paths = ", ".join(html.escape(str(p)) for p in rs.paths)
    parts = [
        f"<p>Searched: {paths}. Found {len(rs.train)} finished training run(s) and "
        f"{len(rs.few_shot)} few-shot run(s) on task(s): "
        f"{html.escape(', '.join(rs.tasks) or 'none')}.</p>"
    ]
    refs = [
        f"{html.escape(t)}: {html.escape(rs.relative(ref.first.path))}"
        for t in rs.tasks
        if (ref := rs.reference(t)) is not None
    ]
    if refs:
        parts.append(
            "<p>Reference (unregularised LoRA ensemble) per task: " + "; ".join(refs) + "</p>"
        )
    columns = [
        "run",
        "task",
        "setting",
        "method",
        "seed",
        "M",
        "epochs",
        "ens. acc",
        "ens. NLL",
        "ens. ECE",
    ]
    rows = []
    for r in rs.train:
        ens = r.table("ensemble")
        rows.append(
            {
                "run": rs.relative(r.path),
                "task": r.task,
                "setting": r.label,
                "method": r.method,
                "seed": r.seed,
                "M": r.members,
                "epochs": r.epochs,
                "ens. acc": ens.get("accuracy"),
                "ens. NLL": ens.get("nll"),
                "ens. ECE": ens.get("ece"),
            }
        )
    for f in rs.few_shot:
        mean = f.result.mean
        rows.append(
            {
                "run": rs.relative(f.path),
                "task": f.task,
                "setting": f"few-shot k={f.result.k} (mean of draws)",
                "method": "few_shot",
                "seed": f.seed,
                "M": f.result.draws,
                "ens. acc": mean.get("accuracy"),
                "ens. NLL": mean.get("nll"),
                "ens. ECE": mean.get("ece"),
            }
        )
    parts.append(
        "<details open><summary>Runs (all numbers in runs.csv; per-epoch rows in epochs.csv)"
        f"</summary>{_html_table(columns, rows)}</details>"
    )
    if rs.ignored:
        items = "".join(
            f"<li>{html.escape(str(p))}: {html.escape(why)}</li>" for p, why in rs.ignored
        )
        parts.append(
            f"<details><summary>Ignored ({len(rs.ignored)})</summary><ul>{items}</ul></details>"
        )
    return "\n".join(parts)


def _section_html(s: Section) -> str:
    parts = [
        f'<h2 id="{s.key}">{html.escape(s.title)}</h2>',
        f'<p class="look">{html.escape(s.look_for)}</p>',
    ]
    for name, caption in s.images:
        parts.append(
            f'<figure><img src="{html.escape(name)}" alt="{html.escape(s.title)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts += [_html_table(columns, rows) for columns, rows in s.tables]
    if not s.images and not s.tables:
        parts.append('<p class="note">Not drawn: the runs found do not include its inputs.</p>')
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
    return "\n".join(parts)


def _page(rs: RunSet, sections: Sequence[Section]) -> str:
    toc = " · ".join(
        f'<a href="#{s.key}">{html.escape(s.title.split(":")[0])}</a>' for s in sections
    )
    body = "\n".join(_section_html(s) for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>loraens report</title><style>{_CSS}</style></head><body>\n"
        "<h1>LoRA ensembles: report</h1>\n"
        f"{_header(rs)}\n<p>{toc}</p>\n{body}\n</body></html>\n"
    )


# ----------------------------------------------------------------------------- entry point


def write_report(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Collect the runs under ``paths`` and write the report into ``out``; returns index.html.

    Raises ValueError when no finished run is found anywhere in ``paths``.
    """
    if isinstance(paths, str | Path):  # one path given bare: not a sequence of characters
        paths = [paths]
    rs = collect_runs(paths)
    if not rs.train and not rs.few_shot:
        searched = ", ".join(str(p) for p in paths) or "(no paths given)"
        ignored = "".join(f"\n  {p}: {why}" for p, why in rs.ignored)
        raise ValueError(f"No finished runs found in {searched}.{ignored}")
    folder = _Folder(Path(out))
    folder.path.mkdir(parents=True, exist_ok=True)
    specs = (*SECTIONS, *SHIFT_SECTIONS, *COST_SECTIONS)
    sections = [_build(spec, rs, folder) for spec in specs]
    _write_csv(folder.path / "runs.csv", RUN_COLUMNS, run_rows(rs))
    _write_csv(folder.path / "epochs.csv", EPOCH_COLUMNS, epoch_rows(rs))
    # A figure skipped this time must not linger from an earlier report in the same folder.
    for stale in folder.path.glob("fig-*.png"):
        if stale.name not in folder.figures:
            os.remove(stale)
    index = folder.path / "index.html"
    write_text_atomic(index, _page(rs, sections))
    return index
