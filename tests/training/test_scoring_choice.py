"""`--model.scoring auto`: the mode of lowest zero-shot NLL, chosen once and kept in config.yaml.

The model here is built so that every figure is known: a tiny Llama whose layers add nothing
and whose head ignores the input, so the next token's distribution is the same softmax of
chosen logits at every position. Letter scoring then reads fixed letter probabilities, and an
option's answer-text score is a sum of fixed per-token log-probabilities: option lengths and
characters decide which mode wins, and each case below makes a different mode win. The NLLs
the tests expect are computed independently (one plain forward per prompt or option, then
torch's cross-entropy), not by the scoring code under test.
"""

import logging
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FP32, reference_option_log_likelihoods, tiny_llama, tiny_tokenizer, train_argv
from torch.nn import functional as F

import loraens.training.run as run_module
from loraens.cli.main import main
from loraens.config import ModelConfig, OptimConfig, TrainConfig
from loraens.data.files import write_questions_jsonl
from loraens.data.prompts import format_prompt, label_token_ids
from loraens.data.records import Question
from loraens.training.scoring_choice import (
    FAR_WORSE_NLL,
    ModeFigures,
    best_mode,
    choose_scoring,
    zero_shot_figures,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).parents[2]


def unigram_llama(tokenizer, logits: dict[str, float]):
    """A model whose next-token logits are ``logits`` (0 for tokens not named) everywhere."""
    model = tiny_llama(len(tokenizer), tie_word_embeddings=False)
    with torch.no_grad():
        for layer in model.model.layers:  # each layer's residual update is zero
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)  # the final RMSNorm then gives all ones
        values = torch.zeros(len(tokenizer))
        for token, value in logits.items():
            values[tokenizer.convert_tokens_to_ids(token)] = value
        hidden = model.config.hidden_size
        model.lm_head.weight.copy_(values[:, None].expand(-1, hidden) / hidden)
    return model


def _questions(specs: list[tuple[tuple[str, ...], int]]) -> list[Question]:
    return [
        Question(f"q{i}", "Pick one?", choices, answer) for i, (choices, answer) in enumerate(specs)
    ]


def _rotations(choices: tuple[str, ...], n: int) -> list[tuple[tuple[str, ...], int]]:
    """``n`` questions with the first of ``choices`` correct, moved to every position in turn."""
    specs = []
    for i in range(n):
        shift = i % len(choices)
        rotated = choices[-shift:] + choices[:-shift] if shift else choices
        specs.append((rotated, shift))
    return specs


# Which mode each case makes win, and why:
CASES = {
    # Letter 'a' is likely and every answer is (a); every option text scores the same.
    "letter": ({"a": 3.0}, [(("P", "Q", "R"), 0)] * 6),
    # Every token equally likely: the sum favours the shortest option, which is the answer.
    "answer_text none": ({}, _rotations(("P", "QQQQ", "RRRRRR"), 6)),
    # The same, with the longest option the answer: per character favours it, mildly.
    "answer_text per_char": ({}, _rotations(("PPPPPP", "Q", "RR"), 6)),
    # 'X' likely, 'Y' and the delimiter not: only the mean per token favours the X options in
    # both shapes (short X against long Y, long X against short Y); the sum and per character
    # are confidently wrong on one shape each.
    "answer_text per_token": (
        {"X": 3.5, "Y": -1.5, " ": -2.0},
        _rotations(("X", "YYYYYYYYY"), 4) + _rotations(("XXXXXXXXX", "Y"), 4),
    ),
}


def independent_nlls(model, tokenizer, questions: list[Question]) -> dict[str, float]:
    """Each mode's NLL from plain forwards (helpers) and torch's cross-entropy."""
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in CASES}
    for q in questions:
        ids = tokenizer(format_prompt(q.question, q.choices))["input_ids"]
        with torch.no_grad():
            last = model(torch.tensor([ids])).logits[0, -1].double()
        scores["letter"].append(last[label_token_ids(tokenizer, len(q.choices))])
        sums, counts = (
            torch.tensor(values, dtype=torch.float64)
            for values in reference_option_log_likelihoods(model, tokenizer, q)
        )
        chars = torch.tensor([len(c) for c in q.choices], dtype=torch.float64)
        scores["answer_text none"].append(sums)
        scores["answer_text per_token"].append(sums / counts)
        scores["answer_text per_char"].append(sums / chars)
    labels = torch.tensor([q.answer for q in questions])
    return {
        name: F.cross_entropy(torch.stack(rows), labels).item() for name, rows in scores.items()
    }


@pytest.mark.parametrize("winner", list(CASES))
def test_each_mode_wins_where_its_nll_is_lowest(winner):
    tokenizer = tiny_tokenizer()
    logits, specs = CASES[winner]
    model, questions = unigram_llama(tokenizer, logits), _questions(specs)
    expected = independent_nlls(model, tokenizer, questions)
    assert min(expected, key=expected.get) == winner  # the case is built as described

    figures = zero_shot_figures(model, tokenizer, questions, 256, FP32)

    assert {f.name: f.nll for f in figures} == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert best_mode(figures).name == winner


def _config(scoring="auto", normalization="none", loss="option_nll") -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(scoring=scoring, normalization=normalization),
        optim=OptimConfig(loss=loss),
    )


