"""The experiments committed under docs/results regenerate: rebuilding the report from their
committed run records (no training) gives the committed CSVs, number for number."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from loraens.experiments.report import write_report

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.parent.parent for p in (REPO / "docs" / "results").glob("*/report/runs.csv"))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _same(committed: str, rebuilt: str) -> bool:
    if committed == rebuilt:
        return True
    try:
        a, b = float(committed), float(rebuilt)
    except ValueError:
        return False
    # Sums may round differently on another CPU or BLAS: equal to 9 significant digits.
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_there_are_committed_experiments():
    assert EXPERIMENTS, "docs/results/<experiment>/report/runs.csv: none found"


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.name)
def test_committed_records_rebuild_the_committed_csvs(experiment, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # runs.csv names runs by the path the report was given
    write_report([experiment.relative_to(REPO)], tmp_path)
    committed = sorted((experiment / "report").glob("*.csv"))
    assert {p.name for p in committed} == {p.name for p in tmp_path.glob("*.csv")}
    for path in committed:
        old, new = _rows(path), _rows(tmp_path / path.name)
        assert len(old) == len(new), path.name
        for line, (a, b) in enumerate(zip(old, new, strict=True), start=2):
            assert a.keys() == b.keys(), path.name
            diff = {k: (a[k], b[k]) for k in a if not _same(a[k], b[k])}
            assert not diff, f"{path.relative_to(REPO)} line {line}: committed vs rebuilt {diff}"
