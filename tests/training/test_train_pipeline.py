"""Behaviour of the whole `train` pipeline that the paper's figures rely on: where the members'
diversity comes from (Fig. 7) and early stopping as an earlier epoch of the same run (Fig. 2/3)."""

import itertools

import pytest
import torch
from helpers import train_argv
from safetensors.torch import load_file

import loraens.training.trainer as trainer_module
from loraens.cli.main import main
from loraens.models.lora import LoRAEnsemble
from loraens.rundir import read_jsonl

MEMBERS = 3
FP32 = ("--runtime.precision", "fp32")


def _members(run_dir):
    return [
        load_file(run_dir / "members" / f"member-{m:02d}" / "adapter_model.safetensors")
        for m in range(MEMBERS)
    ]


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    "flags, same_init, same_order",
    [
        (("--ensemble.vary_data_order", "false"), False, True),  # init only
        (("--ensemble.vary_init", "false"), True, False),  # data order only
    ],
    ids=["init_only", "data_only"],
)
def test_one_source_of_randomness_through_train(
    flags, same_init, same_order, tiny_model_dir, questions_files, tmp_path, monkeypatch
):
    """The members' actual initial A matrices and actual batches, recorded during `train`."""
    initial_a, orders = [], {}
    real_init, real_order = LoRAEnsemble.init_members, trainer_module.epoch_order

    def recording_init(self, seeds):
        real_init(self, seeds)
        initial_a.extend(
            {name: layer.lora_A[m].detach().clone() for name, layer in self.lora_layers.items()}
            for m in range(self.n_members)
        )

    def recording_order(lengths, batch_size, seed, epoch, schedule_seed=None):
        batches = real_order(lengths, batch_size, seed, epoch, schedule_seed)
        orders.setdefault(epoch, []).append([b.tolist() for b in batches])
        return batches

    monkeypatch.setattr(LoRAEnsemble, "init_members", recording_init)
    monkeypatch.setattr(trainer_module, "epoch_order", recording_order)
    out = tmp_path / "run"
    main(train_argv(tiny_model_dir, *questions_files, out, *FP32, *flags, members=MEMBERS))

    assert len(initial_a) == MEMBERS and sorted(orders) == [0, 1]
    for a, b in itertools.combinations(range(MEMBERS), 2):
        assert _same(initial_a[a], initial_a[b]) == same_init
        for epoch in orders:
            assert (orders[epoch][a] == orders[epoch][b]) == same_order
    # either source alone is enough to make the trained members differ
    final = _members(out)
    assert not any(_same(final[a], final[b]) for a, b in itertools.combinations(range(3), 2))


def test_stopping_after_epoch_e_is_the_longer_runs_epoch_e(
    tiny_model_dir, questions_files, tmp_path
):
    """The paper's early stopping (after 1, 2, 3 epochs) is read from the unstopped run's
    metrics; that holds only if a run stopped after epoch e is that run up to epoch e."""
    long, short = tmp_path / "long", tmp_path / "short"
    main(train_argv(tiny_model_dir, *questions_files, long, *FP32, epochs=3))
    main(train_argv(tiny_model_dir, *questions_files, short, *FP32, epochs=2))
    long_rows = [r for r in read_jsonl(long / "metrics.jsonl") if r["epoch"] <= 2]
    short_rows = read_jsonl(short / "metrics.jsonl")
    assert {r["split"] for r in short_rows} >= {"train", "eval"}
    assert short_rows == long_rows
