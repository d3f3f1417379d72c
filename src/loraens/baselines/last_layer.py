"""Last-layer ensembles (§5.1, Table 1): fine-tune only the LM-head rows the answers are read from.

Each member owns an untied copy of some rows of the output embedding, initialised from the
pretrained weights (SmolLM2 ties them to the input embedding, which stays frozen). The rest of the
model is frozen, so every hidden state the loss reads is computed once. The loss is still the
full-vocabulary NLL (Eq. 3): the frozen rows contribute one constant log-sum-exp per scored
position, so a step costs a few dot products per position instead of a forward.

Which rows train depends on ``model.scoring``:

- ``letter``: the K answer letters' rows, read at each question's answer position.
- ``answer_text``: the rows of every token the *training* options are made of, read at every
  position that predicts an option token. An option's score is its tokens' log-probabilities
  summed and normalised as for LoRA members (:func:`loraens.models.scoring.option_scores`);
  tokens that occur only in eval options keep their pretrained rows (no eval text shapes
  training). The loss is ``optim.loss``, as for LoRA members.

A finished run's members are reloaded by :func:`load_last_layer_run`, whose ``score`` scores
any question set the way training scores the eval set (an experiment's ``ood_eval``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from loraens.config import ModelConfig, OptionLoss
from loraens.data.batching import epoch_order
from loraens.data.packing import plan_rows, rows_batch
from loraens.data.prompts import EncodedQuestions, encode_questions
from loraens.data.records import Question
from loraens.evaluation.metrics import normalize_label_log_probs
from loraens.io import atomic_path, write_json_atomic
from loraens.models.loading import BaseModel
from loraens.models.scoring import answer_features, option_scores, target_states
from loraens.rundir import RunDir
from loraens.rundir.load import load_run_base, refuse_remote_code
from loraens.runtime import Runtime

WEIGHTS = "last_layer.safetensors"


class LastLayerEnsemble(torch.nn.Module):
    """M trainable copies of the head rows of ``token_ids``; every other row stays frozen."""

    def __init__(self, head_weight: torch.Tensor, token_ids: torch.Tensor, n_members: int):
        super().__init__()
        self.token_ids = token_ids.cpu()
        rows = head_weight.detach()[self.token_ids].float().cpu()
        self.rows = torch.nn.Parameter(rows.repeat(n_members, 1, 1).clone())  # (M, V, H)
        # log Σ over every vocabulary row except the trained ones: constant, those rows are frozen.
        others = torch.ones(head_weight.shape[0], dtype=torch.bool)
        others[self.token_ids] = False
        self.frozen_rows = head_weight.detach()[others].float().cpu()
        # Column of each vocabulary id among the trained rows, -1 for a frozen row.
        self.column = torch.full((head_weight.shape[0],), -1, dtype=torch.long)
        self.column[self.token_ids] = torch.arange(len(self.token_ids))

    @property
    def n_members(self) -> int:
        return self.rows.shape[0]

    def frozen_logsumexp(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [torch.logsumexp(chunk @ self.frozen_rows.T, dim=-1) for chunk in features.split(256)]
        )

    def label_logits(self, member_features: torch.Tensor) -> torch.Tensor:
        """(M, b, H) features -> (M, b, V) logits of the trained rows, each member's own."""
        return torch.bmm(member_features, self.rows.transpose(1, 2))


class _Features(Protocol):
    """The frozen model's cached states for one question set, and how a member scores them."""

    def losses(self, ensemble: LastLayerEnsemble, member: int, index: torch.Tensor) -> torch.Tensor:
        """Each question's training loss under ``member``, (len(index),)."""
        ...

    def log_p(self, ensemble: LastLayerEnsemble) -> np.ndarray:
        """Log p_T of every member on every question: (M, N, max options)."""
        ...


class _LetterFeatures:
    def __init__(self, model, encoded: EncodedQuestions, ensemble: LastLayerEnsemble, runtime):
        self.hidden = answer_features(model, encoded, runtime)
        self.rest = ensemble.frozen_logsumexp(self.hidden)
        self.labels = torch.tensor(encoded.labels)
        self.n_choices = np.asarray(encoded.n_choices)

    def losses(self, ensemble: LastLayerEnsemble, member: int, index: torch.Tensor) -> torch.Tensor:
        logits = self.hidden[index] @ ensemble.rows[member].T
        full = torch.cat([logits, self.rest[index][:, None]], dim=-1)
        return full.logsumexp(-1) - logits.gather(1, self.labels[index][:, None]).squeeze(1)

    @torch.no_grad()
    def log_p(self, ensemble: LastLayerEnsemble) -> np.ndarray:
        k = int(self.n_choices.max())
        stacked = self.hidden.expand(ensemble.n_members, *self.hidden.shape)
        logits = ensemble.label_logits(stacked)[..., :k].double().numpy()
        return np.stack([normalize_label_log_probs(m, self.n_choices) for m in logits])


