#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) with its environment made first, from the repository root:
#
#   bash benchmarks/gpu_check.sh                  # a machine with network: a venv with requirements.txt + jax[cuda12]
#   bash benchmarks/gpu_check.sh --wheels DIR     # no network, JAX with CUDA already in the image (e.g. Python 3.12,
#                                                 # JAX 0.11, CUDA 13): the other packages from the wheels in DIR
#                                                 # (make DIR on a machine with network: bash benchmarks/gpu_wheels.sh DIR)
#   bash benchmarks/gpu_check.sh [--wheels DIR] -- --budget 400   # arguments after -- go to gpu_check.py
#
# Every step has its own time limit; the installs together at most 4 minutes, the check itself 9 (its
# --budget). The report is benchmarks/results/gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=""
if [ "${1:-}" = "--wheels" ]; then wheels="$2"; shift 2; fi
[ "${1:-}" = "--" ] && shift

# A system CUDA on LD_LIBRARY_PATH can shadow the CUDA libraries the JAX wheels bring (Playground's advice).
unset LD_LIBRARY_PATH
export XLA_PYTHON_CLIENT_PREALLOCATE=false PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -n "$wheels" ]; then
    # The image's Python and JAX; the project's other packages installed from the folder, without
    # resolving (the image already holds numpy, scipy, flax, optax, ...).
    python=python3
    site=/tmp/gorl-site
    timeout 240 "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$wheels"/*.whl \
        || { echo "error: installing the wheels in $wheels failed"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    venv=.venv-gpu
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    python="$venv/bin/python"
    timeout 240 "$python" -m pip install -q -r requirements.txt "jax[cuda12]==0.8.2" \
        || { echo "error: pip install -r requirements.txt jax[cuda12]==0.8.2 failed"; exit 1; }
fi
exec timeout 600 "$python" benchmarks/gpu_check.py "$@"
