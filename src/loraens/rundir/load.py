"""A finished run's saved members, stacked back onto its base model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraens.config import ModelConfig
from loraens.models.loading import BaseModel, load_base_model
from loraens.models.lora import LoRAEnsemble
from loraens.models.peft_io import AdapterError, adapter_shape, load_members
from loraens.rundir.layout import RunDir
from loraens.runtime import Runtime, resolve_runtime


@dataclass
class LoadedEnsemble:
    ensemble: LoRAEnsemble
    base: BaseModel
    runtime: Runtime
    max_length: int
    mc_dropout_passes: int = 1
    model_config: ModelConfig | None = None  # how questions are prompted and scored


def load_run(run_dir: str | Path, device: str = "auto", precision: str = "auto") -> LoadedEnsemble:
    """The base model of a finished run with every saved member stacked onto it."""
    run = RunDir(Path(run_dir))
    cfg = run.read_config()
    folders = run.member_folders()
    if not folders:
        raise AdapterError(f"{run.root} holds no saved members (members/member-XX folders).")
    method = cfg.ensemble.method
    if method == "last_layer":
        raise ValueError(
            f"{run.root} is a last-layer ensemble: its metrics and predictions are in the run "
            f"directory; evaluate, predict and ood score LoRA runs."
        )
    runtime = resolve_runtime(device, precision)
    base = load_base_model(
        cfg.model.name_or_path,
        device=runtime.device,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    rank, alpha, targets = adapter_shape(folders)
    mc_dropout = method == "mc_dropout"
    dropout = cfg.lora.dropout if mc_dropout else 0.0
    ensemble = LoRAEnsemble(base.model, len(folders), rank, alpha, dropout, targets)
    load_members(ensemble, folders)
    ensemble.to(runtime.device).eval()
    return LoadedEnsemble(
        ensemble,
        base,
        runtime,
        cfg.model.max_length,
        cfg.ensemble.passes_per_adapter,
        model_config=cfg.model,
    )
