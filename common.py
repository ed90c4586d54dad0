"""The shared mathematics of every algorithm in this repository, in reading order.

Environments (MuJoCo Playground's tasks in MJX, or your own), the running observation
normalizer, pure-function MLPs, diagonal-Gaussian math, the rollout scan, GAE, the PPO
family's minibatch targets and minibatch SGD, the decoder fit of a refinement, and the
deterministic evaluation. How a run is run (flag checks, task settings, run folders, logging,
checkpoints, seeds and devices, progress) is in `running.py`.

An algorithm file imports this module and `running.py` and nothing else of the repository, so
an algorithm file with `common.py` and `running.py` can be copied anywhere.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from brax.envs.wrappers import training as brax_wrappers
from mujoco_playground import wrapper as playground_wrapper
from mujoco_playground._src import mjx_env

import running

# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------

EPISODE_LENGTH = 1000


def make_env(env, impl: str = "jax", episode_length: int | None = None):
    """A batched task: auto-reset, episode bookkeeping, tanh-squashed actions.

    `env`: a MuJoCo Playground task name (any of `playground_env_names()`), or an environment
    object: a Playground `MjxEnv` (yours too) or a Brax `Env` / `PipelineEnv`. The contract is
    theirs: `reset(key) -> state`, `step(state, action) -> state` with `state.obs` (an array,
    or a dict with a "state" entry and optionally a "privileged_state" entry for the critic),
    `state.reward`, `state.done` (1 at a termination) and `state.info`; actions in [-1, 1].

    `reset` of the result takes a batch of keys, `step` a batch of *pre-squash* actions `a`; the
    environment receives `tanh(a)`. Episodes end after `episode_length` steps (None: the
    environment config's `episode_length`, else 1000) as a truncation (`info["truncation"]` 1,
    `done` 1); the task's own early termination is a terminal (`done` 1, `truncation` 0).
    Auto-reset then replaces the observation with the new episode's first one, so the true last
    observation is kept in `info["next_obs"]` (equal to `obs` on every other step). The result's
    `episode_length` attribute is the length it applies.
    """
    if isinstance(env, str):
        env = running.load_playground_env(env, impl)
    else:
        running.check_environment(env)  # clear errors for a user's environment, before compiling
    if episode_length is None:
        episode_length = getattr(getattr(env, "_config", None), "episode_length", None) or EPISODE_LENGTH
    # Playground's auto-reset keeps MJX `data`; Brax's keeps `pipeline_state`.
    auto_reset = (playground_wrapper.BraxAutoResetWrapper if isinstance(env, mjx_env.MjxEnv)
                  else brax_wrappers.AutoResetWrapper)
    env = brax_wrappers.VmapWrapper(env)
    env = brax_wrappers.EpisodeWrapper(env, episode_length, action_repeat=1)
    env = _KeepNextObs(env)
    env = _SquashAction(auto_reset(env))
    env.episode_length = int(episode_length)
    return env


def observation_sizes(size) -> tuple[int, int]:
    """(policy input size, critic input size) of an environment's `observation_size`: of "state"
    and "privileged_state" (else "state") for a dict observation, else the array's size."""
    if not isinstance(size, dict):
        return int(size), int(size)
    flat = lambda shape: int(np.prod(shape))  # noqa: E731
    return flat(size["state"]), flat(size.get("privileged_state", size["state"]))


def policy_input(obs):
    """The policy's (actor's, encoder's, decoder's) part of an observation."""
    return obs["state"] if isinstance(obs, dict) else obs


def critic_input(obs):
    """The critic's part of an observation: the privileged state where the task has one."""
    return obs.get("privileged_state", obs["state"]) if isinstance(obs, dict) else obs


class _KeepNextObs(playground_wrapper.Wrapper):
    """Stores the observation the step produced before auto-reset can overwrite it."""

    def reset(self, rng):
        state = self.env.reset(rng)
        state.info["next_obs"] = state.obs
        return state

    def step(self, state, action):
        state = self.env.step(state, action)
        state.info["next_obs"] = state.obs
        return state


class _SquashAction(playground_wrapper.Wrapper):
    """Policies act in the unbounded pre-squash space; the task's bounds are [-1, 1]."""

    def step(self, state, action):
        return self.env.step(state, jnp.tanh(action))


def reset_envs(env, key: jax.Array, num_envs: int):
    return env.reset(jax.random.split(key, num_envs))


