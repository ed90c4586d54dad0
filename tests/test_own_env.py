"""Your own environment: the README's route (an environment object passed to `main`, with no edit
of the algorithm files), dict observations with a privileged critic, early terminations and an
episode length other than 1000, and the errors a user meets on the way."""

import csv
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from brax.envs.base import Env as BraxEnv
from brax.envs.base import PipelineEnv
from brax.envs.base import State as BraxState
from brax.io import mjcf
from ml_collections import config_dict

import common
import running
import dppo
import fpo
import gorl_diffusion
import gorl_fm
import gorl_sac
import ppo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
from double_integrator import XML, DoubleIntegrator  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Stand-ins: the example's task as a Brax PipelineEnv, with a dict observation, and a pure-JAX
# task that terminates early
# ---------------------------------------------------------------------------------------------


class BraxDoubleIntegrator(PipelineEnv):
    """The example's task as a Brax `PipelineEnv` on the MJX backend."""

    def __init__(self):
        super().__init__(mjcf.loads(XML), backend="mjx", n_frames=4)

    def reset(self, rng):
        q = jax.random.uniform(rng, (1,), minval=-1.0, maxval=1.0)
        pipeline_state = self.pipeline_init(q, jnp.zeros(1))
        zero = jnp.zeros(())
        return BraxState(pipeline_state, self._obs(pipeline_state), zero, zero)

    def step(self, state, action):
        pipeline_state = self.pipeline_step(state.pipeline_state, action)
        x = pipeline_state.q[0]
        done = (jnp.abs(x) > 2.0).astype(jnp.float32)
        return state.replace(pipeline_state=pipeline_state, obs=self._obs(pipeline_state),
                             reward=1.0 - jnp.tanh(jnp.abs(x)), done=done)

    def _obs(self, pipeline_state):
        return jnp.concatenate([pipeline_state.q, pipeline_state.qd])


class PrivilegedDoubleIntegrator(DoubleIntegrator):
    """The example's task with a dict observation: the policy sees the position only, the critic
    also the velocity and the time (a privileged state, as Playground's locomotion tasks have)."""

    def reset(self, rng):
        state = super().reset(rng)
        return state.replace(obs=self._dict_obs(state.data), info={**state.info, "t": jnp.zeros(())})

    def step(self, state, action):
        state = super().step(state.replace(obs=state.obs["state"]), action)
        t = state.info["t"] + 1.0
        return state.replace(obs=self._dict_obs(state.data, t), info={**state.info, "t": t})

    def _dict_obs(self, data, t=0.0):
        return {"state": data.qpos, "privileged_state": jnp.concatenate([data.qpos, data.qvel, jnp.reshape(t, (1,))])}


class Countdown(BraxEnv):
    """Pure JAX. The observation is (steps taken, episode limit L); reward 1 per step; the episode
    terminates after L steps, L drawn from {5, 9, 400} at reset (400: never, the 300-step episode
    length truncates it). The config's episode length is 300."""

    LIMITS = jnp.array([5.0, 9.0, 400.0])

    def __init__(self):
        self._config = config_dict.create(episode_length=300)

    def reset(self, rng):
        limit = self.LIMITS[jax.random.randint(rng, (), 0, 3)]
        zero = jnp.zeros(())
        return BraxState(None, jnp.array([0.0, limit]), zero, zero, metrics={}, info={})

    def step(self, state, action):
        t = state.obs[0] + 1.0
        return state.replace(obs=jnp.array([t, state.obs[1]]), reward=jnp.ones(()),
                             done=(t >= state.obs[1]).astype(jnp.float32))

    @property
    def observation_size(self):
        return 2

    @property
    def action_size(self):
        return 1

    @property
    def backend(self):
        return "none"


# ---------------------------------------------------------------------------------------------
# The documented route: main(args, env) with no edit of the algorithm files
# ---------------------------------------------------------------------------------------------

TINY = {
    "ppo": dict(num_envs=8, batch_size=8, num_minibatches=2, unroll_length=5, num_epochs=1,
                total_timesteps=160, eval_every=80, num_eval_envs=4),
    "gorl_fm": dict(num_envs=8, batch_size=8, num_minibatches=2, unroll_length=5, num_epochs=1, stage_steps=(80, 80),
                    refine_episodes=4, refine_steps=20, refine_eval_every=10, refine_batch_size=64, refine_val_size=64,
                    eval_every=80, num_eval_envs=4, episode_length=20),
    "gorl_diffusion": dict(num_envs=8, batch_size=8, num_minibatches=2, unroll_length=5, num_epochs=1,
                           stage_steps=(80, 80), refine_episodes=4, refine_epochs=4, refine_batch_size=16, refine_eval_every=10,
                           eval_every=80, num_eval_envs=4, episode_length=20),
    "gorl_sac": dict(num_envs=4, stage_steps=(40, 40), chunk_length=10, batch_size=16, learning_starts=8,
                     buffer_size=400, refine_envs=2, refine_iterations=1, refine_batch_size=16, eval_every=40,
                     num_eval_envs=4, episode_length=20),
}
MODULES = {"ppo": ppo, "gorl_fm": gorl_fm, "gorl_diffusion": gorl_diffusion, "gorl_sac": gorl_sac, "fpo": fpo, "dppo": dppo}
TINY.update(fpo=TINY["ppo"], dppo=TINY["ppo"])


