"""Every member's unrounded eval log-probs at every evaluated epoch: ``eval_log_probs.safetensors``.

``predictions.jsonl`` keeps the kept epoch only (float64 log-probs and rounded probabilities;
files written before the log-probs were added hold the rounded ones only); the ensemble-size
ablation (Fig. 6) needs every epoch. One safetensors file (float32, no pickle, readable without
torch) holds a tensor ``epoch-EEEE`` of shape (M, N, K) per evaluated epoch E, padded with
``-inf`` past a question's options, and ``labels`` (N,) int64, in the eval set's order (the order
of ``predictions.jsonl``).

Training rewrites the file after each evaluated epoch, keeping the epochs before it: an epoch
redone after a resume replaces its own entry and drops any later one, so a resumed run ends with
exactly the file an uninterrupted one writes.

An OOD evaluation (an experiment's ``ood_eval``) keeps its per-question scores the same way in
``ood/<set>_log_probs.safetensors`` (:class:`OODLogProbs`): the members' log-probs on the OOD
questions and on the in-distribution questions they are told apart from, each set with its
labels (-1 for a question without an answer) and, in the file's metadata, its question ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from loraens.io import atomic_path

FORMAT_VERSION = "1"
_LABELS = "labels"
_EPOCH_PREFIX = "epoch-"


def _epoch_key(epoch: int) -> str:
    return f"{_EPOCH_PREFIX}{epoch:04d}"


@dataclass(frozen=True)
class EvalLogProbs:
    """Evaluated epochs (ascending), their (E, M, N, K) log-probs and the (N,) labels."""

    epochs: list[int]
    member_log_probs: np.ndarray
    labels: np.ndarray

    def at(self, epoch: int) -> np.ndarray:
        """The (M, N, K) log-probs of one evaluated epoch."""
        if epoch not in self.epochs:
            raise KeyError(f"epoch {epoch} was not evaluated (evaluated: {self.epochs})")
        return self.member_log_probs[self.epochs.index(epoch)]


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for a torn or foreign file
        raise ValueError(f"{path} is not a readable log-prob file: {err}") from err


def write_eval_log_probs(
    path: str | Path, epoch: int, member_log_probs: ArrayLike, labels: ArrayLike
) -> None:
    """Add (or replace) ``epoch``'s (M, N, K) log-probs, dropping entries of later epochs."""
    path = Path(path)
    lp = np.asarray(member_log_probs, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if lp.ndim != 3 or lp.shape[1] != len(y):
        raise ValueError(f"expected (M, N, K) log-probs for {len(y)} questions, got {lp.shape}")
    tensors = {}
    if path.is_file():
        tensors = {
            key: value
            for key, value in _read_tensors(path).items()
            if key.startswith(_EPOCH_PREFIX)
            and int(key.removeprefix(_EPOCH_PREFIX)) < epoch
            # Another shape can only come from another eval set: never mix the two.
            and value.shape == lp.shape
        }
    tensors[_epoch_key(epoch)] = np.ascontiguousarray(lp)
    tensors[_LABELS] = y
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format_version": FORMAT_VERSION})


def read_eval_log_probs(path: str | Path) -> EvalLogProbs:
    """The file's epochs in ascending order, as float64 (E, M, N, K) log-probs."""
    path = Path(path)
    tensors = _read_tensors(path)
    if _LABELS not in tensors:
        raise ValueError(f"{path} has no '{_LABELS}' tensor.")
    epochs = sorted(
        int(k.removeprefix(_EPOCH_PREFIX)) for k in tensors if k.startswith(_EPOCH_PREFIX)
    )
    if not epochs:
        raise ValueError(f"{path} holds no evaluated epoch.")
    stacked = np.stack([tensors[_epoch_key(e)] for e in epochs]).astype(np.float64)
    return EvalLogProbs(epochs, stacked, tensors[_LABELS])


# ----------------------------------------------------------------------------- OOD evaluations

_OOD_SETS = ("in_distribution", "ood")


@dataclass(frozen=True)
class OODLogProbs:
    """A run scored on an OOD set and on the in-distribution questions it is told apart from.

    Log-probs are (M, N, K) (padded with ``-inf`` past a question's options; the two sets may
    pad to different K), labels (N,) int64 with -1 where a question has no answer, ids the
    questions' ids in the same order."""

    in_log_probs: np.ndarray
    in_labels: np.ndarray
    in_ids: list[str]
    ood_log_probs: np.ndarray
    ood_labels: np.ndarray
    ood_ids: list[str]

    def parts(self) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
        return {
            "in_distribution": (self.in_log_probs, self.in_labels, self.in_ids),
            "ood": (self.ood_log_probs, self.ood_labels, self.ood_ids),
        }


def write_ood_log_probs(path: str | Path, record: OODLogProbs) -> None:
    """Write ``record`` atomically (float32 log-probs, as eval_log_probs.safetensors)."""
    tensors: dict[str, np.ndarray] = {}
    metadata = {"format_version": FORMAT_VERSION}
    members = {np.asarray(lp).shape[0] for lp, _, _ in record.parts().values()}
    if len(members) != 1:
        raise ValueError(f"both sets must come from the same members, got {sorted(members)}")
    for name, (lp, labels, ids) in record.parts().items():
        x = np.asarray(lp, dtype=np.float32)
        y = np.asarray(labels, dtype=np.int64)
        if x.ndim != 3 or x.shape[1] != len(y) or len(ids) != len(y):
            raise ValueError(
                f"{name}: expected (M, N, K) log-probs, N labels and N ids, got {x.shape}, "
                f"{len(y)} labels, {len(ids)} ids"
            )
        tensors[name] = np.ascontiguousarray(x)
        tensors[f"{name}_labels"] = y
        metadata[f"{name}_ids"] = json.dumps([str(i) for i in ids])
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_ood_log_probs(path: str | Path) -> OODLogProbs:
    """The record :func:`write_ood_log_probs` wrote, with float64 log-probs."""
    path = Path(path)
    tensors = _read_tensors(path)
    try:
        with safe_open(path, framework="numpy") as handle:
            metadata = handle.metadata() or {}
        parts = [
            (
                tensors[name].astype(np.float64),
                tensors[f"{name}_labels"],
                [str(i) for i in json.loads(metadata[f"{name}_ids"])],
            )
            for name in _OOD_SETS
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not an OOD log-prob record: missing or bad {err}") from err
    (in_lp, in_y, in_ids), (ood_lp, ood_y, ood_ids) = parts
    return OODLogProbs(in_lp, in_y, in_ids, ood_lp, ood_y, ood_ids)
