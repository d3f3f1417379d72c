"""Each question gets the same probabilities whatever else shares its pass, in every training
precision: scoring runs in fp32 (runtime.score_precision) and reads half base weights upcast.

The tiny model has a wide MLP on purpose: half-precision GEMMs over a long reduction (K = 1536,
SmolLM2's down projection) switch kernels with the row count on AVX512-BF16 / AMX CPUs, which is
what moved bf16 answers by up to 0.08 between batch sizes on the real model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    make_questions,
    randomize_b,
    reference_option_log_likelihoods,
    tiny_llama,
    tiny_tokenizer,
)
from scipy.special import log_softmax

from loraens.data.prompts import encode_questions, scoring_label_ids
from loraens.evaluation.inference import score_members
from loraens.models.loading import cast_parameters, matmul_weights
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import Runtime, scoring_runtime

CPU = torch.device("cpu")
HALF = [torch.bfloat16, torch.float16]
WIDE = {"intermediate_size": 1536}


def _ensemble(dtype: torch.dtype):
    tokenizer = tiny_tokenizer()
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer), **WIDE), 2)
    ensemble.init_members([0, 1])
    randomize_b(ensemble, 0.05)
    cast_parameters(matmul_weights(ensemble.model), dtype)  # as a bf16 / fp16 run holds them
    return tokenizer, ensemble


def _scores(ensemble, encoded, labels, dtype, packing, batch_size):
    runtime = scoring_runtime(Runtime(CPU, dtype, packing=packing), "fp32")
    return score_members(ensemble, encoded, labels, runtime, batch_size=batch_size)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("scoring", ["letter", "answer_text"])
def test_scores_do_not_depend_on_batching(one_thread, dtype, scoring):
    tokenizer, ensemble = _ensemble(dtype)
    questions = make_questions(12, seed=3)
    encoded = encode_questions(tokenizer, questions, 256, scoring, "none")
    labels = torch.tensor(scoring_label_ids(tokenizer, 5, scoring))
    first = np.exp(_scores(ensemble, encoded, labels, dtype, False, 1))
    for packing in (True, False):
        for batch_size in (1, 5, 12):
            probs = np.exp(_scores(ensemble, encoded, labels, dtype, packing, batch_size))
            np.testing.assert_allclose(probs, first, rtol=0, atol=1e-4)
    # Training goes on from the same half weights, usable by autograd again.
    for param in matmul_weights(ensemble.model):
        assert param.dtype == dtype and not param.is_inference()


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_scores_equal_the_merged_member_in_fp32_option_by_option(one_thread, dtype):
    """Against a dense reference: member 0 merged into an fp32 copy of the rounded base weights
    (W + (alpha/r) B A), every option scored in its own plain forward."""
    tokenizer, ensemble = _ensemble(dtype)
    questions = make_questions(6, seed=4)
    encoded = encode_questions(tokenizer, questions, 256, "answer_text", "none")
    labels = torch.tensor(scoring_label_ids(tokenizer, 5, "answer_text"))
    ours = _scores(ensemble, encoded, labels, dtype, True, 6)[0]

    dense = tiny_llama(len(tokenizer), **WIDE)
    with torch.no_grad():
        for param in matmul_weights(dense):
            param.copy_(param.to(dtype).float())
        for name, layer in ensemble.lora_layers.items():
            delta = layer.scaling * layer.lora_B[0] @ layer.lora_A[0]
            dense.get_submodule(name).weight += delta
    for i, question in enumerate(questions):
        sums, _ = reference_option_log_likelihoods(dense, tokenizer, question)
        expected = np.exp(log_softmax(np.asarray(sums)))
        k = len(question.choices)
        np.testing.assert_allclose(np.exp(ours[i, :k]), expected, rtol=0, atol=1e-5)
