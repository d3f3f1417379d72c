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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
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
