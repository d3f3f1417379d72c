"""The report generator on synthetic run directories (no model, no training)."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchmetrics.functional.classification import multiclass_calibration_error

from loraens.config import TrainConfig
from loraens.data.records import Question
from loraens.evaluation.metrics import summarize
from loraens.evaluation.ood import detection_rows
from loraens.evaluation.predictions import write_predictions
from loraens.evaluation.tables import METRICS, metric_rows, single_vs_ensemble
from loraens.experiments.report import write_report
from loraens.experiments.runs import collect_runs
from loraens.io import write_json_atomic, write_jsonl_atomic
from loraens.rundir import RunDir, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_CHOICES = 4


# ----------------------------------------------------------------------------- synthetic runs


def synthetic_questions(n: int, seed: int) -> list[Question]:
    rng = np.random.default_rng(seed)
    return [
        Question(f"q{i}", f"question {i}", tuple("wxyz"), int(rng.integers(N_CHOICES)))
        for i in range(n)
    ]


def synthetic_log_probs(
    labels: np.ndarray, members: int, sharpness: float, rng: np.random.Generator
) -> np.ndarray:
    """(M, N, K) member log-probs from Dirichlet draws tilted towards the label, so accuracy
    and confidence grow with ``sharpness`` like a run that trains."""
    out = np.empty((members, len(labels), N_CHOICES))
    for m in range(members):
        for i, y in enumerate(labels):
            alpha = np.full(N_CHOICES, 0.6)
            alpha[y] += sharpness
            out[m, i] = np.log(np.maximum(rng.dirichlet(alpha), 1e-9))
    return out - np.log(np.exp(out).sum(axis=-1, keepdims=True))


def write_train_run(
    path: Path,
    *,
    task: str = "arce",
    method: str = "lora",
    members: int = 3,
    epochs: int = 4,
    seed: int = 0,
    kl_beta: float = 0.0,
    weight_decay: float = 0.01,
    decay_target: str = "all",
    dropout: float = 0.0,
    vary_init: bool = True,
    vary_data_order: bool = True,
    ood_task: str | None = None,
    n_eval: int = 40,
    complete: bool = True,
    cell: str | None = None,
    eval_log_probs: bool = True,
) -> Path:
    """A training run directory in the format `loraens train` writes (plus ``cell.json``)."""
    cfg = TrainConfig()
    cfg.data.task, cfg.data.ood_task = task, ood_task
    cfg.ensemble.method, cfg.ensemble.members, cfg.ensemble.seed = method, members, seed
    cfg.ensemble.vary_init, cfg.ensemble.vary_data_order = vary_init, vary_data_order
    cfg.optim.epochs, cfg.optim.lr, cfg.optim.batch_size = epochs, 1e-3, 8
    cfg.optim.kl_beta, cfg.optim.weight_decay = kl_beta, weight_decay
    cfg.optim.decay_target = decay_target
    cfg.lora.dropout = dropout
    run = RunDir(path)
    path.mkdir(parents=True)
    run.write_config(cfg)
    # Keyed by the whole config, so every setting gets its own numbers.
    rng = np.random.default_rng(zlib.crc32(yaml.safe_dump(cfg.to_dict()).encode()))
    questions = synthetic_questions(n_eval, seed=1)
    labels = np.asarray([q.answer for q in questions])
    ood_labels = rng.integers(N_CHOICES, size=n_eval // 2)
    rows: list[dict] = []
    for epoch in range(1, epochs + 1):
        lp = synthetic_log_probs(labels, members, 0.2 + 0.35 * epoch, rng)
        rows += [
            {"epoch": epoch, "split": "train", "member": m, "loss": 1.0 / epoch}
            for m in range(members)
        ]
        rows += metric_rows(lp, labels, epoch=epoch, split="eval")
        if eval_log_probs:  # as training does; runs of older loraens lack the file
            run.write_eval_log_probs(epoch, lp, labels)
        if ood_task:
            ood_lp = synthetic_log_probs(ood_labels, members, 0.3, rng)
            rows += metric_rows(ood_lp, ood_labels, epoch=epoch, split="ood")
            rows += detection_rows(lp, ood_lp, epoch=epoch)
    write_jsonl_atomic(run.metrics, rows)
    if cell is not None:
        write_json_atomic(
            path / "cell.json",
            {"experiment": "synthetic", "task": task, "cell": cell, "seed": seed, "kind": "train"},
        )
    if complete:
        write_predictions(run.predictions, questions, lp)
        summary = {
            "method": method,
            "epochs_trained": epochs,
            "epoch_kept": epochs,
            "table": single_vs_ensemble(metric_rows(lp, labels)),
            "train_questions": 64,
            "eval_questions": n_eval,
            "train_seconds": 1.0,
            "train_tokens_per_second": 100.0,
            "wall_seconds": 2.0,
            "precision": "fp32",
            "device": "cpu",
        }
        write_json_atomic(run.summary, summary)
    return path


def write_few_shot_run(path: Path, *, task: str = "arce", draws: int = 3, n_eval: int = 40) -> Path:
    """A few-shot directory as the experiment runner writes it: draws play the members' part."""
    rng = np.random.default_rng(7)
    questions = synthetic_questions(n_eval, seed=1)
    labels = np.asarray([q.answer for q in questions])
    lp = synthetic_log_probs(labels, draws, 0.4, rng)
    per_draw = [{"draw": d, **summarize(lp[d], labels)} for d in range(draws)]
    path.mkdir(parents=True)
    cfg = TrainConfig()
    cfg.data.task = task
    RunDir(path).write_config(cfg)  # the runner writes it too: few_shot.json must win
    write_predictions(RunDir(path).predictions, questions, lp)
    write_json_atomic(
        path / "few_shot.json",
        {
            "k": 3,
            "draws": draws,
            "seed": 0,
            "per_draw": per_draw,
            "mean": {m: float(np.mean([r[m] for r in per_draw])) for m in METRICS},
            "std": {m: float(np.std([r[m] for r in per_draw])) for m in METRICS},
            "task": task,
            "model": "smollm2-135m",
            "eval_questions": n_eval,
        },
    )
    write_json_atomic(
        path / "cell.json",
        {
            "experiment": "synthetic",
            "task": task,
            "cell": "few_shot",
            "seed": 0,
            "kind": "few_shot",
        },
    )
    return path