def test_auto_resolves_to_the_best_mode_and_logs_every_figure(caplog):
    tokenizer = tiny_tokenizer()
    logits, specs = CASES["answer_text per_char"]
    with caplog.at_level(logging.INFO, logger="loraens.training.scoring_choice"):
        chosen = choose_scoring(
            _config(), unigram_llama(tokenizer, logits), tokenizer, _questions(specs), FP32
        )
    assert (chosen.model.scoring, chosen.model.normalization) == ("answer_text", "per_char")
    assert chosen.optim.loss == "option_nll"
    lines = [r.getMessage() for r in caplog.records]
    for name in CASES:
        assert sum(name in line and "nll" in line and "ece" in line for line in lines) == 1, name
    assert any("--model.normalization per_char" in line for line in lines)


def test_auto_choosing_letter_trains_the_letters_nll():
    tokenizer = tiny_tokenizer()
    logits, specs = CASES["letter"]
    chosen = choose_scoring(
        _config(), unigram_llama(tokenizer, logits), tokenizer, _questions(specs), FP32
    )
    assert (chosen.model.scoring, chosen.model.normalization) == ("letter", "none")
    # option_nll is a loss over answer texts; the saved config must stay valid
    assert chosen.optim.loss == "token_nll"
    TrainConfig.from_dict(chosen.to_dict())


@pytest.mark.parametrize(
    ("scoring", "normalization", "warned"),
    [("answer_text", "none", True), ("letter", "none", True), ("answer_text", "per_char", False)],
)
def test_an_explicit_mode_far_worse_than_the_best_is_warned_about(
    caplog, scoring, normalization, warned
):
    tokenizer = tiny_tokenizer()
    logits, specs = CASES["answer_text per_char"]
    cfg = _config(scoring, normalization, loss="token_nll")
    with caplog.at_level(logging.INFO, logger="loraens.training.scoring_choice"):
        kept = choose_scoring(
            cfg, unigram_llama(tokenizer, logits), tokenizer, _questions(specs), FP32
        )
    assert kept == cfg  # an explicit mode is never changed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == int(warned)
    if warned:
        assert "--model.scoring answer_text --model.normalization per_char" in warnings[0]


@pytest.mark.parametrize(
    ("ratio", "warned"), [(FAR_WORSE_NLL - 0.05, False), (FAR_WORSE_NLL + 0.05, True)]
)
def test_the_warning_starts_at_the_far_worse_ratio(caplog, ratio, warned):
    from loraens.training import scoring_choice

    best = ModeFigures("answer_text", "per_char", 0.5, 1.0, 0.1)
    own = ModeFigures("letter", "none", 0.3, ratio, 0.2)
    with caplog.at_level(logging.WARNING):
        scoring_choice._warn_if_far_worse(_config("letter", loss="token_nll"), [own, best], best)
    assert bool(caplog.records) == warned


def test_auto_is_checked_like_the_other_modes():
    with pytest.raises(ValueError, match="normalization"):
        ModelConfig(scoring="auto", normalization="per_char")  # auto chooses it
    _config("auto", loss="option_nll")  # allowed: resolved before training
    with pytest.raises(ValueError, match="option_nll"):
        _config("letter", loss="option_nll")


@pytest.fixture
def per_char_run_inputs(tmp_path):
    """A saved unigram model and question files on which answer_text per_char wins."""
    tokenizer = tiny_tokenizer()
    logits, specs = CASES["answer_text per_char"]
    model_dir = tmp_path / "model"
    unigram_llama(tokenizer, logits).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_questions_jsonl(_questions(specs * 2), train)
    write_questions_jsonl(_questions(specs), evaluation)
    return model_dir, train, evaluation


def test_a_run_records_the_chosen_mode_and_a_resume_keeps_it(
    per_char_run_inputs, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    args = train_argv(
        *per_char_run_inputs, out, "--model.scoring", "auto", "--optim.loss", "option_nll",
        "--runtime.precision", "fp32", members=2, epochs=1, batch_size=4,
    )  # fmt: skip
    main(args)
    config = out / "config.yaml"
    saved = yaml.safe_load(config.read_text())["model"]
    assert (saved["scoring"], saved["normalization"]) == ("answer_text", "per_char")
    text = config.read_text()

    def never(*args, **kwargs):
        raise AssertionError("a continued run chose its scoring mode again")

    monkeypatch.setattr(run_module, "choose_scoring", never)
    (out / "summary.json").unlink()  # an unfinished run, as far as a resume can tell
    main(["train", "--resume", str(out)])
    (out / "summary.json").unlink()
    main(args)  # the same command again: auto continues the run in its recorded mode
    main(args)  # and once complete, it is just reported
    assert config.read_text() == text
    assert (out / "summary.json").exists()


def _preset(name: str, capsys) -> TrainConfig:
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", str(ROOT / "configs" / name), "--print_config"])
    assert stop.value.code in (0, None)
    values = yaml.safe_load(capsys.readouterr().out)
    return TrainConfig.from_dict({k: v for k, v in values.items() if k not in ("out", "resume")})


def test_the_cpu_preset_is_the_overconfidence_setting_with_auto_scoring(capsys):
    cpu = _preset("cpu.yaml", capsys).to_dict()
    base = yaml.safe_load((ROOT / "experiments" / "overconfidence-cpu.yaml").read_text())["base"]
    assert cpu["model"]["scoring"] == "auto"
    for section in ("ensemble", "optim", "data"):
        for key, value in base[section].items():
            assert cpu[section][key] == value, f"{section}.{key}"
    for name in ("demo.yaml", "paper.yaml"):
        _preset(name, capsys)  # every preset loads through the same config types
