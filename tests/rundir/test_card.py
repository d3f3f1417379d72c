"""The model card's text, section by section, without training a model (test_export.py checks
the card a real run writes)."""

import re

import pytest

from loraens.config import TrainConfig
from loraens.rundir.card import render_card
from loraens.rundir.records import RunSummary

MEMBERS = [("member-00", "members/member-00"), ("member-01", "members/member-01")]
PROVENANCE = {
    "model_sha256": "cafe",
    "model_dir": "/models/tiny",
    "train_data_sha256": "beef",
    "versions": {"torch": "2.13.0", "peft": None},
}

# Sections as render_card wrote them before it was split into one function per section
# (literals, so the check does not depend on the code under test).
BASE_MODEL = """## Base model

- `tiny-model` (loaded from `/models/tiny`)
- SHA-256 of its weight and config files: `cafe`
- weights in float32, trained in fp32 on cpu
"""
DATA = """## Data

- source: the user's question files (`train.jsonl`, `eval.jsonl` in place of its splits)
- train: 16 questions, SHA-256 `beef`
- eval: 8 questions
"""
MEMBERS_SECTION = """## Members

2 LoRA adapters (rank 8, alpha 32, dropout 0 on q_proj, v_proj), differing in initialisation \
(ensemble seed 0).

| member | adapter name | folder |
|---|---|---|
| 0 | `member-00` | `members/member-00` |
| 1 | `member-01` | `members/member-01` |
"""
RESULTS = """## Results

Eval split, 8 questions, after epoch 2 of 3:

| | accuracy | nll |
|---|---|---|
| single (mean) | 0.3750 | 1.5000 |
| ensemble (M=2) | 0.5000 | 1.2500 |
"""
HEADINGS = [
    "# LoRA ensemble: 2 members of tiny-model (custom data)",
    "## Base model",
    "## Data",
    "## Members",
    "## Results",
    "## Hyper-parameters",
    "## How to load",
    "### With loraens (the whole ensemble)",
    "### With plain PEFT",
    "## Citation",
]


def config(method: str = "lora") -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.name_or_path = "tiny-model"
    cfg.data.task, cfg.data.train_file, cfg.data.eval_file = None, "train.jsonl", "eval.jsonl"
    cfg.ensemble.vary_data_order = False
    cfg.ensemble.method = method
    return cfg


def summary(method: str = "lora") -> RunSummary:
    table = {
        "ensemble (M=2)": {"nll": 1.25, "accuracy": 0.5},
        "single (mean)": {"nll": 1.5, "accuracy": 0.375},
    }
    return RunSummary(
        table, 16, 8, 1.0, 2.0, 3.0, "fp32", "cpu", method=method, epochs_trained=3, epoch_kept=2
    )


def card(method: str = "lora", adapters=MEMBERS) -> str:
    return render_card(config(method), summary(method), PROVENANCE, adapters, "runs/tiny")


def section(text: str, heading: str) -> str:
    """From ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading) :], re.MULTILINE)
    assert following is not None, f"no section after {heading!r}"
    return text[start : start + len(heading) + following.start()]


@pytest.mark.parametrize(
    "heading, expected",
    [("## Base model", BASE_MODEL), ("## Data", DATA), ("## Members", MEMBERS_SECTION)]
    + [("## Results", RESULTS)],
)
def test_sections_are_rendered_as_before(heading, expected):
    assert section(card(), heading) == expected + "\n"


def test_sections_come_in_order_after_the_front_matter():
    text = card()
    assert text.startswith("---\nlibrary_name: peft\nbase_model: tiny-model\n")
    headings = [line for line in text.splitlines() if re.match(r"#{1,3} ", line)]
    assert headings == HEADINGS
    assert text.endswith("Made with loraens (torch 2.13.0).\n")


def test_hyper_parameters_and_loading_name_the_run():
    text = card()
    assert "Method `lora`: 2 members, 3 epochs, batch None, learning rate\n5e-05," in text
    assert "loraens evaluate runs/tiny --file eval.jsonl\n" in text
    assert "loraens export runs/tiny FOLDER  # one folder of PEFT adapters\n```" in text
    # Plain PEFT loads from the folder the weights were read from.
    assert 'BASE = "/models/tiny"' in section(text, "### With plain PEFT")


def test_an_export_is_not_exported_again():
    text = card(adapters=[("default", "."), ("member-01", "member-01")])
    assert "loraens export" not in text
    assert 'PeftModel.from_pretrained(base, FOLDER, adapter_name="default")' in text


def test_last_layer_members_have_no_plain_peft_loading():
    text = card("last_layer")
    assert "last-layer ensemble members" in section(text, "## Members")
    assert "### With plain PEFT" not in text
    # The blank line the missing PEFT section leaves is kept: cards render as they always have.
    assert "stacked onto it\n```\n\n\n## Citation" in text


def test_mc_dropout_says_plain_peft_is_deterministic():
    members = section(card("mc_dropout"), "## Members")
    assert members.startswith("## Members\n\nOne LoRA adapter (rank 8, alpha 32, dropout 0 on")
    assert "not the MC ensemble." in members


def test_a_bf16_run_says_how_its_weights_were_held_and_scored():
    bf16 = summary()
    bf16.precision, bf16.weights_dtype = "torch.bfloat16", "torch.float32"
    bf16.matmul_weights_dtype, bf16.score_precision = "torch.bfloat16", "fp32"
    text = render_card(config(), bf16, PROVENANCE, MEMBERS, "runs/tiny")
    assert (
        "- linear layers' weights in torch.bfloat16, the others in torch.float32, trained in "
        "torch.bfloat16 on cpu, scored in fp32\n" in section(text, "## Base model")
    )


def test_a_remote_code_run_is_loaded_with_the_flag_it_needs():
    cfg = config()
    plain = render_card(cfg, summary(), PROVENANCE, MEMBERS, "runs/tiny")
    assert "trust_remote_code" not in section(plain, "### With loraens (the whole ensemble)")
    cfg.model.trust_remote_code = True
    text = section(
        render_card(cfg, summary(), PROVENANCE, MEMBERS, "runs/tiny"),
        "### With loraens (the whole ensemble)",
    )
    assert "loraens evaluate runs/tiny --file eval.jsonl --trust_remote_code true\n" in text
    assert 'load_run("runs/tiny", trust_remote_code=True)' in text
