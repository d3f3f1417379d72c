"""MC dropout (ensemble.method=mc_dropout): one adapter, M stochastic passes at test time."""

import typing

import numpy as np
import pytest
from helpers import FP32, encoded_tiny_data, train_tiny_ensemble

from loraens.config import (
    ENSEMBLE_METHODS,
    EnsembleConfig,
    EnsembleMethod,
    OptimConfig,
    TrainConfig,
)
from loraens.evaluation.inference import score_members


@pytest.fixture(scope="module")
def data():
    return encoded_tiny_data()


def test_every_method_is_listed_once_with_its_meaning():
    assert list(typing.get_args(EnsembleMethod)) == list(ENSEMBLE_METHODS)
    assert all(len(meaning) > 20 for meaning in ENSEMBLE_METHODS.values())


@pytest.mark.parametrize(
    "method, trained, passes",
    [("lora", 5, 1), ("last_layer", 5, 1), ("mc_dropout", 1, 5)],
)
def test_mc_dropout_trains_one_adapter_and_scores_m_passes(method, trained, passes):
    ensemble = EnsembleConfig(members=5, method=method)
    assert (ensemble.trained_adapters, ensemble.passes_per_adapter) == (trained, passes)


def test_mc_dropout_passes_differ_with_dropout_and_agree_without(data):
    _, _, evaluation, label_ids = data
    with_dropout = train_tiny_ensemble(data, OptimConfig(lr=1e-2), epochs=1, dropout=0.3, members=1)
    passes = score_members(with_dropout, evaluation, label_ids, FP32, mc_dropout_passes=4)
    assert passes.shape[0] == 4
    assert not np.allclose(passes[0], passes[1])
    deterministic = score_members(with_dropout, evaluation, label_ids, FP32)
    assert deterministic.shape[0] == 1

    without = train_tiny_ensemble(data, OptimConfig(lr=1e-2), epochs=1, dropout=0.0, members=1)
    passes = score_members(without, evaluation, label_ids, FP32, mc_dropout_passes=3)
    np.testing.assert_allclose(passes[0], passes[2])


def test_mc_dropout_config_requires_dropout():
    with pytest.raises(ValueError, match="lora.dropout"):
        TrainConfig(ensemble=type(TrainConfig().ensemble)(method="mc_dropout"))