def make_synthetic_runs(root: Path) -> Path:
    """Every kind of run the report knows, laid out as OUT/<experiment>/<task>/<cell>/seed-<s>."""
    base = root / "synthetic"
    arce = base / "arce"
    for seed in (0, 1):
        write_train_run(arce / "none" / f"seed-{seed}", seed=seed, cell="none")
    write_train_run(arce / "kl" / "seed-0", kl_beta=0.05, cell="kl-kl_beta=0.05")
    write_train_run(arce / "kl2" / "seed-0", kl_beta=0.1, cell="kl-kl_beta=0.1")
    write_train_run(arce / "b_decay" / "seed-0", weight_decay=100.0, decay_target="B", cell="b")
    write_train_run(arce / "last_layer" / "seed-0", method="last_layer", cell="last_layer")
    write_train_run(arce / "mc" / "seed-0", method="mc_dropout", dropout=0.1, cell="mc")
    write_train_run(arce / "lora_dropout" / "seed-0", dropout=0.1, cell="lora_dropout")
    write_train_run(arce / "init_only" / "seed-0", vary_data_order=False, cell="init_only")
    write_train_run(arce / "data_only" / "seed-0", vary_init=False, cell="data_only")
    write_train_run(arce / "pool" / "seed-0", members=6, cell="pool")
    write_train_run(arce / "crashed" / "seed-0", complete=False, cell="crashed")
    write_few_shot_run(arce / "few_shot" / "seed-0")
    # A second task with OOD rows; trained by hand, so without cell.json.
    cqa = base / "cqa"
    write_train_run(cqa / "none", task="cqa", ood_task="mmlu", epochs=3)
    write_train_run(
        cqa / "b_decay", task="cqa", ood_task="mmlu", epochs=3, weight_decay=100.0, decay_target="B"
    )
    # Fig. 8 (App. B): the same λ on A only and on both; another λ on A only, which Fig. 8
    # passes over (fewer targets). No OOD rows, so Fig. 5 keeps its inputs.
    for name, target, decay in (("a_decay", "A", 100.0), ("ab_decay", "all", 100.0),
                                ("a_decay_1e3", "A", 1000.0)):  # fmt: skip
        write_train_run(cqa / name, task="cqa", epochs=3, weight_decay=decay, decay_target=target)
    return base


