"""Temperature scaling: recovers a known temperature, and minimises held-out NLL (checked
against a grid search computed here, independently of loraens)."""

import math

import numpy as np
import pytest
from scipy.special import log_softmax

from loraens.decisions.temperature import (
    LOG_T_BOUNDS,
    fit_temperature,
    fit_temperatures,
    scale_log_probs,
)


def _draw(n: int, k: int, t_true: float, seed: int, pad: bool = True):
    """Labels drawn from softmax(z); the model reports softmax(t_true · z), over-confident for
    t_true > 1, so the temperature that undoes it is t_true. Some questions have one option
    fewer (padding)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, k))
    if pad:
        z[: n // 3, -1] = -np.inf
    p = np.exp(log_softmax(z, axis=1))
    labels = np.array([rng.choice(k, p=row) for row in p])
    return log_softmax(z * t_true, axis=1), labels


@pytest.mark.parametrize("t_true", [0.4, 1.0, 2.5])
def test_recovers_the_temperature_the_logits_were_drawn_with(t_true):
    lp, labels = _draw(6000, 4, t_true, seed=1)
    assert fit_temperature(lp, labels) == pytest.approx(t_true, rel=0.06)


def _nll_at(lp, labels, t):
    scaled = log_softmax(np.where(np.isfinite(lp), lp / t, -np.inf), axis=1)
    return -np.mean(scaled[np.arange(len(labels)), labels])


def test_fitted_temperature_minimises_held_out_nll_against_a_grid():
    lp, labels = _draw(500, 5, 0.6, seed=2)
    t = fit_temperature(lp, labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    losses = np.array([_nll_at(lp, labels, g) for g in grid])
    assert _nll_at(lp, labels, t) <= losses.min() + 1e-9
    step = np.log(grid[1] / grid[0])
    assert abs(np.log(t) - np.log(grid[losses.argmin()])) <= step


def test_scaling_keeps_the_argmax_and_padding_and_t1_is_the_identity():
    lp, _ = _draw(200, 4, 1.0, seed=3)
    for t in (0.3, 1.0, 4.0):
        scaled = scale_log_probs(lp, t)
        assert (scaled.argmax(axis=1) == lp.argmax(axis=1)).all()
        assert np.isneginf(scaled[: 200 // 3, -1]).all()
        np.testing.assert_allclose(np.exp(scaled).sum(axis=1), 1.0)
    np.testing.assert_allclose(scale_log_probs(lp, 1.0), lp, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        scale_log_probs(lp, 0.0)


def test_a_model_right_with_ever_more_confidence_goes_to_the_lower_bound():
    lp = log_softmax(np.array([[3.0, 0.0, 0.0]] * 10), axis=1)
    t = fit_temperature(lp, np.zeros(10, dtype=int))
    assert t == pytest.approx(math.exp(LOG_T_BOUNDS[0]))


def test_one_temperature_per_member_and_one_for_the_ensemble():
    # same seed: the same z and labels for both members, reported at two temperatures
    (lp0, labels), (lp1, _) = (_draw(3000, 4, t, seed=7, pad=False) for t in (0.5, 2.0))
    members = [lp0, lp1]
    temps = fit_temperatures(np.stack(members), labels)
    assert temps.members[0] == pytest.approx(0.5, rel=0.08)
    assert temps.members[1] == pytest.approx(2.0, rel=0.08)
    ens = np.log(np.mean(np.exp(np.stack(members)), axis=0))
    assert temps.ensemble == pytest.approx(fit_temperature(ens, labels), rel=1e-6)
    scaled = temps.members_scaled(np.stack(members))
    np.testing.assert_allclose(scaled[1], scale_log_probs(members[1], temps.members[1]))
