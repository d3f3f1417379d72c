"""A finished run's saved members, stacked back onto its base model.

A run directory may come from someone else, and its config.yaml is theirs: it never decides on
its own that the model folder's Python code runs. The user allows that on the command that
loads the run (``--trust_remote_code``, :func:`load_run`'s ``trust_remote_code``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from loraens.config import ModelConfig
from loraens.data.prompts import EncodedQuestions
from loraens.models.loading import (
    BaseModel,
    cast_parameters,
    hold_matmul_weights_in,
    load_base_model,
)
from loraens.models.lora import LoRAEnsemble
from loraens.models.peft_io import AdapterError, adapter_shape, load_members
from loraens.rundir.layout import RunDir
from loraens.runtime import Runtime, resolve_runtime


class Predictive(Protocol):
    """Every member's (M, N, K) log p_T on encoded questions, by a method's own predictive."""

    def __call__(
        self,
        encoded: EncodedQuestions,
        label_ids: torch.Tensor,
        *,
        batch_size: int,
        progress: bool,
    ) -> np.ndarray: ...


class RemoteCodeError(ValueError):
    """A run's config asks to run its model folder's code, and the user has not allowed it."""


def refuse_remote_code(
    config_file: Path, model: ModelConfig, allowed: bool, flag: str = "--trust_remote_code true"
) -> None:
    """Raise :class:`RemoteCodeError` when ``model`` (read from ``config_file``) asks for
    ``trust_remote_code`` and the user has not allowed it (``allowed``, given by ``flag``)."""
    if model.trust_remote_code and not allowed:
        raise RemoteCodeError(
            f"{config_file} sets model.trust_remote_code: true, which runs the Python code in "
            f"the model folder {model.name_or_path}. A run's config cannot allow that by "
            f"itself: if you trust that folder, pass {flag} (from Python: "
            f"trust_remote_code=True)."
        )


@dataclass
class LoadedEnsemble:
    ensemble: LoRAEnsemble
    base: BaseModel
    runtime: Runtime
    max_length: int
    mc_dropout_passes: int = 1
    model_config: ModelConfig | None = None  # how questions are prompted and scored
    predictive: Predictive | None = None
    """A posterior's own predictive (loraens.posteriors), used instead of the members' plain
    stacked pass by every command that scores the run."""


def _trained_dtype(run: RunDir, field: str) -> torch.dtype:
    """A dtype the run's summary records (float32 when it predates the field)."""
    summary = run.read_summary() if run.summary.exists() else None
    name = getattr(summary, field, None) if summary is not None else None
    dtypes = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}
    return dtypes.get(name or "", torch.float32)


def load_run_base(run: RunDir, device: str, precision: str) -> tuple[Runtime, BaseModel]:
    """The runtime scoring a run and its base model, weights as its members were trained
    against (the caller has checked the run's trust_remote_code)."""
    cfg = run.read_config()
    runtime = resolve_runtime(device, precision)
    base = load_base_model(
        cfg.model.name_or_path,
        device=runtime.device,
        dtype=_trained_dtype(run, "weights_dtype"),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    # The weights the members were trained against: a bf16 run's matmul weights were rounded
    # to bf16, so round them again (fp32 scoring then reads those values upcast).
    hold_matmul_weights_in(base.model, _trained_dtype(run, "matmul_weights_dtype"))
    if runtime.autocast_dtype is None:
        cast_parameters(list(base.model.parameters()), torch.float32)
    return runtime, base


def load_run(
    run_dir: str | Path,
    device: str = "auto",
    precision: str = "fp32",
    *,
    trust_remote_code: bool = False,
) -> LoadedEnsemble:
    """The base model of a finished run with every saved member stacked onto it.

    ``trust_remote_code`` allows the model folder's own code to run when the run's config asks
    for it (:class:`RemoteCodeError` otherwise); it never turns it on for a run trained
    without it, whose members fit the model as transformers' own code builds it.
    """
    run = RunDir(Path(run_dir))
    cfg = run.read_config()
    refuse_remote_code(run.config, cfg.model, trust_remote_code)
    folders = run.member_folders()
    if not folders:
        raise AdapterError(f"{run.root} holds no saved members (members/member-XX folders).")
    method = cfg.ensemble.method
    if method == "last_layer":
        raise ValueError(
            f"{run.root} is a last-layer ensemble: its metrics and predictions are in the run "
            f"directory; evaluate and predict score LoRA runs (an experiment's ood_eval scores "
            f"it with loraens.baselines.last_layer.load_last_layer_run)."
        )
    runtime, base = load_run_base(run, device, precision)
    rank, alpha, targets = adapter_shape(folders)
    mc_dropout = method == "mc_dropout"
    dropout = cfg.lora.dropout if mc_dropout else 0.0
    ensemble = LoRAEnsemble(base.model, len(folders), rank, alpha, dropout, targets)
    if method == "blob":  # its scales are read too; loraens.posteriors.load scores its draws
        ensemble.make_variational(cfg.blob.eps)
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
