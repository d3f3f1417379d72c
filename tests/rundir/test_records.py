"""The run directory's records: written byte for byte as before, read back through one type."""

import json
import subprocess
import sys

import pytest
import yaml

from loraens.config import TrainConfig
from loraens.rundir import CellRecord, FewShotResult, RecordError, RunDir

# summary.json as `loraens train` wrote it before the record type existed (a literal, so the
# check does not depend on the code under test).
SUMMARY_TEXT = """{
  "device": "cpu",
  "distributed_mode": "single",
  "epoch_kept": 2,
  "epochs_trained": 2,
  "eval_questions": 8,
  "eval_seconds": 0.5,
  "fit_seconds": null,
  "matmul_weights_dtype": "torch.float32",
  "method": "lora",
  "peak_memory_gb": 1.5,
  "precision": "fp32",
  "processes": 1,
  "score_precision": "fp32",
  "table": {
    "ensemble (M=2)": {
      "accuracy": 0.5,
      "nll": 1.25
    },
    "single (mean)": {
      "accuracy": 0.375,
      "nll": 1.5
    }
  },
  "train_questions": 16,
  "train_seconds": 3.5,
  "train_tokens_per_second": 1234.5,
  "wall_seconds": 7.25,
  "weights_dtype": "torch.float32"
}
"""


def test_summary_round_trips_byte_for_byte(tmp_path):
    (tmp_path / "summary.json").write_text(SUMMARY_TEXT)
    run = RunDir(tmp_path)
    summary = run.read_summary()
    assert summary.epochs_trained == 2 and summary.table["ensemble (M=2)"]["nll"] == 1.25
    out = RunDir(tmp_path / "copy")
    out.write_summary(summary)
    assert out.summary.read_text() == SUMMARY_TEXT


def test_an_older_summary_reads_with_the_later_fields_unset(tmp_path):
    old = json.loads(SUMMARY_TEXT)
    for key in ("method", "epochs_trained", "epoch_kept", "weights_dtype", "processes"):
        del old[key]
    old["shortened_prompts"] = 0  # written by the first release, since dropped
    (tmp_path / "summary.json").write_text(json.dumps(old))
    summary = RunDir(tmp_path).read_summary()
    assert summary.method is None and summary.epochs_trained is None
    assert summary.train_questions == 16


@pytest.mark.parametrize(
    "change, words",
    [
        ({"train_questions": None}, ["'train_questions'", "int"]),
        ({"table": [1, 2]}, ["'table'", "dict"]),
        ({"wall_seconds": "fast"}, ["'wall_seconds'", "float"]),
        ({"processes": True}, ["'processes'"]),
    ],
)
def test_a_malformed_summary_names_the_file_and_the_field(tmp_path, change, words):
    (tmp_path / "summary.json").write_text(json.dumps(json.loads(SUMMARY_TEXT) | change))
    with pytest.raises(RecordError) as err:
        RunDir(tmp_path).read_summary()
    assert str(tmp_path / "summary.json") in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_missing_field_and_broken_json_are_named(tmp_path):
    data = json.loads(SUMMARY_TEXT)
    del data["device"]
    (tmp_path / "summary.json").write_text(json.dumps(data))
    with pytest.raises(RecordError, match="field 'device' is missing"):
        RunDir(tmp_path).read_summary()
    (tmp_path / "summary.json").write_text('{"table": ')
    with pytest.raises(RecordError, match="not valid JSON"):
        RunDir(tmp_path).read_summary()


def test_few_shot_and_cell_records_round_trip(tmp_path):
    few = {
        "k": 3,
        "draws": 2,
        "seed": 0,
        "per_draw": [{"draw": 0, "accuracy": 0.5}, {"draw": 1, "accuracy": 0.25}],
        "mean": {"accuracy": 0.375},
        "std": {"accuracy": 0.125},
        "task": "arce",
        "model": "smollm2-135m",
        "eval_questions": 4,
    }
    cell = {"experiment": "e", "task": "arce", "cell": "few", "seed": 1, "kind": "few_shot"}
    run = RunDir(tmp_path)
    run.write_few_shot(FewShotResult(**few))
    run.write_cell(CellRecord(**cell))
    assert json.loads(run.few_shot.read_text()) == few
    assert json.loads(run.cell.read_text()) == cell
    assert run.read_few_shot() == FewShotResult(**few)
    assert run.read_cell() == CellRecord(**cell)
    assert RunDir(tmp_path / "elsewhere").read_cell() is None


def test_the_config_reads_back_as_the_config_written(tmp_path):
    cfg = TrainConfig()
    cfg.ensemble.members, cfg.optim.kl_beta = 3, 0.5
    run = RunDir(tmp_path)
    run.write_config(cfg)
    assert yaml.safe_load(run.config.read_text()) == cfg.to_dict()
    assert run.read_config() == cfg


def test_a_config_lacking_a_later_key_takes_its_default(tmp_path):
    values = TrainConfig().to_dict()
    del values["ensemble"]["members"], values["optim"]["weight_decay"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    cfg = RunDir(tmp_path).read_config()
    assert cfg.ensemble.members == 5 and cfg.optim.weight_decay == 0.01


def test_a_bad_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a loraens run directory"):
        RunDir(tmp_path).read_config()
    (tmp_path / "config.yaml").write_text("ensemble: {colour: red}\n")
    with pytest.raises(ValueError, match=r"config\.yaml.*colour"):
        RunDir(tmp_path).read_config()


def test_the_rundir_package_sits_below_evaluation_experiments_and_training():
    code = (
        "import sys, loraens.rundir, loraens.rundir.load\n"
        "bad = [m for m in sys.modules if m.split('.')[1:2] in "
        "(['evaluation'], ['experiments'], ['training'], ['methods'], ['cli'])\n"
        "       and m.startswith('loraens.')]\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_calibration_record_round_trips_and_bad_fields_are_named(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_calibration() is None
    text = (
        '{"ensemble_temperature": 1.5, "holdout_nll": {"ensemble": 0.9}, '
        '"member_temperatures": [1.25, 2], "questions": 12, "source": "training hold-out"}'
    )
    run.calibration.write_text(text)
    record = run.read_calibration()
    assert record.member_temperatures == [1.25, 2] and record.ensemble_temperature == 1.5
    run.write_calibration(record)
    assert json.loads(run.calibration.read_text()) == json.loads(text)
    for change, words in (
        ({"ensemble_temperature": -1.0}, "temperatures must be finite numbers > 0"),
        ({"member_temperatures": []}, "temperatures must be"),
        ({"member_temperatures": ["1"]}, "temperatures must be"),
        ({"questions": "12"}, "field 'questions' should be int"),
        ({"questions": 0}, "questions must be >= 1"),
    ):
        run.calibration.write_text(json.dumps({**json.loads(text), **change}))
        with pytest.raises(RecordError, match=words) as info:
            run.read_calibration()
        assert "calibration.json" in str(info.value)
