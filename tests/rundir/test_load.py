"""Loading a run: its config.yaml alone never lets the model folder's code run."""

from __future__ import annotations

import pytest
from helpers import write_untrained_run
from transformers import AutoConfig

from loraens.models import loading
from loraens.rundir.load import RemoteCodeError, load_run


@pytest.fixture
def config_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every AutoConfig.from_pretrained the model loader makes."""
    calls: list[dict] = []

    class SpyConfig:
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls.append(kwargs)
            return AutoConfig.from_pretrained(path, **kwargs)

    monkeypatch.setattr(loading, "AutoConfig", SpyConfig)
    return calls


def _run(tmp_path, tiny_model_dir, questions_files, trust_remote_code: bool):
    return write_untrained_run(
        tmp_path / "run", tiny_model_dir, *questions_files, trust_remote_code=trust_remote_code
    )


def test_a_run_asking_for_remote_code_is_refused_without_the_flag(
    tmp_path, tiny_model_dir, questions_files, config_calls
):
    run = _run(tmp_path, tiny_model_dir, questions_files, trust_remote_code=True)
    with pytest.raises(RemoteCodeError) as refused:
        load_run(run.root, "cpu", "fp32")
    message = str(refused.value)
    assert "--trust_remote_code true" in message
    assert str(run.config) in message and str(tiny_model_dir) in message
    assert config_calls == []  # refused before transformers saw the folder


def test_with_the_flag_the_model_loads_trusting_its_code(
    tmp_path, tiny_model_dir, questions_files, config_calls
):
    run = _run(tmp_path, tiny_model_dir, questions_files, trust_remote_code=True)
    loaded = load_run(run.root, "cpu", "fp32", trust_remote_code=True)
    assert loaded.ensemble.n_members == 2
    assert [call["trust_remote_code"] for call in config_calls] == [True]


@pytest.mark.parametrize("flag", [False, True])
def test_a_run_trained_without_remote_code_never_trusts_it(
    tmp_path, tiny_model_dir, questions_files, config_calls, flag
):
    # The flag allows what the run asks for; it does not change the model the members fit.
    run = _run(tmp_path, tiny_model_dir, questions_files, trust_remote_code=False)
    load_run(run.root, "cpu", "fp32", trust_remote_code=flag)
    assert [call["trust_remote_code"] for call in config_calls] == [False]
