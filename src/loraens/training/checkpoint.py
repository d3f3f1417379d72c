"""Epoch checkpoints: enough to continue a run exactly where its last complete epoch ended.

A checkpoint folder holds every member's stacked adapters (safetensors), the optimiser state and
the torch RNG state (``torch.load(weights_only=True)``: plain tensors and numbers, nothing
unpickled beyond that), and ``state.json`` with the epoch count and the metric rows so far. The
data order needs no saved state: each epoch's order is rebuilt from the seeds. The folder is
swapped in atomically, so a kill leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraens.io import atomic_path
from loraens.models.lora import LoRAEnsemble

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, from another format version, or does not fit the run."""


@dataclass
class TrainState:
    n_train: int = 0
    epochs_done: int = 0
    rows: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_seen: int = 0
    best_epoch: int = 0  # early stopping on held-out NLL (optim.patience)
    best_holdout_nll: float | None = None
    stopped_early: bool = False


def stacked_tensors(ensemble: LoRAEnsemble) -> dict[str, torch.Tensor]:
    """Every member's adapters as stacked CPU tensors: a snapshot later training leaves alone."""
    return {
        f"{name}.lora_{which}": getattr(layer, f"lora_{which}").detach().cpu().clone()
        for name, layer in ensemble.lora_layers.items()
        for which in ("A", "B")
    }


def save_checkpoint(
    folder: Path,
    ensemble: LoRAEnsemble,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    best: dict[str, torch.Tensor] | None = None,
) -> None:
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(stacked_tensors(ensemble), tmp / "adapters.safetensors")
        if best is not None:
            save_file(best, tmp / "best_adapters.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
            tmp / "optimizer.pt",
        )
        payload = {"format_version": FORMAT_VERSION, **asdict(state)}
        (tmp / "state.json").write_text(json.dumps(payload))


def load_checkpoint(
    folder: Path, ensemble: LoRAEnsemble, optimizer: torch.optim.Optimizer
) -> TrainState:
    state_file = folder / "state.json"
    if not state_file.exists():
        raise CheckpointError(f"{folder} holds no checkpoint (state.json missing).")
    payload = json.loads(state_file.read_text())
    version = payload.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} was written by checkpoint format {version}; this loraens reads format "
            f"{FORMAT_VERSION}. Start a new run directory (or use the loraens version that "
            f"wrote it)."
        )
    tensors = load_file(folder / "adapters.safetensors")
    expected = stacked_tensors(ensemble)
    if set(tensors) != set(expected) or any(
        tensors[k].shape != v.shape for k, v in expected.items()
    ):
        raise CheckpointError(
            f"{folder} does not fit this run's model and ensemble (different base model, "
            f"rank, targets or number of members)."
        )
    load_stacked(ensemble, tensors)
    extra = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["torch_rng"])
    return TrainState(**payload)


def load_stacked(ensemble: LoRAEnsemble, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in ensemble.lora_layers.items():
            for which in ("A", "B"):
                getattr(layer, f"lora_{which}").copy_(tensors[f"{name}.lora_{which}"])


def load_best(folder: Path) -> dict[str, torch.Tensor] | None:
    path = folder / "best_adapters.safetensors"
    return load_file(path) if path.exists() else None
