"""Shared pytest setup.

Compiling MJX programs on a CPU takes tens of seconds. A persistent XLA compilation cache for
the session lets a test that runs the same program twice (e.g. a run and its resume) compile
it once. Set JAX_COMPILATION_CACHE_DIR to keep the cache between sessions.
"""

import os
import shutil
import tempfile

import jax

_session_cache_dir = None


def pytest_configure(config):
    global _session_cache_dir
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _session_cache_dir = tempfile.mkdtemp(prefix="jax-compilation-cache-")
        jax.config.update("jax_compilation_cache_dir", _session_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
    if _session_cache_dir is not None:
        shutil.rmtree(_session_cache_dir, ignore_errors=True)
