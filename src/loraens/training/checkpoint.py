"""Epoch checkpoints: enough to continue a run exactly where its last complete epoch ended.

A checkpoint folder holds every member's stacked adapters (safetensors), the optimiser state and
the torch RNG state (``torch.load(weights_only=True)``: plain tensors and numbers, nothing
unpickled beyond that), and ``state.json`` with the epoch count and the metric rows so far. The
data order needs no saved state: each epoch's order is rebuilt from the seeds. The folder is
swapped in atomically, so a kill leaves either the previous checkpoint or the new one.

The format does not depend on the number of processes: a distributed run gathers every member's
adapters and AdamW moments to rank 0, which writes exactly what a single process would (plus
each rank's RNG state); reading, rank 0 loads the files and scatters each rank its members. A run
can therefore resume on any number of ranks, or in one process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraens.distributed import Dist
from loraens.io import atomic_path
from loraens.models.lora import LoRAEnsemble
from loraens.rundir.layout import CHECKPOINT_STATE_FILE

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
    return {k: v.cpu().clone() for k, v in ensemble.stacked_adapters().items()}


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # The order of optimizer.state_dict()'s integer parameter ids.
    return [p for group in optimizer.param_groups for p in group["params"]]


def member_state(
    ensemble: LoRAEnsemble,
    optimizer: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the training state that is stacked by member (dim 0): adapters, AdamW
    moments, the best epoch's adapters. What ranks gather and scatter."""
    out = {f"adapters/{k}": v for k, v in stacked_tensors(ensemble).items()}
    for index, param in enumerate(_params(optimizer)):
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                out[f"optimizer/{index}/{key}"] = value.detach().cpu()
    if best is not None:
        out.update({f"best/{k}": v for k, v in best.items()})
    return out


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def save_checkpoint(
    folder: Path,
    ensemble: LoRAEnsemble,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    best: dict[str, torch.Tensor] | None = None,
    dist: Dist | None = None,
) -> None:
    """Write the checkpoint (on rank 0, from every rank's members); returns once it is on disk
    on every rank, or raises everywhere if writing failed."""
    dist = dist or Dist(ensemble.n_members)
    full = dist.gather_members(member_state(ensemble, optimizer, best))
    rng_states = dist.all_gather_object(torch.get_rng_state())

    def write() -> None:
        local = optimizer.state_dict()  # its scalars (AdamW's step) are the same on every rank
        optimizer_state = {
            "state": {
                index: {key: full.get(f"optimizer/{index}/{key}", v) for key, v in entries.items()}
                for index, entries in local["state"].items()
            },
            "param_groups": local["param_groups"],
        }
        extra = {"optimizer": optimizer_state, "torch_rng": rng_states[0]}
        if dist.active:
            extra["torch_rng_by_rank"] = rng_states
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file(_section(full, "adapters/"), tmp / "adapters.safetensors")
            if best is not None:
                save_file(_section(full, "best/"), tmp / "best_adapters.safetensors")
            torch.save(extra, tmp / "optimizer.pt")
            payload = {"format_version": FORMAT_VERSION, **asdict(state)}
            (tmp / CHECKPOINT_STATE_FILE).write_text(json.dumps(payload))

    dist.on_main(write)


def _read_checkpoint(folder: Path, ensemble: LoRAEnsemble, n_members: int) -> tuple[dict, dict]:
    """(member-stacked tensors for all members, everything else) from a checkpoint folder."""
    state_file = folder / CHECKPOINT_STATE_FILE
    if not state_file.exists():
        raise CheckpointError(f"{folder} holds no checkpoint ({CHECKPOINT_STATE_FILE} missing).")
    payload = json.loads(state_file.read_text())
    version = payload.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} was written by checkpoint format {version}; this loraens reads format "
            f"{FORMAT_VERSION}. Start a new run directory (or use the loraens version that "
            f"wrote it)."
        )
    tensors = load_file(folder / "adapters.safetensors")
    expected = {k: (n_members, *v.shape[1:]) for k, v in ensemble.stacked_adapters().items()}
    if set(tensors) != set(expected) or any(
        tuple(tensors[k].shape) != shape for k, shape in expected.items()
    ):
        raise CheckpointError(
            f"{folder} does not fit this run's model and ensemble (different base model, "
            f"rank, targets or number of members)."
        )
    extra = torch.load(folder / "optimizer.pt", weights_only=True)
    full = {f"adapters/{k}": v for k, v in tensors.items()}
    scalars: dict[int, dict] = {}
    for index, entries in extra["optimizer"]["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value) and value.dim() > 0:
                full[f"optimizer/{index}/{key}"] = value
            else:
                scalars.setdefault(int(index), {})[key] = value
    best = load_best(folder)
    if best is not None:
        full.update({f"best/{k}": v for k, v in best.items()})
    shared = {
        "state": payload,
        "param_groups": extra["optimizer"]["param_groups"],
        "scalars": scalars,
        "torch_rng": extra["torch_rng"],
        "torch_rng_by_rank": extra.get("torch_rng_by_rank"),
        "has_best": best is not None,
    }
    return full, shared


def load_checkpoint(
    folder: Path,
    ensemble: LoRAEnsemble,
    optimizer: torch.optim.Optimizer,
    dist: Dist | None = None,
) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """Restore this rank's members, their optimiser state and the RNG; returns the train state
    and this rank's slice of the best epoch's adapters (None without optim.patience)."""
    dist = dist or Dist(ensemble.n_members)
    read: dict[str, dict] = {}

    def read_on_main() -> dict:
        read["full"], shared = _read_checkpoint(folder, ensemble, dist.n_members)
        return shared

    shared = dist.on_main(read_on_main)
    local = dist.scatter_members(read.get("full"))
    load_stacked(ensemble, _section(local, "adapters/"))
    optimizer_state: dict[int, dict] = {i: dict(s) for i, s in shared["scalars"].items()}
    for name, value in _section(local, "optimizer/").items():
        index, key = name.split("/")
        optimizer_state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": shared["param_groups"]})
    by_rank = shared["torch_rng_by_rank"]
    if by_rank is not None and len(by_rank) == dist.world_size:
        torch.set_rng_state(by_rank[dist.rank])
    elif dist.is_main:
        # Another number of ranks: rank 0 continues rank 0's stream; dropout masks then differ
        # from the original run's other ranks (equal in distribution, not bit for bit).
        torch.set_rng_state(shared["torch_rng"])
    best = _section(local, "best/") if shared["has_best"] else None
    return TrainState(**shared["state"]), best


def load_stacked(ensemble: LoRAEnsemble, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in ensemble.lora_layers.items():
            for which in ("A", "B", "G"):
                param = getattr(layer, f"lora_{which}")
                if param is not None:  # G: BLoB members only
                    param.copy_(tensors[f"{name}.lora_{which}"])


def load_best(folder: Path) -> dict[str, torch.Tensor] | None:
    path = folder / "best_adapters.safetensors"
    return load_file(path) if path.exists() else None
