"""Members as standard PEFT adapter folders, loadable with ``PeftModel.from_pretrained``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from loraens.io import atomic_path
from loraens.models.lora import LoRAEnsemble, peft_member_state

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BLOB_SCALES = "blob_scale.safetensors"
"""A BLoB member's scale G of A (Ω = G²) beside its adapter, which holds A's mean: PEFT loads
the folder as the mean weights; loraens reads the scale too."""


class AdapterError(ValueError):
    """An adapter folder is missing, malformed, or does not fit the base model."""


def save_member(
    ensemble: LoRAEnsemble,
    member: int,
    folder: Path,
    base_model: str,
    stacked: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write member ``member`` as a PEFT LoRA adapter folder, atomically.

    ``stacked`` (``{layer}.lora_A``/``.lora_B`` tensors of every member, as a distributed run
    gathers them on rank 0) replaces the ensemble's own weights, which hold only that rank's
    members.
    """
    stacked = ensemble.stacked_adapters() if stacked is None else stacked
    state = peft_member_state(stacked, member)
    scales = {k: v[member].float().contiguous() for k, v in stacked.items() if k.endswith("lora_G")}
    config = LoraConfig(
        r=ensemble.rank,
        lora_alpha=ensemble.alpha,  # type: ignore[arg-type]  # PEFT scales by any float alpha
        target_modules=list(ensemble.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    with atomic_path(folder) as tmp:
        config.save_pretrained(str(tmp))
        _sort_target_modules(tmp / ADAPTER_CONFIG)
        save_file(state, tmp / ADAPTER_WEIGHTS, {"format": "pt"})
        if scales:
            save_file(scales, tmp / BLOB_SCALES)


def _sort_target_modules(path: Path) -> None:
    """PEFT keeps target_modules as a set and writes it in hash order, which changes from one
    Python process to the next: sorted, the same run writes the same bytes in any process."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True))  # PEFT's own layout


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(f"{folder} is not an adapter folder: {ADAPTER_CONFIG} is missing.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from err
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'.")
    return config


def adapter_shape(folders: Sequence[Path]) -> tuple[int, float, list[str]]:
    """(rank, alpha, target modules) shared by all adapters; they must agree to be stacked."""
    shapes = set()
    for folder in folders:
        config = read_adapter_config(folder)
        targets = config["target_modules"]
        targets = sorted(targets) if isinstance(targets, list) else [targets]
        shapes.add((config["r"], float(config["lora_alpha"]), tuple(targets)))
    if len(shapes) != 1:
        raise AdapterError(f"Adapters differ in rank, alpha or target modules: {sorted(shapes)}")
    rank, alpha, targets = shapes.pop()
    return rank, alpha, list(targets)


def load_members(ensemble: LoRAEnsemble, folders: Sequence[Path]) -> None:
    """Load adapter ``folders[m]`` into member m (safetensors only: nothing is unpickled)."""
    for member, folder in enumerate(folders):
        weights = Path(folder) / ADAPTER_WEIGHTS
        if not weights.exists():
            raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS} is missing.")
        try:
            ensemble.load_member_state_dict(member, load_file(weights))
        except ValueError as err:
            raise AdapterError(f"{folder}: {err}") from err
        if ensemble.variational:
            scales = Path(folder) / BLOB_SCALES
            if not scales.exists():
                raise AdapterError(f"{folder}: {BLOB_SCALES} is missing (a BLoB member's scale).")
            ensemble.load_member_scales(member, load_file(scales))
