"""--num-seeds: several seeds in one process, and over several devices.

Each seed trained in a group must be the run that seed gives alone: the same evaluation returns,
seed by seed, up to float rounding. The runs go through the scripts' main() on the pure-JAX
stand-in task (tests/fake_env.py), so a whole run compiles in seconds; its dynamics contract,
so float rounding is not amplified the way a chaotic MJX task amplifies it over an episode.
The two-device tests run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2
(JAX fixes its device count when it starts).
"""

import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import common
import running
import gorl_fm
import ppo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

PPO = dict(env_name="CartpoleBalance", num_envs=4, batch_size=4, num_minibatches=2, unroll_length=7, num_epochs=2,
           actor_hidden=(16,), critic_hidden=(16,), total_timesteps=168, eval_every=56, num_eval_envs=4)
GORL_FM = dict(env_name="CartpoleBalance", num_envs=4, batch_size=4, num_minibatches=2, unroll_length=7,
               num_epochs=2, encoder_hidden=(16,), critic_hidden=(16,), decoder_hidden=(16,), stage_steps=(112, 112),
               eval_every=56, num_eval_envs=4, refine_envs=2, refine_episodes=2, refine_steps=20, refine_eval_every=10,
               refine_batch_size=500, refine_draws=2, refine_val_size=1000)


# Seed-by-seed equality to 1e-5 is a property of the CPU: on a GPU, batched (vmapped) and TF32
# matmuls round differently from a seed's run alone, and training amplifies it. On another
# backend these tests are skipped and test_the_seed_tests_pass_on_the_cpu runs them in a child
# process with JAX_PLATFORMS=cpu.
ON_CPU = jax.default_backend() == "cpu"
on_cpu = pytest.mark.skipif(not ON_CPU, reason="run on the CPU by test_the_seed_tests_pass_on_the_cpu")


def eval_returns(runs_dir) -> dict[int, list[float]]:
    """{seed: its evaluation returns, in step order} of every run folder under `runs_dir`
    (the refinement's check included, as refine/prior_latent_return)."""
    out = {}
    for run_dir in glob.glob(os.path.join(str(runs_dir), "*")):
        with open(os.path.join(run_dir, "config.json")) as f:
            seed = json.load(f)["seed"]
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        out[seed] = [float(r[k]) for r in rows for k in ("eval/return", "refine/prior_latent_return") if r.get(k)]
    return out


@pytest.fixture(scope="module")
def fake_task():
    from fake_env import FakeEnv

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "make_env", lambda *args, **kwargs: FakeEnv())
        yield


@pytest.fixture(scope="module")
def trained(fake_task, tmp_path_factory):
    """Runs made once for the module: `trained(algo, kind)` is the run folders' parent, kind
    "group" (seeds 3 and 4 in one process) or "alone" (seed 3, then seed 4, one run each)."""
    modules = {"ppo": (ppo, PPO), "gorl_fm": (gorl_fm, GORL_FM)}
    made = {}

    def get(algo, kind):
        if (algo, kind) not in made:
            module, flags = modules[algo]
            root = tmp_path_factory.mktemp(f"{algo}_{kind}")
            if kind == "group":
                module.main(module.Args(**flags, seed=3, num_seeds=2, runs_dir=str(root)))
            else:
                for seed in (3, 4):
                    module.main(module.Args(**flags, seed=seed, runs_dir=str(root)))
            made[algo, kind] = root
        return made[algo, kind]

    return get


def assert_same_runs(group: dict, alone: dict):
    assert sorted(group) == sorted(alone)
    for seed in group:
        assert len(group[seed]) == len(alone[seed]) > 0
        np.testing.assert_allclose(group[seed], alone[seed], rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")
    first, second = sorted(group)
    assert not np.allclose(group[first], group[second])  # the seeds differ: each got its own keys


@on_cpu
@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "gorl_fm"])
def test_two_seeds_in_one_process_are_two_single_seed_runs(algo, trained):
    group = trained(algo, "group")
    assert_same_runs(eval_returns(group), eval_returns(trained(algo, "alone")))
    if algo == "gorl_fm":  # each seed's own stage table
        assert len(glob.glob(str(group / "*" / "stages.md"))) == 2


