"""`loraens train` under a distributed launcher (torchrun, accelerate launch): who trains what,
and the few collectives that keep every rank's view of the run identical.

The mode follows from W processes (``WORLD_SIZE``) and M trained members:

- W = 1: no process group; everything below is a no-op and the run is the plain one.
- W <= M, "members" mode: rank r trains a contiguous block of members (block sizes differ by at
  most one) with the ordinary stacked path. Members are independent, so no gradient crosses
  ranks; per step only M floats travel (each member's loss, poisoned with NaN when a gradient is
  not finite), so every rank stops on the same bad step.
- W > M with W % M = 0, "data" mode: member m gets the G = W/M ranks ``[m·G, (m+1)·G)``. Each
  splits the member's per-step batch (``np.array_split``), scales its mean loss by its share of
  the rows and sums the LoRA gradients over the member's group in one flat all_reduce, which is
  exactly the gradient of the full batch's mean loss, however unevenly the rows split.

Each rank scores its own members (in data mode: its share of the questions) and every rank
gathers all (members, questions, options) log-probs, so ensemble metrics see the full ensemble.
Checkpoints are gathered to rank 0 and written in the single-process format (every member
stacked), and read back by rank 0 and scattered, so a run resumes on any number of ranks.
Only rank 0 touches the run directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.distributed as tdist

T = TypeVar("T")


class PeerFailed(RuntimeError):
    """Another rank failed or vanished; this rank stops too (the cause is reported there)."""


def env_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Placement:
    """What one rank trains: a block of members, and its place among the member's ranks."""

    members: range
    replica: int = 0  # position in the member's group of ranks (data mode), else 0
    replicas: int = 1  # ranks per member: 1 in members mode