@dataclass
class _OptionPositions:
    """The positions predicting option tokens, question-major: question i owns
    ``starts[i]:starts[i + 1]``."""

    hidden: torch.Tensor  # (T, H) the frozen model's final state there
    targets: torch.Tensor  # (T,) the token it predicts
    option: torch.Tensor  # (T,) which option of its question
    starts: torch.Tensor  # (N + 1,)
    option_tokens: torch.Tensor  # (N, K_max) each option's token count, 0 if absent
    option_chars: torch.Tensor  # (N, K_max)


def option_positions(
    model: PreTrainedModel, encoded: EncodedQuestions, runtime: Runtime, batch_size: int = 32
) -> _OptionPositions:
    """The frozen model's states at every option-token position of an answer-text set."""
    k_max = max(encoded.n_choices)
    n = len(encoded)
    lengths = [len(ids) for ids in encoded.input_ids]
    order = np.argsort(lengths, kind="stable")
    per_question: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    option_tokens = torch.zeros((n, k_max), dtype=torch.long)
    option_chars = torch.zeros((n, k_max), dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size].tolist()
            rows = plan_rows([batch], lengths, runtime.row_tokens)[0]
            inputs = rows_batch(encoded, rows, 0, packed=True)
            with runtime.autocast():
                hidden = target_states(model, inputs, runtime.device).float().cpu()
            slots = inputs["target_slots"]
            local = slots // k_max
            for q, i in enumerate(inputs["indices"].tolist()):
                mine = local == q
                per_question[i] = (hidden[mine], inputs["target_ids"][mine], slots[mine] % k_max)
                option_tokens[i] = inputs["option_tokens"][q]
                option_chars[i] = inputs["option_chars"][q]
    parts = [per_question[i] for i in range(n)]
    counts = torch.tensor([len(p[1]) for p in parts])
    return _OptionPositions(
        hidden=torch.cat([p[0] for p in parts]),
        targets=torch.cat([p[1] for p in parts]),
        option=torch.cat([p[2] for p in parts]),
        starts=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        option_tokens=option_tokens,
        option_chars=option_chars,
    )


class _OptionFeatures:
    def __init__(
        self,
        positions: _OptionPositions,
        encoded: EncodedQuestions,
        ensemble: LastLayerEnsemble,
        head_weight: torch.Tensor,
        loss: OptionLoss,
    ):
        assert encoded.options is not None
        self.p = positions
        self.normalization = encoded.options.normalization
        self.labels = torch.tensor(encoded.labels)
        self.n_choices = np.asarray(encoded.n_choices)
        self.loss = loss
        self.rest = ensemble.frozen_logsumexp(positions.hidden)
        # A target outside the trained rows keeps its pretrained logit: computed once, from
        # the target rows only (no copy of the whole head).
        self.frozen_target = torch.cat(
            [
                (h * head_weight.detach()[t.to(head_weight.device)].float().cpu()).sum(-1)
                for h, t in zip(
                    positions.hidden.split(1024), positions.targets.split(1024), strict=True
                )
            ]
        )
        self.column = ensemble.column[positions.targets]

    def scores(self, ensemble: LastLayerEnsemble, member: int, index: torch.Tensor):
        """(b, K_max) option scores of questions ``index`` under ``member``."""
        p = self.p
        starts = p.starts.tolist()
        spans = [torch.arange(starts[i], starts[i + 1]) for i in index.tolist()]
        at = torch.cat(spans)
        owner = torch.repeat_interleave(
            torch.arange(len(spans)), torch.tensor(list(map(len, spans)))
        )
        logits = p.hidden[at] @ ensemble.rows[member].T  # (P, V)
        lse = torch.cat([logits, self.rest[at][:, None]], dim=-1).logsumexp(-1)
        column = self.column[at]
        trained = logits.gather(1, column.clamp(min=0)[:, None]).squeeze(1)
        target = torch.where(column >= 0, trained, self.frozen_target[at])
        k_max = p.option_tokens.shape[1]
        layout = {
            "option_tokens": p.option_tokens[index],
            "option_chars": p.option_chars[index],
            "target_slots": owner * k_max + p.option[at],
        }
        return option_scores(target - lse, layout, self.normalization)

    def losses(self, ensemble: LastLayerEnsemble, member: int, index: torch.Tensor) -> torch.Tensor:
        scores = self.scores(ensemble, member, index)
        labels = self.labels[index][:, None]
        if self.loss == "token_nll":
            return -scores.gather(1, labels).squeeze(1)
        absent = self.p.option_tokens[index] == 0
        log_p = scores.masked_fill(absent, float("-inf")).log_softmax(dim=-1)
        return -log_p.gather(1, labels).squeeze(1)

    @torch.no_grad()
    def log_p(self, ensemble: LastLayerEnsemble) -> np.ndarray:
        k = int(self.n_choices.max())
        every = torch.arange(len(self.labels))
        return np.stack(
            [
                normalize_label_log_probs(
                    self.scores(ensemble, m, every)[:, :k].double().numpy(), self.n_choices
                )
                for m in range(ensemble.n_members)
            ]
        )


