#!/usr/bin/env bash
# The pip route, as a user outside this checkout takes it: build the sdist and wheel
# (`python -m build`, the wheel from the sdist), check the wheel holds the package's data files,
# install it with the pinned torch into a fresh virtual environment, and run `loraens tasks` plus
# a one-epoch train, evaluate and export on a tiny random model. CI runs it after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

BUILD_PYTHON=${BUILD_PYTHON:-.venv/bin/python}  # has `build` and setuptools (dev extras)
PYTHON=${PYTHON:-python3}
TORCH="torch==2.13.0"  # as scripts/setup.sh: a looser request may pull a multi-GB CUDA build
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Build from a copy of what a sdist holds, so nothing is written into the checkout and a file
# the build needs but that is not in the copy fails here.
mkdir "$WORK/tree"
cp -r pyproject.toml README.md src "$WORK/tree/"
find "$WORK/tree/src" -name __pycache__ -prune -exec rm -rf {} +
# --no-isolation: the build backend comes from the dev environment, not a fresh download.
"$BUILD_PYTHON" -m build --no-isolation --outdir "$WORK/dist" "$WORK/tree" >"$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; exit 1; }
wheel=$(ls "$WORK"/dist/loraens-*.whl)
echo "check_wheel: built $(basename "$wheel") and $(basename "$(ls "$WORK"/dist/*.tar.gz)")"

# Every non-Python file under src/loraens is package data the wheel must carry.
"$BUILD_PYTHON" - "$wheel" "$ROOT/src" <<'PY'
import sys
import zipfile
from pathlib import Path

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
src = Path(sys.argv[2])
# Only the package itself: an editable install leaves src/loraens.egg-info beside it.
package = src / "loraens"
wanted = {
    p.relative_to(src).as_posix()
    for p in package.rglob("*")
    if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
}
wanted |= {p.relative_to(src).as_posix() for p in package.rglob("*.py")}
missing = sorted(wanted - names)
if missing:
    sys.exit(f"check_wheel: the wheel lacks {missing}")
print(f"check_wheel: the wheel holds all {len(wanted)} files of src/loraens")
PY

"$PYTHON" -m venv "$WORK/venv"
BIN="$WORK/venv/bin"
# --no-compile: byte-compiling torch's thousands of modules would double the install time.
"$BIN/python" -m pip install --no-compile "$TORCH" "$wheel" >"$WORK/install.log" 2>&1 \
    || { cat "$WORK/install.log"; exit 1; }
grep -v "^WARNING: Location" "$WORK/install.log" | tail -n 2
"$BIN/python" -m pip list 2>/dev/null | grep -E "^(loraens|torch|transformers|peft) " || true

# Run from outside the checkout: only the installed wheel can be imported.
cd "$WORK"
"$BIN/python" -c "import loraens, sys; assert loraens.__file__.startswith(sys.prefix), loraens.__file__"
"$BIN/loraens" tasks >tasks.txt
head -n 3 tasks.txt
"$BIN/python" -m loraens --help >/dev/null
PYTHONPATH="$ROOT/tests" "$BIN/python" - <<'PY'
# The tests' tiny random model and synthetic questions (tests/helpers.py, run against the wheel).
from helpers import make_questions, tiny_llama, tiny_tokenizer

from loraens.data.files import write_questions_jsonl

tokenizer = tiny_tokenizer()
tiny_llama(len(tokenizer)).save_pretrained("tiny")
tokenizer.save_pretrained("tiny")
write_questions_jsonl(make_questions(16, seed=1), "train.jsonl")
write_questions_jsonl(make_questions(8, seed=2), "eval.jsonl")
PY
"$BIN/loraens" train --out run --model.name_or_path tiny --data.task null \
    --data.train_file train.jsonl --data.eval_file eval.jsonl --ensemble.members 2 \
    --optim.epochs 1 --optim.batch_size 8 --runtime.progress false --runtime.precision fp32
test -f run/README.md
"$BIN/loraens" export run exported
"$BIN/loraens" evaluate exported --file eval.jsonl --precision fp32
echo "check_wheel: ok"
