"""The run directory: its layout (:class:`RunDir`, the one place that names its files) and the
records in it, each written and read back through one type. Loading a run's ensemble lives in
:mod:`loraens.rundir.load` (it needs torch; the report does not).

This package sits below :mod:`loraens.training`, :mod:`loraens.evaluation` and
:mod:`loraens.experiments`: it imports none of them.
"""

from loraens.io import read_jsonl
from loraens.rundir.layout import RunDir
from loraens.rundir.log_probs import EvalLogProbs, OODLogProbs
from loraens.rundir.records import (
    CalibrationRecord,
    CellRecord,
    FewShotResult,
    RecordError,
    RunSummary,
)

__all__ = [
    "CalibrationRecord",
    "CellRecord",
    "EvalLogProbs",
    "FewShotResult",
    "OODLogProbs",
    "RecordError",
    "RunDir",
    "RunSummary",
    "read_jsonl",
]