def answer_token_ids(encoded: EncodedQuestions) -> torch.Tensor:
    """Every token id the options of an answer-text set are made of, ascending."""
    assert encoded.options is not None
    ids: set[int] = set()
    for tokens, lengths in zip(encoded.input_ids, encoded.options.lengths, strict=True):
        ids.update(tokens[len(tokens) - sum(lengths) :])
    return torch.tensor(sorted(ids), dtype=torch.long)


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
    loss: OptionLoss = "token_nll",
) -> LastLayerEnsemble:
    """Train M last-layer members; ``on_epoch(epoch, train_losses, member_log_probs)``.

    ``label_ids`` are the answer letters' tokens (letter scoring); answer-text sets
    (``train_set.options``) train the rows of their options' tokens instead, on ``loss``.
    """
    head = model.get_output_embeddings().weight
    train: _Features
    evaluation: _Features
    if train_set.options is None:
        ensemble = LastLayerEnsemble(head, label_ids, n_members)
        train = _LetterFeatures(model, train_set, ensemble, runtime)
        evaluation = _LetterFeatures(model, eval_set, ensemble, runtime)
    else:
        ensemble = LastLayerEnsemble(head, answer_token_ids(train_set), n_members)
        train, evaluation = (
            _OptionFeatures(option_positions(model, s, runtime), s, ensemble, head, loss)
            for s in (train_set, eval_set)
        )
    optimizer = torch.optim.AdamW([ensemble.rows], lr=lr, weight_decay=weight_decay)
    lengths = [len(ids) for ids in train_set.input_ids]
    for epoch in range(epochs):
        orders = [epoch_order(lengths, batch_size, s, epoch, schedule_seed) for s in data_seeds]
        losses = np.zeros(n_members)
        for step in range(len(orders[0])):
            optimizer.zero_grad()
            per_member = torch.stack(
                [
                    train.losses(ensemble, m, torch.as_tensor(order[step])).mean()
                    for m, order in enumerate(orders)
                ]
            )
            per_member.sum().backward()
            optimizer.step()
            losses += per_member.detach().numpy() * len(orders[0][step])
        on_epoch(epoch, losses / len(train_set), evaluation.log_p(ensemble))
    return ensemble


def save_last_layer_member(ensemble: LastLayerEnsemble, member: int, folder: Path) -> None:
    """A member's trained head rows and their token ids (not a PEFT adapter: no LoRA matrices)."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(
            {"rows": ensemble.rows[member].detach().contiguous(), "token_ids": ensemble.token_ids},
            tmp / WEIGHTS,
        )
        write_json_atomic(tmp / "last_layer.json", {"method": "last_layer", "member": member})


@dataclass
class LastLayerRun:
    """A finished last-layer run: its base model and every member's trained head rows."""

    ensemble: LastLayerEnsemble
    base: BaseModel
    runtime: Runtime
    model_config: ModelConfig

    def score(self, questions: Sequence[Question], batch_size: int = 32) -> np.ndarray:
        """Every member's log p_T on ``questions``, (M, N, max options): the features and
        scores training computes for its eval set (letters' rows, or option tokens' rows)."""
        cfg, model = self.model_config, self.base.model
        encoded = encode_questions(
            self.base.tokenizer, list(questions), cfg.max_length, cfg.scoring, cfg.normalization
        )
        features: _Features
        if encoded.options is None:
            if max(encoded.n_choices) > len(self.ensemble.token_ids):
                raise ValueError(
                    f"the run trained {len(self.ensemble.token_ids)} answer letters' rows; "
                    f"these questions have up to {max(encoded.n_choices)} options"
                )
            features = _LetterFeatures(model, encoded, self.ensemble, self.runtime)
        else:
            positions = option_positions(model, encoded, self.runtime, batch_size)
            head = model.get_output_embeddings().weight
            features = _OptionFeatures(positions, encoded, self.ensemble, head, "option_nll")
        return features.log_p(self.ensemble)


def load_last_layer_run(
    run_dir: str | Path,
    device: str = "auto",
    precision: str = "fp32",
    *,
    trust_remote_code: bool = False,
) -> LastLayerRun:
    """A finished last-layer run's members on its base model (``trust_remote_code``: as
    :func:`~loraens.rundir.load.load_run`'s)."""
    run = RunDir(Path(run_dir))
    cfg = run.read_config()
    refuse_remote_code(run.config, cfg.model, trust_remote_code)
    if cfg.ensemble.method != "last_layer":
        raise ValueError(f"{run.root} is not a last-layer run (ensemble.method last_layer).")
    folders = run.member_folders()
    if not folders or not all((f / WEIGHTS).is_file() for f in folders):
        raise ValueError(f"{run.root} holds no saved last-layer members (members/*/{WEIGHTS}).")
    saved = [load_file(f / WEIGHTS) for f in folders]
    token_ids = saved[0]["token_ids"]
    if any(not torch.equal(s["token_ids"], token_ids) for s in saved):
        raise ValueError(f"the members of {run.root} trained different head rows")
    runtime, base = load_run_base(run, device, precision)
    head = base.model.get_output_embeddings().weight
    ensemble = LastLayerEnsemble(head, token_ids, len(saved))
    with torch.no_grad():
        ensemble.rows.copy_(torch.stack([s["rows"] for s in saved]).float())
    return LastLayerRun(ensemble, base, runtime, cfg.model)
