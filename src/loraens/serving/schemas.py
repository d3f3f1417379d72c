"""Request and response models of the HTTP API; FastAPI derives the OpenAPI schema from them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# The file reader's own rule for an answer, so that a line of a questions file is a valid
# question here too and both reject the same answers with the same words.
from loraens.data.files import parse_answer
from loraens.data.records import MAX_CHOICES, MIN_CHOICES


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("empty; expected a non-empty string")
    return text


# The same rules as a questions file (loraens.data.files), so predict and serve accept the same.
Text = Annotated[str, AfterValidator(_not_blank)]


class QuestionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | int | None = Field(
        None, description="Echoed back; defaults to the question's position in the request."
    )
    question: Text = Field(description="The question text.")
    choices: list[Text] = Field(
        min_length=MIN_CHOICES,
        max_length=MAX_CHOICES,
        description=f"{MIN_CHOICES} to {MAX_CHOICES} answer options, labelled a, b, c, ...",
    )
    answer: int | None = Field(
        None,
        description="Optional: the correct option, as in a questions file (an index from 0, or "
        "a letter a, b, ... in either case). The probabilities do not depend on it; the "
        "question's answer then reports whether its prediction is correct.",
    )

    @field_validator("answer", mode="before", json_schema_input_type=int | str | None)
    @classmethod
    def _answer_index(cls, answer: Any, info: ValidationInfo) -> int | None:
        # Raw, before pydantic's coercion: the file reader decides what an answer may be (no
        # booleans, no "1"). Invalid choices are missing from info.data and are reported on
        # their own; the answer is then checked for its form only, as in a file.
        record = {"answer": answer, "choices": info.data.get("choices")}
        index, problems = parse_answer(record, require_answer=False)
        if problems:
            # The error's loc already names the field.
            raise ValueError("; ".join(p.removeprefix("field 'answer': ") for p in problems))
        return index


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "questions": [
                        {
                            "id": "q1",
                            "question": "Which is red?",
                            "choices": ["the sky", "a ripe tomato", "grass"],
                        }
                    ]
                }
            ]
        },
    )

    questions: list[QuestionIn] = Field(min_length=1, description="One or more questions.")
    max_risk: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Mark each answer abstain: true/false, answering where the (calibrated) "
        "ensemble's top probability reaches the threshold whose error rate on the run's "
        "held-out questions is at most this. Needs a calibrated run.",
    )
    coverage: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Add prediction_set to every answer: split conformal answer sets that hold "
        "the right answer with at least this probability. Needs a calibrated run.",
    )
    score: Literal["lac", "aps"] = Field(
        "lac", description="Conformal score: lac (smallest sets) or aps (adaptive, never empty)."
    )


class PredictionSet(BaseModel):
    letters: list[str]
    texts: list[str]


class Answer(BaseModel):
    id: str
    prediction: int = Field(description="Index of the predicted option (0-based).")
    letter: str = Field(description="Letter of the predicted option (a, b, ...).")
    text: str = Field(description="Text of the predicted option.")
    probability: float = Field(description="The ensemble's probability of the predicted option.")
    disagreement: float = Field(
        description="Share of members whose top option differs from the ensemble's (0: unanimous)."
    )
    entropy: float = Field(description="Entropy of the ensemble's probabilities (nats).")
    mutual_information: float = Field(
        description="Epistemic uncertainty: entropy of the mean minus mean member entropy (nats)."
    )
    ensemble_probs: list[float] = Field(description="Mean of the members' probabilities.")
    member_probs: list[list[float]] = Field(description="Every member's probabilities.")
    # Filled only by a calibrated run (temperature scaling; abstention and conformal sets on
    # request); null otherwise, so clients can feature-test them.
    calibrated_probs: list[float] | None = Field(
        None, description="The ensemble's temperature-scaled probabilities (calibrated runs)."
    )
    abstain: bool | None = Field(None, description="With max_risk: whether to abstain.")
    prediction_set: PredictionSet | None = Field(
        None, description="With coverage: the conformal answer set."
    )
    # Filled only for a question sent with its answer; null otherwise, as above.
    answer: int | None = Field(None, description="Index of the correct option sent.")
    answer_letter: str | None = Field(None, description="Letter of the correct option.")
    correct: bool | None = Field(
        None, description="Whether the predicted option is the correct one."
    )


class PredictResponse(BaseModel):
    model: str
    answers: list[Answer]


class Health(BaseModel):
    status: str
    pending_questions: int = Field(description="Questions queued or being computed.")
    passes: int = Field(description="Batches computed since the server started.")


class Info(BaseModel):
    model: str
    run: str
    method: str
    members: int
    max_length: int
    device: str
    precision: str
    batching: dict[str, Any]
    calibration: dict[str, Any] | None = None
    versions: dict[str, str | None]
    provenance: dict[str, Any] | None = Field(
        None, description="The run's provenance.json (model and data hashes), when it has one."
    )
