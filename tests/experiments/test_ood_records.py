"""An experiment's ood_eval keeps per-question records (ood/<set>_log_probs.safetensors) beside
its JSON for every training method, LoRA, MC dropout and last-layer: checked against the
questions drawn independently, the run's own eval log-probs and sklearn's AUROC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from loraens.data.sources import load_run_data, subset
from loraens.data.tasks import load_task
from loraens.evaluation.evaluate import score_questions
from loraens.experiments.runner import cell_dir, run_experiment
from loraens.experiments.spec import load_experiment
from loraens.rundir import OODLogProbs, RunDir
from loraens.rundir.load import load_run
from loraens.rundir.log_probs import read_ood_log_probs, write_ood_log_probs

LIMIT = 4
TASKS = ["arcc", "mmlu-chem"]


def test_ood_record_round_trips_with_its_ids_and_refuses_a_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    lp_in = np.log(rng.dirichlet(np.ones(4), size=(3, 5)))
    lp_out = np.log(rng.dirichlet(np.ones(5), size=(3, 2)))
    lp_out[:, 1, 4] = -np.inf  # a question with 4 of 5 options
    record = OODLogProbs(
        lp_in, np.arange(5) % 4, list("abcde"), lp_out, np.array([-1, 2]), ["x", "y"]
    )
    path = tmp_path / "ood" / "arcc_log_probs.safetensors"
    write_ood_log_probs(path, record)
    back = read_ood_log_probs(path)
    assert back.in_ids == list("abcde") and back.ood_ids == ["x", "y"]
    np.testing.assert_array_equal(back.in_labels, np.arange(5) % 4)
    np.testing.assert_array_equal(back.ood_labels, [-1, 2])
    np.testing.assert_allclose(back.in_log_probs, lp_in.astype(np.float32), rtol=0, atol=0)
    np.testing.assert_array_equal(back.ood_log_probs, lp_out.astype(np.float32))
    with pytest.raises(ValueError, match="same members"):
        write_ood_log_probs(
            path,
            OODLogProbs(
                lp_in,
                record.in_labels,
                record.in_ids,
                lp_out[:2],
                record.ood_labels,
                record.ood_ids,
            ),
        )
    with pytest.raises(ValueError, match="ids"):
        write_ood_log_probs(
            path,
            OODLogProbs(lp_in, record.in_labels, ["a"], lp_out, record.ood_labels, record.ood_ids),
        )


def _spec(model_dir: Path) -> dict:
    return {
        "name": "tiny-shift",
        "base": {
            "model": {"name_or_path": str(model_dir)},
            "ensemble": {"members": 2},
            "optim": {"epochs": 1, "lr": 1e-2, "batch_size": 4},
            "data": {"train_limit": 12, "eval_limit": LIMIT, "calibrate": True},
            "runtime": {"progress": False, "precision": "fp32"},
        },
        "tasks": ["obqa"],
        "seeds": [0, 1],
        "ood_eval": {"tasks": TASKS, "limit": LIMIT},
        "cells": {
            "none": {},
            "mc_dropout": {"ensemble.method": "mc_dropout", "lora.dropout": 0.1, "seeds": [0]},
            "last_layer": {"ensemble.method": "last_layer", "seeds": [0]},
        },
    }


@pytest.fixture(scope="module")
def shift(tiny_model_dir, tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("shift")
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(_spec(tiny_model_dir), sort_keys=False))
    experiment = load_experiment(path)
    outcomes = run_experiment(experiment, experiment.cells, root / "runs")
    assert [o.status for o in outcomes] == ["done"] * len(experiment.cells), outcomes
    return experiment, {o.cell.key: o.folder for o in outcomes}


def _ids(questions) -> list[str]:
    return [q.id for q in questions]


def test_every_cell_keeps_records_of_the_same_questions_for_every_seed_and_method(shift):
    experiment, folders = shift
    assert sorted(folders) == [
        "obqa/last_layer/seed-0", "obqa/mc_dropout/seed-0", "obqa/none/seed-0", "obqa/none/seed-1"
    ]  # fmt: skip
    cfg = RunDir(folders["obqa/none/seed-0"]).read_config()
    in_ids = _ids(subset(load_run_data(cfg.data)[1], LIMIT, cfg.data.subset_seed))
    for key, folder in folders.items():
        run = RunDir(folder)
        members = 2
        for task in TASKS:
            record = run.read_ood_log_probs(task)
            # The subset seed draws the OOD questions: the same for every seed and method.
            assert record.ood_ids == _ids(subset(load_task(task)[1], LIMIT, 0)), (key, task)
            assert record.in_ids == in_ids, key
            assert record.in_log_probs.shape[:2] == (members, LIMIT)
            assert record.ood_log_probs.shape[:2] == (members, LIMIT)
            assert (record.ood_labels >= 0).all() and (record.in_labels >= 0).all()
            result = json.loads(run.ood_result(task).read_text())
            assert result["n_in"] == result["n_ood"] == LIMIT
        # The in-distribution questions were scored once: the same numbers in every file.
        first, second = (run.read_ood_log_probs(t).in_log_probs for t in TASKS)
        np.testing.assert_array_equal(first, second)


def test_lora_records_are_the_members_scores_and_the_json_their_auroc(shift):
    _, folders = shift
    folder = folders["obqa/none/seed-1"]
    loaded = load_run(folder, "cpu", "fp32")
    record = RunDir(folder).read_ood_log_probs("arcc")
    cfg = RunDir(folder).read_config()
    in_questions = subset(load_run_data(cfg.data)[1], LIMIT, 0)
    ood_questions = subset(load_task("arcc")[1], LIMIT, 0)
    lp_in = score_questions(loaded, in_questions)
    lp_out = score_questions(loaded, ood_questions)
    np.testing.assert_allclose(record.in_log_probs, lp_in, atol=1e-5)
    np.testing.assert_allclose(record.ood_log_probs, lp_out, atol=1e-5)
    np.testing.assert_array_equal(record.ood_labels, [q.answer for q in ood_questions])

    def neg_max_p(lp):
        return -np.exp(np.log(np.exp(lp).mean(axis=0)).max(axis=1))

    y = np.r_[np.zeros(LIMIT), np.ones(LIMIT)]
    expected = roc_auc_score(y, np.r_[neg_max_p(lp_in), neg_max_p(lp_out)])
    result = json.loads(RunDir(folder).ood_result("arcc").read_text())
    assert result["auroc"]["ensemble"]["neg_max_prob"] == pytest.approx(expected, abs=1e-9)
    assert {"single + TS", "ensemble + TS"} <= set(result["ood"])  # calibrated: "+ TS" rows


def test_last_layer_cells_are_scored_like_their_own_eval_set(shift):
    _, folders = shift
    run = RunDir(folders["obqa/last_layer/seed-0"])
    record = run.read_ood_log_probs("arcc")
    evals = run.read_eval_log_probs()
    # eval_limit = limit: the in-distribution questions are the run's whole eval set, in order.
    np.testing.assert_allclose(record.in_log_probs, evals.member_log_probs[-1], atol=1e-5)
    np.testing.assert_array_equal(record.in_labels, evals.labels)
    assert np.isfinite(record.ood_log_probs.max(axis=-1)).all()
    result = json.loads(run.ood_result("arcc").read_text())
    assert "ensemble + TS" not in result["auroc"]  # last-layer runs are not calibrated


def test_a_missing_record_is_scored_again_and_nothing_else(shift):
    experiment, folders = shift
    folder = folders["obqa/none/seed-0"]
    run = RunDir(folder)
    run.ood_log_probs("arcc").unlink()
    untouched = run.ood_result("mmlu-chem").stat().st_mtime_ns
    before = run.ood_result("arcc").stat().st_mtime_ns
    summary = run.summary.stat().st_mtime_ns
    cell = next(c for c in experiment.cells if c.key == "obqa/none/seed-0")
    assert cell_dir(folder.parents[3], experiment, cell) == folder
    outcomes = run_experiment(experiment, experiment.cells, folder.parents[3])
    assert [o.status for o in outcomes] == ["done", "skipped", "skipped", "skipped"]
    assert run.ood_log_probs("arcc").is_file()
    assert run.ood_result("arcc").stat().st_mtime_ns != before
    assert run.ood_result("mmlu-chem").stat().st_mtime_ns == untouched
    assert run.summary.stat().st_mtime_ns == summary


def test_the_report_reads_the_records_of_every_method(shift, tmp_path):
    import csv

    from loraens.experiments.report import write_report

    _, folders = shift
    write_report([folders["obqa/none/seed-0"].parents[2]], tmp_path)
    with (tmp_path / "shift.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    models = {r["model"] for r in rows if r["eval_set"] == "arcc"}
    assert {"MC dropout 0.1 (M=2)", "last-layer ens. (M=2)", "LoRA ens. (M=2) + TS"} <= models
    # The ensemble's AUROC from the float32 records is the JSON's, seed by seed.
    (row,) = [
        r
        for r in rows
        if (r["eval_set"], r["model"], r["metric"])
        == ("mmlu-chem", "LoRA ens. (M=2)", "auroc_neg_max_prob")
    ]
    per_seed = [
        json.loads(RunDir(folders[f"obqa/none/seed-{s}"]).ood_result("mmlu-chem").read_text())
        for s in (0, 1)
    ]
    expected = np.mean([r["auroc"]["ensemble"]["neg_max_prob"] for r in per_seed])
    assert row["seeds"] == "0 1" and float(row["value"]) == pytest.approx(expected, abs=1e-9)
    with (tmp_path / "shift_differences.csv").open(newline="") as handle:
        claims = {(r["claim"], r["b"]) for r in csv.DictReader(handle)}
    assert ("LoRA ensemble − method", "last-layer ens. (M=2)") in claims
