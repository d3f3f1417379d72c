"""Weight draws: stacked as M·S members they score as the same adapters one by one; Laplace's
draws have the posterior's covariance; TFB's σ = 0 is the trained member and its σ search
stops at the tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FP32, make_questions, randomize_b, tiny_llama, tiny_tokenizer

from loraens.data.prompts import encode_questions, label_token_ids
from loraens.evaluation.inference import mean_over_draws, score_draws, score_members
from loraens.models.lora import LoRAEnsemble
from loraens.posteriors.kfac import kfac_factors
from loraens.posteriors.laplace import LaplacePosterior, map_norms
from loraens.posteriors.tfb import rotate, search_sigma, tfb_draws

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(scoring: str = "answer_text", members: int = 2):
    tokenizer = tiny_tokenizer()
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), members)
    ensemble.init_members(list(range(members)))
    randomize_b(ensemble, 0.3)
    normalization = "per_char" if scoring == "answer_text" else "none"
    encoded = encode_questions(tokenizer, make_questions(5, seed=4), 256, scoring, normalization)
    return ensemble, encoded, torch.tensor(label_token_ids(tokenizer))


@pytest.mark.parametrize("scoring", ["letter", "answer_text"])
def test_draws_of_every_member_in_one_pass_equal_each_draw_scored_alone(scoring):
    ensemble, encoded, label_ids = _setup(scoring)
    samples = 3
    factors = kfac_factors(ensemble, encoded, label_ids, FP32, labels="true")
    posterior = LaplacePosterior(
        factors, map_norms(ensemble.stacked_adapters()), torch.tensor([2.0, 5.0])
    )
    draws = posterior.weight_draws(
        ensemble.stacked_adapters(), samples, torch.Generator().manual_seed(0)
    )
    stacked = score_draws(ensemble, draws, samples, encoded, label_ids, FP32)
    one_by_one = []
    for row in range(ensemble.n_members * samples):
        single = {key: tensor[row : row + 1] for key, tensor in draws.items()}
        with ensemble.adapters(single):
            one_by_one.append(score_members(ensemble, encoded, label_ids, FP32, batch_size=1)[0])
    # Averaged by hand: log of the mean probability of each member's own draws.
    with np.errstate(divide="ignore"):  # absent options: log 0
        mean = np.exp(np.stack(one_by_one)).reshape(2, samples, *stacked.shape[1:]).mean(1)
        by_hand = np.log(mean)
    np.testing.assert_allclose(stacked, by_hand, rtol=1e-5, atol=1e-6)
    # The saved members are back in place afterwards.
    assert ensemble.n_members == 2
    assert ensemble.lora_parameters("A")[0].shape[0] == 2


def test_laplace_draws_have_the_posterior_covariance():
    ensemble, encoded, label_ids = _setup("letter")
    factors = kfac_factors(ensemble, encoded, label_ids, FP32, labels="true")
    key = next(k for k in factors if k.endswith("lora_B") and "v_proj" in k)
    factors = {key: factors[key]}  # one weight: a dense covariance is small enough
    adapters = {key: ensemble.stacked_adapters()[key]}
    posterior = LaplacePosterior(factors, map_norms(adapters), torch.tensor([0.5, 0.5]))
    draws = posterior.weight_draws(adapters, 20000, torch.Generator().manual_seed(1))[key]
    member = draws[:20000].double().flatten(1)  # member 0's draws, (S, out·r)
    eig = factors[key]
    act = (eig.act_vecs[0] * eig.act_vals[0]) @ eig.act_vecs[0].T
    grad = (eig.grad_vecs[0] * eig.grad_vals[0]) @ eig.grad_vecs[0].T
    precision = torch.kron(grad.double(), act.double()) + 0.5 * torch.eye(member.shape[1])
    want = torch.linalg.inv(precision)
    got = torch.cov(member.T)
    torch.testing.assert_close(
        member.mean(0), adapters[key][0].double().flatten(), atol=0.05, rtol=0
    )
    assert (got - want).abs().max() < 0.06 * want.diagonal().max()


def test_tfb_with_sigma_zero_is_the_trained_member_and_keeps_the_update():
    ensemble, encoded, label_ids = _setup()
    adapters = ensemble.stacked_adapters()
    rotated = rotate(adapters)
    for layer in ensemble.lora_layers:
        before = adapters[f"{layer}.lora_B"] @ adapters[f"{layer}.lora_A"]
        after = rotated.adapters[f"{layer}.lora_B"] @ rotated.adapters[f"{layer}.lora_A"]
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-6)
    draws = tfb_draws(rotated, torch.zeros(2), 2, seed=0)
    sampled = score_draws(ensemble, draws, 2, encoded, label_ids, FP32)
    plain = score_members(ensemble, encoded, label_ids, FP32)
    np.testing.assert_allclose(sampled, plain, rtol=1e-5, atol=1e-5)


def test_tfb_noise_lies_in_the_column_space_of_b_with_scale_sigma():
    ensemble, _, _ = _setup()
    rotated = rotate(ensemble.stacked_adapters())
    layer = next(iter(ensemble.lora_layers))
    draws = tfb_draws(rotated, torch.tensor([0.3, 0.3]), 4000, seed=2)
    b, a = rotated.adapters[f"{layer}.lora_B"], rotated.adapters[f"{layer}.lora_A"]
    noise = draws[f"{layer}.lora_B"][:4000] @ (draws[f"{layer}.lora_A"][:4000] - a[0])
    u = torch.linalg.svd(b[0], full_matrices=False)[0]  # (out, r)
    inside = u.T @ noise  # coordinates in B's column space: iid N(0, σ²)
    torch.testing.assert_close(inside.std(), torch.tensor(0.3), atol=0.01, rtol=0)
    outside = noise - u @ inside
    assert outside.abs().max() < 1e-4


def test_the_sigma_search_stops_within_the_tolerance_and_the_next_step_exceeds_it():
    thresholds = torch.tensor([0.013, 0.4])  # where each member's criterion crosses 0.003

    def change_at(sigma: torch.Tensor) -> torch.Tensor:
        return 0.003 * (sigma / thresholds) ** 2  # increasing, crosses at the threshold

    found = search_sigma(change_at, 2, tolerance=0.003, high=0.2, steps=12)
    assert (change_at(found.sigma) <= 0.003).all()
    assert (change_at(found.above) > 0.003).all()
    # The brackets start as [0, 0.2] and, after doublings, [0.4, 0.8]: halved 12 times.
    assert ((found.above - found.sigma) <= 0.4 / 2**12 + 1e-12).all()
    assert len(found.steps) >= 13


def test_mean_over_draws_keeps_absent_options_at_minus_infinity():
    lp = np.log(np.array([[[0.5, 0.5, 0.0]], [[0.9, 0.1, 0.0]]]))
    with np.errstate(divide="ignore"):
        got = mean_over_draws(lp, 2)
    np.testing.assert_allclose(np.exp(got[0, 0, :2]), [0.7, 0.3])
    assert got[0, 0, 2] == -np.inf