@on_cpu
@pytest.mark.slow
def test_resume_of_a_group_resumes_every_seed(trained, tmp_path, capsys):
    shutil.copytree(trained("gorl_fm", "group"), tmp_path, dirs_exist_ok=True)
    before = eval_returns(tmp_path)
    run_dirs = sorted(glob.glob(str(tmp_path / "*")))
    for run_dir in run_dirs:  # interrupted inside stage 1 (after its evaluation at step 168), in both seeds
        os.remove(os.path.join(run_dir, "checkpoints", "stage1.npz"))
    capsys.readouterr()
    gorl_fm.main(gorl_fm.Args(resume=run_dirs[1]))  # either seed's folder names the group
    out = capsys.readouterr().out
    assert "resuming the 2 seeds trained together: 3, 4" in out and "resuming inside stage 1 at step 168" in out
    after = eval_returns(tmp_path)
    for run_dir in run_dirs:
        assert os.path.exists(os.path.join(run_dir, "checkpoints", "stage1.npz"))
    # Each seed continued its stage from its own checkpoint (environments included): the same
    # returns as the uninterrupted group (2 evaluations in stage 0, the refinement's check, 2 in stage 1).
    for seed in (3, 4):
        assert len(after[seed]) == len(before[seed]) == 5
        np.testing.assert_allclose(after[seed], before[seed], rtol=1e-5, err_msg=f"seed {seed}")
        assert np.all(np.isfinite(after[seed]))
    # Without the stage-1 checkpoint inside it, the group resumes after stage 0 and redoes its
    # refinement from the saved key: the same refined decoder, so the same prior-latent return.
    for run_dir in run_dirs:
        os.remove(os.path.join(run_dir, "checkpoints", "stage1.npz"))
        os.remove(os.path.join(run_dir, "checkpoints", "latest.npz"))
    gorl_fm.main(gorl_fm.Args(resume=run_dirs[0]))
    assert "resuming after stage 0" in capsys.readouterr().out
    again = eval_returns(tmp_path)
    for seed in (3, 4):
        np.testing.assert_allclose(again[seed][:3], before[seed][:3], rtol=1e-5, err_msg=f"seed {seed}")
    assert not np.allclose(after[3][:3], after[4][:3])


def test_device_layout():
    assert running.device_layout(4, 64, 1) is None
    assert running.device_layout(4, 64, 2) == "seeds" and running.device_layout(2, 64, 2) == "seeds"
    assert running.device_layout(1, 64, 2) == "envs" and running.device_layout(2, 64, 4) == "envs"
    with pytest.raises(SystemExit, match="--num-seeds 3 cannot be split evenly over 2 devices"):
        running.device_layout(3, 64, 2)
    with pytest.raises(SystemExit, match="--num-envs 6 is not a multiple of 4"):
        running.device_layout(2, 6, 4)
    with pytest.raises(SystemExit, match="--num-seeds must be at least 1"):
        ppo.validate(ppo.Args(num_seeds=0))


def test_seed_slices_and_stacks_round_trip():
    tree = {"w": np.arange(6.0).reshape(2, 3), "step": 5, "rows": [{"return": np.array([1.0, 2.0]), "stage": 0}]}
    parts = [running.seed_slice(tree, i) for i in range(2)]
    assert parts[1]["step"] == 5 and list(parts[1]["w"]) == [3.0, 4.0, 5.0] and parts[1]["rows"][0]["return"] == 2.0
    again = running.stack_seeds(parts, "checkpoint")
    np.testing.assert_array_equal(again["w"], tree["w"])
    np.testing.assert_array_equal(again["rows"][0]["return"], [1.0, 2.0])
    with pytest.raises(SystemExit, match="the seeds' stage1.npz disagree"):
        running.stack_seeds([dict(parts[0], step=5), dict(parts[1], step=6)], "stage1.npz")
    assert running.over_seeds(np.array([1.0])) == "1.0"
    assert running.over_seeds(np.array([1.0, 2.0, 6.0])) == "3.0 [1.0, 6.0]"


