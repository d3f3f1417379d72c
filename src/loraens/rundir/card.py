"""A run's model card: README.md beside its adapters, as PEFT adapters pushed anywhere carry.

An ensemble needs a card more than a single adapter does: loading one member with plain PEFT
works, looks right and silently loses the ensemble. The card says what the members are, how
they were trained and scored, and how to load all of them (with loraens, or with plain PEFT and
an average of the members' answer probabilities).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import yaml

from loraens.config import TrainConfig
from loraens.io import write_text_atomic
from loraens.rundir.layout import PEFT_DEFAULT_ADAPTER, RunDir
from loraens.rundir.records import RunSummary

PAPER = (
    'Xi Wang, Laurence Aitchison and Maja Rudolph, "LoRA ensembles for large language model '
    'fine-tuning", arXiv:2310.00035 (2023)'
)
BIBTEX = """@article{wang2023loraensembles,
  title   = {{LoRA} ensembles for large language model fine-tuning},
  author  = {Wang, Xi and Aitchison, Laurence and Rudolph, Maja},
  journal = {arXiv preprint arXiv:2310.00035},
  year    = {2023}
}"""


# The table's column order (summary.json stores its keys sorted).
_METRIC_ORDER = ("accuracy", "nll", "ece", "brier")


def _table(table: Mapping[str, Mapping[str, float]]) -> str:
    keys = list(next(iter(table.values()), {}))
    metrics = [m for m in _METRIC_ORDER if m in keys] + [m for m in keys if m not in _METRIC_ORDER]
    lines = ["| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    # As loraens prints it: the single members first, then the ensemble.
    for name, values in sorted(table.items(), key=lambda item: item[0].startswith("ensemble")):
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
    return "\n".join(lines)


def _data(cfg: TrainConfig, summary: RunSummary, prov: Mapping[str, object]) -> str:
    d = cfg.data
    source = f"built-in task `{d.task}`" if d.task else "the user's question files"
    files = [f"`{f}`" for f in (d.train_file, d.eval_file) if f]
    lines = [
        f"- source: {source}" + (f" ({', '.join(files)} in place of its splits)" if files else ""),
        f"- train: {summary.train_questions} questions"
        + (f", SHA-256 `{prov['train_data_sha256']}`" if "train_data_sha256" in prov else ""),
        f"- eval: {summary.eval_questions} questions"
        + (f", SHA-256 `{prov['eval_data_sha256']}`" if "eval_data_sha256" in prov else ""),
    ]
    if d.ood_task or d.ood_file:
        lines.append(f"- out-of-distribution set scored every epoch: `{d.ood_task or d.ood_file}`")
    return "\n".join(lines)


def _peft_section(base: str, folder: str, adapters: Sequence[tuple[str, str]]) -> str:
    """Plain transformers + PEFT: one member, then all of them averaged."""
    first_name, first_path = adapters[0]
    first = "FOLDER" if first_path == "." else f'f"{{FOLDER}}/{first_path}"'
    rest = ", ".join(f'"{name}": "{path}"' for name, path in adapters[1:])
    return f"""### With plain PEFT

One member is a standard PEFT LoRA adapter. **One member alone is not the ensemble**: it is a
single fine-tuned model, with the single member's (worse calibrated) numbers in the table above,
not the ensemble's.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

