"""Per-member data order and padded batches for the stacked forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from loraens.data.prompts import EncodedQuestions

BATCHES_PER_LENGTH_GROUP = 8


def epoch_order(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    schedule_seed: int | None = None,
) -> list[np.ndarray]:
    """One member's mini-batches for one epoch, keyed by (seed, epoch).

    Keying by the epoch instead of carrying generator state means any epoch's order can be
    rebuilt from the seeds alone, which resuming and the data-order ablation rely on.

    With ``schedule_seed`` None this is a plain shuffle. Otherwise questions are grouped by
    length (groups of ``BATCHES_PER_LENGTH_GROUP`` batches): each member shuffles its own
    questions inside every group, while the order in which groups' batch slots are visited is
    shared (drawn from ``schedule_seed``). At any step all members then hold questions of
    similar length, so the stacked batch wastes little on padding, yet every member still sees
    its own random batches in its own order.
    """
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    if schedule_seed is None:
        permutation = rng.permutation(n)
        return [permutation[i : i + batch_size] for i in range(0, n, batch_size)]
    by_length = np.argsort(np.asarray(lengths), kind="stable")
    group_size = batch_size * BATCHES_PER_LENGTH_GROUP
    slots = []
    for start in range(0, n, group_size):
        group = rng.permutation(by_length[start : start + group_size])
        slots += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    schedule = np.random.default_rng([schedule_seed, epoch]).permutation(len(slots))
    return [slots[i] for i in schedule]


def collate(
    encoded: EncodedQuestions, index_groups: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Stack several members' batches (member-major rows), padded on the right to one length."""
    indices = [int(i) for group in index_groups for i in group]
    lengths = [len(encoded.input_ids[i]) for i in indices]
    input_ids = torch.full((len(indices), max(lengths)), pad_id, dtype=torch.long)
    for row, i in enumerate(indices):
        input_ids[row, : lengths[row]] = torch.tensor(encoded.input_ids[i])
    return {
        "input_ids": input_ids,
        "indices": torch.tensor(indices),
        "lengths": torch.tensor(lengths),
        "labels": torch.tensor([encoded.labels[i] for i in indices]),
    }
