import pytest
from helpers import tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from loraens.data.prompts import (
    PromptTooLongError,
    TokenizerError,
    encode_prompt,
    encode_questions,
    format_prompt,
    label_token_ids,
)
from loraens.data.records import Question


def test_prompt_follows_the_papers_format():
    assert format_prompt("Why?", ("yes", "no", "maybe")) == (
        "Q: Why?\nAnswer Choices:\n(a) yes\n(b) no\n(c) maybe\nA: ("
    )


def test_label_tokens_are_single_continuing_tokens():
    tokenizer = tiny_tokenizer()
    ids = label_token_ids(tokenizer, 5)
    assert ids == tokenizer.convert_tokens_to_ids(list("abcde"))


def test_tokenizer_that_merges_the_letter_is_rejected():
    # A word-level tokenizer turns "(a" into one unknown token: the letter does not continue
    # the prompt as its own token, so the method cannot score it.
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "Q:": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(TokenizerError, match="single token"):
        label_token_ids(tokenizer)


def test_long_question_is_shortened_keeping_choices_and_cue():
    tokenizer = tiny_tokenizer()
    question = Question("long", "x" * 300 + " the real question?", ("alpha", "beta"), 1)
    ids, shortened = encode_prompt(tokenizer, question, max_length=120)
    text = "".join(tokenizer.convert_ids_to_tokens(ids))  # character-level tokenizer
    assert shortened and len(ids) <= 120
    assert text.endswith("(a) alpha\n(b) beta\nA: (")
    assert "the real question?" in text  # the end of the question survives
    encoded = encode_questions(tokenizer, [question, Question("s", "short", ("a", "b"), 0)], 120)
    assert encoded.n_shortened == 1


def test_choices_longer_than_the_limit_are_an_error_naming_the_question():
    tokenizer = tiny_tokenizer()
    question = Question("q7", "short", ("y" * 200, "z"), 0)
    with pytest.raises(PromptTooLongError, match="q7"):
        encode_prompt(tokenizer, question, max_length=100)
