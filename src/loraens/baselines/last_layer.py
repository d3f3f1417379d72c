"""Last-layer ensembles (§5.1, Table 1): fine-tune only the LM-head rows of the answer letters.

Each member owns an untied copy of the K label rows of the output embedding, initialised from
the pretrained weights (SmolLM2 ties them to the input embedding, which stays frozen). The rest
of the model is frozen, so every training and eval question's answer-position hidden state is
computed once. The loss is still the full-vocabulary NLL (Eq. 3): the frozen rows contribute one
constant log-sum-exp per question, so a step costs K dot products per row instead of a forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from loraens.data.batching import epoch_order
from loraens.data.prompts import EncodedQuestions
from loraens.evaluation.metrics import normalize_label_log_probs
from loraens.io import atomic_path, write_json_atomic
from loraens.models.scoring import answer_features
from loraens.runtime import Runtime

WEIGHTS = "last_layer.safetensors"


class LastLayerEnsemble(torch.nn.Module):
    def __init__(self, head_weight: torch.Tensor, label_ids: torch.Tensor, n_members: int):
        super().__init__()
        rows = head_weight.detach()[label_ids].float().cpu()
        self.label_ids = label_ids.cpu()
        self.rows = torch.nn.Parameter(rows.repeat(n_members, 1, 1).clone())  # (M, K, H)
        # log Σ over every vocabulary row except the labels' own: constant, the head is frozen.
        others = torch.ones(head_weight.shape[0], dtype=torch.bool)
        others[self.label_ids] = False
        self.frozen_rows = head_weight.detach()[others].float().cpu()

    @property
    def n_members(self) -> int:
        return self.rows.shape[0]

    def frozen_logsumexp(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [torch.logsumexp(chunk @ self.frozen_rows.T, dim=-1) for chunk in features.split(256)]
        )

    def label_logits(self, member_features: torch.Tensor) -> torch.Tensor:
        """(M, b, H) answer-position features -> (M, b, K) label logits, each member's rows."""
        return torch.bmm(member_features, self.rows.transpose(1, 2))


def train_last_layer(
    model: PreTrainedModel,
    train_set: EncodedQuestions,
    eval_set: EncodedQuestions,
    label_ids: torch.Tensor,
    runtime: Runtime,
    *,
    n_members: int,
    data_seeds: Sequence[int],
    schedule_seed: int | None,
    batch_size: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    on_epoch: Callable[[int, np.ndarray, np.ndarray], None],
) -> LastLayerEnsemble:
    """Train M last-layer members; ``on_epoch(epoch, train_losses, member_log_probs)``."""
    if train_set.options is not None or eval_set.options is not None:
        raise ValueError(
            "Last-layer ensembles need letter scoring (model.scoring=letter): they train the "
            "LM-head rows of the answer letters, which answer-text scoring never reads."
        )
    ensemble = LastLayerEnsemble(model.get_output_embeddings().weight, label_ids, n_members)
    train_features = answer_features(model, train_set, runtime)
    eval_features = answer_features(model, eval_set, runtime)
    rest = ensemble.frozen_logsumexp(train_features)
    labels = torch.tensor(train_set.labels)
    optimizer = torch.optim.AdamW([ensemble.rows], lr=lr, weight_decay=weight_decay)
    lengths = [len(ids) for ids in train_set.input_ids]
    for epoch in range(epochs):
        orders = [epoch_order(lengths, batch_size, s, epoch, schedule_seed) for s in data_seeds]
        losses = np.zeros(n_members)
        for step in range(len(orders[0])):
            index = torch.as_tensor(np.stack([order[step] for order in orders]))  # (M, b)
            logits = ensemble.label_logits(train_features[index])
            full = torch.cat([logits, rest[index][..., None]], dim=-1)
            nll = -(logits.gather(2, labels[index][..., None]).squeeze(2) - full.logsumexp(-1))
            per_member = nll.mean(dim=1)
            optimizer.zero_grad()
            per_member.sum().backward()
            optimizer.step()
            losses += per_member.detach().numpy() * index.shape[1]
        on_epoch(
            epoch, losses / len(train_set), score_last_layer(ensemble, eval_features, eval_set)
        )
    return ensemble


@torch.no_grad()
def score_last_layer(
    ensemble: LastLayerEnsemble, features: torch.Tensor, encoded: EncodedQuestions
) -> np.ndarray:
    """Log p_T of every member on every question: (M, N, max options)."""
    k = max(encoded.n_choices)
    stacked = features.expand(ensemble.n_members, *features.shape)
    logits = ensemble.label_logits(stacked)[..., :k].double().numpy()
    n_choices = np.asarray(encoded.n_choices)
    return np.stack([normalize_label_log_probs(member, n_choices) for member in logits])


def save_last_layer_member(ensemble: LastLayerEnsemble, member: int, folder: Path) -> None:
    """A member's label rows and their token ids (not a PEFT adapter: no LoRA matrices)."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(
            {"rows": ensemble.rows[member].detach().contiguous(), "label_ids": ensemble.label_ids},
            tmp / WEIGHTS,
        )
        write_json_atomic(tmp / "last_layer.json", {"method": "last_layer", "member": member})
