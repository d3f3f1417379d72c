"""One epoch of stacked ensemble training."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from loraens.config import OptionLoss
from loraens.data.batching import epoch_order
from loraens.data.packing import Row, plan_rows, rows_batch
from loraens.data.prompts import EncodedQuestions
from loraens.distributed import Dist
from loraens.evaluation.inference import member_slices
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import (
    batch_hidden_states,
    option_scores,
    target_log_probs,
    target_states,
    vocab_log_probs,
)
from loraens.runtime import Runtime
from loraens.training.kl import base_log_probs, base_target_log_probs, kl_to_base
from loraens.training.memory import (
    activation_bytes_per_token,
    resolve_budget,
    scored_bytes_per_token,
    split_passes,
)


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; training stops before any update is applied."""


class EnsembleTrainer:
    """Trains every member on its own data order, members stacked along the batch dimension.

    Each optimiser step processes one mini-batch per member. The loss of a pass is the sum over
    its members of each member's mean loss (NLL, Eq. 3, plus β·KL to the base model when
    ``kl_beta`` > 0), so each member's gradient is exactly the gradient of its own mini-batch
    loss and members never influence each other.

    Each step's questions are laid out in rows (packed several per row with
    ``runtime.packing``, see :mod:`loraens.data.packing`) and split into passes that fit
    ``runtime.memory_budget_gb`` (see :mod:`loraens.training.memory`): every question's loss is
    divided by its member's full batch size, so the passes' gradients sum to exactly the
    gradient of the member's mean loss.

    Answer-text questions (``train_set.options``) are trained on ``loss``: ``token_nll``, the
    full-vocabulary NLL of the correct option's tokens normalised as the scores are, or
    ``option_nll``, the K-way cross-entropy of the softmax over option scores; the KL term is
    then the mean KL over the positions the loss reads (see :mod:`loraens.training.kl`).

    Under a distributed launcher (``dist``) the trainer holds only this rank's members
    (``data_seeds`` are theirs); in data mode it computes its share of each batch's rows and
    the member's ranks sum their gradients before the step (see :mod:`loraens.distributed`).
    """

    def __init__(
        self,
        ensemble: LoRAEnsemble,
        optimizer: torch.optim.Optimizer,
        train_set: EncodedQuestions,
        label_ids: torch.Tensor,
        runtime: Runtime,
        *,
        data_seeds: Sequence[int],
        batch_size: int,
        schedule_seed: int | None = None,
        members_per_pass: int | None = None,
        kl_beta: float = 0.0,
        pad_id: int = 0,
        dist: Dist | None = None,
        loss: OptionLoss = "token_nll",
    ):
        self.ensemble = ensemble
        self.optimizer = optimizer
        self.train_set = train_set
        self.label_ids = label_ids.to(runtime.device)
        self.runtime = runtime
        self.data_seeds = list(data_seeds)
        self.batch_size = batch_size
        self.schedule_seed = schedule_seed
        self.lengths = [len(ids) for ids in train_set.input_ids]
        self.members_per_pass = members_per_pass
        budget = resolve_budget(runtime.memory_budget_gb, runtime.device)
        per_token = activation_bytes_per_token(ensemble.model.config, runtime.autocast_dtype)
        if train_set.options is not None:
            per_token += _scored_share(train_set, loss) * scored_bytes_per_token(
                ensemble.model.config
            )
        self.budget_tokens = budget / per_token
        self.pad_id = pad_id
        self.dist = dist or Dist(ensemble.n_members)
        self.params = [p for which in "ABG" for p in ensemble.lora_parameters(which)]
        self.tokens_seen = 0  # non-padding tokens, for throughput reports
        self.tokens_processed = 0  # padding included
        # (rows, row length, questions' lengths) of every pass, when a caller sets it to a list
        self.pass_log: list[tuple[int, int, list[int]]] | None = None
        self.on_step: Callable[[float], None] | None = None  # gets each step's seconds
        self.kl_beta = kl_beta
        self.loss = loss
        # BLoB: the KL's own step after each NLL step (loraens.training.blob.KLStep).
        self.after_step: Callable[[int], object] | None = None

    def steps_per_epoch(self) -> int:
        return -(-len(self.train_set) // self.batch_size)

    def train_epoch(self, epoch: int, progress: bool = False) -> np.ndarray:
        """Run one epoch; returns every member's mean training loss (all M, on every rank)."""
        orders = [
            epoch_order(self.lengths, self.batch_size, seed, epoch, self.schedule_seed)
            for seed in self.data_seeds
        ]
        losses = np.zeros(self.dist.n_members)
        self.ensemble.model.train()
        steps = range(self.steps_per_epoch())
        for step in tqdm(steps, desc=f"epoch {epoch + 1}", disable=not progress, leave=False):
            tick = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            step_losses = self._step([order[step] for order in orders])
            self.dist.reduce_grads(self.params)
            step_losses, bad = self.dist.combine_step(step_losses, self._bad_gradients())
            losses += step_losses
            self._check_finite(bad, epoch, step)
            self.optimizer.step()
            if self.after_step is not None:
                self.after_step(step)
            if self.on_step is not None:
                self.on_step(time.perf_counter() - tick)
        self.ensemble.model.eval()
        return losses / len(self.train_set)

    def _bad_gradients(self) -> np.ndarray:
        """Which of this rank's members has a non-finite gradient."""
        grads = [
            torch.isfinite(p.grad.flatten(1)).all(dim=1) for p in self.params if p.grad is not None
        ]
        # One device-to-host transfer per step, not one per adapter tensor.
        if not grads:
            return np.zeros(self.ensemble.n_members, dtype=bool)
        return ~torch.stack(grads).all(dim=0).cpu().numpy()

    def _check_finite(self, bad: np.ndarray, epoch: int, step: int) -> None:
        # Checked before optimizer.step(), so a bad step never reaches the adapters and the last
        # checkpoint stays the last good state. ``bad`` covers every member on every rank, so all
        # ranks stop on the same step with the same message.
        if bad.any():
            members = ", ".join(str(m) for m in np.flatnonzero(bad))
            raise NonFiniteError(
                f"Non-finite loss or gradient at epoch {epoch + 1}, step {step + 1}, "
                f"member(s) {members}. Training stopped; the last checkpoint is intact. Lower "
                f"optim.lr or use runtime.precision=fp32 and resume."
            )

    def _step(self, batches: list[np.ndarray]) -> np.ndarray:
        """Backward of each member's mean loss on its batch; returns each member's summed loss.

        In data mode only this rank's share of the rows is computed, its losses still divided
        by the full batch size, so the member's ranks' gradients sum to the full batch's
        mean-loss gradient.
        """
        n_members = len(batches)
        full_size = len(batches[0])
        batches = [self.dist.shard(batch) for batch in batches]
        losses = np.zeros(n_members)
        if len(batches[0]) == 0:  # data mode, a last batch smaller than the member's ranks
            return losses
        # Each group of members_per_pass members is laid out on its own, so a process holding
        # some members (distributed members mode) computes exactly what a single process
        # computes for that group.
        for group in member_slices(n_members, self.members_per_pass):
            layout = plan_rows(batches[group], self.lengths, self.runtime.row_tokens)
            n_rows = len(layout[0])
            width = max(sum(self.lengths[i] for i in row) for rows in layout for row in rows)
            size = group.stop - group.start
            per_pass, rows_per_pass = split_passes(size, n_rows, width, self.budget_tokens, None)
            for start in range(0, size, per_pass):
                part = slice(start, min(start + per_pass, size))
                members = slice(group.start + part.start, group.start + part.stop)
                for first in range(0, n_rows, rows_per_pass):
                    rows = [row for rows in layout[part] for row in rows[first:][:rows_per_pass]]
                    losses[members] += self._backward(members, rows, full_size)
        return losses

    def _backward(self, members: slice, rows: list[Row], full_size: int) -> np.ndarray:
        """One pass over ``rows`` (grouped by member, as many per member); each question's loss
        enters divided by ``full_size``. Returns each member's summed loss over the pass."""
        n_active = members.stop - members.start
        inputs = rows_batch(
            self.train_set,
            rows,
            self.pad_id,
            packed=self.runtime.packing,
            width_multiple=self.runtime.width_multiple,
        )
        self.tokens_seen += int(inputs["lengths"].sum())
        self.tokens_processed += inputs["input_ids"].numel()
        if self.pass_log is not None:
            self.pass_log.append((*inputs["input_ids"].shape, inputs["lengths"].tolist()))
        device = self.runtime.device
        if self.train_set.options is not None:
            loss = self._option_loss(members, inputs)
        else:
            with self.ensemble.members(members), self.runtime.autocast():
                hidden = batch_hidden_states(self.ensemble.model, inputs, device)
                log_probs = vocab_log_probs(self.ensemble.model, hidden)
            targets = self.label_ids[inputs["labels"].to(device)]
            loss = -log_probs.gather(1, targets[:, None]).squeeze(1)
            if self.kl_beta > 0:
                base = base_log_probs(self.ensemble, inputs, self.runtime)
                loss = loss + self.kl_beta * kl_to_base(log_probs, base)
        owner = (inputs["answer_rows"] // (len(rows) // n_active)).to(device)
        per_member = torch.zeros(n_active, device=device).index_add(0, owner, loss) / full_size
        per_member.sum().backward()
        return per_member.detach().cpu().numpy() * full_size

    def _option_loss(self, members: slice, inputs: dict) -> torch.Tensor:
        """Each answer-text question's loss (plus β·KL), (questions,), in batch order."""
        device = self.runtime.device
        options = self.train_set.options
        assert options is not None
        k_max = inputs["option_tokens"].shape[1]
        slots = inputs["target_slots"].to(device)
        question = slots // k_max
        labels = inputs["labels"].to(device)
        # token_nll reads the correct option's tokens only: the other options' head
        # projections are not computed at all.
        read = slots % k_max == labels[question] if self.loss == "token_nll" else None
        targets = inputs["target_ids"].to(device)
        model = self.ensemble.model
        with self.ensemble.members(members), self.runtime.autocast():
            hidden = target_states(model, inputs, device)
            if read is not None:
                hidden, targets, slots, question = (
                    hidden[read],
                    targets[read],
                    slots[read],
                    question[read],
                )
            if self.kl_beta > 0:
                full = vocab_log_probs(model, hidden)
                token_log_probs = full.gather(1, targets[:, None]).squeeze(1)
            else:
                token_log_probs = target_log_probs(
                    model, hidden, targets, chunk=max(len(targets), 1)
                )
        layout = {**inputs, "target_slots": slots}
        scores = option_scores(token_log_probs, layout, options.normalization)
        if self.loss == "token_nll":
            loss = -scores.gather(1, labels[:, None]).squeeze(1)
        else:
            absent = inputs["option_tokens"].to(device) == 0
            log_p = scores.masked_fill(absent, float("-inf")).log_softmax(dim=-1)
            loss = -log_p.gather(1, labels[:, None]).squeeze(1)
        if self.kl_beta > 0:
            base = base_target_log_probs(self.ensemble, inputs, self.runtime, read)
            per_position = kl_to_base(full, base)
            n_questions = len(labels)
            total = torch.zeros(n_questions, device=device).index_add(0, question, per_position)
            count = torch.zeros(n_questions, device=device).index_add(
                0, question, torch.ones_like(per_position)
            )
            loss = loss + self.kl_beta * total / count.clamp(min=1)
        return loss


def _scored_share(train_set: EncodedQuestions, loss: OptionLoss) -> float:
    """Share of a segment's tokens whose full-vocabulary logits a training pass keeps."""
    options = train_set.options
    assert options is not None
    total = sum(len(ids) for ids in train_set.input_ids)
    if loss == "option_nll":
        scored = sum(sum(lengths) for lengths in options.lengths)
    else:
        scored = sum(
            lengths[label] for lengths, label in zip(options.lengths, train_set.labels, strict=True)
        )
    return scored / max(total, 1)
