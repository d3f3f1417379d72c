"""The stored KL reference: the base model's own next-token distribution, kept in float16."""

import torch
import torch.nn.functional as F
from helpers import FP32, encoded_tiny_data, tiny_llama

from loraens.models.lora import LoRAEnsemble
from loraens.training.kl import base_log_probs


def test_base_log_probs_are_the_plain_models_answer_distribution_in_float16():
    tokenizer, train, _, _ = encoded_tiny_data()
    vocab = len(tokenizer)
    ensemble = LoRAEnsemble(tiny_llama(vocab), n_members=2)
    ensemble.init_members([0, 1])
    with torch.no_grad():  # nonzero adapters: the reference must switch them off
        for param in ensemble.lora_parameters("B"):
            param.normal_(0.0, 0.5)
    stored = base_log_probs(ensemble, train, FP32, batch_size=5)  # chunks of 5, 5, 5, 1
    assert stored.dtype == torch.float16  # half the memory of float32, see kl.py
    assert stored.shape == (len(train), vocab)

    plain = tiny_llama(vocab)  # same seed: the same base weights, no adapters at all
    with torch.no_grad():
        expected = torch.stack(
            [
                F.log_softmax(plain(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
                for ids in train.input_ids
            ]
        )
    # float16 spacing is 2^-8 for |log p| in [4, 8): rounding moves a value by at most 2e-3.
    torch.testing.assert_close(stored.float(), expected, atol=4e-3, rtol=0)
