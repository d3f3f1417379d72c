"""One epoch of stacked ensemble training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from loraens.data.batching import collate, epoch_order
from loraens.data.prompts import EncodedQuestions
from loraens.distributed import Dist
from loraens.evaluation.inference import member_slices
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import answer_hidden_states, vocab_log_probs
from loraens.runtime import Runtime
from loraens.training.kl import base_log_probs, kl_to_base


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; training stops before any update is applied."""


class EnsembleTrainer:
    """Trains every member on its own data order, members stacked along the batch dimension.

    Each optimiser step processes one mini-batch per member. The loss of a pass is the sum over
    its members of each member's mean loss (NLL, Eq. 3, plus β·KL to the base model when
    ``kl_beta`` > 0), so each member's gradient is exactly the gradient of its own mini-batch
    loss and members never influence each other.

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
        self.slices = member_slices(ensemble.n_members, members_per_pass)
        self.pad_id = pad_id
        self.dist = dist or Dist(ensemble.n_members)
        self.params = ensemble.lora_parameters("A") + ensemble.lora_parameters("B")
        self.tokens_seen = 0  # non-padding tokens, for throughput reports
        self.kl_beta = kl_beta

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
            self.optimizer.zero_grad(set_to_none=True)
            step_losses = np.zeros(self.ensemble.n_members)
            for members in self.slices:
                batches = [orders[m][step] for m in range(members.start, members.stop)]
                step_losses[members] = self._backward(members, batches)
            self.dist.reduce_grads(self.params)
            step_losses, bad = self.dist.combine_step(step_losses, self._bad_gradients())
            losses += step_losses
            self._check_finite(bad, epoch, step)
            self.optimizer.step()
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

    def _backward(self, members: slice, batches: list[np.ndarray]) -> np.ndarray:
        """Backward of each member's mean loss on its batch; returns each member's summed loss.

        In data mode only this rank's share of the rows is computed, its mean weighted by that
        share, so the member's ranks' gradients sum to the full batch's mean-loss gradient.
        """
        full_size = len(batches[0])
        batches = [self.dist.shard(batch) for batch in batches]
        if len(batches[0]) == 0:  # data mode, a last batch smaller than the member's ranks
            return np.zeros(len(batches))
        inputs = collate(self.train_set, batches, self.pad_id)
        self.tokens_seen += int(inputs["lengths"].sum())
        device = self.runtime.device
        input_ids, lengths = inputs["input_ids"].to(device), inputs["lengths"].to(device)
        with self.ensemble.members(members), self.runtime.autocast():
            hidden = answer_hidden_states(self.ensemble.model, input_ids, lengths)
            log_probs = vocab_log_probs(self.ensemble.model, hidden)
        targets = self.label_ids[inputs["labels"].to(device)]
        loss = -log_probs.gather(1, targets[:, None]).squeeze(1)
        if self.kl_beta > 0:
            base = base_log_probs(self.ensemble, input_ids, lengths, self.runtime)
            loss = loss + self.kl_beta * kl_to_base(log_probs, base)
        per_member = loss.view(len(batches), -1).mean(dim=1)
        if len(batches[0]) != full_size:
            per_member = per_member * (len(batches[0]) / full_size)
        per_member.sum().backward()
        return per_member.detach().cpu().numpy() * full_size