def train(algo, env, tmp_path, **extra):
    module = MODULES[algo]
    args = module.Args(env_name="DoubleIntegrator", runs_dir=str(tmp_path), **{**TINY[algo], **extra})
    module.main(args, env=env)
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), "DoubleIntegrator__*"))
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    return run_dir, rows, config


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "gorl_fm", "gorl_diffusion", "gorl_sac"])
@pytest.mark.parametrize("kind", ["playground", "brax"])
def test_your_own_environment_trains_through_main(algo, kind, tmp_path):
    env = DoubleIntegrator() if kind == "playground" else BraxDoubleIntegrator()
    run_dir, rows, config = train(algo, env, tmp_path)
    assert config["env_name"] == "DoubleIntegrator"
    # The environment's own episode length (the example's config: 200), unless a flag set it.
    expected_length = TINY[algo].get("episode_length") or (200 if kind == "playground" else common.EPISODE_LENGTH)
    assert config["episode_length"] == expected_length
    returns = [float(r["eval/return"]) for r in rows if r.get("eval/return")]
    assert returns and all(np.isfinite(returns))
    # Rewards are at most 1 per step, and no evaluation episode outlasts the episode length.
    assert max(returns) <= expected_length
    assert all(0 < float(r["eval/episode_length"]) <= expected_length for r in rows if r.get("eval/episode_length"))
    if algo != "ppo":  # one refinement between the two stages
        assert any(r.get("refine/seconds") for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "gorl_fm", "gorl_diffusion", "fpo", "dppo"])
def test_dict_observations_give_the_critic_the_privileged_state(algo, tmp_path):
    run_dir, rows, _ = train(algo, PrivilegedDoubleIntegrator(), tmp_path)
    gorl = algo.startswith("gorl")
    checkpoint = running.load_checkpoint(os.path.join(run_dir, "checkpoints", "stage1.npz" if gorl else "latest.npz"))
    params = checkpoint["params"]
    policy = params["encoder"] if gorl else params["actor"]
    # "state" (the position) is the policy's input; the flow policies also take the action and time.
    flow_inputs = 1 + common.TIME_EMBEDDING_SIZE if algo in ("fpo", "dppo") else 0
    assert policy[0]["w"].shape[0] == 1 + flow_inputs
    assert params["critic"][0]["w"].shape[0] == 3  # "privileged_state": position, velocity, time
    norm = checkpoint["norm"]  # one normalizer per entry, each with its own statistics
    assert set(norm) == {"state", "privileged_state"}
    assert norm["state"].mean.shape == (1,) and norm["privileged_state"].mean.shape == (3,)
    assert float(norm["state"].count) == float(norm["privileged_state"].count) > 0
    if gorl:  # the refined decoder saw the policy's "state" only
        assert checkpoint["decoder_norm"].mean.shape == (1,) and float(checkpoint["decoder_norm"].count) > 0
        assert checkpoint["decoder"][0]["w"].shape[0] == 1 + 1 + common.TIME_EMBEDDING_SIZE
    assert all(np.isfinite(float(r["eval/return"])) for r in rows if r.get("eval/return"))


def test_gorl_sac_rejects_dict_observations_with_a_message(tmp_path):
    args = gorl_sac.Args(env_name="DoubleIntegrator", runs_dir=str(tmp_path), **TINY["gorl_sac"])
    with pytest.raises(SystemExit, match="privileged_state"):
        gorl_sac.main(args, env=PrivilegedDoubleIntegrator())
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Early terminations and a 300-step episode length, through common.make_env's wrappers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def countdown():
    return common.make_env(Countdown())


def test_episode_length_comes_from_the_environment_config(countdown):
    assert countdown.episode_length == 300
    assert common.make_env(Countdown(), episode_length=50).episode_length == 50
    assert common.make_env(BraxDoubleIntegrator()).episode_length == common.EPISODE_LENGTH


def zero_action(obs, key):
    return jnp.zeros((obs.shape[0], 1))


def test_evaluation_stops_counting_at_the_first_episode_end(countdown):
    evaluate = jax.jit(common.make_evaluator(countdown, 64), static_argnums=0)
    out = evaluate(zero_action, jax.random.PRNGKey(0))
    # Each environment's return is its own episode's length: 5, 9, or 300 (truncated); the
    # restarted episodes after an early end are not counted.
    starts = jax.vmap(Countdown().reset)(jax.random.split(jax.random.PRNGKey(0), 64)).obs[:, 1]
    want = np.minimum(np.asarray(starts), 300.0)
    assert float(out["eval/return"]) == pytest.approx(want.mean())
    assert float(out["eval/episode_length"]) == pytest.approx(want.mean())


