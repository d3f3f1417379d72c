"""BLoB: the KL against torch.distributions, Ω = 0 against plain LoRA, the reparameterised
gradient against finite differences, stacked draws against one-by-one passes, and a killed
run's resume against an uninterrupted one."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from helpers import FP32, encoded_tiny_data, make_questions, randomize_b, tiny_llama, train_argv
from test_resume import POSIX_SIGNALS, _spawn_paused, _wait_until_paused
from torch.distributions import Normal, kl_divergence

from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.evaluation.inference import score_draws, score_members, score_variational
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import batch_hidden_states
from loraens.rundir import RunDir, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _blob(members: int = 2, vocab: int | None = None, eps: float = 0.05) -> LoRAEnsemble:
    tokenizer_vocab = vocab or len(encoded_tiny_data()[0])
    ensemble = LoRAEnsemble(tiny_llama(tokenizer_vocab), members)
    ensemble.make_variational(eps)
    ensemble.init_members(list(range(members)))
    randomize_b(ensemble, 0.3)
    return ensemble


def test_the_kl_is_torch_distributions_kl_of_the_same_gaussians():
    ensemble = _blob(eps=0.3)
    got = ensemble.variational_kl(prior_sigma=0.2)
    for member in range(2):
        want = 0.0
        for layer in ensemble.lora_layers.values():
            q = Normal(layer.lora_A[member].double(), layer.lora_G[member].double().square())
            prior = Normal(torch.zeros_like(q.loc), torch.full_like(q.loc, 0.2))
            want += float(kl_divergence(q, prior).sum())
        assert float(got[member]) == pytest.approx(want, rel=1e-9)


def _letter_logits(ensemble, encoded, label_ids, rows) -> torch.Tensor:
    from loraens.data.packing import rows_batch

    inputs = rows_batch(encoded, rows, 0, packed=False)
    hidden = batch_hidden_states(ensemble.model, inputs, torch.device("cpu"))
    # The head by hand, in the hidden states' dtype (label_logits returns float32).
    return hidden @ ensemble.model.get_output_embeddings().weight[label_ids].T


def test_with_zero_scale_a_blob_member_is_the_plain_member_of_its_mean():
    _, _, evaluation, label_ids = encoded_tiny_data()
    blob = _blob()
    plain = LoRAEnsemble(tiny_llama(len(encoded_tiny_data()[0])), 2)
    with torch.no_grad():
        for name, layer in blob.lora_layers.items():
            layer.lora_G.zero_()
            plain.lora_layers[name].lora_A.copy_(layer.lora_A)
            plain.lora_layers[name].lora_B.copy_(layer.lora_B)
    blob.model.train()  # training mode: the noise is drawn, times Ω = 0
    plain.model.train()
    rows = [[0], [1], [2], [0], [1], [2]]  # three questions for each of the two members
    got = _letter_logits(blob, evaluation, label_ids, rows)
    want = _letter_logits(plain, evaluation, label_ids, rows)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_reparameterised_gradient_matches_finite_differences_under_fixed_noise():
    _, train, _, label_ids = encoded_tiny_data()
    ensemble = _blob(members=1, eps=0.2)
    ensemble.double()
    ensemble.model.train()
    layer = next(iter(ensemble.lora_layers.values()))
    labels = torch.tensor(train.labels[:4])

    def loss() -> torch.Tensor:
        torch.manual_seed(7)  # the same E and flipout signs at every evaluation
        logits = _letter_logits(ensemble, train, label_ids, [[0], [1], [2], [3]])
        return torch.nn.functional.cross_entropy(logits[:, :3], labels.clamp(max=2))

    value = loss()
    value.backward()
    for param, index in ((layer.lora_G, (0, 1, 2)), (layer.lora_A, (0, 3, 5))):
        analytic = float(param.grad[index])
        assert analytic != 0.0
        # Central differences at h = 1e-3: parts of the model's forward round to float32, so a
        # smaller step measures rounding rather than slope.
        with torch.no_grad():
            param[index] += 1e-3
            up = float(loss())
            param[index] -= 2e-3
            down = float(loss())
            param[index] += 1e-3
        assert analytic == pytest.approx((up - down) / 2e-3, rel=2e-2)


@pytest.mark.parametrize("scoring", ["letter", "answer_text"])
def test_draws_in_one_stacked_pass_equal_the_draws_one_by_one(scoring):
    tokenizer = encoded_tiny_data()[0]
    normalization = "per_token" if scoring == "answer_text" else "none"
    encoded = encode_questions(tokenizer, make_questions(5, seed=8), 256, scoring, normalization)
    label_ids = torch.tensor(label_token_ids(tokenizer))
    ensemble = _blob(eps=0.3)
    ensemble.model.eval()
    samples = 3
    got = score_variational(ensemble, encoded, label_ids, FP32, samples)
    draws = ensemble.variational_draws(samples, [0, 1])
    singles = []
    for row in range(2 * samples):
        one = {key: tensor[row : row + 1] for key, tensor in draws.items()}
        with ensemble.adapters(one):
            singles.append(score_members(ensemble, encoded, label_ids, FP32, batch_size=1)[0])
    with np.errstate(divide="ignore"):
        want = np.log(np.exp(np.stack(singles)).reshape(2, samples, *got.shape[1:]).mean(1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(score_draws(ensemble, draws, samples, encoded, label_ids, FP32), got)
    # Member 1's draws do not depend on member 0 being there.
    alone = {k: v[samples:] for k, v in draws.items()}
    np.testing.assert_allclose(
        score_draws(ensemble, alone, samples, encoded, label_ids, FP32)[0], got[1], rtol=1e-6
    )


def _blob_args(model_dir, files, out):
    return train_argv(
        model_dir, *files, out, "--ensemble.method", "blob", "--blob.eval_samples", "2",
        "--runtime.precision", "fp32", members=2, epochs=3, batch_size=4, lr=1e-2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def blob_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blob-data")
    write_questions_jsonl(make_questions(40, seed=1), folder / "train.jsonl")
    write_questions_jsonl(make_questions(12, seed=2), folder / "eval.jsonl")
    return folder / "train.jsonl", folder / "eval.jsonl"


@POSIX_SIGNALS
def test_a_killed_blob_run_resumes_bit_identical(tiny_model_dir, blob_files, tmp_path):
    full = tmp_path / "full"
    main(_blob_args(tiny_model_dir, blob_files, full))
    out, marker = tmp_path / "killed", tmp_path / "paused"
    process = _spawn_paused(_blob_args(tiny_model_dir, blob_files, out), marker)
    _wait_until_paused(out, process, marker)
    process.send_signal(signal.SIGKILL)
    process.wait()
    main(["train", "--resume", str(out)])
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(full / "metrics.jsonl")
    for run in (full, out):
        assert (run / "members" / "member-01" / "blob_scale.safetensors").is_file()
    a, b = RunDir(full).read_eval_log_probs(), RunDir(out).read_eval_log_probs()
    assert np.array_equal(a.member_log_probs, b.member_log_probs)
    table = RunDir(full).read_summary().table
    assert {"single (mean), mean weights", "ensemble (M=2), mean weights"} <= set(table)
    # The saved members score like the run: evaluate on the run reproduces its predictions.
    predictions = tmp_path / "again.jsonl"
    main(["predict", str(full), str(blob_files[1]), "--output", str(predictions)])
    pairs = zip(read_jsonl(full / "predictions.jsonl"), read_jsonl(predictions), strict=True)
    for saved, again in pairs:
        np.testing.assert_allclose(saved["member_probs"], again["member_probs"], atol=1e-5)
