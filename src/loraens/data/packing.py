"""Rows of a stacked pass: several questions packed per row, or one question per row.

Right-padding every prompt of a stacked batch to the longest one wastes compute on padding
(1.7 processed tokens per useful token on ARC-Easy with M = 5). Packing puts several questions
of one member end to end in a row, each with its own position ids restarting at 0. Given
``position_ids`` and no attention mask, transformers' masking utilities detect the restarts
(``find_packed_sequence_indices``) and build a block-diagonal causal mask, so every question
attends to itself only: its hidden states equal those of the question scored alone.

A layout is, per member, a list of rows, each a list of question indices. The LoRA layers need
rows grouped by member with the same count for every member (rows ``[g*R, (g+1)*R)`` belong to
the g-th active member), so members with fewer rows get empty rows (padding only).

Answer-text questions (:class:`loraens.data.prompts.AnswerOptions`) are segments of a prompt
followed by its K options. Their rows get an explicit 4-D attention mask instead: a token sees
the earlier tokens of its own question's prompt and of its own option only, and each option's
position ids continue from the prompt's end, so option k is computed exactly as the prompt + k
alone would be while the prompt is computed once. Packed or not, a segment's length is its
row-space (prompt plus every option), which is what packing and the memory budget count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from loraens.data.prompts import EncodedQuestions

Row = list[int]  # question indices, in order along the row


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of positions into ``lengths`` with at most ``budget`` tokens each (a longer item
    gets a bin of its own): first-fit over the items sorted longest first."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, load in enumerate(loads):
            if load + lengths[item] <= budget:
                bins[b].append(item)
                loads[b] += lengths[item]
                break
        else:
            bins.append([item])
            loads.append(lengths[item])
    return bins


def balanced(lengths: Sequence[int], n_bins: int) -> list[list[int]]:
    """Exactly ``n_bins`` bins of positions into ``lengths``: each item, longest first, goes to
    the least-loaded bin (keeps the longest bin short when the bin count is fixed)."""
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    loads = [0] * n_bins
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = loads.index(min(loads))
        bins[b].append(item)
        loads[b] += lengths[item]
    return bins


def plan_rows(
    groups: Sequence[Sequence[int] | np.ndarray], lengths: Sequence[int], row_tokens: int | None
) -> list[list[Row]]:
    """Rows for each group of questions (one group per member), the same number per group.

    ``row_tokens`` None: one question per row (no packing). Otherwise questions are packed
    first-fit-decreasing into rows of at most ``row_tokens`` tokens (never shorter than the
    longest question); the row count R is the largest any group needs, and each group is then
    spread over exactly R rows, keeping whichever of the two layouts has the shorter longest
    row. Rows are sorted longest first, so consecutive rows have similar lengths.
    """

    def load(row: Row) -> int:
        return sum(lengths[i] for i in row)

    if row_tokens is None:
        layouts = [[[int(i)] for i in group] for group in groups]
    else:
        layouts = []
        for group in groups:
            own = [lengths[i] for i in group]
            bins = first_fit_decreasing(own, max([row_tokens, *own]))
            layouts.append([[int(group[i]) for i in b] for b in bins])
        n_rows = max(len(rows) for rows in layouts)
        for g, group in enumerate(groups):
            own = [lengths[i] for i in group]
            spread = [[int(group[i]) for i in b] for b in balanced(own, n_rows)]
            if max(map(load, spread), default=0) <= max(map(load, layouts[g]), default=0):
                layouts[g] = spread
    n_rows = max(len(rows) for rows in layouts)
    return [sorted(rows, key=load, reverse=True) + [[]] * (n_rows - len(rows)) for rows in layouts]


def rows_batch(
    encoded: EncodedQuestions,
    rows: Sequence[Row],
    pad_id: int,
    packed: bool,
    width_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Token ids of ``rows`` (right-padded to the longest, rounded up to a multiple of
    ``width_multiple``), and where each question ends.

    Questions are listed in row order. ``answer_rows``/``answer_ends`` locate each question's
    last prompt token (``ends`` is one past it, like a length). ``position_ids`` is set when
    ``packed``: positions restart at 0 for every question and for the trailing padding, which
    the decoder turns into a block-diagonal causal mask; otherwise it is absent and rows use
    plain causal attention (trailing padding cannot influence earlier tokens).
    """
    loads = [sum(len(encoded.input_ids[i]) for i in row) for row in rows]
    width = -(-max([1, *loads]) // width_multiple) * width_multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.empty((len(rows), width), dtype=torch.long) if packed else None
    indices, answer_rows, answer_ends = [], [], []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids = encoded.input_ids[i]
            input_ids[r, start : start + len(ids)] = torch.tensor(ids)
            if positions is not None:
                positions[r, start : start + len(ids)] = torch.arange(len(ids))
            start += len(ids)
            indices.append(i)
            answer_rows.append(r)
            answer_ends.append(start)
        if positions is not None:
            positions[r, start:] = torch.arange(width - start)
    batch = {
        "input_ids": input_ids,
        "indices": torch.tensor(indices, dtype=torch.long),
        "answer_rows": torch.tensor(answer_rows, dtype=torch.long),
        "answer_ends": torch.tensor(answer_ends, dtype=torch.long),
        "lengths": torch.tensor([len(encoded.input_ids[i]) for i in indices], dtype=torch.long),
        "labels": torch.tensor([encoded.labels[i] for i in indices], dtype=torch.long),
    }
    if positions is not None:
        batch["position_ids"] = positions
    if encoded.options is not None:
        batch.update(_option_layout(encoded, rows, width))
    return batch


def _option_layout(encoded: EncodedQuestions, rows: Sequence[Row], width: int) -> dict:
    """Positions, attention mask and scored tokens of answer-text rows (see the module doc).

    Every option token is predicted from the position before it: the prompt's last token for an
    option's first token. ``target_*`` list them all (row, predicting column, token id, and slot
    ``q * K_max + k`` of question q in batch order, option k); ``option_tokens`` and
    ``option_chars`` (questions, K_max) are each option's length, 0 for options a question
    lacks.
    """
    options = encoded.options
    assert options is not None
    k_max = max(encoded.n_choices)
    n_rows = len(rows)
    # Per token: its question slot (padding: a unique negative id, so it sees itself only),
    # its part (0 prompt, k + 1 option k) and its position id.
    slot = -1 - torch.arange(n_rows * width).view(n_rows, width)
    part = torch.zeros((n_rows, width), dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    t_rows, t_cols, t_ids, t_slots = [], [], [], []
    n_questions = sum(len(row) for row in rows)
    option_tokens = torch.zeros((n_questions, k_max), dtype=torch.long)
    option_chars = torch.zeros((n_questions, k_max), dtype=torch.long)
    q = 0
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids, lengths = encoded.input_ids[i], options.lengths[i]
            prompt = len(ids) - sum(lengths)
            slot[r, start : start + len(ids)] = q
            positions[r, start : start + prompt] = torch.arange(prompt)
            begin = start + prompt
            for k, n in enumerate(lengths):
                part[r, begin : begin + n] = k + 1
                positions[r, begin : begin + n] = torch.arange(prompt, prompt + n)
                t_rows += [r] * n
                t_cols += [start + prompt - 1, *range(begin, begin + n - 1)]
                t_ids += ids[begin - start : begin - start + n]
                t_slots += [q * k_max + k] * n
                begin += n
            option_tokens[q, : len(lengths)] = torch.tensor(lengths)
            option_chars[q, : len(lengths)] = torch.tensor(options.chars[i])
            start += len(ids)
            q += 1
    same_question = slot[:, :, None] == slot[:, None, :]
    causal = positions[:, None, :] <= positions[:, :, None]
    key_part = part[:, None, :]
    visible = (key_part == 0) | (key_part == part[:, :, None])
    return {
        "position_ids": positions,
        # (rows, 1, query, key), True where attention is allowed: taken as is by the decoder.
        "attention_mask": (same_question & causal & visible)[:, None],
        "target_rows": torch.tensor(t_rows, dtype=torch.long),
        "target_cols": torch.tensor(t_cols, dtype=torch.long),
        "target_ids": torch.tensor(t_ids, dtype=torch.long),
        "target_slots": torch.tensor(t_slots, dtype=torch.long),
        "option_tokens": option_tokens,
        "option_chars": option_chars,
    }
