"""The FastAPI application: /v1/predict, /v1/info, /health, and the server's life cycle."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response

from loraens.data.prompts import PromptTooLongError
from loraens.data.records import Question
from loraens.decisions.run import RunDecisions, read_decisions
from loraens.posteriors.load import load_scorer
from loraens.provenance import library_versions
from loraens.rundir.layout import RunDir
from loraens.rundir.load import LoadedEnsemble
from loraens.serving.batcher import Batcher, Closed, QueueFull
from loraens.serving.memory import release_freed_memory
from loraens.serving.predictor import Predictor, mark_correct
from loraens.serving.schemas import Answer, Health, Info, PredictRequest, PredictResponse

log = logging.getLogger(__name__)

_SERVER_PACKAGES = ("fastapi", "uvicorn", "pydantic")


@dataclass(frozen=True)
class ServeSettings:
    """Batching and admission knobs of `loraens serve` (see docs/serving.md)."""

    max_batch: int = 64
    """Most questions gathered into one pass."""
    max_wait_ms: float = 5.0
    """Longest a request waits for others to share its pass."""
    max_queue: int = 1024
    """Most questions pending (queued or being computed); beyond it requests get 503."""
    max_request_questions: int = 64
    """Most questions in one request; beyond it 413."""
    max_question_chars: int = 20_000
    """Most characters in one question (text plus choices); beyond it 413."""
    batch_size: int = 32
    """Questions per forward pass within a gathered batch (as in `loraens predict`)."""
    naive: bool = False
    """No gathering and members one after another: the load test's baseline."""
    retry_after_s: int = 1
    """Retry-After of a 503."""


async def _until_disconnected(request: Request) -> None:
    """Return once the client has gone (its body is already read, so only a disconnect or the
    end of the response can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _info(loaded: LoadedEnsemble, run: RunDir, settings: ServeSettings) -> Info:
    cfg = run.read_config()
    calibration = run.read_calibration()
    provenance = json.loads(run.provenance.read_text()) if run.provenance.is_file() else None
    dtype = loaded.runtime.autocast_dtype
    return Info(
        model=cfg.model.name_or_path,
        run=str(run.root.resolve()),
        method=cfg.ensemble.method,
        members=loaded.ensemble.n_members,
        max_length=loaded.max_length,
        device=str(loaded.runtime.device),
        precision="fp32" if dtype is None else str(dtype).removeprefix("torch."),
        batching=asdict(settings),
        calibration=None if calibration is None else asdict(calibration),
        versions={**library_versions(), **library_versions(_SERVER_PACKAGES)},
        provenance=provenance,
    )


@dataclass(frozen=True)
class _Service:
    """What the routes share: one predictor, its batcher, and the run's fixed facts."""

    predictor: Predictor
    batcher: Batcher
    decisions: RunDecisions
    info: Info
    settings: ServeSettings


def _too_large(detail: str) -> HTTPException:
    return HTTPException(status_code=413, detail=detail)


def _admit(service: _Service, request: PredictRequest) -> list[Question]:
    """The request's questions, or 413 naming the first one that is too large to score."""
    settings = service.settings
    if len(request.questions) > settings.max_request_questions:
        raise _too_large(
            f"questions: {len(request.questions)} questions in one request, more than "
            f"{settings.max_request_questions}; split the request."
        )
    questions = []
    for i, q in enumerate(request.questions):
        size = len(q.question) + sum(len(c) for c in q.choices)
        if size > settings.max_question_chars:
            raise _too_large(
                f"questions.{i}: {size} characters, more than {settings.max_question_chars}."
            )
        qid = str(i) if q.id is None else str(q.id)
        question = Question(qid, q.question, tuple(q.choices), q.answer)
        # A long question text is shortened as in predict; choices that alone exceed the
        # run's max_length cannot be scored at all.
        try:
            service.predictor.check_length(question)
        except PromptTooLongError as err:
            raise _too_large(f"questions.{i}.choices: {err}") from err
        questions.append(question)
    return questions


def _check_decisions_possible(service: _Service, request: PredictRequest) -> None:
    for field in ("max_risk", "coverage"):
        if getattr(request, field) is not None and not service.decisions.has_holdout:
            raise HTTPException(
                status_code=422,
                detail=f"{field}: chosen on the run's held-out questions, which this run "
                f"lacks; run `loraens calibrate RUN --file LABELLED.jsonl` first.",
            )