# Two forced CPU devices: the script runs in a fresh process and prints each run's returns.
TWO_DEVICES = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import jax
assert jax.device_count() == 2, jax.devices()
import common, gorl_fm, ppo
from fake_env import FakeEnv
common.make_env = lambda *args, **kwargs: FakeEnv()
module = {{"ppo": ppo, "gorl_fm": gorl_fm}}[sys.argv[1]]
module.main(module.Args(**json.loads(sys.argv[2])))
"""


def run_on_two_devices(algo: str, flags: dict):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    script = TWO_DEVICES.format(repo=REPO, tests=TESTS)
    return subprocess.run([sys.executable, "-c", script, algo, json.dumps(flags)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@on_cpu
@pytest.mark.slow
def test_two_devices_split_the_seeds_or_the_environments(trained, tmp_path):
    alone = eval_returns(trained("ppo", "alone"))
    # Two seeds on two devices: one seed on each.
    result = run_on_two_devices("ppo", dict(PPO, seed=3, num_seeds=2, runs_dir=str(tmp_path / "seeds")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 seed(s) on 2 devices, the seeds axis split" in result.stdout
    assert_same_runs(eval_returns(tmp_path / "seeds"), alone)
    # One seed on two devices: its 4 environments split 2 + 2.
    for seed in (3, 4):
        result = run_on_two_devices("ppo", dict(PPO, seed=seed, runs_dir=str(tmp_path / "envs")))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "1 seed(s) on 2 devices, the envs axis split" in result.stdout
    assert_same_runs(eval_returns(tmp_path / "envs"), alone)
    # GoRL's stage loop and refinement, seeds split.
    result = run_on_two_devices("gorl_fm", dict(GORL_FM, seed=3, num_seeds=2, runs_dir=str(tmp_path / "gorl")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_runs(eval_returns(tmp_path / "gorl"), eval_returns(trained("gorl_fm", "alone")))


@pytest.mark.parametrize("flags, message", [
    (dict(num_seeds=3), "--num-seeds 3 cannot be split evenly over 2 devices"),
    (dict(num_seeds=1, num_envs=3, batch_size=3), "--num-envs 3 is not a multiple of 2"),
])
def test_two_devices_reject_an_uneven_layout_before_compiling(flags, message, tmp_path):
    result = run_on_two_devices("ppo", dict(PPO, **flags, runs_dir=str(tmp_path / "runs")))
    assert result.returncode != 0 and message in result.stderr, result.stdout[-2000:] + result.stderr[-2000:]
    assert "compiling" not in result.stdout and not os.path.exists(tmp_path / "runs")  # nothing made


@on_cpu
@pytest.mark.slow
def test_distributed_processes_train_their_own_seeds(trained, tmp_path):
    """--distributed with 2 processes on this machine (JAX's multi-host runtime, coordinated on
    localhost): process p trains seeds 3 + 2p and 4 + 2p, each the run that seed gives alone."""
    script = TWO_DEVICES.replace("assert jax.device_count() == 2, jax.devices()", "")
    flags = json.dumps(dict(PPO, seed=3, num_seeds=2, distributed=True, runs_dir=str(tmp_path / "dist")))
    procs = []
    for p in (0, 1):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS="localhost:12361",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p))
        procs.append(subprocess.Popen([sys.executable, "-c", script.format(repo=REPO, tests=TESTS), "ppo", flags],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p, proc in enumerate(procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-2000:] + err[-2000:]
        assert f"process {p} of 2" in out
    ppo.main(ppo.Args(**PPO, seed=5, num_seeds=2, runs_dir=str(tmp_path / "alone")))
    dist, alone = eval_returns(tmp_path / "dist"), {**eval_returns(tmp_path / "alone"), **eval_returns(trained("ppo", "alone"))}
    assert sorted(dist) == [3, 4, 5, 6]
    for seed in dist:
        np.testing.assert_allclose(dist[seed], alone[seed], rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")


@pytest.mark.slow
@pytest.mark.skipif(ON_CPU, reason="on the CPU the tests above run in this process")
def test_the_seed_tests_pass_on_the_cpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
