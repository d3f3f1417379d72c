"""Per-member seeds derived from one run seed.

Two independent streams (initialisation, data order) so the paper's Fig. 7 ablation can switch
either source of diversity off without changing the other. Member m's seed depends only on the
run seed and m, never on M, so a member trained alone equals the same member in an ensemble.
"""

from __future__ import annotations

import numpy as np

_STREAMS = {"init": 1, "data": 2, "schedule": 3, "rank": 4}


def member_seeds(run_seed: int, n_members: int, stream: str, vary: bool = True) -> list[int]:
    children = np.random.SeedSequence([run_seed, _STREAMS[stream]]).spawn(n_members)
    seeds = [int(child.generate_state(1)[0]) for child in children]
    return seeds if vary else [seeds[0]] * n_members


def schedule_seed(run_seed: int) -> int:
    """Seed of the length-group schedule that all members share (see ``epoch_order``)."""
    return member_seeds(run_seed, 1, "schedule")[0]


def rank_seed(run_seed: int, rank: int) -> int:
    """Seed of a process's global torch generator (LoRA dropout masks).

    Rank 0 (and a single-process run) uses the run seed itself; other ranks get their own
    stream, so the ranks splitting one member's batch in data mode draw independent masks.
    """
    if rank == 0:
        return run_seed
    return int(np.random.SeedSequence([run_seed, _STREAMS["rank"], rank]).generate_state(1)[0])
