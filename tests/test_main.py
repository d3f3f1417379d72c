"""`python -m loraens` is the same command as the `loraens` script."""

import os
import subprocess
import sys
from pathlib import Path

import loraens


def test_python_dash_m_loraens_shows_every_command():
    # The child must import this checkout's loraens, not whatever is installed.
    src = str(Path(loraens.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "loraens", "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: loraens")
    for command in ("train", "evaluate", "predict", "few_shot", "ood", "experiment", "report"):
        assert command in done.stdout
