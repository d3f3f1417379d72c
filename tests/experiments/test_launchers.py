"""Launchers: cells as Ray tasks and as SLURM jobs (submitit) write the serial runner's records,
resume after a killed worker, and start a posterior cell only after its source cell."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from loraens.cli.main import main
from loraens.experiments.launch_worker import (
    RUNNING,
    cell_lock,
    cell_log,
    cell_running,
    run_logged_cell,
)
from loraens.experiments.launchers import (
    CellResources,
    RayOptions,
    SlurmOptions,
    launch_ray,
    launch_slurm,
    slurm_executor,
    submit_slurm,
)
from loraens.experiments.runner import cell_dir, plan_table, run_experiment
from loraens.experiments.spec import Experiment, load_experiment, select

# What a run writes that depends on the clock or the allocator, not on the seeds.
TIMINGS = {
    "train_seconds",
    "wall_seconds",
    "train_tokens_per_second",
    "eval_seconds",
    "peak_memory_gb",
    "fit_seconds",
}
RECORDS = [
    "metrics.jsonl",
    "predictions.jsonl",
    "eval_log_probs.safetensors",
    "config.yaml",
    "cell.json",
    "members/member-00/adapter_model.safetensors",
    "members/member-01/adapter_model.safetensors",
]


def _spec(model_dir: Path) -> dict:
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
        "seeds": [0, 1],
        "cells": {"none": {}, "decay": {"optim.weight_decay": 0.5}},
    }


def _load(tmp_path: Path, spec: dict) -> Experiment:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_experiment(path)


def _untimed_summary(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    assert TIMINGS & set(summary)  # the fields left out exist: their names are current
    return {k: v for k, v in summary.items() if k not in TIMINGS}


def _assert_same_records(experiment, cells, serial_root: Path, root: Path) -> None:
    for cell in cells:
        ours, theirs = cell_dir(root, experiment, cell), cell_dir(serial_root, experiment, cell)
        for name in RECORDS:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (cell.key, name)
        assert _untimed_summary(ours) == _untimed_summary(theirs), cell.key


@pytest.fixture(scope="module")
def single_thread():
    """Workers run one thread (Ray sets OMP_NUM_THREADS from num_cpus=1; the submitit jobs
    inherit the variable): the serial reference does too, so float sums add up alike."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="module")
def serial(tiny_model_dir, tmp_path_factory, single_thread):
    """The 4-cell experiment (2 cells x 2 seeds) run by the serial runner: the reference."""
    tmp = tmp_path_factory.mktemp("serial")
    experiment = _load(tmp, _spec(tiny_model_dir))
    outcomes = run_experiment(experiment, experiment.cells, tmp / "runs")
    assert [o.status for o in outcomes] == ["done"] * 4
    return experiment, tmp / "runs"


@pytest.fixture(scope="module")
def ray_cluster(single_thread):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_cells_write_the_serial_records(serial, ray_cluster, tmp_path, capsys):
    experiment, serial_root = serial
    root = tmp_path / "runs"
    outcomes = launch_ray(experiment, experiment.cells, root, CellResources(), RayOptions())
    assert sorted(o.status for o in outcomes) == ["done"] * 4
    _assert_same_records(experiment, experiment.cells, serial_root, root)
    log = cell_log(root, experiment, experiment.cells[0]).read_text()
    assert "obqa/none/seed-0: running" in log and "epoch 2" in log
    # Finished cells are skipped without a task, from the command line too.
    again = launch_ray(experiment, experiment.cells, root, CellResources(), RayOptions())
    assert [o.status for o in again] == ["skipped"] * 4
    path = serial_root.parent / "exp.yaml"
    main(["experiment", str(path), "--out", str(root), "--launcher", "ray", "--cpus_per_cell", "1"])
    assert "4 of 4 cells complete" in capsys.readouterr().out


def test_a_killed_worker_is_reported_and_its_cell_resumes(serial, ray_cluster, tmp_path):
    experiment, serial_root = serial
    cells = select(experiment.cells, ["cell=none", "seed=0"])
    root = tmp_path / "runs"

    def die_after_the_first_checkpoint(*args):
        import loraens.training.run as run_module

        real = run_module.save_checkpoint

        def save_then_die(*a, **k):
            real(*a, **k)
            os._exit(3)  # the process is gone, as on an OOM kill or a lost node

        run_module.save_checkpoint = save_then_die
        return run_logged_cell(*args)

    no_retry = RayOptions(max_retries=0)
    (killed,) = launch_ray(
        experiment, cells, root, CellResources(), no_retry, work=die_after_the_first_checkpoint
    )
    assert killed.status == "failed" and "log:" in killed.error
    assert "epoch 1" in cell_log(root, experiment, cells[0]).read_text()  # its tail is shown
    assert "partial" in plan_table(experiment, cells, root)

    (resumed,) = launch_ray(experiment, cells, root, CellResources(), no_retry)
    assert resumed.status == "done"
    assert "resuming" in cell_log(root, experiment, cells[0]).read_text()
    _assert_same_records(experiment, cells, serial_root, root)


