"""Answer-text scoring against a plain transformers computation: each option alone, one ordinary
causal forward of prompt + option on the base model with the member's ΔW merged in."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import (
    make_questions,
    randomize_b,
    reference_option_log_likelihoods,
    tiny_llama,
    tiny_tokenizer,
)
from torch.nn import functional as F

from loraens.data.packing import plan_rows, rows_batch
from loraens.data.prompts import encode_questions, format_text_prompt
from loraens.evaluation.inference import score_members
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import Runtime
from loraens.training.trainer import EnsembleTrainer

CPU = torch.device("cpu")
FP32 = Runtime(device=CPU, autocast_dtype=None)
UNPACKED = dataclasses.replace(FP32, packing=False)
SMALL_ROWS = dataclasses.replace(FP32, pack_tokens=110)  # several questions per row, not all
# A budget of a few tokens: every step is split into passes of one row of one member.
TINY_BUDGET = dataclasses.replace(SMALL_ROWS, memory_budget_gb=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(one_thread):
    tokenizer = tiny_tokenizer()
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), n_members=3)
    ensemble.init_members([1, 2, 3])
    randomize_b(ensemble, scale=0.1)
    questions = make_questions(7, seed=3)
    return tokenizer, ensemble, questions


def merged_model(ensemble: LoRAEnsemble, member: int, vocab: int):
    """A fresh copy of the base model with member ``member``'s update added to its weights."""
    model = tiny_llama(vocab)  # same seed as the ensemble's base
    for name, layer in ensemble.lora_layers.items():
        update = layer.scaling * layer.lora_B[member] @ layer.lora_A[member]
        with torch.no_grad():
            model.get_submodule(name).weight += update
    return model


def reference_log_p(ensemble, tokenizer, questions, normalization) -> np.ndarray:
    k_max = max(len(q.choices) for q in questions)
    out = np.full((ensemble.n_members, len(questions), k_max), -np.inf)
    for m in range(ensemble.n_members):
        model = merged_model(ensemble, m, len(tokenizer))
        for i, q in enumerate(questions):
            sums, counts = reference_option_log_likelihoods(model, tokenizer, q)
            size = {
                "none": [1] * len(sums),
                "per_token": counts,
                "per_char": [len(c) for c in q.choices],
            }[normalization]
            scores = np.asarray(sums) / np.asarray(size)
            out[m, i, : len(scores)] = scores - np.logaddexp.reduce(scores)
    return out


def test_segment_is_the_prompt_then_every_option(setup):
    tokenizer, _, questions = setup
    encoded = encode_questions(tokenizer, questions, 512, "answer_text")
    for i, q in enumerate(questions):
        prompt = format_text_prompt(q.question)
        expected = tokenizer(prompt)["input_ids"]
        for choice in q.choices:
            expected += tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        assert encoded.input_ids[i] == expected
        assert encoded.options.lengths[i] == [len(" " + c) for c in q.choices]  # char tokens
        assert encoded.options.chars[i] == [len(c) for c in q.choices]


@pytest.mark.parametrize("normalization", ["none", "per_token", "per_char"])
@pytest.mark.parametrize("runtime", [FP32, UNPACKED, SMALL_ROWS], ids=["packed", "rows", "small"])
def test_option_scores_equal_separate_forwards_for_every_member(setup, normalization, runtime):
    tokenizer, ensemble, questions = setup
    encoded = encode_questions(tokenizer, questions, 512, "answer_text", normalization)
    got = score_members(ensemble, encoded, torch.tensor([]), runtime, batch_size=4)
    expected = reference_log_p(ensemble, tokenizer, questions, normalization)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[0], got[1])  # members differ: rows reached their own member


def test_packed_rows_hold_several_questions(setup):
    tokenizer, _, questions = setup
    encoded = encode_questions(tokenizer, questions, 512, "answer_text")
    lengths = [len(ids) for ids in encoded.input_ids]
    rows = plan_rows([range(len(questions))], lengths, SMALL_ROWS.row_tokens)[0]
    assert any(len(row) > 1 for row in rows)
    batch = rows_batch(encoded, rows, 0, packed=True)
    assert batch["input_ids"].shape[1] == max(sum(lengths[i] for i in row) for row in rows)
    assert len(batch["target_ids"]) == sum(sum(ls) for ls in encoded.options.lengths)


def test_shortening_keeps_every_option(setup):
    tokenizer, _, questions = setup
    long = dataclasses.replace(questions[0], question="word " * 80 + questions[0].question)
    encoded = encode_questions(tokenizer, [long], 100, "answer_text")
    full = encode_questions(tokenizer, [questions[0]], 512, "answer_text")
    assert encoded.n_shortened == 1 and len(encoded.input_ids[0]) <= 100
    n_options = sum(full.options.lengths[0])
    assert encoded.input_ids[0][-n_options:] == full.input_ids[0][-n_options:]