def test_refinement_collection_and_gae_on_early_terminations(countdown):
    data = jax.jit(lambda key: common.collect_episodes(
        countdown, lambda obs, key: (jnp.zeros((obs.shape[0], 1)), {}), key, 12, 12))(jax.random.PRNGKey(1))
    assert data["obs"].shape == (300, 12, 2)  # the environment's episode length, each column one start state
    limits = np.asarray(data["obs"][0, :, 1])
    assert set(limits.tolist()) <= {5.0, 9.0, 400.0} and len(set(limits.tolist())) > 1
    term, trunc = np.asarray(data["termination"]), np.asarray(data["truncation"])
    for e, limit in enumerate(limits):
        if limit < 300:  # terminates at every multiple of the limit, restarting from the same start state
            assert np.flatnonzero(term[:, e]).tolist() == list(range(int(limit) - 1, 300, int(limit)))
            assert trunc[:, e].sum() == 0
            np.testing.assert_array_equal(data["obs"][:, e, 1], limit)  # the same start state throughout
        else:  # the 300-step limit truncates it
            assert term[:, e].sum() == 0 and np.flatnonzero(trunc[:, e]).tolist() == [299]
    # GAE with a zero critic: the discounted number of steps left in the episode, cut at a
    # termination; at the truncation or the rollout's end, bootstrapped from V = 0 here too.
    advantages, targets = common.value_targets(lambda obs: jnp.zeros(obs.shape[:-1]), data, 1.0, 0.9, 1.0)
    for e, limit in enumerate(limits):
        left = np.asarray([min(int(limit) - 1 - t % int(limit), 299 - t) for t in range(300)])
        np.testing.assert_allclose(np.asarray(advantages[:, e]), (1 - 0.9 ** (left + 1)) / (1 - 0.9), rtol=1e-5)
    # The split keeps each start state's block whole.
    train, val = common.split_episodes({"obs": data["obs"]}, jax.random.PRNGKey(2), 0.25, countdown.episode_length)
    assert train["obs"].shape == (9 * 300, 2) and val["obs"].shape == (3 * 300, 2)


# ---------------------------------------------------------------------------------------------
# Errors, before anything compiles
# ---------------------------------------------------------------------------------------------


class NoStateEntry(DoubleIntegrator):
    def reset(self, rng):
        state = super().reset(rng)
        return state.replace(obs={"joints": state.obs, "goal": jnp.zeros(2)})


def test_a_dict_observation_without_state_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="goal, joints[\\s\\S]*\"state\""):
        common.make_env(NoStateEntry())
    with pytest.raises(ValueError, match="\"state\""):
        ppo.main(ppo.Args(env_name="Mine", runs_dir=str(tmp_path), **TINY["ppo"]), env=NoStateEntry())
    assert os.listdir(tmp_path) == []  # no run folder was made


def test_a_missing_menagerie_says_what_to_provide(monkeypatch):
    def failed_clone(name, config_overrides=None):
        raise subprocess.CalledProcessError(128, ["git", "clone"])

    monkeypatch.setattr(running.registry, "load", failed_clone)
    with pytest.raises(SystemExit) as error:
        ppo.make_env(ppo.Args(env_name="Go1JoystickFlatTerrain"))
    message = str(error.value)
    assert "Go1JoystickFlatTerrain" in message and "mujoco_menagerie" in message and "git clone" in message
    assert str(common.mjx_env.MENAGERIE_PATH) in message and "CalledProcessError" in message


def test_every_playground_task_name_is_accepted():
    for name in ("CartpoleBalance", "Go1JoystickFlatTerrain", "Go1Getup", "PandaPickCube"):
        assert running.env_name_check(name)[0], name


def test_an_actuator_range_other_than_the_unit_box_is_noted():
    assert running.action_range_notice(DoubleIntegrator()) is None  # ctrlrange [-1, 1]

    class Wide(DoubleIntegrator):
        def __init__(self):
            super().__init__()
            self._mj_model.actuator_ctrlrange[:] = [-3.0, 3.0]

    notice = running.action_range_notice(Wide())
    assert "[-1, 1]" in notice and "-3.0" in notice


def test_a_run_that_fails_before_its_first_iteration_leaves_no_folder(tmp_path):
    class Broken(DoubleIntegrator):
        def step(self, state, action):
            raise RuntimeError("a bug in step()")

    with pytest.raises(RuntimeError, match="a bug in step"):
        ppo.main(ppo.Args(env_name="Mine", runs_dir=str(tmp_path), **TINY["ppo"]), env=Broken())
    assert os.listdir(tmp_path) == []


def test_progress_shows_a_dash_until_a_training_episode_finishes():
    assert running.over_seeds(np.array([np.nan])) == "-"
    assert running.over_seeds(np.array([np.nan, np.nan]), ".2f") == "-"
    assert running.over_seeds(np.array([1.0, np.nan, 3.0])) == "2.0 [1.0, 3.0]"
