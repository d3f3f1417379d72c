"""The two prompt formats and their tokenisation.

Letter scoring (the paper's, App. C): every prompt lists the choices and ends with the cue
``A: (`` so that the next token is the answer letter; the loss and every prediction read the
model's distribution at that one position.

Answer-text scoring (lm-evaluation-harness's ranked classification, its ``multiple_choice``
output type as used for ARC and OpenBookQA): the prompt is ``Question: {question}\nAnswer:``
without the choices, and option k is the continuation ``" " + choices[k]`` (lm-eval's
``target_delimiter``). As lm-eval's ``_encode_pair`` does, the prompt is encoded alone and each
continuation is what the encoding of prompt + continuation adds after the prompt's token count.
A question is encoded as one segment, prompt then every option's tokens, which
:func:`loraens.data.packing.rows_batch` lays out so that each option attends to the prompt and
to itself only: the K options share one pass over the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraens.config import Normalization, Scoring
from loraens.data.records import MAX_CHOICES, Question

LETTERS = "abcdefghij"[:MAX_CHOICES]
ANSWER_CUE = "A: ("
TEXT_ANSWER_CUE = "\nAnswer:"
OPTION_DELIMITER = " "  # lm-eval's target_delimiter, between the cue and an option's text


class TokenizerError(ValueError):
    """The tokenizer cannot represent the answer letters as single continuing tokens."""


class PromptTooLongError(ValueError):
    """A prompt exceeds the maximum length even with its question text removed."""


def format_prompt(question: str, choices: tuple[str, ...] | list[str]) -> str:
    options = "\n".join(f"({LETTERS[k]}) {text}" for k, text in enumerate(choices))
    return f"Q: {question}\nAnswer Choices:\n{options}\n{ANSWER_CUE}"


def format_text_prompt(question: str) -> str:
    """The answer-text prompt: lm-eval's ``Question: {question}\nAnswer:`` (its ARC/OBQA form)."""
    return f"Question: {question}{TEXT_ANSWER_CUE}"


def option_continuation(choice: str) -> str:
    return OPTION_DELIMITER + choice


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


def scoring_label_ids(tokenizer, n_letters: int, scoring: Scoring) -> list[int]:
    """:func:`label_token_ids` for letter scoring; none for answer text, which reads no letter
    (so any tokenizer serves it)."""
    return label_token_ids(tokenizer, n_letters) if scoring == "letter" else []


@dataclass(frozen=True)
class AnswerOptions:
    """Where the options of answer-text questions lie, and how their scores are normalised."""

    lengths: list[list[int]]
    """Tokens of each option; a question's segment is its prompt, then its options in order."""
    chars: list[list[int]]
    """Characters of each option's text (without the delimiter), for per_char normalisation."""
    normalization: Normalization = "none"


@dataclass(frozen=True)
class EncodedQuestions:
    """Token ids of every question's segment plus what the scorer needs to read it.

    Letter scoring: a segment is the prompt and the answer position its last token. Answer-text
    scoring (``options`` set): the prompt followed by every option's tokens.
    """

    input_ids: list[list[int]]
    n_choices: list[int]
    labels: list[int]  # -1 for unlabeled questions
    n_shortened: int
    options: AnswerOptions | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def scoring(self) -> Scoring:
        return "letter" if self.options is None else "answer_text"


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


def encode_with_options(tokenizer, prompt: str, choices: tuple[str, ...] | list[str]):
    """(prompt ids + every option's ids, option lengths): one answer-text segment.

    Each option's ids are those the encoding of prompt + continuation adds beyond the prompt's
    own token count (lm-eval's ``_encode_pair``), so the options share the prompt's ids.
    """
    prompt_ids = encode_text(tokenizer, prompt)
    ids, lengths = list(prompt_ids), []
    for k, choice in enumerate(choices):
        option = encode_text(tokenizer, prompt + option_continuation(choice))[len(prompt_ids) :]
        if not option:
            raise TokenizerError(f"Option {k} ({choice!r}) encodes to no token after the prompt.")
        ids += option
        lengths.append(len(option))
    return ids, lengths


def encode_text_question(tokenizer, q: Question, max_length: int):
    """(segment ids, option lengths, shortened) of an answer-text question: ``max_length``
    bounds the whole segment, prompt and every option, shortening the question's text only
    (keeping its end, as :func:`encode_prompt` does)."""

    def encode(question: str):
        return encode_with_options(tokenizer, format_text_prompt(question), q.choices)

    ids, lengths = encode(q.question)
    if len(ids) <= max_length:
        return ids, lengths, False
    bare, bare_lengths = encode("…")
    if len(bare) > max_length:
        raise PromptTooLongError(
            f"Question {q.id!r}: its answer options and the cue alone take {len(bare)} tokens, "
            f"more than max_length={max_length}. Raise --model.max_length."
        )
    lo, hi, best = 0, len(q.question), (bare, bare_lengths)
    while lo < hi:
        keep = (lo + hi + 1) // 2
        trial = encode("…" + q.question[-keep:])
        if len(trial[0]) <= max_length:
            lo, best = keep, trial
        else:
            hi = keep - 1
    return best[0], best[1], True


def encode_questions(
    tokenizer,
    questions: list[Question],
    max_length: int,
    scoring: Scoring = "letter",
    normalization: Normalization = "none",
) -> EncodedQuestions:
    """Every question's segment in the ``scoring`` format (see the module doc)."""
    if scoring not in ("letter", "answer_text"):
        raise ValueError(
            f"scoring {scoring!r} is not a way to score: give letter or answer_text "
            f"(auto is resolved by `loraens train` alone, which records the mode it chose)."
        )
    if scoring == "letter" and normalization != "none":
        raise ValueError(f"normalization={normalization!r} needs scoring='answer_text'.")
    input_ids, shortened, lengths = [], 0, []
    for q in questions:
        if scoring == "letter":
            ids, was_shortened = encode_prompt(tokenizer, q, max_length)
        else:
            ids, option_lengths, was_shortened = encode_text_question(tokenizer, q, max_length)
            lengths.append(option_lengths)
        input_ids.append(ids)
        shortened += was_shortened
    options = None
    if scoring == "answer_text":
        chars = [[len(c) for c in q.choices] for q in questions]
        options = AnswerOptions(lengths, chars, normalization)
    return EncodedQuestions(
        input_ids=input_ids,
        n_choices=[len(q.choices) for q in questions],
        labels=[-1 if q.answer is None else q.answer for q in questions],
        n_shortened=shortened,
        options=options,
    )
