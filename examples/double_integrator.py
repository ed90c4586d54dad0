"""Your own task, trained by GoRL: a 1-D double integrator written as a MuJoCo Playground `MjxEnv`.

A unit mass on a rail, pushed by one motor, must come to rest at x = 0 from a random start in
[-1, 1]; leaving [-2, 2] ends the episode early (a termination). Episodes last at most 200
steps of 0.04 s. Everything an algorithm file needs from an environment is here: `reset`,
`step`, `State` (obs, reward, done, metrics, info), actions in [-1, 1], and the config's
`episode_length`. Next to gorl_fm.py, common.py, running.py and requirements.txt:

    python double_integrator.py                      # GoRL-FM, about a minute on a CPU
    python double_integrator.py --algo ppo           # or ppo, gorl_diffusion, gorl_sac, fpo, dppo

(from a clone of the repository: `python examples/double_integrator.py`). Reference returns
(256 episodes): a zero action 106, a N(0, 1) action 75; GoRL-FM with the command above reaches
184-189 (seed 1, 128,000 steps, 49 s on a 2-core CPU, 2026-12-06).
"""

from __future__ import annotations

import importlib
import os
import sys

import jax
import jax.numpy as jnp
import mujoco
from ml_collections import config_dict
from mujoco import mjx
from mujoco_playground import MjxEnv, State
from mujoco_playground._src import mjx_env

XML = """
<mujoco model="double_integrator">
  <option timestep="0.01"/>
  <worldbody>
    <body name="mass">
      <joint name="x" type="slide" axis="1 0 0" damping="0.1"/>
      <geom type="sphere" size="0.05" mass="1" contype="0" conaffinity="0"/>
    </body>
  </worldbody>
  <actuator>
    <motor joint="x" gear="2" ctrlrange="-1 1" ctrllimited="true"/>
  </actuator>
</mujoco>
"""


def default_config() -> config_dict.ConfigDict:
    return config_dict.create(ctrl_dt=0.04, sim_dt=0.01, episode_length=200, impl="jax")


class DoubleIntegrator(MjxEnv):
    def __init__(self, config: config_dict.ConfigDict | None = None, config_overrides: dict | None = None):
        super().__init__(config or default_config(), config_overrides)
        self._mj_model = mujoco.MjModel.from_xml_string(XML)
        self._mj_model.opt.timestep = self.sim_dt
        self._mjx_model = mjx.put_model(self._mj_model, impl=self._config.impl)

    def reset(self, rng: jax.Array) -> State:
        qpos = jax.random.uniform(rng, (1,), minval=-1.0, maxval=1.0)
        data = mjx_env.make_data(self._mj_model, qpos=qpos, qvel=jnp.zeros(1), impl=self._mjx_model.impl.value)
        data = mjx.forward(self._mjx_model, data)
        zero = jnp.zeros(())
        return State(data, self._obs(data), zero, zero, {"distance": jnp.abs(qpos[0])}, {})

    def step(self, state: State, action: jax.Array) -> State:
        # The action is in [-1, 1] (the algorithms squash with tanh); the motor's ctrlrange is too.
        data = mjx_env.step(self._mjx_model, state.data, action, self.n_substeps)
        x, v = data.qpos[0], data.qvel[0]
        reward = 1.0 - jnp.tanh(jnp.abs(x)) - 0.1 * jnp.tanh(jnp.abs(v)) - 0.05 * jnp.sum(action**2)
        done = (jnp.abs(x) > 2.0).astype(jnp.float32)  # left the rail: a termination
        return state.replace(data=data, obs=self._obs(data), reward=reward, done=done,
                             metrics={"distance": jnp.abs(x)})

    def _obs(self, data) -> jax.Array:
        return jnp.concatenate([data.qpos, data.qvel])

    @property
    def xml_path(self) -> str:
        return "<in-memory double_integrator>"

    @property
    def action_size(self) -> int:
        return self._mj_model.nu

    @property
    def mj_model(self) -> mujoco.MjModel:
        return self._mj_model

    @property
    def mjx_model(self) -> mjx.Model:
        return self._mjx_model


# Small budgets that learn this task on a CPU in minutes (the algorithms' defaults are GPU-sized).
CPU_FLAGS = {
    "gorl_fm": dict(num_envs=64, batch_size=64, num_minibatches=4, unroll_length=10, num_epochs=4,
                    stage_steps=(76_800, 51_200), refine_episodes=64, refine_steps=500, refine_eval_every=250,
                    refine_batch_size=512, eval_every=25_600, num_eval_envs=32),
    "gorl_diffusion": dict(num_envs=64, batch_size=64, num_minibatches=4, unroll_length=10, num_epochs=4,
                           stage_steps=(76_800, 51_200), refine_episodes=64, refine_epochs=2,
                           eval_every=25_600, num_eval_envs=32),
    "ppo": dict(num_envs=64, batch_size=64, num_minibatches=4, unroll_length=10, num_epochs=4,
                total_timesteps=128_000, eval_every=25_600, num_eval_envs=32),
    "fpo": dict(num_envs=64, batch_size=64, num_minibatches=4, unroll_length=10, num_epochs=4,
                total_timesteps=128_000, eval_every=25_600, num_eval_envs=32),
    "dppo": dict(num_envs=64, batch_size=64, num_minibatches=4, unroll_length=10, num_epochs=4,
                 total_timesteps=128_000, eval_every=25_600, num_eval_envs=32),
    "gorl_sac": dict(num_envs=16, stage_steps=(20_000, 20_000), refine_envs=16, refine_iterations=1,
                     eval_every=10_000, num_eval_envs=32),
}


if __name__ == "__main__":
    import argparse

    import tyro

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--algo", default="gorl_fm", choices=list(CPU_FLAGS))
    known, rest = parser.parse_known_args()  # the rest are the algorithm's own flags
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # from the repository too
    module = importlib.import_module(known.algo)
    defaults = module.Args(env_name="DoubleIntegrator", **CPU_FLAGS[known.algo])
    module.main(tyro.cli(module.Args, default=defaults, args=rest), env=DoubleIntegrator())
