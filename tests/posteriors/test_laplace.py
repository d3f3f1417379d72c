"""K-FAC factors, the Laplace evidence and the linearised predictive against brute force: per
question passes, dense Kronecker products, torch.func Jacobians."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FP32, make_questions, randomize_b, tiny_llama, tiny_tokenizer
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn import functional as F

from loraens.data.packing import rows_batch
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.evaluation.inference import option_logits
from loraens.models.lora import LoRAEnsemble
from loraens.posteriors.kfac import kfac_factors
from loraens.posteriors.laplace import LaplacePosterior, map_norms
from loraens.posteriors.predictive import gaussian_softmax_log_probs, linearised_moments

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(scoring: str, members: int = 2, n: int = 6):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), members)
    ensemble.init_members(list(range(members)))
    randomize_b(ensemble, 0.3)
    normalization = "per_char" if scoring == "answer_text" else "none"
    questions = make_questions(n, seed=3)
    encoded = encode_questions(tokenizer, questions, 256, scoring, normalization)
    return ensemble, encoded, torch.tensor(label_token_ids(tokenizer))


def _dense(factor_vecs: torch.Tensor, factor_vals: torch.Tensor) -> torch.Tensor:
    return (factor_vecs.double() * factor_vals.double()) @ factor_vecs.double().T


def _one_question(ensemble, encoded, label_ids, member: int, question: int):
    """Per-token inputs and output gradients of every weight, for one member and one question
    in a pass of their own: the definition K-FAC's expectations are taken over."""
    seen: dict = {}

    def probe(name, layer, a_in, a_out, b_in, b_out):
        seen[name] = (a_in[0], a_out, b_in[0], b_out)

    inputs = rows_batch(encoded, [[question]], 0, packed=False)
    with ensemble.members(slice(member, member + 1)), ensemble.probed(probe):
        logits = option_logits(ensemble.model, inputs, FP32, label_ids, encoded.options)
    k = encoded.n_choices[question]
    loss = F.cross_entropy(logits[:, :k], torch.tensor([encoded.labels[question]]))
    outputs = [t for name in seen for t in (seen[name][1], seen[name][3])]
    grads = torch.autograd.grad(loss, outputs)
    result = {}
    for i, name in enumerate(seen):
        a_in, _, b_in, _ = seen[name]
        result[f"{name}.lora_A"] = (a_in.detach(), grads[2 * i][0])
        result[f"{name}.lora_B"] = (b_in.detach(), grads[2 * i + 1][0])
    return result


@pytest.mark.parametrize("scoring", ["letter", "answer_text"])
def test_kfac_factors_are_the_expectations_over_tokens_of_each_question(scoring):
    ensemble, encoded, label_ids = _setup(scoring)
    fitted = kfac_factors(ensemble, encoded, label_ids, FP32, labels="true", batch_size=4)
    for member in range(ensemble.n_members):
        act: dict = {}
        grad: dict = {}
        tokens = 0
        for question in range(len(encoded)):
            for key, (a, g) in _one_question(
                ensemble, encoded, label_ids, member, question
            ).items():
                act[key] = act.get(key, 0) + a.double().T @ a.double()
                grad[key] = grad.get(key, 0) + g.double().T @ g.double()
            tokens += len(encoded.input_ids[question])
        for key, eig in fitted.items():
            want_act, want_grad = act[key] / tokens, grad[key]
            got_act = _dense(eig.act_vecs[member], eig.act_vals[member])
            got_grad = _dense(eig.grad_vecs[member], eig.grad_vals[member])
            torch.testing.assert_close(got_act, want_act, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-8)


def test_a_low_rank_factor_keeps_the_top_eigenpairs_of_the_full_one():
    ensemble, encoded, label_ids = _setup("letter")
    full = kfac_factors(ensemble, encoded, label_ids, FP32, labels="true")
    low = kfac_factors(ensemble, encoded, label_ids, FP32, labels="true", keep=3, full_up_to=16)
    for key, eig in full.items():
        # A's input and B's output are wide (64, 32): truncated; the rank-8 sides stay whole.
        side = "act" if key.endswith("lora_A") else "grad"
        vecs_full, vals_full = getattr(eig, f"{side}_vecs")[0], getattr(eig, f"{side}_vals")[0]
        vals, vecs = torch.linalg.eigh(_dense(vecs_full, vals_full))
        kept_vals = getattr(low[key], f"{side}_vals")[0].double()
        torch.testing.assert_close(kept_vals, vals.flip(0)[:3], rtol=1e-4, atol=1e-8)
        # Eigenvectors up to sign: the projectors agree.
        want = vecs.flip(1)[:, :3]
        got = getattr(low[key], f"{side}_vecs")[0].double()
        torch.testing.assert_close(got @ got.T, want @ want.T, rtol=1e-3, atol=1e-4)
        other = "grad" if side == "act" else "act"
        assert getattr(low[key], f"{other}_vals").shape == getattr(eig, f"{other}_vals").shape


def _posterior(ensemble, encoded, label_ids, tau: float) -> LaplacePosterior:
    factors = kfac_factors(ensemble, encoded, label_ids, FP32, labels="true")
    adapters = ensemble.stacked_adapters()
    prior = torch.full((ensemble.n_members,), tau, dtype=torch.float64)
    return LaplacePosterior(factors, map_norms(adapters), prior)


