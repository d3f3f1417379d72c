"""`loraens posterior` end to end: a trained run's members get a posterior whose folder every
scoring command and the report read like a run."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import train_argv

from loraens.cli.main import main
from loraens.experiments.runs import collect_runs
from loraens.posteriors.state import read_posterior_record
from loraens.rundir import RunDir, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWER_TEXT = ["--model.scoring", "answer_text", "--model.normalization", "per_char"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    from helpers import make_questions

    from loraens.data.files import write_questions_jsonl

    folder = tmp_path_factory.mktemp("posterior-run")
    train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
    write_questions_jsonl(make_questions(24, seed=1), train)
    write_questions_jsonl(make_questions(10, seed=2), evaluation)
    out = folder / "run"
    argv = train_argv(tiny_model_dir, train, evaluation, out, *ANSWER_TEXT, members=2, lr=1e-2)
    main([*argv, "--optim.loss", "option_nll", "--data.calibrate", "true",
          "--optim.holdout_fraction", "0.25", "--runtime.precision", "fp32"])  # fmt: skip
    return out, evaluation


@pytest.mark.parametrize(
    "method, extra",
    [
        ("laplace", []),
        ("laplace", ["--posterior.predictive", "sampled", "--posterior.samples", "3"]),
        ("tfb", ["--posterior.samples", "3", "--posterior.search_steps", "3"]),
    ],
)
def test_a_posterior_folder_reads_like_a_run(trained, method, extra, tmp_path, capsys):
    run, evaluation = trained
    out = tmp_path / method
    main(["posterior", str(run), "--posterior.method", method, "--out", str(out), *extra])
    printed = capsys.readouterr().out
    assert "ensemble + TS" in printed and "peak memory" in printed
    record = read_posterior_record(out)
    assert record.members == 2 and (out / record.source).resolve() == run.resolve()
    assert record.fit_seconds > 0 and record.eval_questions == 10
    if method == "laplace":
        assert len(record.prior_precision) == 2 and record.prior_selection == "holdout"
    else:
        assert len(record.sigma) == 2 and record.sigma_search
    folder = RunDir(out)
    assert folder.calibration.is_file() and folder.summary.is_file()
    assert "ensemble + TS" in folder.read_summary().table  # in the summary written last
    fitted = folder.read_calibration()
    main(["calibrate", str(out)])  # refit from the held-out records: the same temperatures
    assert folder.read_calibration() == fitted
    stored = folder.read_eval_log_probs().member_log_probs[-1]
    # Scoring the folder again gives the stored predictive (the same draws, the same Jacobians).
    predictions = tmp_path / "again.jsonl"
    main(["predict", str(out), str(evaluation), "--output", str(predictions)])
    again = read_jsonl(predictions)
    saved = read_jsonl(folder.predictions)
    for first, second in zip(saved, again, strict=True):
        np.testing.assert_allclose(first["member_probs"], second["member_probs"], atol=1e-5)
    assert stored.shape[0] == 2
    # The report finds it as a run of its own method.
    runs = collect_runs([tmp_path])
    assert [r.method for r in runs.train] == [method]


def test_a_posterior_is_only_fitted_on_lora_members(trained, tmp_path, capsys):
    run, _ = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(SystemExit):
        main(["posterior", str(bare)])
    assert "holds no saved members" in capsys.readouterr().err


def test_the_report_sets_a_posterior_beside_its_members_with_their_costs(trained, tmp_path):
    import csv

    from loraens.experiments.report import write_report

    run, _ = trained
    main(["posterior", str(run), "--posterior.method", "laplace", "--posterior.link", "probit"])
    folder = run / "posteriors" / "laplace"  # the default place, inside the run
    record = read_posterior_record(folder)
    write_report([run], tmp_path / "report")
    with (tmp_path / "report" / "cost.csv").open() as handle:
        rows = {r["model"]: r for r in csv.DictReader(handle)}
    laplace = rows["laplace (M=2)"]
    assert float(laplace["fit_seconds"]) == pytest.approx(record.fit_seconds)
    per_question = record.eval_seconds / record.eval_questions
    assert float(laplace["eval_seconds_per_question"]) == pytest.approx(per_question)
    assert float(rows["laplace, one member"]["eval_seconds_per_question"]) == pytest.approx(
        per_question / 2
    )
    trained_run = RunDir(run).read_summary()
    lora = next(r for name, r in rows.items() if name.startswith("none (M="))
    assert float(lora["eval_seconds_per_question"]) == pytest.approx(
        trained_run.eval_seconds / trained_run.eval_questions
    )
    assert float(lora["peak_memory_gb"]) > 0
    # With its temperatures: the summary's "+ TS" figures at the same cost.
    table = RunDir(folder).read_summary().table
    for model, key in (
        ("laplace (M=2) + TS", "ensemble + TS"),
        ("laplace, one member + TS", "single + TS"),
    ):
        assert float(rows[model]["nll"]) == pytest.approx(table[key]["nll"])
        plain = rows[model.removesuffix(" + TS")]
        assert rows[model]["eval_seconds_per_question"] == plain["eval_seconds_per_question"]
    assert (tmp_path / "report" / "fig-cost.png").is_file()