async def _scored(
    service: _Service, questions: list[Question], http_request: Request
) -> list[dict[str, Any]] | None:
    """The questions' answer rows from the batcher, or None once the client has gone."""
    try:
        future = service.batcher.submit(questions)
    except (QueueFull, Closed) as err:
        raise HTTPException(
            status_code=503,
            detail=f"{err}; retry later.",
            headers={"Retry-After": str(service.settings.retry_after_s)},
        ) from err
    answered = asyncio.ensure_future(asyncio.wrap_future(future))
    gone = asyncio.ensure_future(_until_disconnected(http_request))
    await asyncio.wait({answered, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not answered.done():
        # The client gave up (e.g. its timeout): drop the request if its pass has not
        # started, so that abandoned work cannot pile up behind an overloaded server.
        answered.cancel()
        return None
    rows: list[dict[str, Any]] = answered.result()
    return rows


def _add_predict_route(app: FastAPI, service: _Service) -> None:
    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={
            413: {"description": "Too many questions, or a question too long."},
            503: {"description": "The queue is full or the server is stopping; see Retry-After."},
        },
    )
    async def predict(request: PredictRequest, http_request: Request) -> PredictResponse | Response:
        """Answer one or more questions: the predicted option, the ensemble's and every
        member's probabilities, disagreement, entropy and mutual information."""
        questions = _admit(service, request)
        _check_decisions_possible(service, request)
        rows = await _scored(service, questions, http_request)
        if rows is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        service.predictor.decide(
            rows, questions, max_risk=request.max_risk, coverage=request.coverage,
            score=request.score,
        )  # fmt: skip
        mark_correct(rows, questions)
        return PredictResponse(model=service.info.model, answers=[Answer(**row) for row in rows])


def _add_status_routes(app: FastAPI, service: _Service) -> None:
    @app.get("/health")
    async def health() -> Health:
        batcher = service.batcher
        return Health(status="ok", pending_questions=batcher.pending, passes=batcher.passes)

    @app.get("/v1/info")
    async def get_info() -> Info:
        """The model, its members, batching settings, library versions and the run's
        provenance."""
        return service.info


def _lifespan(batcher: Batcher) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        # uvicorn calls this once in-flight requests are answered; finish anything still queued.
        await asyncio.to_thread(batcher.close)
        log.info("batcher drained after %d passes", batcher.passes)

    return lifespan


def create_app(loaded: LoadedEnsemble, run_dir: str | Path, settings: ServeSettings) -> FastAPI:
    """An app answering with ``loaded``; its batcher starts and drains with the app's life."""
    run = RunDir(Path(run_dir))
    info = _info(loaded, run, settings)
    decisions: RunDecisions = read_decisions(run.root)
    predictor = Predictor(
        loaded,
        decisions,
        batch_size=settings.batch_size,
        members_per_pass=1 if settings.naive else None,
    )
    batcher = Batcher(
        predictor,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        max_pending=settings.max_queue,
        gather=not settings.naive,
        after_pass=release_freed_memory,
    )
    service = _Service(predictor, batcher, decisions, info, settings)
    app = FastAPI(
        title="loraens",
        summary="A LoRA ensemble's answers to multiple-choice questions, with its uncertainty.",
        version=info.versions.get("loraens") or "unknown",
        lifespan=_lifespan(batcher),
    )
    _add_predict_route(app, service)
    _add_status_routes(app, service)
    return app


def run_server(
    run_dir: str,
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    precision: str = "fp32",
    access_log: bool = False,
    trust_remote_code: bool = False,
) -> None:
    """Load the run, then serve it until SIGTERM or Ctrl-C (in-flight requests finish first).
    ``trust_remote_code``: as :func:`~loraens.rundir.load.load_run`'s."""
    import uvicorn

    loaded = load_scorer(run_dir, device, precision, trust_remote_code=trust_remote_code)
    app = create_app(loaded, run_dir, settings)
    mode = "naive (no batching, members one by one)" if settings.naive else "batched"
    log.info(
        "serving %s: %d members on %s, %s", run_dir, loaded.ensemble.n_members,
        loaded.runtime.device, mode,
    )  # fmt: skip
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")
