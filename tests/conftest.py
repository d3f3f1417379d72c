"""Fixtures shared by every test; plain helper functions are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_questions, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder, usable anywhere a model path is accepted."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def questions_files(tmp_path) -> tuple[Path, Path]:
    from loraens.data.files import write_questions_jsonl

    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_questions_jsonl(make_questions(24, seed=1), train)
    write_questions_jsonl(make_questions(12, seed=2), evaluation)
    return train, evaluation


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are latency-bound: one thread is faster, and it avoids OpenMP barrier stalls
    (hundreds of ms per op) when another process holds a core of a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