BASE = "{base}"  # the base model (see its SHA-256 above)
FOLDER = "{folder}"  # this folder
base = AutoModelForCausalLM.from_pretrained(BASE)
tokenizer = AutoTokenizer.from_pretrained(BASE)
model = PeftModel.from_pretrained(base, {first}, adapter_name="{first_name}")
```

The ensemble is every member loaded as a named adapter, and the average of their probabilities
over the answer letters at the token after the prompt's `A: (` cue (the paper's App. C format):

```python
import torch

others = {{{rest}}}
for name, path in others.items():
    model.load_adapter(f"{{FOLDER}}/{{path}}", adapter_name=name)
adapters = ["{first_name}", *others]

prompt = "Q: Which is red?\\nAnswer Choices:\\n(a) blue\\n(b) red\\nA: ("
ids = tokenizer(prompt, return_tensors="pt").input_ids
letters = [tokenizer(prompt + letter).input_ids[-1] for letter in "ab"]
model.eval()
probs = []
for name in adapters:
    model.set_adapter(name)
    with torch.no_grad():
        probs.append(model(ids).logits[0, -1, letters].float().softmax(-1))
ensemble = torch.stack(probs).mean(0)  # the ensemble's probability of (a), (b)
```
"""


def _header(cfg: TrainConfig, m: int) -> str:
    """The front matter hubs read, the title and why every member must be loaded."""
    base = cfg.model.name_or_path
    return f"""---
library_name: peft
base_model: {base}
tags: [lora, peft, ensemble, loraens, calibration, uncertainty]
---

# LoRA ensemble: {m} members of {base} ({cfg.data.task or "custom data"})

An ensemble of {m} fine-tuned members whose prediction is the **average of the members' answer
probabilities** (Wang, Aitchison, Rudolph, "LoRA ensembles for large language model
fine-tuning"). Averaging is what makes the ensemble better calibrated than any one member, so
load every member (below)."""


def _base_model_section(
    cfg: TrainConfig, summary: RunSummary, provenance: Mapping[str, object]
) -> str:
    base = cfg.model.name_or_path
    model_dir = provenance.get("model_dir")
    # The folder is named only when it says more than the name the config gave.
    loaded_from = f" (loaded from `{model_dir}`)" if model_dir and str(model_dir) != base else ""
    sha = provenance.get("model_sha256", "not recorded")
    trained = f"trained in {summary.precision} on {summary.device}"
    weights = f"weights in {summary.weights_dtype or 'float32'}"
    matmul = summary.matmul_weights_dtype
    if matmul and matmul != summary.weights_dtype:
        weights = f"linear layers' weights in {matmul}, the others in {summary.weights_dtype}"
    scored = f", scored in {summary.score_precision}" if summary.score_precision else ""
    return f"""## Base model

- `{base}`{loaded_from}
- SHA-256 of its weight and config files: `{sha}`
- {weights}, {trained}{scored}"""


def _members_description(cfg: TrainConfig, method: str, m: int) -> str:
    """What the members are: the three methods store and score different things."""
    lora, ens = cfg.lora, cfg.ensemble
    if method == "last_layer":
        return (
            f"{m} last-layer ensemble members (each a copy of the LM head's rows the answers are "
            "read from: the answer letters', or the option tokens' by answer text; trained on "
            "frozen features; not PEFT adapters)."
        )
    if method == "mc_dropout":
        return (
            f"One LoRA adapter (rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} "
            f"on {', '.join(lora.target_modules)}) scored with {ens.passes_per_adapter} "
            "stochastic dropout passes averaged (MC dropout, the paper's baseline). Plain PEFT "
            "below loads it without dropout: one deterministic model, not the MC ensemble."
        )
    if method == "blob":
        return (
            f"{m} BLoB adapters (rank {lora.rank}, alpha {lora.alpha:g} on "
            f"{', '.join(lora.target_modules)}): each A is a Gaussian, its mean in the PEFT "
            "adapter, its scale G (sd = G²) in blob_scale.safetensors beside it. loraens scores "
            f"each member by the mean over {cfg.blob.eval_samples} weight draws. Plain PEFT "
            "below loads the mean weights only: a deterministic model, not BLoB's predictive "
            '(its figures are the summary\'s "mean weights" rows).'
        )
    diversity = [
        *(["initialisation"] if ens.vary_init else []),
        *(["data order"] if ens.vary_data_order else []),
    ]
    return (
        f"{m} LoRA adapters (rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} "
        f"on {', '.join(lora.target_modules)}), differing in "
        + (" and ".join(diversity) or "nothing but their seeds")
        + f" (ensemble seed {ens.seed})."
    )


def _members_section(cfg: TrainConfig, method: str, adapters: Sequence[tuple[str, str]]) -> str:
    listing = "\n".join(f"| {i} | `{name}` | `{path}` |" for i, (name, path) in enumerate(adapters))
    return f"""## Members

{_members_description(cfg, method, len(adapters))}

| member | adapter name | folder |
|---|---|---|
{listing}"""


def _results_section(summary: RunSummary, epochs: int) -> str:
    # Under patience the saved adapters are the best epoch's, not the last one's.
    kept = summary.epoch_kept or epochs
    return f"""## Results

Eval split, {summary.eval_questions} questions, after epoch {kept} of {epochs}:

{_table(summary.table)}"""


def _hyperparameters_section(cfg: TrainConfig, method: str, m: int, epochs: int) -> str:
    optim = cfg.optim
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip()
    return f"""## Hyper-parameters

Method `{method}`: {m} members, {epochs} epochs, batch {optim.batch_size}, learning rate
{optim.lr:g}, weight decay {optim.weight_decay:g}, KL beta {optim.kl_beta:g}. The full
configuration (`config.yaml`):

```yaml
{config_yaml}
```"""


def _loraens_section(cfg: TrainConfig, adapters: Sequence[tuple[str, str]], folder: str) -> str:
    """Loading with loraens: the whole ensemble, by command or in Python."""
    evaluate_on = f"--task {cfg.data.task}" if cfg.data.task else "--file eval.jsonl"
    # An export's members already sit in one folder of PEFT adapters: nothing to export.
    exported = any(path == "." for _, path in adapters)
    export_line = (
        "" if exported else f"loraens export {folder} FOLDER  # one folder of PEFT adapters\n"
    )
    # A run directory never switches remote code on by itself: the reader has to ask.
    remote = cfg.model.trust_remote_code
    flag, keyword = (
        (" --trust_remote_code true", ", trust_remote_code=True") if remote else ("", "")
    )
    return f"""## How to load

### With loraens (the whole ensemble)

```bash
pip install "torch==2.13.0" loraens   # from the loraens checkout or its wheel
loraens evaluate {folder} {evaluate_on}{flag}
loraens predict {folder} questions.jsonl --output predictions.jsonl{flag}
{export_line}```

```python
from loraens.rundir.load import load_run

loaded = load_run("{folder}"{keyword})  # the base model with every member stacked onto it
```"""


def _made_with(provenance: Mapping[str, object]) -> str:
    versions = provenance.get("versions")
    if not isinstance(versions, dict):
        return ""
    return ", ".join(f"{name} {v}" for name, v in versions.items() if v)


def render_card(
    cfg: TrainConfig,
    summary: RunSummary,
    provenance: Mapping[str, object],
    adapters: Sequence[tuple[str, str]],
    folder: str,
) -> str:
    """The card's markdown. ``adapters`` are (name, path relative to the folder) in member
    order; ``folder`` names the folder in the loading examples."""
    m = len(adapters)
    method = summary.method or cfg.ensemble.method
    epochs = summary.epochs_trained or cfg.optim.epochs
    # Last-layer members are head rows, not PEFT adapters: plain PEFT cannot load them.
    loading_peft = ""
    if method != "last_layer":
        peft_base = provenance.get("model_dir") or cfg.model.name_or_path
        loading_peft = _peft_section(str(peft_base), folder, adapters)
    made_with = _made_with(provenance)
    return f"""{_header(cfg, m)}

{_base_model_section(cfg, summary, provenance)}

## Data

{_data(cfg, summary, provenance)}

{_members_section(cfg, method, adapters)}

{_results_section(summary, epochs)}

{_hyperparameters_section(cfg, method, m, epochs)}

{_loraens_section(cfg, adapters, folder)}

{loading_peft}
## Citation

{PAPER}:

```bibtex
{BIBTEX}
```

Made with loraens{f" ({made_with})" if made_with else ""}.
"""


def run_adapters(run: RunDir) -> list[tuple[str, str]]:
    """(adapter name, folder relative to the run) of every member of a run or an export."""
    folders = run.member_folders()
    if run.export_manifest.is_file():
        names = run.exported_adapter_names()
        return [(n, "." if n == PEFT_DEFAULT_ADAPTER else n) for n in names]
    return [(p.name, p.relative_to(run.root).as_posix()) for p in folders]


def read_provenance(run: RunDir) -> dict:
    return json.loads(run.provenance.read_text()) if run.provenance.is_file() else {}


def write_card(run: RunDir, cfg: TrainConfig, summary: RunSummary) -> str:
    """Write the run's README.md card (from its saved members and provenance); its text."""
    text = render_card(cfg, summary, read_provenance(run), run_adapters(run), str(run.root))
    write_text_atomic(run.card, text)
    return text