# Where the auto-reset wrappers cache the state an environment restarts from after `done`:
# Playground's BraxAutoResetWrapper (DMC tasks) and Brax's AutoResetWrapper (Brax's Gym tasks).
START_STATE_KEYS = ("AutoResetWrapper_first_data", "AutoResetWrapper_first_obs", "first_pipeline_state", "first_obs")


def redraw_start_states(env, env_state, key: jax.Array):
    """Give every environment a freshly drawn start state for its next episode.

    The auto-reset wrappers restart a finished episode from the state cached at the last
    `reset`, so without this a run with 64 environments sees 64 start states in its whole
    life. Brax's PPO trainer re-resets all environments between training epochs
    (`num_resets_per_eval`), which cuts the episodes in progress; redrawing only the cache
    gives the same diversity and lets running episodes finish. Cost: one `reset` of the batch.
    """
    num_envs = env_state.reward.shape[0]
    fresh = env.reset(jax.random.split(key, num_envs))
    info = dict(env_state.info)
    for name in START_STATE_KEYS:
        if name in info:
            info[name] = fresh.info[name]
    return env_state.replace(info=info)


# ---------------------------------------------------------------------------------------------
# Observation normalization: running mean and variance, Chan et al.'s parallel update
# ---------------------------------------------------------------------------------------------


class Normalizer(NamedTuple):
    count: jax.Array  # number of observations seen (float, to combine batches exactly)
    mean: jax.Array
    m2: jax.Array  # sum of squared deviations from the mean


def normalizer_init(size) -> Normalizer:
    """Empty statistics for observations of `size`; for a dict observation (`size` a dict of
    shapes), a dict of them: each entry keeps its own statistics."""
    if isinstance(size, dict):
        return {k: normalizer_init(int(np.prod(v))) for k, v in size.items()}
    return Normalizer(jnp.zeros(()), jnp.zeros(size), jnp.zeros(size))


def normalizer_update(norm: Normalizer, batch: jax.Array, keep_variance=True) -> Normalizer:
    """Merge a batch (any leading shape) into the statistics without summing raw squares.
    keep_variance False (or an array 0) is the release's `legacy_batch_only` (GoRL-FM on FishSwim,
    GoRL-Diffusion's stage 0 on HopperStand): the squared deviations of earlier batches are
    dropped while the count keeps growing, so the std shrinks."""
    if isinstance(norm, dict):
        return {k: normalizer_update(norm[k], batch[k], keep_variance) for k in norm}
    batch = batch.reshape(-1, norm.mean.shape[-1])
    n_b = batch.shape[0]
    mean_b = batch.mean(axis=0)
    m2_b = ((batch - mean_b) ** 2).sum(axis=0)
    count = norm.count + n_b
    delta = mean_b - norm.mean
    mean = norm.mean + delta * n_b / count
    m2 = keep_variance * norm.m2 + m2_b + delta**2 * norm.count * n_b / count
    return Normalizer(count, mean, m2)


def normalize(norm: Normalizer, obs: jax.Array, eps: float = 1e-8) -> jax.Array:
    if isinstance(norm, dict):
        return {k: normalize(norm[k], obs[k], eps) for k in norm}
    var = norm.m2 / jnp.maximum(norm.count, 1.0)
    # Before any data the statistics are (0, 0): pass observations through unchanged.
    std = jnp.where(norm.count > 0, jnp.sqrt(var + eps), 1.0)
    return (obs - norm.mean) / std


# ---------------------------------------------------------------------------------------------
# Networks: pure functions over parameter pytrees
# ---------------------------------------------------------------------------------------------


