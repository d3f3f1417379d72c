"""The server's answer function in-process: the naive path (members one by one, one request at
a time) and the stacked path agree, so the load test compares equal answers."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_questions

from loraens.rundir.load import load_run
from loraens.serving.predictor import Predictor


def test_members_one_by_one_answer_like_the_stacked_pass(served_run, one_thread):
    loaded = load_run(served_run, "cpu", "fp32")
    questions = make_questions(6, seed=4)
    stacked = Predictor(loaded, batch_size=4)(questions)
    naive = [Predictor(loaded, members_per_pass=1)([q])[0] for q in questions]
    for ours, theirs in zip(stacked, naive, strict=True):
        assert ours["prediction"] == theirs["prediction"] and ours["id"] == theirs["id"]
        assert np.asarray(ours["member_probs"]) == pytest.approx(
            np.asarray(theirs["member_probs"]), abs=2e-6
        )
        assert "calibrated_probs" not in ours  # filled only by a calibrated run's decide()
