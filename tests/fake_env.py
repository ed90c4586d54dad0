"""A pure-JAX stand-in for `common.make_env`'s batched task, for tests of the training wiring.

It has what `common.rollout`, `common.redraw_start_states` and the training iterations use:
`reset(keys)`, `step(state, pre_squash_action)`, a Playground `State` whose info carries
`truncation`, `next_obs`, `episode_metrics.sum_reward` and the auto-reset cache. Compiling it
takes a fraction of a second, where an MJX task takes tens of seconds on a CPU.
Dynamics: obs' = 0.9 obs + 0.5 tanh(a) on the first `action_size` coordinates; reward
1 - mean(obs'^2); episodes of `episode_length` steps, ended by truncation, then auto-reset.
"""

import jax
import jax.numpy as jnp
from mujoco_playground._src.mjx_env import State


class FakeEnv:
    observation_size = 3
    action_size = 2

    def __init__(self, episode_length: int = 7):
        self.episode_length = episode_length

    def reset(self, keys):
        obs = jax.vmap(lambda k: jax.random.normal(k, (self.observation_size,)))(keys)
        zeros = jnp.zeros(keys.shape[0])
        info = {"steps": zeros, "truncation": zeros, "next_obs": obs, "episode_metrics": {"sum_reward": zeros},
                "AutoResetWrapper_first_obs": obs, "AutoResetWrapper_first_data": obs}
        return State(data=obs, obs=obs, reward=zeros, done=zeros, metrics={}, info=info)

    def step(self, state, action):
        push = jnp.pad(0.5 * jnp.tanh(action), ((0, 0), (0, self.observation_size - self.action_size)))
        obs = 0.9 * state.obs + push
        reward = 1.0 - jnp.mean(obs**2, axis=-1)
        steps = state.info["steps"] + 1
        done = (steps >= self.episode_length).astype(jnp.float32)
        # As Brax's EpisodeWrapper: the sum restarts on the step after an episode's end.
        previous = jnp.where(state.done > 0, 0.0, state.info["episode_metrics"]["sum_reward"])
        info = dict(state.info, truncation=done, next_obs=obs, steps=jnp.where(done > 0, 0.0, steps),
                    episode_metrics={"sum_reward": previous + reward})
        first = state.info["AutoResetWrapper_first_obs"]
        obs_after = jnp.where(done[:, None] > 0, first, obs)
        return state.replace(data=obs_after, obs=obs_after, reward=reward, done=done, info=info)
