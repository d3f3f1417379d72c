import numpy as np
import pytest

from loraens.data.batching import epoch_order

LENGTHS = np.random.default_rng(0).integers(20, 200, size=203)


@pytest.mark.parametrize("schedule", [None, 5])
def test_each_member_sees_every_question_once_per_epoch(schedule):
    batches = epoch_order(LENGTHS, 16, seed=1, epoch=0, schedule_seed=schedule)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(LENGTHS)))
    assert [len(b) for b in batches].count(16) == len(batches) - 1


@pytest.mark.parametrize("schedule", [None, 5])
def test_orders_differ_between_members_and_epochs_but_replay_exactly(schedule):
    def order(seed, epoch):
        return np.concatenate(epoch_order(LENGTHS, 16, seed, epoch, schedule)).tolist()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(2, 0)
    assert order(1, 0) != order(1, 1)


def test_length_grouping_aligns_members_and_cuts_padding():
    seeds = range(5)

    def padding_efficiency(schedule):
        orders = [epoch_order(LENGTHS, 16, s, 0, schedule) for s in seeds]
        useful = padded = 0
        for step in range(len(orders[0])):
            lengths = np.concatenate([LENGTHS[o[step]] for o in orders])
            useful += lengths.sum()
            padded += len(lengths) * lengths.max()
            # all members hold batches of the same size at every step (stackable)
            assert len({len(o[step]) for o in orders}) == 1
        return useful / padded

    assert padding_efficiency(7) > padding_efficiency(None) + 0.1
    # members still draw different batches from the same length group
    a, b = (epoch_order(LENGTHS, 16, s, 0, 7) for s in (0, 1))
    assert any(set(x) != set(y) for x, y in zip(a, b, strict=True))