def _naive_loss(ensemble, tokenizer, question, member, loss, normalization, kl_beta):
    """One member's loss on one question, every option in its own plain causal forward."""
    prompt_ids = tokenizer(format_text_prompt(question.question))["input_ids"]
    scores, kls, count = [], torch.zeros(()), 0
    for k, choice in enumerate(question.choices):
        ids = tokenizer(format_text_prompt(question.question) + " " + choice)["input_ids"]
        with ensemble.members(slice(member, member + 1)):
            logits = ensemble.model(torch.tensor([ids])).logits[0]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        positions = torch.arange(len(prompt_ids) - 1, len(ids) - 1)
        token_lp = log_probs[positions, torch.tensor(ids[len(prompt_ids) :])]
        size = {"none": 1, "per_token": len(positions), "per_char": len(choice)}[normalization]
        scores.append(token_lp.sum() / size)
        read = loss == "option_nll" or k == question.answer
        if kl_beta > 0 and read:
            with torch.no_grad(), ensemble.adapters_disabled():
                base = F.log_softmax(ensemble.model(torch.tensor([ids])).logits[0].float(), -1)
            p = log_probs[positions]
            kls = kls + (p.exp() * (p - base[positions])).sum()
            count += len(positions)
    scores = torch.stack(scores)
    if loss == "token_nll":
        value = -scores[question.answer]
    else:
        value = -scores.log_softmax(0)[question.answer]
    return value + (kl_beta * kls / count if kl_beta > 0 else 0.0)


@pytest.mark.parametrize(
    ("loss", "normalization", "kl_beta", "runtime"),
    [
        ("token_nll", "none", 0.0, SMALL_ROWS),
        ("token_nll", "per_char", 0.1, UNPACKED),
        ("option_nll", "per_token", 0.1, SMALL_ROWS),
        ("option_nll", "none", 0.0, TINY_BUDGET),
    ],
)
def test_gradients_of_the_shared_prompt_equal_separate_forwards(
    setup, loss, normalization, kl_beta, runtime
):
    tokenizer, _, questions = setup
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), n_members=2)
    ensemble.init_members([4, 5])
    randomize_b(ensemble, scale=0.1, seed=1)
    encoded = encode_questions(tokenizer, questions, 512, "answer_text", normalization)
    trainer = EnsembleTrainer(
        ensemble,
        torch.optim.SGD(ensemble.parameters(), lr=0.0),
        encoded,
        torch.tensor([]),
        runtime,
        data_seeds=[0, 1],
        batch_size=3,
        kl_beta=kl_beta,
        loss=loss,
    )
    trainer.pass_log = []
    batches = [np.array([0, 2, 5]), np.array([1, 6, 3])]
    params = trainer.params
    for p in params:
        p.grad = None
    losses = trainer._step(batches)
    if runtime is TINY_BUDGET:
        assert len(trainer.pass_log) >= 4  # split into passes of one row of one member
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    expected_losses = []
    for m, batch in enumerate(batches):
        member_loss = sum(
            _naive_loss(ensemble, tokenizer, questions[i], m, loss, normalization, kl_beta)
            for i in batch
        )
        (member_loss / len(batch)).backward()
        expected_losses.append(member_loss.item())
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize("loss", ["token_nll", "option_nll"])
def test_training_by_answer_text_lowers_the_loss(setup, loss):
    from loraens.config import OptimConfig
    from loraens.training.optim import build_optimizer

    tokenizer, _, _ = setup
    encoded = encode_questions(tokenizer, make_questions(16, seed=5), 256, "answer_text")
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), n_members=2)
    ensemble.init_members([0, 1])
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, OptimConfig(lr=5e-3)),
        encoded,
        torch.tensor([]),
        FP32,
        data_seeds=[10, 11],
        batch_size=4,
        loss=loss,
    )
    losses = [trainer.train_epoch(epoch) for epoch in range(4)]
    assert (losses[-1] < losses[0]).all(), losses


def test_mc_dropout_passes_in_answer_text_mode(setup):
    tokenizer, _, questions = setup
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), n_members=1, dropout=0.3)
    ensemble.init_members([7])
    randomize_b(ensemble, scale=0.2)
    encoded = encode_questions(tokenizer, questions, 512, "answer_text")
    out = score_members(ensemble, encoded, torch.tensor([]), FP32, mc_dropout_passes=3)
    assert out.shape == (3, len(questions), 5)
    for i, q in enumerate(questions):
        k = len(q.choices)
        np.testing.assert_allclose(np.exp(out[:, i, :k]).sum(-1), 1.0, rtol=1e-6)
    assert not np.allclose(out[0], out[1])  # each pass drew its own dropout mask


def test_config_refuses_combinations_that_mean_nothing():
    from loraens.config import EnsembleConfig, ModelConfig, OptimConfig, TrainConfig

    with pytest.raises(ValueError, match="model.normalization"):
        ModelConfig(normalization="per_char")
    with pytest.raises(ValueError, match="option_nll needs model.scoring=answer_text"):
        TrainConfig(optim=OptimConfig(loss="option_nll"))
    TrainConfig(model=ModelConfig(scoring="answer_text", normalization="per_char"))
    TrainConfig(
        model=ModelConfig(scoring="answer_text"), ensemble=EnsembleConfig(method="last_layer")
    )
