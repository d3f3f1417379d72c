"""Last-layer ensembles (ensemble.method=last_layer): only the answer letters' head rows train."""

import numpy as np
import pytest
import torch
from helpers import FP32, encoded_tiny_data, tiny_llama

from loraens.baselines.last_layer import LastLayerEnsemble, train_last_layer
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
