"""Shared test helpers: tiny random models built in code (so tests never download weights),
synthetic questions, and `loraens train` arguments. Fixtures live in conftest.py."""

from __future__ import annotations

import random
import string

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraens.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from loraens.data.prompts import encode_questions, format_text_prompt, label_token_ids
from loraens.data.records import Question
from loraens.models.lora import LoRAEnsemble
from loraens.models.peft_io import save_member
from loraens.rundir import RunDir
from loraens.runtime import Runtime
from loraens.training.optim import build_optimizer
from loraens.training.trainer import EnsembleTrainer

FP32 = Runtime(device=torch.device("cpu"), autocast_dtype=None)

# Character-level vocabulary: every letter is its own token, so the answer-letter check holds.
_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n…"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_questions(n: int, seed: int = 0, n_choices: int | None = None) -> list[Question]:
    """Synthetic questions whose answer is learnable: the correct choice repeats a key word."""
    rng = random.Random(seed)
    words = ["red", "blue", "green", "gold", "gray", "pink"]
    questions = []
    for i in range(n):
        k = n_choices or rng.randint(3, 5)
        key = rng.choice(words)
        answer = rng.randrange(k)
        distractors = [w for w in words if w != key]
        choices = [key if j == answer else rng.choice(distractors) for j in range(k)]
        # Question files must not repeat a choice. Repeats become unused words without a new
        # draw, so the random stream (and every other question) stays as it was.
        unused = [w for w in distractors if w not in choices]
        for j in range(k):
            if choices[j] in choices[:j]:
                choices[j] = unused.pop(0)
        questions.append(Question(f"q{i}", f"Which is {key}?", tuple(choices), answer))
    return questions


def train_argv(
    model_dir, train, evaluation, out, *extra, members=3, epochs=2, lr=1e-3, batch_size=8
) -> list[str]:
    """`loraens train` arguments for a tiny model on question files; ``extra`` flags win."""
    return [
        "train", "--out", str(out), "--model.name_or_path", str(model_dir),
        "--data.task", "null", "--data.train_file", str(train), "--data.eval_file", str(evaluation),
        "--ensemble.members", str(members), "--optim.epochs", str(epochs), "--optim.lr", str(lr),
        "--optim.batch_size", str(batch_size), "--runtime.progress", "false", *extra,
    ]  # fmt: skip


def write_untrained_run(
    folder, model_dir, train, evaluation, members: int = 2, trust_remote_code: bool = False
) -> RunDir:
    """A run directory as `loraens train` leaves one, without training: its config and
    ``members`` freshly initialised adapters (B = 0) for the model in ``model_dir``."""
    run = RunDir(folder)
    run.root.mkdir(parents=True)
    model = ModelConfig(name_or_path=str(model_dir), trust_remote_code=trust_remote_code)
    data = DataConfig(task=None, train_file=str(train), eval_file=str(evaluation))
    run.write_config(TrainConfig(model=model, data=data))
    ensemble = LoRAEnsemble(tiny_llama(len(tiny_tokenizer())), members)
    ensemble.init_members(list(range(members)))
    for m in range(members):
        save_member(ensemble, m, run.root / "members" / f"member-{m:02d}", str(model_dir))
    return run


def encoded_tiny_data():
    """(tokenizer, 16 encoded train questions, 8 encoded eval questions, label token ids)."""
    tokenizer = tiny_tokenizer()
    train = encode_questions(tokenizer, make_questions(16, seed=5), 256)
    evaluation = encode_questions(tokenizer, make_questions(8, seed=6), 256)
    return tokenizer, train, evaluation, torch.tensor(label_token_ids(tokenizer))


def train_tiny_ensemble(
    data, optim: OptimConfig, epochs: int = 3, dropout: float = 0.0, members: int = 2
) -> LoRAEnsemble:
    """A tiny LoRA ensemble trained on ``encoded_tiny_data()`` in fp32 on the CPU."""
    tokenizer, train, _, label_ids = data
    ensemble = LoRAEnsemble(tiny_llama(len(tokenizer)), members, dropout=dropout)
    ensemble.init_members(list(range(members)))
    trainer = EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, optim),
        train,
        label_ids,
        FP32,
        data_seeds=list(range(10, 10 + members)),
        batch_size=4,
        kl_beta=optim.kl_beta,
    )
    for epoch in range(epochs):
        trainer.train_epoch(epoch)
    return ensemble


def log(p) -> np.ndarray:
    """Elementwise log with log 0 = -inf (the padding convention), without a warning."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, dtype=np.float64))


def randomize_b(ensemble: LoRAEnsemble, scale: float, seed: int = 0) -> None:
    """Non-zero B for every member (normal draws times ``scale``), so members differ from the
    base and from each other, and A gets a gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ensemble.lora_parameters("B"):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def reference_option_log_likelihoods(model, tokenizer, question) -> tuple[list, list]:
    """(summed log-likelihood, token count) of each option, each scored in its own forward."""
    prompt = format_text_prompt(question.question)
    prompt_ids = tokenizer(prompt)["input_ids"]
    sums, counts = [], []
    for choice in question.choices:
        ids = tokenizer(prompt + " " + choice)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        log_probs = F.log_softmax(logits.double(), dim=-1)
        option = range(len(prompt_ids), len(ids))
        sums.append(sum(log_probs[t - 1, ids[t]].item() for t in option))
        counts.append(len(option))
    return sums, counts