# ----------------------------------------------------------------------------- helpers


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


EXPECTED_FIGURES = [
    "fig-1a.png",
    "fig-reliability-arce.png",
    "fig-reliability-cqa.png",
    "fig-2.png",
    "fig-3.png",
    "fig-4.png",
    "fig-5.png",
    "fig-6.png",
    "fig-7.png",
    "fig-8.png",
]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = make_synthetic_runs(root)
    index = write_report([runs], tmp_path_factory.mktemp("report") / "out")
    return runs, index


# ----------------------------------------------------------------------------- tests


def test_every_figure_is_a_png_referenced_by_the_page(full_report):
    _, index = full_report
    page = index.read_text()
    for name in EXPECTED_FIGURES:
        assert_png(index.parent / name)
        assert f'<img src="{name}"' in page
    assert "Failed" not in page
    assert sorted(p.name for p in index.parent.glob("fig-*.png")) == sorted(EXPECTED_FIGURES)


def test_page_has_table_1_and_lists_the_runs(full_report):
    _, index = full_report
    page = index.read_text()
    assert "Table 1" in page and "last-layer ens." in page
    assert "Found 16 finished training run(s) and 1 few-shot run(s)" in page
    assert "incomplete (no summary.json)" in page  # the crashed run is listed as ignored


def test_classification_by_config(full_report):
    runs, _ = full_report
    rs = collect_runs([runs])
    labels = {(r.task, r.label, r.seed) for r in rs.train}
    assert ("arce", "none", 1) in labels
    assert ("arce", "KL β=0.05", 0) in labels
    assert ("arce", "B-decay λ=100", 0) in labels
    assert ("arce", "MC dropout 0.1", 0) in labels
    assert ("arce", "LoRA ens. + dropout 0.1", 0) in labels
    assert ("arce", "none [init only]", 0) in labels
    assert ("arce", "none [data only]", 0) in labels
    assert ("arce", "last-layer ens.", 0) in labels
    ref = rs.reference("arce")
    assert ref is not None and ref.first.members == 3 and ref.seeds == [0, 1]
    assert all("crashed" not in str(r.path) for r in rs.train)


def test_runs_csv_has_a_row_per_run(full_report):
    _, index = full_report
    rows = read_csv(index.parent / "runs.csv")
    assert len(rows) == 17  # 16 training runs + 1 few-shot
    assert {"path", "task", "regulariser", "ensemble_accuracy", "single_ece"} <= set(rows[0])
    few = [r for r in rows if r["kind"] == "few_shot"]
    assert len(few) == 1 and few[0]["ensemble_accuracy"] == ""  # draws are not an ensemble
    kl = next(r for r in rows if r["regulariser"] == "KL β=0.05")
    # The run's final ensemble, scored independently from its predictions.jsonl (probabilities
    # rounded to 6 decimals) with torchmetrics' ECE and a plain accuracy count.
    predictions = read_jsonl(Path(kl["path"]) / "predictions.jsonl")
    probs = torch.tensor([p["ensemble_probs"] for p in predictions], dtype=torch.float64)
    labels = torch.tensor([p["answer"] for p in predictions])
    expected_ece = multiclass_calibration_error(probs, labels, num_classes=N_CHOICES, n_bins=15)
    assert float(kl["ensemble_ece"]) == pytest.approx(expected_ece.item(), abs=1e-5)
    expected_accuracy = (probs.argmax(dim=1) == labels).double().mean().item()
    assert float(kl["ensemble_accuracy"]) == pytest.approx(expected_accuracy)


def test_epochs_csv_holds_every_evaluation_row(full_report):
    runs, index = full_report
    rows = read_csv(index.parent / "epochs.csv")
    assert {r["split"] for r in rows} == {"eval", "ood", "ood_detection"}
    # 12 arce runs (incl. 2 seeds) x 4 epochs x (M + 1) + the 6-member pool; cqa has OOD rows.
    arce_eval = [r for r in rows if r["task"] == "arce" and r["split"] == "eval"]
    assert len(arce_eval) == 10 * 4 * 4 + 4 * 7
    auroc = [r for r in rows if r["split"] == "ood_detection" and r["member"] == "ensemble"]
    assert len(auroc) == 2 * 3 and all(r["mutual_information"] != "" for r in auroc)


