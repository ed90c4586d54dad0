#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh --wheels DIR installs on a machine without network whose image
# already has Python 3.12 and JAX with CUDA (and numpy, scipy, flax, optax, absl-py, etils, lxml, ...):
# the project's other packages, for CPython 3.12 on x86-64 Linux, about 35 MB. MuJoCo Warp (warp-lang,
# 150 MB) is left out: Playground imports it only when present, and --impl jax (MJX) does not need it.
#
#   bash benchmarks/gpu_wheels.sh DIR
set -euo pipefail
dir="${1:?usage: bash benchmarks/gpu_wheels.sh DIR}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" \
    mujoco==4.0.0 mujoco-core==4.0.0 mujoco-studio==4.0.0 mujoco-mjx==3.17.0 playground==0.2.0 brax==0.14.2 \
    tyro==1.0.17 docstring-parser typeguard tensorboardX==2.6.5 trimesh ml-collections jaxopt glfw
du -sh "$dir"
