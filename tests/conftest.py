"""Shared pytest setup.

Compiling MJX programs on a CPU takes tens of seconds. A persistent XLA compilation cache for
the session lets a test that runs the same program twice (e.g. a run and its resume) compile
it once. Set JAX_COMPILATION_CACHE_DIR to keep the cache between sessions.

On a GPU machine the tests check the same math as on the CPU: float32 matmuls at full
precision (a recent NVIDIA GPU's default is TF32, about 1e-3 relative, which the hand-computed
comparisons' tolerances are not meant for), and no preallocation of 75% of the GPU's memory,
so that the tests' child processes can start beside this one. Tests whose point is bitwise
equality across batch shapes or processes run on the CPU (tests/test_seeds.py, test_resume.py).
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

_session_cache_dir = None


def pytest_configure(config):
    global _session_cache_dir
    jax.config.update("jax_default_matmul_precision", "highest")
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _session_cache_dir = tempfile.mkdtemp(prefix="jax-compilation-cache-")
        jax.config.update("jax_compilation_cache_dir", _session_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
    if _session_cache_dir is not None:
        shutil.rmtree(_session_cache_dir, ignore_errors=True)
