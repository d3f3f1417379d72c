"""How score_members groups questions into passes."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from loraens.evaluation.inference import token_bounded_batches


@given(
    lengths=st.lists(st.integers(1, 300), min_size=0, max_size=40),
    batch_size=st.integers(1, 12),
    max_tokens=st.integers(1, 900),
    seed=st.integers(0, 2**16),
)
def test_batches_cover_the_order_within_both_bounds_and_close_only_when_needed(
    lengths, batch_size, max_tokens, seed
):
    order = np.random.default_rng(seed).permutation(len(lengths))
    batches = token_bounded_batches(order, lengths, batch_size, max_tokens)
    joined = np.concatenate(batches) if batches else np.array([], dtype=int)
    assert joined.tolist() == order.tolist()
    for i, batch in enumerate(batches):
        tokens = sum(lengths[q] for q in batch)
        assert 1 <= len(batch) <= batch_size
        assert len(batch) == 1 or tokens <= max_tokens
        if i + 1 < len(batches):  # greedy: the next question did not fit
            following = lengths[batches[i + 1][0]]
            assert len(batch) == batch_size or tokens + following > max_tokens