class _Logits(nn.Module):
    """Member 0's option logits on question 0, in a plain single-member pass."""

    def __init__(self, ensemble, encoded, label_ids):
        super().__init__()
        self.ensemble, self.encoded, self.label_ids = ensemble, encoded, label_ids
        self.inputs = rows_batch(encoded, [[0]], 0, packed=False)

    def forward(self):
        with self.ensemble.members(slice(0, 1)):
            logits = option_logits(
                self.ensemble.model,
                self.inputs,
                FP32,
                self.label_ids[: max(self.encoded.n_choices)],
                self.encoded.options,
            )
        return logits[0]


@pytest.mark.parametrize("scoring", ["letter", "answer_text"])
def test_linearised_covariance_is_j_sigma_jt_with_a_dense_sigma(scoring):
    ensemble, encoded, label_ids = _setup(scoring)
    posterior = _posterior(ensemble, encoded, label_ids, tau=3.0)
    _, jac, questions, _ = linearised_moments(
        ensemble, encoded, torch.tensor([0]).numpy(), label_ids, FP32
    )
    got = posterior.logit_covariance(jac)[0, 0, 0]
    module = _Logits(ensemble, encoded, label_ids)
    names = {f"ensemble.model.{layer}.lora_{w}": f"{layer}.lora_{w}"
             for layer in ensemble.lora_layers for w in "AB"}  # fmt: skip
    params = {name: p.detach().clone() for name, p in module.named_parameters() if name in names}
    dense_j = jacrev(lambda ps: functional_call(module, ps, ()))(params)
    want = torch.zeros_like(got)
    for name, key in names.items():
        j = dense_j[name][:, 0].reshape(got.shape[0], -1).double()  # member 0's weight
        eig = posterior.factors[key]
        h = torch.kron(
            _dense(eig.grad_vecs[0], eig.grad_vals[0]), _dense(eig.act_vecs[0], eig.act_vals[0])
        )
        sigma = torch.linalg.inv(h + 3.0 * torch.eye(h.shape[0], dtype=torch.float64))
        want += j @ sigma @ j.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_a_batch_at_several_priors_gives_each_questions_own_covariance_at_each():
    """The batched path (questions and prior precisions at once, as the held-out search runs
    it) against one question at one prior at a time, which the dense test above checks."""
    ensemble, encoded, label_ids = _setup("answer_text")
    posterior = _posterior(ensemble, encoded, label_ids, tau=3.0)
    taus = torch.tensor([[0.01, 0.5], [2.0, 40.0]], dtype=torch.float64)  # (τs, members)
    batch = torch.arange(len(encoded)).numpy()
    _, jac, questions, _ = linearised_moments(ensemble, encoded, batch, label_ids, FP32)
    got = posterior.logit_covariance(jac, taus)
    for row, question in enumerate(questions):
        _, one, _, _ = linearised_moments(ensemble, encoded, [question], label_ids, FP32)
        for s, tau in enumerate(taus):
            want = posterior.logit_covariance(one, tau[None])[0, :, 0]
            torch.testing.assert_close(got[s, :, row], want, rtol=1e-9, atol=1e-12)


def test_an_infinite_prior_precision_gives_the_map_predictive():
    ensemble, encoded, label_ids = _setup("answer_text")
    posterior = _posterior(ensemble, encoded, label_ids, tau=1e12)
    mean, jac, _, n_choices = linearised_moments(
        ensemble, encoded, torch.arange(4).numpy(), label_ids, FP32
    )
    cov = posterior.logit_covariance(jac)
    assert cov.abs().max() < 1e-9
    draws = torch.randn(500, mean.shape[-1], generator=torch.Generator().manual_seed(0))
    for link in ("mc", "probit"):
        got = gaussian_softmax_log_probs(mean[None], cov, n_choices, link, draws)[0]
        k = torch.arange(mean.shape[-1])
        masked = mean.double().masked_fill(k >= torch.as_tensor(n_choices)[:, None], -torch.inf)
        torch.testing.assert_close(got, masked.log_softmax(-1))


def _dense_evidence(posterior, norm2: float, member: int, tau: float) -> float:
    """The Laplace evidence's τ-dependent part from dense curvature blocks and slogdet."""
    total = -tau / 2 * norm2
    for eig in posterior.factors.values():
        h = torch.kron(
            _dense(eig.grad_vecs[member], eig.grad_vals[member]),
            _dense(eig.act_vecs[member], eig.act_vals[member]),
        )
        eye = torch.eye(h.shape[0], dtype=torch.float64)
        total += h.shape[0] / 2 * math.log(tau) - torch.linalg.slogdet(h + tau * eye)[1] / 2
    return float(total)


def test_the_evidence_maximiser_agrees_with_a_grid_search_of_the_dense_objective():
    ensemble, encoded, label_ids = _setup("letter")
    posterior = _posterior(ensemble, encoded, label_ids, tau=1.0)
    chosen = posterior.fit_prior_by_evidence()
    norms = map_norms(ensemble.stacked_adapters())
    grid = torch.logspace(-6, 6, 241, dtype=torch.float64)
    for member in range(ensemble.n_members):
        norm2 = float(norms[member])
        values = torch.tensor([_dense_evidence(posterior, norm2, member, float(t)) for t in grid])
        best = grid[values.argmax()]
        # The grid steps by 10^(1/20): the maximiser lies within one step of the grid best.
        assert abs(torch.log10(chosen[member]) - torch.log10(best)) <= 1 / 20 + 1e-6
        got = _dense_evidence(posterior, norm2, member, float(chosen[member]))
        assert got >= float(values.max()) - 1e-6
