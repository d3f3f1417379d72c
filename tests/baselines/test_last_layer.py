"""Last-layer ensembles (ensemble.method=last_layer): only the head rows the answers are read from
train (the letters', or the option tokens' by answer text)."""

import numpy as np
import pytest
import torch
from helpers import (
    FP32,
    encoded_tiny_data,
    make_questions,
    reference_option_log_likelihoods,
    tiny_llama,
    tiny_tokenizer,
)

from loraens.baselines.last_layer import LastLayerEnsemble, train_last_layer
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.data.records import Question
from loraens.models.scoring import answer_features


@pytest.fixture(scope="module")
def data():
    return encoded_tiny_data()


def test_last_layer_trains_only_label_rows_with_the_full_vocabulary_loss(data):
    tokenizer, train, evaluation, label_ids = data
    model = tiny_llama(len(tokenizer))
    head_before = model.get_output_embeddings().weight.detach().clone()
    seen = []
    ensemble = train_last_layer(
        model,
        train,
        evaluation,
        label_ids,
        FP32,
        n_members=3,
        data_seeds=[1, 2, 3],
        schedule_seed=None,
        batch_size=4,
        lr=5e-2,
        weight_decay=0.0,
        epochs=3,
        on_epoch=lambda epoch, losses, log_probs: seen.append((losses, log_probs)),
    )
    torch.testing.assert_close(model.get_output_embeddings().weight, head_before)  # untied
    assert len(seen) == 3 and seen[-1][0].mean() < seen[0][0].mean()
    rows = ensemble.rows.detach()
    assert not torch.allclose(rows[0], rows[1])  # members differ by their data order

    # The reported eval log p_T are the trained rows applied to the frozen model's answer
    # position: recomputed from plain Hugging Face hidden states and a float64 softmax over
    # each question's own options.
    with torch.no_grad():
        hidden = torch.stack(
            [
                model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
                for ids in evaluation.input_ids
            ]
        )
    expected = np.full((3, len(evaluation), max(evaluation.n_choices)), -np.inf)
    for m in range(3):
        logits = (hidden @ rows[m].T).double()
        for i, k in enumerate(evaluation.n_choices):
            expected[m, i, :k] = torch.log_softmax(logits[i, :k], dim=-1).numpy()
    np.testing.assert_allclose(seen[-1][1], expected, rtol=1e-5, atol=1e-5)

    # the cached log-sum-exp trick equals cross-entropy over the full vocabulary
    fresh = LastLayerEnsemble(model.get_output_embeddings().weight, label_ids, 1)
    features = answer_features(model, train, FP32)
    logits = features @ model.get_output_embeddings().weight.T
    labels = torch.tensor(train.labels)
    expected = torch.nn.functional.cross_entropy(logits, label_ids[labels], reduction="none")
    label_logits = fresh.label_logits(features[None])[0]
    full = torch.cat([label_logits, fresh.frozen_logsumexp(features)[:, None]], dim=-1)
    ours = full.logsumexp(-1) - label_logits.gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("loss", "normalization"), [("option_nll", "none"), ("token_nll", "per_char")]
)
def test_answer_text_members_train_option_token_rows_and_score_like_a_plain_model(
    loss, normalization
):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    head_before = model.get_output_embeddings().weight.detach().clone()
    train_qs = make_questions(12, seed=5)
    # Eval options with characters no training option has ("z", "c", "v", "w", "h"): their
    # rows stay pretrained while the normaliser still includes every trained row.
    eval_qs = [
        Question("e0", "Which is zinc?", ("zinc", "red"), 0),
        Question("e1", "Which is white?", ("blue", "white", "violet"), 1),
        *make_questions(4, seed=6),
    ]
    train, evaluation = (
        encode_questions(tokenizer, qs, 256, "answer_text", normalization)
        for qs in (train_qs, eval_qs)
    )
    seen = []
    ensemble = train_last_layer(
        model,
        train,
        evaluation,
        torch.tensor(label_token_ids(tokenizer)),
        FP32,
        n_members=2,
        data_seeds=[1, 2],
        schedule_seed=None,
        batch_size=4,
        lr=5e-2,
        weight_decay=0.0,
        epochs=3,
        on_epoch=lambda epoch, losses, log_probs: seen.append((losses, log_probs)),
        loss=loss,
    )
    torch.testing.assert_close(model.get_output_embeddings().weight, head_before)
    assert seen[-1][0].mean() < seen[0][0].mean()
    trained = {tokenizer.convert_ids_to_tokens(int(t)) for t in ensemble.token_ids}
    assert {"r", "e", "d", " "} <= trained and not {"z", "c", "v", "w", "h"} & trained
    rows = ensemble.rows.detach()
    assert not torch.allclose(rows[0], rows[1])

    # Independent check: a plain transformers model whose (untied) head has the member's rows,
    # each option scored in its own forward, normalised and softmaxed in float64.
    expected = np.full((2, len(eval_qs), max(len(q.choices) for q in eval_qs)), -np.inf)
    for m in range(2):
        reference = tiny_llama(len(tokenizer), tie_word_embeddings=False)
        with torch.no_grad():
            reference.lm_head.weight.copy_(head_before)
            reference.lm_head.weight[ensemble.token_ids] = rows[m]
        for i, q in enumerate(eval_qs):
            sums, counts = reference_option_log_likelihoods(reference, tokenizer, q)
            size = counts if normalization == "per_token" else [1] * len(sums)
            if normalization == "per_char":
                size = [len(c) for c in q.choices]
            scores = np.asarray(sums) / np.asarray(size)
            expected[m, i, : len(scores)] = scores - np.logaddexp.reduce(scores)
    np.testing.assert_allclose(seen[-1][1], expected, rtol=1e-4, atol=1e-4)
