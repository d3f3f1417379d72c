"""The paper's prompt format (App. C) and its tokenisation.

Every prompt ends with the cue ``A: (`` so that the next token is the answer letter; the loss and
every prediction read the model's distribution at that one position.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraens.data.records import MAX_CHOICES, Question

LETTERS = "abcdefghij"[:MAX_CHOICES]
ANSWER_CUE = "A: ("


class TokenizerError(ValueError):
    """The tokenizer cannot represent the answer letters as single continuing tokens."""


class PromptTooLongError(ValueError):
    """A prompt exceeds the maximum length even with its question text removed."""


def format_prompt(question: str, choices: tuple[str, ...] | list[str]) -> str:
    options = "\n".join(f"({LETTERS[k]}) {text}" for k, text in enumerate(choices))
    return f"Q: {question}\nAnswer Choices:\n{options}\n{ANSWER_CUE}"


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, special tokens included: the one tokenisation every path uses."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def label_token_ids(tokenizer, n_letters: int = MAX_CHOICES) -> list[int]:
    """Token id of each answer letter as it follows the cue; fail clearly if it is not one token.

    The method scores one position, so each letter must be exactly one token appended to the
    prompt's own tokens (the prompt's tokenisation must not change when the letter is added).
    """
    prompt = format_prompt("Which letter?", ["yes", "no"])
    prompt_ids = encode_text(tokenizer, prompt)
    ids = []
    for letter in LETTERS[:n_letters]:
        with_letter = encode_text(tokenizer, prompt + letter)
        if len(with_letter) != len(prompt_ids) + 1 or with_letter[:-1] != prompt_ids:
            raise TokenizerError(
                f"With this tokenizer the answer letter {letter!r} after {ANSWER_CUE!r} is not a "
                f"single token continuing the prompt (prompt ends {prompt_ids[-3:]}, prompt + "
                f"letter ends {with_letter[-3:]}). LoRA ensembles score one answer token; use a "
                f"tokenizer that encodes '(a' as '(' + 'a' (Llama, Mistral, Qwen, SmolLM do)."
            )
        ids.append(with_letter[-1])
    if len(set(ids)) != len(ids):
        raise TokenizerError(f"Answer letters share token ids {ids}: they must be distinct.")
    return ids


@dataclass(frozen=True)
class EncodedQuestions:
    """Token ids of every prompt plus what the scorer needs to read the answer position."""

    input_ids: list[list[int]]
    n_choices: list[int]
    labels: list[int]  # -1 for unlabeled questions
    n_shortened: int

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_prompt(tokenizer, q: Question, max_length: int) -> tuple[list[int], bool]:
    """Token ids of the prompt, shortening the question text (never the choices or the cue).

    Returns the ids and whether the question had to be shortened. The question keeps its end,
    which usually holds the actual question after a long passage.
    """
    ids = encode_text(tokenizer, format_prompt(q.question, q.choices))
    if len(ids) <= max_length:
        return ids, False
    bare = encode_text(tokenizer, format_prompt("…", q.choices))
    if len(bare) > max_length:
        raise PromptTooLongError(
            f"Question {q.id!r}: its answer choices alone take {len(bare)} tokens, more than "
            f"max_length={max_length}. Raise --model.max_length."
        )
    # Binary search on how many characters of the question's end to keep: tokenisation does not
    # compose across a cut, so re-encode the whole prompt each time rather than splicing tokens.
    lo, hi = 0, len(q.question)
    best = bare
    while lo < hi:
        keep = (lo + hi + 1) // 2
        trial = encode_text(tokenizer, format_prompt("…" + q.question[-keep:], q.choices))
        if len(trial) <= max_length:
            lo, best = keep, trial
        else:
            hi = keep - 1
    return best, True


def encode_questions(tokenizer, questions: list[Question], max_length: int) -> EncodedQuestions:
    input_ids, shortened = [], 0
    for q in questions:
        ids, was_shortened = encode_prompt(tokenizer, q, max_length)
        input_ids.append(ids)
        shortened += was_shortened
    return EncodedQuestions(
        input_ids=input_ids,
        n_choices=[len(q.choices) for q in questions],
        labels=[-1 if q.answer is None else q.answer for q in questions],
        n_shortened=shortened,
    )
