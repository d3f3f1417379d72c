"""Answer-position scoring: padding, the label-row head, precision and member grouping."""

import numpy as np
import pytest
import torch
from helpers import make_questions, randomize_b, tiny_llama, tiny_tokenizer
from torch import nn

from loraens.data.batching import collate
from loraens.data.prompts import EncodedQuestions, encode_questions, label_token_ids
from loraens.evaluation.inference import score_members
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import answer_hidden_states, label_logits
from loraens.runtime import Runtime

CPU = torch.device("cpu")
FP32 = Runtime(device=CPU, autocast_dtype=None)
BF16 = Runtime(device=CPU, autocast_dtype=torch.bfloat16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(one_thread):
    """A 3-member ensemble with non-zero B (so every member differs) and 10 encoded questions."""
    tokenizer = tiny_tokenizer()
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), n_members=3)
    ensemble.init_members([1, 2, 3])
    randomize_b(ensemble, scale=0.1)
    encoded = encode_questions(tokenizer, make_questions(10, seed=3), max_length=512)
    assert len({len(ids) for ids in encoded.input_ids}) > 3, "need prompts of different lengths"
    label_ids = torch.tensor(label_token_ids(tokenizer, 5))
    return ensemble, encoded, label_ids


def _subset(encoded: EncodedQuestions, indices) -> EncodedQuestions:
    return EncodedQuestions(
        input_ids=[encoded.input_ids[i] for i in indices],
        n_choices=[encoded.n_choices[i] for i in indices],
        labels=[encoded.labels[i] for i in indices],
        n_shortened=0,
    )


def test_right_padding_equals_scoring_each_prompt_alone(setup):
    ensemble, encoded, label_ids = setup
    model = ensemble.model
    n = len(encoded)
    with torch.no_grad(), ensemble.members(slice(1, 2)):
        batch = collate(encoded, [range(n)], pad_id=0)
        assert (batch["lengths"] < batch["input_ids"].shape[1]).any()  # some rows are padded
        hidden = answer_hidden_states(model, batch["input_ids"], batch["lengths"])
        logits = label_logits(model, hidden, label_ids)
        for i in range(n):
            ids = torch.tensor([encoded.input_ids[i]])
            alone = answer_hidden_states(model, ids, torch.tensor([ids.shape[1]]))
            torch.testing.assert_close(hidden[i : i + 1], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                logits[i : i + 1], label_logits(model, alone, label_ids), rtol=1e-5, atol=1e-5
            )


def test_score_members_on_mixed_lengths_equals_per_question_scoring(setup):
    ensemble, encoded, label_ids = setup
    batched = score_members(ensemble, encoded, label_ids, FP32, batch_size=4)
    for i in range(len(encoded)):
        alone = score_members(ensemble, _subset(encoded, [i]), label_ids, FP32, batch_size=1)
        k = encoded.n_choices[i]
        np.testing.assert_allclose(batched[:, i, :k], alone[:, 0, :k], rtol=1e-5, atol=1e-5)
        assert np.isneginf(batched[:, i, k:]).all()


@pytest.mark.parametrize("head_bias", [False, True])
def test_label_logits_equal_full_vocabulary_logits_at_label_rows(setup, head_bias):
    _, encoded, label_ids = setup
    model = tiny_llama(len(tiny_tokenizer()), seed=4)
    if head_bias:  # an untied head with a bias, as some architectures (e.g. GPT-2 style) have
        torch.manual_seed(5)
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    batch = collate(encoded, [range(len(encoded))], pad_id=0)
    rows = torch.arange(len(encoded))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"]).logits[rows, batch["lengths"] - 1]
        hidden = answer_hidden_states(model, batch["input_ids"], batch["lengths"])
        ours = label_logits(model, hidden, label_ids)
    assert ours.dtype == torch.float32 and ours.shape == (len(encoded), len(label_ids))
    torch.testing.assert_close(ours, full[:, label_ids], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_changes_the_dtype_but_stays_close_to_fp32(setup):
    ensemble, encoded, label_ids = setup
    fp32 = np.exp(score_members(ensemble, encoded, label_ids, FP32, batch_size=4))
    bf16 = np.exp(score_members(ensemble, encoded, label_ids, BF16, batch_size=4))
    diff = np.abs(fp32 - bf16).max()
    # bf16 keeps 8 mantissa bits (relative error ~4e-3 per op); on this tiny model that moves
    # probabilities by ~1e-3. Identical results would mean the autocast switch did nothing.
    assert 0 < diff < 0.05
    np.testing.assert_allclose(bf16.sum(axis=-1), 1.0, atol=1e-6)  # still normalised per question


def test_members_per_pass_one_equals_all_members_in_one_pass(setup):
    ensemble, encoded, label_ids = setup
    stacked = score_members(ensemble, encoded, label_ids, FP32, batch_size=4)
    one_by_one = score_members(ensemble, encoded, label_ids, FP32, batch_size=4, members_per_pass=1)
    np.testing.assert_allclose(one_by_one, stacked, rtol=1e-5, atol=1e-6)
    assert not np.allclose(stacked[0], stacked[1])  # members really differ
