"""The decision files of a run directory, without a model."""

import logging

import numpy as np
from scipy.special import log_softmax

from loraens.decisions.stored import HOLDOUT_SOURCE, read_decisions, write_calibration
from loraens.rundir import RunDir


def test_written_calibration_reads_back_and_a_bound_temperature_is_warned_about(tmp_path, caplog):
    rng = np.random.default_rng(0)
    labels = rng.integers(4, size=40)
    # Confidently wrong everywhere: only flattening to uniform helps, T goes to its bound.
    logits = rng.normal(size=(2, 40, 4))
    logits[:, np.arange(40), labels] = -5.0
    with caplog.at_level(logging.WARNING):
        temps = write_calibration(
            RunDir(tmp_path), 3, log_softmax(logits, -1), labels, HOLDOUT_SOURCE
        )
    assert "hit the search bound" in caplog.text
    assert temps.ensemble > 99
    decided = read_decisions(tmp_path)
    assert decided.temperatures == temps and decided.has_holdout
    np.testing.assert_array_equal(decided.holdout_labels, labels)
    np.testing.assert_allclose(decided.holdout_log_probs, log_softmax(logits, -1), atol=1e-6)