def test_a_posterior_cell_starts_after_its_source_cell_ends(tiny_model_dir, ray_cluster, tmp_path):
    posterior = {
        "kind": "posterior",
        "method": "tfb",
        "fit_on": "none",
        "samples": 2,
        "search_steps": 2,
        "search_samples": 2,
    }
    spec = _spec(tiny_model_dir)
    spec["base"]["data"]["calibrate"] = True
    spec["base"]["optim"]["holdout_fraction"] = 0.5
    spec["seeds"] = [0]
    spec["cells"] = {"tfb": posterior, "none": {}}  # listed first: still run second
    experiment = _load(tmp_path, spec)
    stamps = tmp_path / "stamps"
    stamps.mkdir()

    def timed(experiment, cell, root, *after):
        start = time.time()
        outcome = run_logged_cell(experiment, cell, root, *after)
        (stamps / f"{cell.name}.json").write_text(json.dumps([start, time.time()]))
        return outcome

    root = tmp_path / "runs"
    outcomes = launch_ray(experiment, experiment.cells, root, CellResources(), RayOptions(), timed)
    assert [(o.cell.name, o.status) for o in outcomes] == [("none", "done"), ("tfb", "done")]
    source = json.loads((stamps / "none.json").read_text())
    fitted = json.loads((stamps / "tfb.json").read_text())
    assert fitted[0] >= source[1]


def test_submitit_local_jobs_write_the_serial_records(serial, tmp_path):
    pytest.importorskip("submitit")
    experiment, serial_root = serial
    cells = select(experiment.cells, ["seed=0"])  # a fresh process per job: keep it short
    root = tmp_path / "runs"
    options = SlurmOptions(cluster="local", time_min=10)
    outcomes = launch_slurm(experiment, cells, root, CellResources(), options)
    assert [o.status for o in outcomes] == ["done"] * 2
    _assert_same_records(experiment, cells, serial_root, root)


def _fake_slurm(folder: Path, monkeypatch) -> Path:
    """srun and sbatch on PATH: sbatch keeps each job script and answers with a job id."""
    scripts = folder / "scripts"
    scripts.mkdir(parents=True)
    fake_sbatch = (
        "#!/bin/sh\n"
        f'n=$(ls {scripts} | wc -l); cp "$1" {scripts}/job-$n.sh\n'
        'echo "Submitted batch job $((1000 + n))"\n'
    )
    for name, text in (("sbatch", fake_sbatch), ("srun", "#!/bin/sh\n")):
        (folder / name).write_text(text)
        (folder / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_slurm_job_scripts_ask_for_the_resources_and_wait_for_the_source(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    spec = {
        "name": "grid",
        "tasks": ["obqa"],
        "base": {"data": {"calibrate": True}, "optim": {"holdout_fraction": 0.5}},
        "cells": {"none": {}, "tfb": {"kind": "posterior", "method": "tfb", "fit_on": "none"}},
        "seeds": [0, 1],
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(spec))
    experiment = load_experiment(tmp_path / "exp.yaml")
    scripts = _fake_slurm(tmp_path / "bin", monkeypatch)
    resources = CellResources(cpus=4, gpus=1, mem_gb=16)
    options = SlurmOptions(partition="gpu", time_min=90, account="lab", max_parallel=8)
    jobs = submit_slurm(experiment, experiment.cells, tmp_path / "runs", resources, options)
    assert sorted(jobs) == sorted(c.key for c in experiment.cells)

    array, *posteriors = [p.read_text() for p in sorted(scripts.iterdir())]
    for line in (
        "--partition=gpu",
        "--time=90",
        "--account=lab",
        "--cpus-per-task=4",
        "--gpus-per-node=1",
        "--mem=16GB",
        "--array=0-1%2",
        "--job-name=loraens-grid",
    ):
        assert f"#SBATCH {line}" in array
    assert sys.executable in array and "submitit.core._submit" in array
    # Each posterior job waits for its own seed's training job, an array task of job 1000.
    dependencies = sorted(
        line for text in posteriors for line in text.splitlines() if "dependency" in line
    )
    assert dependencies == [
        "#SBATCH --dependency=afterany:1000_0",
        "#SBATCH --dependency=afterany:1000_1",
    ]
    assert jobs["obqa/tfb/seed-1"].job_id in {"1001", "1002"}


def test_slurm_needs_whole_gpus_and_says_how_to_try_without_slurm(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    experiment = _load(tmp_path, _spec(tmp_path))
    folder = tmp_path / "jobs"
    with pytest.raises(ValueError, match="whole GPUs"):
        slurm_executor(folder, experiment, CellResources(gpus=0.5), SlurmOptions())
    with pytest.raises(RuntimeError, match="--slurm_cluster local"):
        slurm_executor(folder, experiment, CellResources(), SlurmOptions())


def test_a_cell_held_by_another_worker_is_left_alone_and_shown_running(tmp_path):
    experiment = _load(tmp_path, _spec(tmp_path))
    cell, root = experiment.cells[0], tmp_path / "runs"
    with cell_lock(root, experiment, cell) as held:
        assert held
        outcome = run_logged_cell(experiment, cell, root)
        assert outcome.status == RUNNING and not cell_dir(root, experiment, cell).exists()
        shown = plan_table(experiment, [cell], root, lambda c: cell_running(root, experiment, c))
        assert "running  train     obqa/none/seed-0" in shown
    assert not cell_running(root, experiment, cell)  # released with the worker's file


def test_a_missing_engine_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    experiment = _load(tmp_path, _spec(tmp_path))
    with pytest.raises(RuntimeError, match=r"pip install 'loraens\[ray\]'"):
        launch_ray(experiment, experiment.cells, tmp_path, CellResources(), RayOptions())