def placements(n_members: int, world_size: int) -> list[Placement]:
    """Every rank's placement under the mode rule (see the module docstring)."""
    if world_size <= n_members:
        size, extra = divmod(n_members, world_size)
        out, start = [], 0
        for rank in range(world_size):
            stop = start + size + (rank < extra)
            out.append(Placement(range(start, stop)))
            start = stop
        return out
    if world_size % n_members:
        lower = n_members * (world_size // n_members)
        raise ValueError(
            f"{world_size} processes cannot share {n_members} trained member(s): with more "
            f"processes than members every member needs the same number of processes, so the "
            f"process count must be a multiple of {n_members} (e.g. {lower} or "
            f"{lower + n_members}), or at most {n_members}. Change --nproc_per_node/--nnodes "
            f"or --ensemble.members."
        )
    group = world_size // n_members
    return [
        Placement(range(r // group, r // group + 1), r % group, group) for r in range(world_size)
    ]


def rank_device(requested: str, local_rank: int) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is asked for (or auto-detected)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested != "cuda":
        raise ValueError(
            f"runtime.device={requested!r}: under a distributed launcher each rank uses "
            f"cuda:LOCAL_RANK; pass --runtime.device cuda (or auto, or cpu)."
        )
    if not torch.cuda.is_available():
        raise ValueError("runtime.device=cuda requested but CUDA is not available on this node.")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} but this node sees {torch.cuda.device_count()} GPU(s): "
            f"start at most one process per GPU (--nproc_per_node)."
        )
    return f"cuda:{local_rank}"


@dataclass
class Dist:
    """This process's rank, its members, and the collectives the training loop needs.

    ``Dist(n_members)`` is the single-process case: every method returns its input unchanged.
    """

    n_members: int
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    member_group: Any = None  # this member's process group (data mode)
    layout: list[Placement] = field(init=False)

    def __post_init__(self) -> None:
        self.layout = placements(self.n_members, self.world_size)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def place(self) -> Placement:
        return self.layout[self.rank]

    @property
    def members(self) -> range:
        """Global indices of the members this rank trains."""
        return self.place.members

    @property
    def mode(self) -> str:
        if not self.active:
            return "single"
        return "data" if self.place.replicas > 1 else "members"

    # -- the training step -------------------------------------------------------------------

    def shard(self, batch: np.ndarray) -> np.ndarray:
        """The rows of a member's batch this rank computes (all of them outside data mode)."""
        if self.place.replicas == 1:
            return batch
        return np.array_split(batch, self.place.replicas)[self.place.replica]

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the member's gradients over its ranks (data mode): one flat all_reduce."""
        if self.place.replicas == 1:
            return
        # A rank whose share of a small last batch is empty still contributes (zeros).
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        with self._collective("summing a member's gradients over its ranks"):
            tdist.all_reduce(flat, group=self.member_group)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()

    def combine_step(self, losses: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every member's summed step loss, and which members went non-finite, on every rank.

        ``losses`` and ``bad`` hold this rank's members. A member with a bad gradient is sent as
        NaN, so one all_reduce of M floats gives every rank the same stop decision.
        """
        if not self.active:
            return losses, bad | ~np.isfinite(losses)
        vector = torch.zeros(self.n_members, dtype=torch.float64)
        vector[self.members.start : self.members.stop] = torch.from_numpy(
            np.where(bad, np.nan, losses)
        )
        vector = vector.to(self.device)
        with self._collective("combining step losses"):
            tdist.all_reduce(vector)
        combined = vector.cpu().numpy()
        return combined, ~np.isfinite(combined)

    def sum(self, value: int) -> int:
        """Sum of an integer over all ranks (e.g. tokens seen)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        with self._collective("summing counters"):
            tdist.all_reduce(tensor)
        return int(tensor.item())

    # -- evaluation -------------------------------------------------------------------------

    def question_share(self, n_questions: int) -> np.ndarray | None:
        """Questions this rank scores: None (all) unless its member's ranks split them."""
        if self.place.replicas == 1:
            return None
        return np.array_split(np.arange(n_questions), self.place.replicas)[self.place.replica]

    def gather_scores(self, local: np.ndarray) -> np.ndarray:
        """(local members·passes, N, K) log-probs -> (M·passes, N, K), the same on every rank."""
        if not self.active:
            return local
        shape = local.shape[1:]
        blocks = self._all_gather_rows(torch.from_numpy(local).reshape(len(self.members), -1))
        by_member: dict[int, np.ndarray] = {}
        for place, block in zip(self.layout, blocks, strict=True):
            scores = block.numpy().reshape(-1, *shape)
            if place.replicas == 1:
                by_member[place.members.start] = scores
                continue
            member = by_member.setdefault(place.members.start, scores.copy())
            share = np.array_split(np.arange(shape[0]), place.replicas)[place.replica]
            member[:, share] = scores[:, share]
        return np.concatenate([by_member[m] for m in sorted(by_member)])

    # -- member-stacked state (checkpoints, saved adapters) ---------------------------------

    def gather_members(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors stacked by local member -> the same tensors for all M members (CPU).

        Every rank gets the result (an all_gather, which every backend has); in data mode each
        member is taken from its first rank (its replicas hold identical copies).
        """
        if not self.active or not tensors:
            return tensors
        n_local = len(self.members)
        names = list(tensors)
        widths = [tensors[k].numel() // n_local for k in names]
        dtype = tensors[names[0]].dtype
        flat = torch.cat([tensors[k].reshape(n_local, -1).to(dtype) for k in names], dim=1)
        blocks = self._all_gather_rows(flat)
        full = torch.cat(
            [b for place, b in zip(self.layout, blocks, strict=True) if place.replica == 0]
        )
        out = {}
        for name, part in zip(names, full.split(widths, dim=1), strict=True):
            local_shape = tensors[name].shape
            rows = local_shape[0] // n_local * self.n_members
            out[name] = part.reshape(rows, *local_shape[1:]).contiguous()
        return out

    def scatter_members(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Rank 0's tensors stacked by all M members -> this rank's members' slices (CPU)."""
        if not self.active:
            assert tensors is not None
            return tensors
        meta = self.broadcast(
            None if tensors is None else [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
        )
        if not meta:
            return {}
        widths = [int(np.prod(shape)) // self.n_members for _, shape, _ in meta]
        if self.is_main:
            assert tensors is not None
            flat = torch.cat([tensors[k].reshape(self.n_members, -1) for k, _, _ in meta], dim=1)
            flat = flat.to(self.device)
        else:
            flat = torch.empty(self.n_members, sum(widths), dtype=meta[0][2], device=self.device)
        with self._collective("sending the checkpoint from rank 0"):
            tdist.broadcast(flat, src=0)
        mine = flat[self.members.start : self.members.stop].cpu()
        out = {}
        for (name, shape, _), part in zip(meta, mine.split(widths, dim=1), strict=True):
            rows = shape[0] // self.n_members * len(self.members)
            out[name] = part.reshape(rows, *shape[1:]).contiguous()
        return out

    # -- plumbing ------------------------------------------------------------------------------

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled: only for small Python values)."""
        if not self.active:
            return obj
        box = [obj]
        with self._collective("receiving a value from rank 0"):
            tdist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def all_gather_object(self, obj: T) -> list[T]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective("exchanging a value between ranks"):
            tdist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only (e.g. a file write); its result or failure reaches every
        rank, so no rank runs ahead of a half-written file or waits on a rank that failed."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # re-raised below, after the other ranks are told
                error = err
        outcome = self.broadcast((result, None if error is None else str(error)))
        if error is not None:
            raise error
        if outcome[1] is not None:
            raise PeerFailed(f"Stopped because rank 0 failed: {outcome[1]}")
        return cast("T", outcome[0])

    def barrier(self) -> None:
        if self.active:
            with self._collective("waiting for the other ranks"):
                tdist.barrier()

    def _all_gather_rows(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's (its members, width) block, padded to one shape for all_gather."""
        rows = max(len(p.members) for p in self.layout)
        padded = torch.zeros(rows, flat.shape[1], dtype=flat.dtype, device=self.device)
        padded[: flat.shape[0]] = flat.to(self.device)
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        with self._collective("gathering every member's results"):
            tdist.all_gather(out, padded)
        return [b[: len(p.members)].cpu() for p, b in zip(self.layout, out, strict=True)]

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except PeerFailed:
            raise
        except RuntimeError as err:  # DistBackendError, DistNetworkError, timeouts
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err)
            raise PeerFailed(
                f"rank {self.rank} lost contact with the other ranks while {what}: another rank "
                f"most likely failed (its error is printed above; torchrun's summary names it). "
                f"The last complete checkpoint is intact: fix the cause and rerun the same "
                f"command to resume. ({first_line})"
            ) from err


@contextmanager
def launch(requested_device: str, n_members: int, timeout_minutes: float) -> Iterator[Dist]:
    """This process's :class:`Dist`, with a process group when a launcher started several.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``, through
    ``init_process_group``'s env:// default) as torchrun and accelerate launch set them; gloo on
    CPU, nccl on CUDA. A group this function creates is destroyed when the run ends.
    """
    world_size = env_world_size()
    if world_size <= 1:
        yield Dist(n_members)
        return
    if "RANK" not in os.environ:
        raise ValueError(
            f"WORLD_SIZE={world_size} is set but RANK is not: start distributed runs with "
            f"torchrun (or accelerate launch), which set both."
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    placements(n_members, world_size)  # refuse a bad process count before any rendezvous
    device = torch.device(rank_device(requested_device, local_rank))
    owned = not tdist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The default 30 min (gloo) would leave a job hanging that long if a rank died outside
        # an agent that kills its peers; the timeout must exceed the longest gap between
        # collectives (model loading, rank 0 writing a checkpoint).
        tdist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
        )
    elif tdist.get_world_size() != world_size or tdist.get_rank() != rank:
        raise ValueError("An existing process group disagrees with RANK/WORLD_SIZE.")
    dist = Dist(n_members, rank, world_size, local_rank, device)
    if rank != 0:
        # Rank 0 reports progress; the others speak only to warn or fail.
        logging.getLogger("loraens").setLevel(logging.WARNING)
    if dist.layout[-1].replicas > 1:
        # Every rank creates every member's group, in the same order (new_group's contract).
        group_size = dist.layout[-1].replicas
        for member in range(n_members):
            group = tdist.new_group(list(range(member * group_size, (member + 1) * group_size)))
            if member == dist.members.start:
                dist.member_group = group
    yield dist
    # Only on success: after a failure the peers may be gone, and tearing down a group whose
    # peers vanished can block; the process is about to exit anyway.
    if owned:
        tdist.destroy_process_group()
