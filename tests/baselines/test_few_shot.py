"""The few-shot baseline: demonstration draws, prompt layout, long prompts and scoring."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import make_questions, tiny_llama, tiny_tokenizer
from torch import nn

from loraens.baselines.few_shot import (
    DEMO_SEPARATOR,
    base_model_as_ensemble,
    demonstration_text,
    encode_few_shot,
    few_shot_draws,
    few_shot_prompts,
    score_few_shot,
)
from loraens.data.prompts import encode_prompt, format_prompt, label_token_ids
from loraens.data.records import Question
from loraens.evaluation.metrics import normalize_label_log_probs
from loraens.models.scoring import answer_hidden_states, label_logits
from loraens.runtime import Runtime

FP32 = Runtime(device=torch.device("cpu"), autocast_dtype=None)


def _renamed(questions, prefix):
    return [dataclasses.replace(q, id=f"{prefix}{i}") for i, q in enumerate(questions)]


@pytest.fixture(scope="module")
def splits():
    return _renamed(make_questions(20, seed=1), "t"), _renamed(make_questions(8, seed=2), "e")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_llama(len(tokenizer)), tokenizer


def test_each_prompt_has_exactly_k_distinct_train_demonstrations(splits):
    train, evaluation = splits
    prompts = few_shot_prompts(train, evaluation, k=3, seed=0, draw=0)
    assert [p.question for p in prompts] == evaluation
    for p in prompts:
        assert len(p.demonstrations) == 3
        assert len({d.id for d in p.demonstrations}) == 3  # without replacement
        assert all(d in train for d in p.demonstrations)
        assert p.text().count("Q: ") == 4


def test_prompt_text_is_demonstrations_then_the_eval_prompt(splits):
    train, evaluation = splits
    p = few_shot_prompts(train, evaluation, k=2, seed=0, draw=0)[0]
    d0, d1 = p.demonstrations
    letter = "abcde"[d0.answer]
    assert demonstration_text(d0) == format_prompt(d0.question, d0.choices) + f"{letter})\n\n"
    assert DEMO_SEPARATOR == "\n\n"
    expected = demonstration_text(d0) + demonstration_text(d1)
    assert p.text() == expected + format_prompt(p.question.question, p.question.choices)
    assert p.text(1) == demonstration_text(d1) + format_prompt(
        p.question.question, p.question.choices
    )
    assert p.text(0) == format_prompt(p.question.question, p.question.choices)


def test_the_eval_question_itself_is_never_a_demonstration(splits):
    train, evaluation = splits
    target = evaluation[0]
    # The same id, and the same text and choices under another id, both count as "itself".
    copies = [target, dataclasses.replace(target, id="copy")]
    small_train = train[:4] + copies
    for draw in range(30):
        (prompt,) = few_shot_prompts(small_train, [target], k=3, seed=5, draw=draw)
        assert not {d.id for d in prompt.demonstrations} & {target.id, "copy"}
    with pytest.raises(ValueError, match="eligible"):
        few_shot_prompts(small_train, [target], k=5, seed=0, draw=0)


def test_draws_are_reproducible_and_differ_by_draw_index(splits):
    train, evaluation = splits

    def demos(seed, draw):
        prompts = few_shot_prompts(train, evaluation, k=3, seed=seed, draw=draw)
        return [tuple(d.id for d in p.demonstrations) for p in prompts]

    assert demos(0, 1) == demos(0, 1)
    assert demos(0, 1) != demos(0, 2)
    assert demos(0, 1) != demos(1, 1)


def test_unlabelled_train_questions_are_refused(splits):
    train, evaluation = splits
    with pytest.raises(ValueError, match="answer"):
        few_shot_prompts(train + [Question("u", "?", ("a", "b"), None)], evaluation, k=1)


def test_long_prompts_drop_demonstrations_never_the_question(splits, tiny):
    _, tokenizer = tiny
    train, evaluation = splits
    prompts = few_shot_prompts(train, evaluation, k=3, seed=0, draw=0)
    own = [len(encode_prompt(tokenizer, q, 10_000)[0]) for q in evaluation]
    # Room for the question and about one demonstration, never three.
    max_length = max(own) + 60
    encoding = encode_few_shot(tokenizer, prompts, max_length)
    assert encoding.k == 3
    assert 0 < encoding.n_fewer_demos <= len(prompts)
    assert encoding.encoded.n_shortened == 0
    for p, ids, n in zip(prompts, encoding.encoded.input_ids, encoding.n_demos, strict=True):
        assert len(ids) <= max_length and n < 3
        assert ids == tokenizer(p.text(n))["input_ids"]  # the demos nearest the question
    # Nothing fits but the question: zero-shot prompts, still uncut.
    bare = encode_few_shot(tokenizer, prompts, max(own))
    assert bare.n_demos == [0] * len(prompts) and bare.encoded.n_shortened == 0


def test_zero_adapter_scores_equal_the_base_model_and_restore_it(splits, tiny):
    model, tokenizer = tiny
    train, evaluation = splits
    prompts = few_shot_prompts(train, evaluation[:3], k=2, seed=0, draw=0)
    log_probs, encoding = score_few_shot(model, tokenizer, prompts, FP32, max_length=512)
    label_ids = torch.tensor(label_token_ids(tokenizer, log_probs.shape[1]))
    for i, ids in enumerate(encoding.encoded.input_ids):
        with torch.no_grad():
            hidden = answer_hidden_states(model, torch.tensor([ids]), torch.tensor([len(ids)]))
            logits = label_logits(model, hidden, label_ids).double().numpy()
        n = np.asarray([encoding.encoded.n_choices[i]])
        expected = normalize_label_log_probs(logits, n)[0]
        np.testing.assert_allclose(log_probs[i], expected, atol=1e-5)
    # The wrapper was taken off again: plain linear projections, nothing left behind.
    assert all(
        type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))
    )
    with base_model_as_ensemble(model) as ensemble:
        assert ensemble.n_members == 1
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_evaluate_few_shot_reports_each_draw_and_their_mean_and_std(splits, tiny):
    model, tokenizer = tiny
    train, evaluation = splits
    _, result = few_shot_draws(
        model, tokenizer, train, evaluation, k=2, draws=3, seed=0, runtime=FP32, batch_size=8
    )
    assert (result["k"], result["draws"], result["seed"]) == (2, 3, 0)
    assert [row["draw"] for row in result["per_draw"]] == [0, 1, 2]
    for metric in ("accuracy", "nll", "ece", "brier"):
        values = [row[metric] for row in result["per_draw"]]
        assert np.isfinite(values).all()
        assert result["mean"][metric] == pytest.approx(np.mean(values))
        assert result["std"][metric] == pytest.approx(np.std(values))
    # Different demonstrations change the base model's answers, so the draws disagree.
    assert result["std"]["nll"] > 0
    assert all(row["n_fewer_demos"] == 0 for row in result["per_draw"])


def test_answer_text_few_shot_shows_solved_examples_and_scores_option_texts(splits, tiny):
    model, tokenizer = tiny
    train, evaluation = splits
    prompts = few_shot_prompts(train, evaluation[:3], k=2, seed=0, draw=0)
    p = prompts[0]
    d0, d1 = p.demonstrations
    expected = "".join(
        f"Question: {d.question}\nAnswer: {d.choices[d.answer]}\n\n" for d in (d0, d1)
    )
    assert p.text(scoring="answer_text") == expected + f"Question: {p.question.question}\nAnswer:"
    log_probs, encoding = score_few_shot(
        model, tokenizer, prompts, FP32, scoring="answer_text", normalization="per_token"
    )
    # Independent: each option scored alone after the few-shot text by a plain forward.
    for i, prompt in enumerate(prompts):
        text = prompt.text(scoring="answer_text")
        context = tokenizer(text)["input_ids"]
        scores = []
        for choice in prompt.question.choices:
            ids = tokenizer(text + " " + choice)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            option = range(len(context), len(ids))
            scores.append(sum(lp[t - 1, ids[t]].item() for t in option) / len(option))
        scores = np.asarray(scores)
        k = len(scores)
        np.testing.assert_allclose(
            log_probs[i, :k], scores - np.logaddexp.reduce(scores), rtol=1e-4, atol=1e-5
        )
    assert encoding.n_fewer_demos == 0
