"""Experiment files and the runner: grid expansion, selection, skipping, resuming, failures."""

import itertools
import json
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

import loraens.training.run as run_module
from loraens.cli.main import main
from loraens.data.batching import BATCHES_PER_LENGTH_GROUP
from loraens.experiments.runner import cell_dir, cell_status, run_experiment
from loraens.experiments.spec import ExperimentError, load_experiment, select
from loraens.rundir import read_jsonl


def _write(tmp_path: Path, spec: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _tiny_spec(model_dir: Path, **cells) -> dict:
    return {
        "name": "tiny",
        "base": {
            "model": {"name_or_path": str(model_dir)},
            "ensemble": {"members": 2},
            "optim": {"epochs": 2, "lr": 1e-2, "batch_size": 4},
            "data": {"train_limit": 8, "eval_limit": 4},
            "runtime": {"progress": False, "precision": "fp32"},
        },
        "tasks": ["obqa"],
        "cells": cells or {"none": {}, "few_shot": {"kind": "few_shot", "k": 1, "draws": 2}},
    }


def test_lists_expand_into_named_cells_with_their_own_tasks_and_seeds(tmp_path):
    spec = {
        "name": "grid",
        "tasks": ["cqa", "obqa"],
        "seeds": [0, 1],
        "ood": "paper",
        "cells": {
            "none": {},
            "b": {"optim.weight_decay": [100.0, 500.0], "optim.decay_target": "B"},
            "rand": {"ensemble.vary_init": False, "tasks": ["cqa"], "seeds": [3]},
            "fs": {"kind": "few_shot", "k": 3, "draws": 2},
        },
    }
    cells = load_experiment(_write(tmp_path, spec)).cells
    keys = [c.key for c in cells]
    assert len(keys) == 4 + 8 + 1 + 4
    assert "obqa/b-weight_decay=500/seed-1" in keys
    assert [c.key for c in cells if c.name == "rand"] == ["cqa/rand/seed-3"]
    b = next(c for c in cells if c.key == "cqa/b-weight_decay=100/seed-0")
    assert (b.config.optim.weight_decay, b.config.optim.decay_target) == (100.0, "B")
    assert b.config.data.task == "cqa" and b.config.data.ood_task == "mmlu"
    obqa = next(c for c in cells if c.key == "obqa/none/seed-1")
    assert obqa.config.data.ood_task is None and obqa.config.ensemble.seed == 1
    few = next(c for c in cells if c.kind == "few_shot")
    assert few.few_shot == {"k": 3, "draws": 2}


@pytest.mark.parametrize(
    "cells, message",
    [
        ({"x": {"optim.lrr": 1.0}}, "cell 'x': Unknown keys in config section 'optim'"),
        ({"x": {"optim.lr": -1.0}}, "cell 'x': optim.lr must be > 0"),
        ({"x": {"lr": 1.0}}, "cell 'x': 'lr' is not a 'section.field' key"),
        ({"x": {"tasks": ["nope"]}}, "cell 'x': tasks: unknown task(s) ['nope']"),
        ({"x": {"kind": "few_shot", "optim.lr": 1.0}}, "few_shot cells take"),
        ({"x": {"kind": "zero_shot"}}, "kind must be 'train', 'few_shot' or 'posterior'"),
        ({"x": {"kind": "posterior", "lr": 1.0}}, "posterior cells take"),
        ({"x": {"kind": "posterior", "fit_on": "nope"}}, "fit_on 'nope' names no training cell"),
    ],
)
def test_mistakes_name_the_file_and_the_cell(tmp_path, cells, message):
    path = _write(tmp_path, {"name": "bad", "tasks": ["cqa"], "cells": cells})
    with pytest.raises(ExperimentError) as err:
        load_experiment(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_only_filters_by_every_field_with_wildcards(tmp_path):
    spec = {"name": "g", "tasks": ["cqa", "obqa"], "cells": {"none": {}, "kl": {}, "klx": {}}}
    cells = load_experiment(_write(tmp_path, spec)).cells
    assert [c.key for c in select(cells, ["task=obqa", "cell=kl*"])] == [
        "obqa/kl/seed-0",
        "obqa/klx/seed-0",
    ]
    assert len(select(cells, ["task=cqa,obqa", "seed=0"])) == 6
    with pytest.raises(ValueError, match="expected task="):
        select(cells, ["model=x"])


def test_shipped_experiments_parse():
    root = Path(__file__).parents[2] / "experiments"
    for name in ("paper.yaml", "cpu-small.yaml", "blob-ood.yaml"):
        assert load_experiment(root / name).cells


def test_paper_grid_has_fig_7_trials_fig_8_targets_and_plain_shuffling():
    cells = load_experiment(Path(__file__).parents[2] / "experiments" / "paper.yaml").cells
    train = [c for c in cells if c.kind == "train"]
    assert not any(c.config.data.group_by_length for c in train)  # the paper's shuffling

    # Fig. 7: each source of randomness (both, init only, data only, neither) on cqa with 5
    # trials, unregularised and with B-decay λ = 1e2.
    seeds = defaultdict(set)
    for c in train:
        cfg = c.config
        if c.task == "cqa" and cfg.ensemble.method == "lora" and cfg.lora.dropout == 0:
            key = (cfg.ensemble.vary_init, cfg.ensemble.vary_data_order)
            seeds[(*key, cfg.optim.decay_target, cfg.optim.weight_decay, cfg.optim.kl_beta)].add(
                (c.seed, cfg.ensemble.members)
            )
    for vary_init, vary_order in itertools.product([True, False], repeat=2):
        for target, decay in (("all", 0.01), ("B", 100.0)):
            trials = seeds[(vary_init, vary_order, target, decay, 0.0)]
            assert {s for s, m in trials if m == 5} == {0, 1, 2, 3, 4}

    # Fig. 8 (App. B): decay on A, on B and on both, at λ = 1e2 (cqa) and 1e3 (MMLU).
    decays = {(c.task, c.config.optim.decay_target, c.config.optim.weight_decay) for c in train}
    for task, strength in (("cqa", 100.0), ("mmlu-ss", 1000.0), ("mmlu-stem", 1000.0)):
        assert {(task, target, strength) for target in ("A", "B", "all")} <= decays


def test_cpu_small_length_grouping_is_a_single_group():
    """cpu-small keeps data.group_by_length on: with at most 8 batches of questions there is one
    length group, so each member's order is a plain shuffle of its own (see the YAML)."""
    cells = load_experiment(Path(__file__).parents[2] / "experiments" / "cpu-small.yaml").cells
    for c in cells:
        if c.kind == "train":
            data, optim = c.config.data, c.config.optim
            assert data.train_limit <= optim.batch_size * BATCHES_PER_LENGTH_GROUP, c.key


def test_finished_cells_are_skipped_and_interrupted_ones_resume(
    tiny_model_dir, tmp_path, monkeypatch
):
    experiment = load_experiment(_write(tmp_path, _tiny_spec(tiny_model_dir)))
    train_cell, few_shot_cell = experiment.cells
    out = tmp_path / "runs"

    # Stop the training cell right after its first checkpoint, as Ctrl-C would.
    real_save = run_module.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="Rerun the same `loraens experiment`"):
        run_experiment(experiment, experiment.cells, out)
    train_dir = cell_dir(out, experiment, train_cell)
    assert cell_status(train_dir, train_cell) == "partial"
    monkeypatch.setattr(run_module, "save_checkpoint", real_save)

    outcomes = run_experiment(experiment, experiment.cells, out)
    assert [o.status for o in outcomes] == ["done", "done"]
    assert json.loads((train_dir / "cell.json").read_text())["cell"] == "none"
    few_dir = cell_dir(out, experiment, few_shot_cell)
    assert len(read_jsonl(few_dir / "predictions.jsonl")[0]["member_probs"]) == 2  # draws

    # The resumed cell equals one that ran without interruption.
    fresh = run_experiment(experiment, [train_cell], tmp_path / "fresh")[0]
    assert read_jsonl(fresh.folder / "metrics.jsonl") == read_jsonl(train_dir / "metrics.jsonl")

    summary = (train_dir / "summary.json").stat().st_mtime_ns
    again = run_experiment(experiment, experiment.cells, out)
    assert [o.status for o in again] == ["skipped", "skipped"]
    assert (train_dir / "summary.json").stat().st_mtime_ns == summary


def test_a_failing_cell_does_not_stop_the_others(tiny_model_dir, tmp_path, capsys):
    spec = _tiny_spec(
        tiny_model_dir,
        broken={"model.name_or_path": str(tmp_path / "missing-model")},
        none={},
    )
    path = _write(tmp_path, spec)
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", str(path), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "1 cell(s) failed (obqa/broken/seed-0:" in err and "missing-model" in err
    assert (out / "tiny" / "obqa" / "none" / "seed-0" / "summary.json").exists()

    main(["experiment", str(path), "--out", str(out), "--only", "cell=none", "--plan", "true"])
    assert "done     train     obqa/none/seed-0" in capsys.readouterr().out


def test_blob_ood_trains_calibrated_obqa_cells_scored_on_near_and_far_shift():
    spec = load_experiment(Path(__file__).parents[2] / "experiments" / "blob-ood.yaml")
    assert [c.key for c in spec.cells] == ["obqa/fixed/seed-0", "obqa/patience/seed-0"]
    assert all(c.kind == "train" and c.config.data.calibrate for c in spec.cells)
    assert [c.config.optim.patience for c in spec.cells] == [None, 1]
    assert spec.ood_eval.tasks == ("arcc", "arce", "mmlu-chem", "mmlu-phy")


@pytest.mark.parametrize(
    ("ood_eval", "message"),
    [
        ({"tasks": ["nope"]}, "unknown task"),
        ({"tasks": ["arcc"], "limit": 0}, "limit"),
        (["arcc"], "expected {tasks"),
    ],
)
def test_ood_eval_mistakes_name_the_file(tmp_path, ood_eval, message):
    path = _write(tmp_path, {**_tiny_spec(tmp_path), "ood_eval": ood_eval})
    with pytest.raises(ExperimentError, match=message):
        load_experiment(path)


def test_ood_eval_scores_a_finished_cell_once_with_temperature_scaling(tiny_model_dir, tmp_path):
    spec = _tiny_spec(tiny_model_dir, none={"data.calibrate": True})
    spec["base"]["data"]["train_limit"] = 12
    spec["ood_eval"] = {"tasks": ["arcc"], "limit": 4}
    experiment = load_experiment(_write(tmp_path, spec))
    out = tmp_path / "runs"
    assert [o.status for o in run_experiment(experiment, experiment.cells, out)] == ["done"]
    folder = cell_dir(out, experiment, experiment.cells[0])
    result = json.loads((folder / "ood" / "arcc.json").read_text())
    assert result["ood_set"] == "arcc" and result["n_ood"] == 4
    assert {"single + TS", "ensemble + TS"} <= set(result["ood"])
    assert set(result["auroc"]["ensemble + TS"]) == {"neg_max_prob", "entropy"}
    # A cell whose OOD file went missing is scored again, without retraining.
    (folder / "ood" / "arcc.json").unlink()
    summary = (folder / "summary.json").stat().st_mtime_ns
    assert [o.status for o in run_experiment(experiment, experiment.cells, out)] == ["done"]
    assert (folder / "ood" / "arcc.json").exists()
    assert (folder / "summary.json").stat().st_mtime_ns == summary


def test_a_posterior_cell_is_fitted_on_its_source_cell_after_every_training_cell(
    tiny_model_dir, tmp_path
):
    cells = {
        # Listed first: the runner still trains its source before fitting it.
        "laplace": {"kind": "posterior", "method": "laplace", "fit_on": "none"},
        "none": {},
    }
    spec = _tiny_spec(tiny_model_dir, **cells)
    spec["base"]["data"]["calibrate"] = True
    spec["base"]["optim"]["holdout_fraction"] = 0.5
    spec["ood_eval"] = {"tasks": ["arce"], "limit": 3}
    experiment = load_experiment(_write(tmp_path, spec))
    posterior = next(c for c in experiment.cells if c.kind == "posterior")
    source = next(c for c in experiment.cells if c.name == "none")
    assert posterior.config == source.config
    outcomes = run_experiment(experiment, experiment.cells, tmp_path / "out")
    assert [(o.cell.name, o.status) for o in outcomes] == [("none", "done"), ("laplace", "done")]
    folder = cell_dir(tmp_path / "out", experiment, posterior)
    assert json.loads((folder / "summary.json").read_text())["method"] == "laplace"
    assert (folder / "ood" / "arce_log_probs.safetensors").is_file()
    assert json.loads((folder / "cell.json").read_text())["kind"] == "posterior"
    # Nothing of the source was trained or written again.
    source_folder = cell_dir(tmp_path / "out", experiment, source)
    stamp = (source_folder / "summary.json").stat().st_mtime_ns
    again = run_experiment(experiment, experiment.cells, tmp_path / "out")
    assert [o.status for o in again] == ["skipped", "skipped"]
    assert (source_folder / "summary.json").stat().st_mtime_ns == stamp
    # A posterior whose OOD record went missing (interrupted while scoring its OOD sets) has
    # only that set scored again: neither refitted nor its eval scored again.
    (folder / "ood" / "arce.json").unlink()
    fitted = {
        name: (folder / name).stat().st_mtime_ns for name in ("summary.json", "posterior.json")
    }
    again = run_experiment(experiment, experiment.cells, tmp_path / "out")
    assert [o.status for o in again] == ["skipped", "done"]
    assert (folder / "ood" / "arce.json").is_file()
    assert {name: (folder / name).stat().st_mtime_ns for name in fitted} == fitted
