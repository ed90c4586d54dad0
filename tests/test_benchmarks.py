"""The benchmarks build the algorithm files' pieces themselves, so a change of those pieces
(a flag that became task-dependent, a new state type) can break them silently: check that
they still construct complete settings and, for the pure-JAX one, run end to end."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ppo  # noqa: E402
from benchmarks import brax_parity, multimodal, throughput  # noqa: E402


@pytest.mark.parametrize("make", [lambda: throughput.ppo_args(throughput.Args()),
                                  lambda: brax_parity.ppo_args(brax_parity.Args(), 1)],
                         ids=["throughput", "brax_parity"])
def test_benchmark_ppo_settings_leave_nothing_to_the_task(make):
    """Brax receives these values too: a task-dependent flag left at None would reach it as None."""
    args = make()
    assert all(getattr(args, name) is not None for name in ppo.TASK_DEFAULTS)
    ppo.validate(args)


@pytest.mark.slow
def test_multimodal_benchmark_runs_end_to_end(tmp_path):
    multimodal.main(["--seeds", "1", "--stage-steps", "1024", "1024", "--num-envs", "64", "--unroll-length", "4",
                     "--batch-size", "16", "--num-minibatches", "4", "--num-epochs", "1", "--refine-envs", "2",
                     "--refine-batch-size", "256", "--refine-steps", "100", "--num-samples", "200",
                     "--out-dir", str(tmp_path)])
    table = (tmp_path / "multimodal.md").read_text()
    assert "| GoRL-FM | 1 | S1 |" in table and "| PPO | 1 | S1 |" in table
    assert (tmp_path / "multimodal_density.png").stat().st_size > 1000
