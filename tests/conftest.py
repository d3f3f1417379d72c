"""Tiny random models built in code, so tests never need a download or the real weights."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraens.data.records import Question

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder, usable anywhere a model path is accepted."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_questions(n: int, seed: int = 0, n_choices: int | None = None) -> list[Question]:
    """Synthetic questions whose answer is learnable: the correct choice repeats a key word."""
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "gold", "gray", "pink"]
    questions = []
    for i in range(n):
        k = n_choices or rng.randint(3, 5)
        key = rng.choice(words)
        answer = rng.randrange(k)
        choices = [
            key if j == answer else rng.choice([w for w in words if w != key]) for j in range(k)
        ]
        questions.append(Question(f"q{i}", f"Which is {key}?", tuple(choices), answer))
    return questions


@pytest.fixture
def questions_files(tmp_path) -> tuple[Path, Path]:
    from loraens.data.files import write_questions_jsonl

    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_questions_jsonl(make_questions(24, seed=1), train)
    write_questions_jsonl(make_questions(12, seed=2), evaluation)
    return train, evaluation


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