def mlp_init(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
    """Layers `sizes[0] -> ... -> sizes[-1]`; LeCun-uniform weights, zero biases."""
    params = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        bound = math.sqrt(3.0 / n_in)
        params.append(
            {"w": jax.random.uniform(k, (n_in, n_out), minval=-bound, maxval=bound), "b": jnp.zeros(n_out)}
        )
    return params


def mlp_apply(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    """SiLU hidden layers, linear output."""
    for layer in params[:-1]:
        x = jax.nn.silu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


TIME_EMBEDDING_SIZE = 8


def time_embedding(t: jax.Array) -> jax.Array:
    """Sinusoidal features of a flow time or diffusion step t in [0, 1]: [...] -> [..., 8].

    Periods 2, 1, 1/2, 1/4: the coarse terms tell early from late, the finest still separates
    neighbouring steps of a 10-step sampler.
    """
    angles = t[..., None] * (jnp.pi * 2.0 ** jnp.arange(TIME_EMBEDDING_SIZE // 2))
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def cosine_alpha_bar(num_steps: int, s: float = 0.008) -> np.ndarray:
    """alpha_bar_k, k = 0..T, of the cosine schedule (Nichol & Dhariwal, 2021), in float64.

    alpha_bar(k) = f(k) / f(0), f(k) = cos^2(((k / T + s) / (1 + s)) pi / 2), with the betas
    capped at 0.999 (f(T) = 0 would leave no signal at k = T); alpha_bar_0 = 1.
    """
    k = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((k + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    return np.concatenate([[1.0], np.cumprod(1.0 - betas)])


# ---------------------------------------------------------------------------------------------
# Diagonal Gaussian
# ---------------------------------------------------------------------------------------------

MIN_SCALE, MAX_SCALE = 1e-3, 10.0


def gaussian_from_output(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a network output into mean and scale = softplus(.) + 1e-3, clipped to [1e-3, 10]."""
    mean, raw_scale = jnp.split(out, 2, axis=-1)
    scale = jnp.clip(jax.nn.softplus(raw_scale) + MIN_SCALE, MIN_SCALE, MAX_SCALE)
    return mean, scale


def unit_scale_bias() -> float:
    """The raw-scale bias b with softplus(b) + 1e-3 = 1: a zero-weight layer then gives scale 1."""
    target = 1.0 - MIN_SCALE
    return float(np.log(np.expm1(target)))


def gaussian_log_prob(x: jax.Array, mean: jax.Array, scale: jax.Array) -> jax.Array:
    """log N(x; mean, diag(scale^2)), summed over the last axis."""
    z = (x - mean) / scale
    return jnp.sum(-0.5 * z**2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def gaussian_entropy(scale: jax.Array) -> jax.Array:
    return jnp.sum(0.5 + 0.5 * jnp.log(2 * jnp.pi) + jnp.log(scale), axis=-1)


def kl_to_standard_normal(mean: jax.Array, scale: jax.Array) -> jax.Array:
    """KL(N(mean, scale^2) || N(0, I)) = 0.5 * sum(mean^2 + scale^2 - 1 - 2 log scale)."""
    return 0.5 * jnp.sum(mean**2 + scale**2 - 1.0 - 2.0 * jnp.log(scale), axis=-1)


# ---------------------------------------------------------------------------------------------
# GoRL pieces shared by its decoders: latent regularizer, decoder targets
# ---------------------------------------------------------------------------------------------


def latent_regularizer(mean, scale, kind: str):
    """kl: KL(N(mean, scale^2) || N(0, I)) in closed form, averaged over states (Eq. 3).
    l2: the released code's stand-in mean(mean^2) + mean(scale^2), minimized at scale 0."""
    if kind == "l2":
        return jnp.mean(mean**2) + jnp.mean(scale**2)
    return kl_to_standard_normal(mean, scale).mean()


def regression_targets(decoder_output, action_semantics: str, clip: float):
    """What the decoder is fitted to: its own output in the rollout (the pre-squash action, or the
    environment's action when bounded), clipped to [-clip, clip] (0: no clip) as released, so
    that a few saturated pre-tanh actions do not dominate the squared error."""
    target = jnp.clip(decoder_output, -1.0, 1.0) if action_semantics == "bounded" else decoder_output
    return jnp.clip(target, -clip, clip) if clip > 0 else target


def env_action(a, action_semantics: str):
    """The pre-squash action the environment (which applies tanh) receives for decoder output a.

    pre_squash: a itself. bounded: the decoder's output is the environment's action; clipped to
    [-1, 1] and passed through arctanh so that the environment's tanh gives it back.
    """
    if action_semantics == "bounded":
        return jnp.arctanh(jnp.clip(a, -BOUND, BOUND))
    return a


BOUND = 1.0 - 1e-6  # tanh(arctanh(BOUND)) == BOUND in float32


# ---------------------------------------------------------------------------------------------
# Rollouts and advantages
# ---------------------------------------------------------------------------------------------


def rollout(env, env_state, policy: Callable, key: jax.Array, num_steps: int, fresh_start_states: bool = False):
    """Run `policy(obs, key) -> (pre_squash_action, extras)` for `num_steps` steps in a scan.

    Returns the final environment state and a dict of [num_steps, num_envs, ...] arrays:
    obs, next_obs (the true next observation, also at a truncation), action, reward,
    termination, truncation, episode_done, episode_return (valid where episode_done), and
    whatever the policy put in `extras`. With `fresh_start_states`, episodes that begin
    during this rollout start from newly drawn states (`redraw_start_states`).
    """
    if fresh_start_states:
        key, k_starts = jax.random.split(key)
        env_state = redraw_start_states(env, env_state, k_starts)

    def step(state, key):
        action, extras = policy(state.obs, key)
        next_state = env.step(state, action)
        truncation = next_state.info["truncation"]
        transition = {
            "obs": state.obs,
            "next_obs": next_state.info["next_obs"],
            "action": action,
            "reward": next_state.reward,
            "termination": next_state.done * (1.0 - truncation),
            "truncation": truncation,
            "episode_done": next_state.done,
            "episode_return": next_state.info["episode_metrics"]["sum_reward"],
            **extras,
        }
        return next_state, transition

    return jax.lax.scan(step, env_state, jax.random.split(key, num_steps))


def collect_episodes(env, policy: Callable, key: jax.Array, num_episodes: int, num_envs: int,
                     episode_length: int | None = None) -> dict:
    """`num_episodes` full episodes of `policy`, each from its own freshly drawn start state.

    The episodes run `num_envs` at a time (`num_envs` divides `num_episodes`): every batch
    resets its environments with a new key and runs `episode_length` steps (None: the
    environment's) in each, so no episode restarts from a start state the auto-reset cached.
    A task that terminates early restarts the episode from the same start state and runs it
    until the block's end: every step is still the policy's, and the block is still one start
    state's data (`split_episodes` keeps blocks whole). One batch of all the episodes is one
    rollout, the fewest sequential steps; smaller batches trade time for memory. Returns
    `rollout`'s arrays as [episode_length, num_episodes, ...].
    """
    episode_length = episode_length or env.episode_length

    def one_batch(key):
        k_reset, k_rollout = jax.random.split(key)
        _, data = rollout(env, reset_envs(env, k_reset, num_envs), policy, k_rollout, episode_length)
        return data

    data = jax.lax.map(one_batch, jax.random.split(key, num_episodes // num_envs))
    # [batches, T, num_envs, ...] -> [T, batches * num_envs, ...]
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:]), data)


def completed_episode_return(data: dict) -> tuple[jax.Array, jax.Array]:
    """Mean return of the episodes that ended inside a rollout, and how many there were."""
    done = data["episode_done"]
    n = done.sum()
    return jnp.where(n > 0, (data["episode_return"] * done).sum() / jnp.maximum(n, 1), jnp.nan), n


def gae(rewards: jax.Array, values: jax.Array, next_values: jax.Array, terminations: jax.Array,
        episode_dones: jax.Array, discount: float, lam: float) -> jax.Array:
    """Generalized advantage estimates over the leading (time) axis.

    `next_values` are the values of the true next observations, so a truncated episode is
    bootstrapped from its real last state; only a termination cuts the bootstrap. Any episode
    end (termination or truncation) stops the lambda-recursion, because the next row belongs
    to a new episode.
    """
    deltas = rewards + discount * (1.0 - terminations) * next_values - values

    def backward(advantage, x):
        delta, done = x
        advantage = delta + discount * lam * (1.0 - done) * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(deltas[0]), (deltas, episode_dones), reverse=True)
    return advantages


def gae_release(rewards: jax.Array, values: jax.Array, next_values: jax.Array, terminations: jax.Array,
                truncations: jax.Array, discount: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Advantages and value targets as Brax's `compute_gae` (and the FPO code the release runs)
    computes them along the leading (time) axis; returns (advantages, targets).

    Two differences from `gae`: a truncated step gets advantage 0 and target V (it is left out
    of both losses, not bootstrapped), and the policy's advantage is the one-step form
    r + gamma * target(t+1) - V(t) (IMPALA's), where `gae`'s is the lambda-return's.
    `next_values` stand for Brax's values[1:] and bootstrap value: they agree wherever Brax's
    are not multiplied by 0 (a termination or a masked truncation).
    """
    mask = 1.0 - truncations
    deltas = (rewards + discount * (1.0 - terminations) * next_values - values) * mask

    def backward(acc, x):
        delta, termination, keep = x
        acc = delta + discount * lam * (1.0 - termination) * keep * acc
        return acc, acc

    _, acc = jax.lax.scan(backward, jnp.zeros_like(deltas[0]), (deltas, terminations, mask), reverse=True)
    targets = acc + values
    next_targets = jnp.concatenate([targets[1:], next_values[-1:]], axis=0)
    advantages = (rewards + discount * (1.0 - terminations) * next_targets - values) * mask
    return advantages, targets


def advantages_and_targets(
    values: jax.Array, next_values: jax.Array, data: dict, reward_scaling: float, discount: float,
    lam: float, form: str = "standard",
) -> tuple[jax.Array, jax.Array]:
    """Advantages and value targets of time-major `data` (rewards, terminations, ...) given the
    critic's values of its observations and of its true next observations.

    form "standard": GAE(lambda) (`gae`), target = advantage + value; "release": `gae_release`.
    """
    rewards = data["reward"] * reward_scaling
    if form == "release":
        return gae_release(rewards, values, next_values, data["termination"], data["truncation"], discount, lam)
    advantages = gae(rewards, values, next_values, data["termination"], data["episode_done"], discount, lam)
    return advantages, advantages + values


def value_targets(
    value_fn: Callable, data: dict, reward_scaling: float, discount: float, lam: float, form: str = "standard"
) -> tuple[jax.Array, jax.Array]:
    """GAE advantages and value targets of a rollout, given `value_fn(raw_observations) ->
    values` (normalization is the caller's); `form` as in `advantages_and_targets`."""
    return advantages_and_targets(
        value_fn(data["obs"]), value_fn(data["next_obs"]), data, reward_scaling, discount, lam, form
    )


def to_sequences(x: jax.Array, unroll_length: int) -> jax.Array:
    """Rollout arrays [T, num_envs, ...] cut into [T // unroll_length * num_envs, unroll_length,
    ...] consecutive-step sequences (Brax's unrolls), each within one environment."""
    T, n = x.shape[:2]
    x = x.reshape(T // unroll_length, unroll_length, n, *x.shape[2:])
    return jnp.moveaxis(x, 2, 1).reshape(-1, unroll_length, *x.shape[3:])


# ---------------------------------------------------------------------------------------------
# The PPO family's epochs data and per-minibatch targets (Gaussian PPO, FPO, DPPO, GoRL's latent PPO)
# ---------------------------------------------------------------------------------------------


def ppo_epochs_data(data: dict, norm, critic: Callable, args, **fields) -> dict:
    """What the epochs of a PPO-family update train on, from a rollout's [T, num_envs, ...] arrays.

    Observations normalized with `norm`, the policy's `fields` (actions, log-probabilities, ...),
    and the value targets' ingredients: with --advantages rollout, GAE advantages and targets
    over each environment's whole rollout, from `critic` (normalized observations -> values)
    before the epochs; with --advantages minibatch (Brax's and the release's), the rewards, episode
    ends and next observations, for `minibatch_targets` to run GAE with the current critic.
    Cut into whole unroll_length sequences (--minibatch-unit sequence, Brax's) or single steps.
    """
    batch = {"obs": normalize(norm, data["obs"]), **fields}
    next_obs = normalize(norm, data["next_obs"])
    if args.advantages == "rollout":
        batch["advantage"], batch["target"] = advantages_and_targets(
            critic(batch["obs"]), critic(next_obs), data, args.reward_scaling, args.discount, args.gae_lambda,
            args.gae_form)
    else:
        batch.update(next_obs=next_obs, **{k: data[k] for k in ("reward", "termination", "truncation", "episode_done")})
    if args.minibatch_unit == "sequence":
        return jax.tree.map(lambda x: to_sequences(x, args.unroll_length), batch)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)


def minibatch_targets(batch: dict, values: jax.Array, critic: Callable, args) -> tuple[jax.Array, jax.Array, dict]:
    """(advantages normalized over the minibatch (Brax's normalize_advantage), value targets,
    metrics) of one minibatch of `ppo_epochs_data` (sequences arrive flattened, `minibatch_sgd`'s
    `flatten`), given the current critic's `values` of its observations. With --advantages
    minibatch, GAE runs here along each sequence with the current critic, so advantages and
    targets are refreshed at every epoch."""
    if args.advantages == "minibatch":
        # [sequences * steps, ...] -> time-major [steps, sequences, ...] and back.
        time_major = lambda x: jnp.swapaxes(x.reshape(-1, args.unroll_length, *x.shape[1:]), 0, 1)  # noqa: E731
        flat = lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])  # noqa: E731
        values_tm = time_major(values)
        if args.gae_form == "release":
            # Brax's: the next row's value, the true last observation's at the sequence's end. They
            # differ from V(next_obs) only where an episode ended, where this form multiplies them
            # by 0, and they cost one critic call on a row per sequence instead of on every row.
            last = critic(jax.tree.map(lambda x: time_major(x)[-1], batch["next_obs"]))
            next_values = jnp.concatenate([values_tm[1:], last[None]], axis=0)
        else:
            next_values = time_major(critic(batch["next_obs"]))
        advantage, target = jax.lax.stop_gradient(jax.tree.map(flat, advantages_and_targets(
            values_tm, next_values, jax.tree.map(time_major, batch),
            args.reward_scaling, args.discount, args.gae_lambda, args.gae_form)))
    else:
        advantage, target = batch["advantage"], batch["target"]
    normalized = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    # How much of the targets the critic explains, minibatch by minibatch through the epochs.
    return normalized, target, {"critic/explained_variance": explained_variance(jax.lax.stop_gradient(values), target)}


def clipped_surrogate(log_ratio: jax.Array, advantages: jax.Array, clip_eps: float):
    """PPO's clipped objective as a loss (Schulman et al., 2017, Eq. 7), advantages as given.

    Returns the loss, the fraction of samples whose ratio was clipped, and the approximate KL
    divergence of the old policy from the new one, mean((r - 1) - log r) (Schulman's k3
    estimator: non-negative, exactly 0 at r = 1).
    """
    ratio = jnp.exp(log_ratio)
    surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    clip_fraction = jnp.mean(jnp.abs(ratio - 1.0) > clip_eps)
    approx_kl = jnp.mean((ratio - 1.0) - log_ratio)
    return -surrogate.mean(), clip_fraction, approx_kl


def explained_variance(values: jax.Array, targets: jax.Array) -> jax.Array:
    """1 - Var[targets - values] / Var[targets]: 1 for a perfect critic, 0 for a constant one."""
    return 1.0 - jnp.var(targets - values) / (jnp.var(targets) + 1e-8)


def minibatch_sgd(update: Callable, carry: Any, data: dict, key: jax.Array, num_epochs: int, num_minibatches: int,
                  flatten: bool = False):
    """`num_epochs` passes over `data` (leading axis = samples) in shuffled minibatches.

    `update(carry, minibatch) -> (carry, metrics)`; returns the final carry and the metrics
    averaged over every minibatch step. With `flatten`, the samples are sequences
    [samples, steps, ...], shuffled whole, and each minibatch reaches `update` as
    [sequences * steps, ...]: the networks then see 2-D inputs, whose gradients run about 1.5x
    faster on a CPU than those of [sequences, steps, features] inputs.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    size = n // num_minibatches

    def epoch(carry, key):
        perm = jax.random.permutation(key, n)[: size * num_minibatches].reshape(num_minibatches, size)
        minibatches = jax.tree.map(lambda x: x[perm], data)
        if flatten:
            minibatches = jax.tree.map(lambda x: x.reshape(num_minibatches, -1, *x.shape[3:]), minibatches)
        return jax.lax.scan(update, carry, minibatches)

    carry, metrics = jax.lax.scan(epoch, carry, jax.random.split(key, num_epochs))
    return carry, jax.tree.map(jnp.mean, metrics)


# ---------------------------------------------------------------------------------------------
# Decoder refinement data and training (the released protocol, shared by the GoRL decoders)
# ---------------------------------------------------------------------------------------------


def split_episodes(data: dict, key: jax.Array, val_fraction: float, episode_length: int = EPISODE_LENGTH):
    """Split a rollout's arrays [T, num_envs, ...] into (train, validation) by whole episodes.

    An episode is a block of `episode_length` consecutive steps of one environment, from one
    start state (`collect_episodes`; on a task that terminates early, the block also holds the
    episode restarted from that start state). `max(1, int(n * val_fraction))`
    of the n episodes, chosen at random, are held out; both parts come back flattened to
    [transitions, ...]. Holding out episodes, not transitions, keeps correlated neighbouring
    steps of one episode from sitting on both sides of the split.
    """
    num_steps, num_envs = jax.tree.leaves(data)[0].shape[:2]
    per_env = num_steps // episode_length
    num_episodes = per_env * num_envs
    num_val = max(1, int(num_episodes * val_fraction))

    def episodes(x):  # [per_env * L, E, ...] -> [per_env * E, L, ...]
        x = x.reshape(per_env, episode_length, num_envs, *x.shape[2:])
        return jnp.swapaxes(x, 1, 2).reshape(num_episodes, episode_length, *x.shape[3:])

    order = jax.random.permutation(key, num_episodes)
    take = lambda ids: jax.tree.map(lambda x: episodes(x)[ids].reshape(-1, *x.shape[2:]), data)  # noqa: E731
    return take(order[num_val:]), take(order[:num_val])


def fit_keep_best(loss_fn: Callable, val_fn: Callable, params: Any, optimizer, train: dict, key: jax.Array, *,
                  num_steps: int, batch_size: int, eval_every: int):
    """`num_steps` Adam steps on `loss_fn(params, batch, key)`, each on `batch_size` samples drawn
    with replacement from `train`; returns the parameters with the lowest held-out
    `val_fn(params)`, measured before the first step and every `eval_every` steps after.

    Keeping the best-validation parameters (the released code's protocol) means an overfitting
    or diverging refinement hands the next stage the decoder from before it went wrong, the
    untouched initial decoder included. Returns (best parameters, metrics).
    """
    n = jax.tree.leaves(train)[0].shape[0]

    def sgd_step(carry, key):
        params, opt_state = carry
        k_batch, k_loss = jax.random.split(key)
        batch = jax.tree.map(lambda x: x[jax.random.randint(k_batch, (batch_size,), 0, n)], train)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, k_loss)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def interval(carry, key):
        params, opt_state, best, best_val, best_step, step = carry
        (params, opt_state), losses = jax.lax.scan(sgd_step, (params, opt_state), jax.random.split(key, eval_every))
        step = step + eval_every
        val = val_fn(params)
        better = val < best_val
        best = jax.tree.map(lambda b, p: jnp.where(better, p, b), best, params)
        best_val, best_step = jnp.where(better, val, best_val), jnp.where(better, step, best_step)
        return (params, opt_state, best, best_val, best_step, step), (losses.mean(), val)

    init_val = val_fn(params)
    carry = (params, optimizer.init(params), params, init_val, jnp.int32(0), jnp.int32(0))
    carry, (losses, vals) = jax.lax.scan(interval, carry, jax.random.split(key, num_steps // eval_every))
    _, _, best, best_val, best_step, _ = carry
    return best, {"refine/loss_mean": losses.mean(), "refine/loss_final": losses[-1],
                  "refine/val_initial": init_val, "refine/val_final": vals[-1], "refine/val_best": best_val,
                  "refine/best_step": best_step}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def make_evaluator(env, num_envs: int = 128, episode_length: int | None = None):
    """`evaluate(act, key)`: one full episode in each of `num_envs` environments, of at most
    `episode_length` steps (None: the environment's).

    Returns {"eval/return": mean return, "eval/return_std": its standard deviation over the
    episodes, "eval/episode_length": mean length}. `act(obs, key) -> pre_squash_action` (the
    caller closes over parameters) receives a fresh key at every step: a deterministic policy
    ignores it, a stochastic evaluation (the release's humanoid profile) samples with it.
    Rewards after an environment's first episode end are not counted.
    """
    episode_length = episode_length or env.episode_length

    def evaluate(act: Callable, key: jax.Array) -> dict:
        state = reset_envs(env, key, num_envs)
        act_keys = jax.random.split(jax.random.fold_in(key, 1), episode_length)

        def step(carry, key):
            state, total, length, alive = carry
            state = env.step(state, act(state.obs, key))
            total = total + alive * state.reward
            length = length + alive
            alive = alive * (1.0 - state.done)
            return (state, total, length, alive), None

        init = (state, jnp.zeros(num_envs), jnp.zeros(num_envs), jnp.ones(num_envs))
        (_, total, length, _), _ = jax.lax.scan(step, init, act_keys)
        return {"eval/return": total.mean(), "eval/return_std": total.std(), "eval/episode_length": length.mean()}

    return evaluate