def test_table1_and_size_csvs(full_report):
    _, index = full_report
    table = read_csv(index.parent / "table1.csv")
    assert [(r["task"], r["method"]) for r in table] == [
        ("arce", "LoRA ens."),
        ("arce", "last-layer ens."),
    ]
    assert table[0]["seeds"] == "0 1"
    size = read_csv(index.parent / "size.csv")
    arce = [r for r in size if r["task"] == "arce"]
    # Every evaluated epoch; M = 1, the paper's sizes that fit and the whole pool.
    assert [(int(r["epoch"]), int(r["size"])) for r in arce] == [
        (e, m) for e in range(1, 5) for m in (1, 3, 5, 6)
    ]
    assert all(r["pool_size"] == "6" and r["source"] == "eval_log_probs" for r in arce)
    assert all(float(r["std_accuracy"]) == 0.0 for r in arce if r["size"] == "6")


def _ensemble_row(run: Path, epoch: int) -> dict:
    return next(
        r
        for r in read_jsonl(run / "metrics.jsonl")
        if r["split"] == "eval" and r["epoch"] == epoch and r["member"] == "ensemble"
    )


def test_size_csv_whole_pool_equals_the_runs_own_ensemble_rows(full_report):
    """M = pool at each epoch is the run's full ensemble: metrics.jsonl has its numbers."""
    runs, index = full_report
    pool = runs / "arce" / "pool" / "seed-0"
    full = [r for r in read_csv(index.parent / "size.csv") if r["size"] == "6"]
    assert {r["run"] for r in full} == {str(pool)}
    for r in full:
        expected = _ensemble_row(pool, int(r["epoch"]))
        for m in ("accuracy", "nll", "ece", "brier"):
            # The file holds float32 log-probs; metrics.jsonl was computed in float64.
            assert float(r[f"mean_{m}"]) == pytest.approx(expected[m], abs=1e-5), (r["epoch"], m)


def test_fig_6_falls_back_to_final_predictions_with_a_note(tmp_path):
    write_train_run(tmp_path / "runs" / "old", members=4, eval_log_probs=False)
    index = write_report([tmp_path / "runs"], tmp_path / "report")
    page = index.read_text()
    assert_png(tmp_path / "report" / "fig-6.png")
    assert "Fig. 6 shows the final epoch only, from the rounded predictions.jsonl" in page
    size = read_csv(tmp_path / "report" / "size.csv")
    assert [(r["epoch"], r["size"], r["source"]) for r in size] == [
        ("4", "1", "predictions"),
        ("4", "3", "predictions"),
        ("4", "4", "predictions"),
    ]
    expected = _ensemble_row(tmp_path / "runs" / "old", 4)
    assert float(size[-1]["mean_nll"]) == pytest.approx(expected["nll"], abs=1e-4)  # rounded


def test_fig_8_compares_decay_on_a_b_and_both_from_the_metrics_rows(full_report):
    runs, index = full_report
    page = index.read_text()
    assert '<img src="fig-8.png"' in page
    rows = read_csv(index.parent / "decay_target.csv")
    # cqa: λ = 100 has all three targets; λ = 1000 (A only) is passed over. arce: B only.
    assert {(r["task"], r["weight_decay"]) for r in rows} == {("cqa", "100.0")}
    folders = {"A and B": "ab_decay", "B only": "b_decay", "A only": "a_decay"}
    assert [(r["decay_on"], r["epoch"]) for r in rows] == [
        (name, str(e)) for name in folders for e in (1, 2, 3)
    ]
    for r in rows:
        metrics = [
            m
            for m in read_jsonl(runs / "cqa" / folders[r["decay_on"]] / "metrics.jsonl")
            if m["split"] == "eval" and m["epoch"] == int(r["epoch"])
        ]
        members = [m for m in metrics if m["member"] != "ensemble"]
        (ensemble,) = [m for m in metrics if m["member"] == "ensemble"]
        for key in ("accuracy", "nll"):
            assert float(r[f"ensemble_{key}"]) == pytest.approx(ensemble[key], rel=1e-12)
            mean = sum(m[key] for m in members) / len(members)
            assert float(r[f"single_{key}"]) == pytest.approx(mean, rel=1e-12)
    # arce has only B-decay: the page says what Fig. 8 needs there.
    assert "arce: needs runs with weight decay λ=100 on A and B (optim.decay_target=all)" in page


