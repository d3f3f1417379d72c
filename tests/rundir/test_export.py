"""The model card every run writes, and `loraens export`: one folder of named PEFT adapters that
plain PEFT loads member by member and loraens loads as the ensemble."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_questions, train_argv

from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl
from loraens.data.prompts import format_prompt
from loraens.rundir import RunDir

MEMBERS = 3
EPOCHS = 2

# transformers + peft only: load every member of the exported folder by name, score each prompt's
# answer letters at the last position, average the members' probabilities. Also save the loaded
# PeftModel with PEFT's own multi-adapter save_pretrained, to compare layouts.
PLAIN_PEFT = r"""
import json, sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_dir, folder, prompts_file, resaved = sys.argv[1:5]
prompts = json.loads(Path(prompts_file).read_text())
names = json.loads((Path(folder) / "ensemble.json").read_text())["adapters"]
tokenizer = AutoTokenizer.from_pretrained(base_dir)
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(base, folder, adapter_name=names[0])
for name in names[1:]:
    model.load_adapter(f"{folder}/{name}", adapter_name=name)
model.eval()
probs = []
for name in names:
    model.set_adapter(name)
    member = []
    for prompt, n_choices in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        letters = [tokenizer(prompt + l).input_ids[-1] for l in "abcdefghij"[:n_choices]]
        with torch.no_grad():
            logits = model(ids).logits[0, -1, letters].float()
        member.append(logits.softmax(-1).tolist())
    probs.append(member)
model.save_pretrained(resaved)
print(json.dumps(probs))
"""


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory, one_thread):
    """A finished 3-member tiny run, its export, its eval questions and their file."""
    folder = tmp_path_factory.mktemp("export")
    train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
    write_questions_jsonl(make_questions(24, seed=1), train)
    questions = make_questions(10, seed=2)
    write_questions_jsonl(questions, evaluation)
    run, out = folder / "run", folder / "exported"
    argv = train_argv(
        tiny_model_dir, train, evaluation, run, "--runtime.precision", "fp32",
        members=MEMBERS, epochs=EPOCHS, lr=3e-3,
    )  # fmt: skip
    main(argv)
    main(["export", str(run), str(out)])
    return run, out, questions, evaluation


def test_plain_peft_loads_every_member_and_reproduces_the_ensemble(
    finished, tiny_model_dir, tmp_path
):
    run, out, questions, _ = finished
    prompts = [[format_prompt(q.question, q.choices), len(q.choices)] for q in questions]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    resaved = tmp_path / "resaved"
    script = [sys.executable, "-c", PLAIN_PEFT, str(tiny_model_dir), str(out)]
    done = subprocess.run(
        [*script, str(tmp_path / "prompts.json"), str(resaved)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a tiny model: one thread is fastest
    )
    assert done.returncode == 0, done.stderr
    peft_probs = json.loads(done.stdout.splitlines()[-1])  # (M, N, K_i)

    # What loraens computed while training: every member's eval log-probs at the last epoch.
    saved = RunDir(run).read_eval_log_probs()
    loraens_members = np.exp(saved.at(EPOCHS))  # (M, N, K), padded options have p = 0
    assert len(peft_probs) == MEMBERS
    for m in range(MEMBERS):
        for n, q in enumerate(questions):
            k = len(q.choices)
            np.testing.assert_allclose(peft_probs[m][n], loraens_members[m, n, :k], atol=2e-5)
    for n, q in enumerate(questions):
        k = len(q.choices)
        plain_ensemble = np.mean([peft_probs[m][n] for m in range(MEMBERS)], axis=0)
        np.testing.assert_allclose(plain_ensemble, loraens_members[:, n, :k].mean(0), atol=2e-5)
    # The members differ, so loading one adapter M times could not pass the checks above.
    assert np.abs(loraens_members[0] - loraens_members[1]).max() > 1e-3

    # The layout is PEFT's own multi-adapter save_pretrained layout.
    def adapter_files(root):
        return sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("adapter_*")
            if p.name in ("adapter_config.json", "adapter_model.safetensors")
        )

    assert adapter_files(out) == adapter_files(resaved)
    assert adapter_files(out) == [
        "adapter_config.json", "adapter_model.safetensors",
        "member-01/adapter_config.json", "member-01/adapter_model.safetensors",
        "member-02/adapter_config.json", "member-02/adapter_model.safetensors",
    ]  # fmt: skip


def test_loraens_commands_take_the_exported_folder(finished, capsys):
    run, out, _, evaluation = finished
    tables = []
    for folder in (run, out):
        main(["evaluate", str(folder), "--file", str(evaluation), "--precision", "fp32"])
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] and "ensemble (M=3)" in tables[0]
    for name in ("README.md", "config.yaml", "summary.json", "provenance.json", "ensemble.json"):
        assert (out / name).is_file(), name


def test_export_refuses_an_unfinished_run_and_a_used_folder(finished, tmp_path):
    run, out, _, _ = finished
    with pytest.raises(FileExistsError):
        main(["--debug", "export", str(run), str(out)])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(ValueError, match="not a finished run"):
        main(["--debug", "export", str(tmp_path / "half"), str(tmp_path / "new")])


def test_every_finished_run_has_a_card(finished):
    run, out, _, _ = finished
    card = (run / "README.md").read_text()
    provenance = json.loads((run / "provenance.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert provenance["model_sha256"] in card
    assert provenance["train_data_sha256"] in card
    assert "arXiv:2310.00035" in card and "Aitchison" in card
    assert "One member alone is not the ensemble" in card
    assert "| | accuracy | nll | ece | brier |" in card
    for row, values in summary["table"].items():
        cells = " | ".join(f"{values[m]:.4f}" for m in ("accuracy", "nll", "ece", "brier"))
        assert f"| {row} | {cells} |" in card
        assert f"| {row} | {cells} |" in (out / "README.md").read_text()
    for m in range(MEMBERS):
        assert f"members/member-{m:02d}" in card
    exported_card = (out / "README.md").read_text()
    assert 'adapter_name="default"' in exported_card and '"member-02": "member-02"' in exported_card
