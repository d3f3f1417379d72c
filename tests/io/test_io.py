import os

import pytest

from loraens.io import atomic_path, write_text_atomic


def test_failed_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "metrics.jsonl"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary left behind


def test_directory_appears_only_when_complete_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "member-00"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "adapter_config.json").write_text("{}")
        raise RuntimeError("killed")
    assert not target.exists()
    for version in ("v1", "v2"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
    assert (target / "weights").read_text() == "v2"
    assert os.listdir(tmp_path) == ["member-00"]
