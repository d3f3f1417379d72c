"""Packed rows: the layout, and that packed questions score exactly as when scored alone."""

import dataclasses

import pytest
import torch
from helpers import make_questions, randomize_b, tiny_llama, tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from loraens.data.packing import balanced, first_fit_decreasing, plan_rows, rows_batch
from loraens.data.prompts import encode_questions, label_token_ids, scoring_label_ids
from loraens.evaluation.inference import score_members
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import answer_features, batch_hidden_states
from loraens.runtime import Runtime

FP32 = Runtime(device=torch.device("cpu"), autocast_dtype=None, pack_tokens=200)
UNPACKED = dataclasses.replace(FP32, packing=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@given(st.lists(st.integers(1, 80), min_size=1, max_size=40), st.integers(16, 120))
def test_first_fit_decreasing_places_every_item_once_within_budget(lengths, budget):
    bins = first_fit_decreasing(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= budget
    # first fit: no two bins could have been merged
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > budget


@given(st.lists(st.integers(1, 80), min_size=1, max_size=30), st.integers(1, 8))
def test_balanced_fills_exactly_n_bins(lengths, n_bins):
    bins = balanced(lengths, n_bins)
    assert len(bins) == n_bins
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))


@settings(max_examples=50)
@given(
    st.lists(st.integers(1, 100), min_size=12, max_size=12),
    st.sampled_from([None, 16, 64, 150]),
    st.integers(1, 3),
)
def test_plan_rows_gives_every_group_as_many_rows_of_its_own_questions(lengths, budget, groups):
    members = [list(range(g * 4, g * 4 + 4)) for g in range(groups)]
    layout = plan_rows(members, lengths, budget)
    assert len({len(rows) for rows in layout}) == 1
    for group, rows in zip(members, layout, strict=True):
        assert sorted(i for row in rows for i in row) == group
        loads = [sum(lengths[i] for i in row) for row in rows]
        assert loads == sorted(loads, reverse=True)
        if budget is None:
            assert all(len(row) == 1 for row in rows)
    if budget is not None:  # never more rows than one per question, never longer than FFD's
        assert len(layout[0]) <= 4
        widest = max(sum(lengths[i] for i in row) for rows in layout for row in rows)
        ffd = max(
            sum(lengths[group[i]] for i in b)
            for group in members
            for b in first_fit_decreasing([lengths[i] for i in group], max(budget, 100))
        )
        assert widest <= max(ffd, max(lengths))


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny_tokenizer()
    encoded = encode_questions(tokenizer, make_questions(9, seed=5), max_length=256)
    assert len({len(ids) for ids in encoded.input_ids}) > 3
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), n_members=3)
    ensemble.init_members([1, 2, 3])
    randomize_b(ensemble, scale=0.1)
    return ensemble, encoded, torch.tensor(label_token_ids(tokenizer, 5))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_hidden_states_equal_each_question_alone(setup, attention):
    """transformers turns restarting position ids into a block-diagonal causal mask."""
    ensemble, encoded, _ = setup
    model = ensemble.model
    previous = model.config._attn_implementation
    model.config._attn_implementation = attention
    try:
        rows = [[0, 1, 2], [3, 4], [5], [6, 7, 8]]
        batch = rows_batch(encoded, rows, pad_id=0, packed=True)
        assert batch["input_ids"].shape[0] == 4 and (batch["position_ids"] == 0).sum() > 4
        with torch.no_grad(), ensemble.members(slice(1, 2)):
            packed = batch_hidden_states(model, batch, torch.device("cpu"))
            for k, i in enumerate(batch["indices"].tolist()):
                ids = torch.tensor([encoded.input_ids[i]])
                alone = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                torch.testing.assert_close(packed[k], alone[0, -1], rtol=1e-5, atol=1e-5)
    finally:
        model.config._attn_implementation = previous


def test_packing_without_position_ids_would_differ(setup):
    """The check above can fail: packed rows with plain positions do mix questions."""
    ensemble, encoded, _ = setup
    batch = rows_batch(encoded, [[0, 1]], pad_id=0, packed=True)
    with torch.no_grad(), ensemble.members(slice(0, 1)):
        right = batch_hidden_states(ensemble.model, batch, torch.device("cpu"))
        wrong = batch_hidden_states(
            ensemble.model, {**batch, "position_ids": None}, torch.device("cpu")
        )
    assert not torch.allclose(right[1], wrong[1], atol=1e-3)


def test_score_members_packed_equals_unpacked(setup):
    ensemble, encoded, label_ids = setup
    lengths = [len(ids) for ids in encoded.input_ids]
    assert len(plan_rows([range(5)], lengths, FP32.row_tokens)[0]) < 5, "must actually pack"
    packed = score_members(ensemble, encoded, label_ids, FP32, batch_size=5)
    plain = score_members(ensemble, encoded, label_ids, UNPACKED, batch_size=5)
    assert packed.shape == plain.shape == (3, len(encoded), 5)
    assert (packed == -float("inf")).sum() == (plain == -float("inf")).sum()
    finite = plain > -float("inf")
    assert abs(packed[finite] - plain[finite]).max() < 1e-5


def test_answer_features_packed_equals_unpacked(setup):
    ensemble, encoded, _ = setup
    with ensemble.members(slice(2, 3)):
        packed = answer_features(ensemble.model, encoded, FP32, batch_size=4)
        plain = answer_features(ensemble.model, encoded, UNPACKED, batch_size=4)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scoring", ["letter", "answer_text"])
def test_rows_padded_to_a_width_multiple_score_as_unpadded(setup, monkeypatch, scoring):
    """Padding a pass to a multiple of 64 positions (CPU half precision) is masked out."""
    ensemble, _, _ = setup
    tokenizer = tiny_tokenizer()
    encoded = encode_questions(tokenizer, make_questions(9, seed=5), 256, scoring, "none")
    labels = torch.tensor(scoring_label_ids(tokenizer, 5, scoring))
    batch = rows_batch(encoded, [[0, 1], [2]], pad_id=0, packed=True, width_multiple=64)
    loads = [sum(len(encoded.input_ids[i]) for i in row) for row in ([0, 1], [2])]
    assert batch["input_ids"].shape[1] % 64 == 0 and batch["input_ids"].shape[1] > max(loads)
    plain = score_members(ensemble, encoded, labels, FP32, batch_size=5)
    monkeypatch.setattr(Runtime, "width_multiple", property(lambda self: 64))
    padded = score_members(ensemble, encoded, labels, FP32, batch_size=5)
    finite = plain > -float("inf")
    assert ((padded > -float("inf")) == finite).all()
    assert abs(padded[finite] - plain[finite]).max() < 1e-5