def test_partial_runs_still_give_a_report_that_says_what_is_missing(tmp_path):
    write_train_run(tmp_path / "runs" / "only-none")
    index = write_report([tmp_path / "runs"], tmp_path / "report")
    page = index.read_text()
    assert "Table 1 needs a last_layer run and a LoRA run on the same task" in page
    assert "mc_dropout" in page and "data.ood_task" in page
    for name in ("fig-reliability-arce.png", "fig-2.png", "fig-3.png", "fig-6.png"):
        assert_png(tmp_path / "report" / name)
        assert f'<img src="{name}"' in page
    for name in ("fig-1a.png", "fig-4.png", "fig-5.png", "fig-7.png", "fig-8.png"):
        assert not (tmp_path / "report" / name).exists()
    assert "Failed" not in page
    assert len(read_csv(tmp_path / "report" / "table1.csv")) == 0


def test_rerun_in_the_same_folder_drops_figures_no_longer_drawn(tmp_path, full_report):
    runs, _ = full_report
    out = tmp_path / "report"
    write_report([runs], out)
    assert (out / "fig-7.png").exists()
    write_report([runs / "arce" / "none"], out)
    assert not (out / "fig-7.png").exists()


def test_a_run_directory_itself_can_be_given(full_report, tmp_path):
    runs, _ = full_report
    index = write_report([runs / "arce" / "none" / "seed-0"], tmp_path / "one")
    assert "Found 1 finished training run(s)" in index.read_text()


def test_only_incomplete_runs_is_an_error_naming_the_paths(tmp_path):
    write_train_run(tmp_path / "runs" / "crashed", complete=False)
    # A few-shot cell that never finished: only its cell.json exists.
    write_json_atomic(tmp_path / "runs" / "few" / "cell.json", {"kind": "few_shot", "seed": 0})
    rs = collect_runs([tmp_path / "runs"])
    assert sorted(why for _, why in rs.ignored) == [
        "incomplete (no few_shot.json)",
        "incomplete (no summary.json)",
    ]
    with pytest.raises(ValueError, match="No finished runs found in .*runs"):
        write_report([tmp_path / "runs"], tmp_path / "report")
    with pytest.raises(ValueError, match="nowhere"):
        write_report([tmp_path / "nowhere"], tmp_path / "report")


def test_synthetic_config_round_trips(tmp_path):
    """The builder writes configs the package itself can read back."""
    path = write_train_run(tmp_path / "run", kl_beta=0.05)
    TrainConfig.from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    assert json.loads((path / "summary.json").read_text())["method"] == "lora"


def test_cli_takes_run_folders_as_plain_arguments(full_report, tmp_path, capsys):
    from loraens.cli.main import main

    runs, _ = full_report
    arce, cqa = sorted(p for p in runs.iterdir() if p.is_dir())[:2]
    main(["report", str(arce), str(cqa), "-o", str(tmp_path / "r")])
    assert f"wrote {tmp_path / 'r' / 'index.html'}" in capsys.readouterr().out
    page = (tmp_path / "r" / "index.html").read_text()
    assert f"Searched: {arce}, {cqa}" in page


def test_a_failing_section_is_named_on_the_page_and_the_others_still_drawn(tmp_path, monkeypatch):
    from loraens.experiments import report
    from loraens.experiments.sections import SECTIONS, SectionSpec

    def broken(rs, task):
        raise KeyError("no such metric")

    reliability = next(s for s in SECTIONS if s.key == "reliability")
    monkeypatch.setattr(report, "SECTIONS", (SectionSpec("fig-x", "X", "", broken), reliability))
    write_train_run(tmp_path / "runs" / "none")
    page = write_report([tmp_path / "runs"], tmp_path / "report").read_text()
    assert "fig-x: failed" in page and "Failed: KeyError: &#x27;no such metric&#x27;" in page
    assert_png(tmp_path / "report" / "fig-reliability-arce.png")
    assert '<img src="fig-reliability-arce.png"' in page
