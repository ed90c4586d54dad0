"""Shared pieces of every algorithm in this repository.

Environments (MuJoCo Playground's DeepMind Control Suite in MJX), the running observation
normalizer, pure-function MLPs, diagonal-Gaussian math, GAE, the rollout scan, minibatch SGD,
deterministic evaluation, and the run folder (config, CSV, TensorBoard, checkpoints, progress).

Everything here is used by at least two algorithm files. An algorithm file imports this module
and nothing else of the repository, so `gorl_fm.py` + `common.py` can be copied anywhere.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, NamedTuple


def _gpu_settings() -> None:
    """What a GPU run needs, set before JAX starts its backend (a value the user set wins).

    XLA_PYTHON_CLIENT_PREALLOCATE=false: JAX would take 75% of the GPU's memory per process, so a
    second process (plot.py video beside a run, seeds as separate processes) could not start;
    MuJoCo Playground's training scripts set the same. --xla_gpu_triton_gemm_any=True: up to 30%
    faster MJX on a GPU (MJX documentation), added to the user's XLA_FLAGS only where a CUDA
    plugin is installed, so a CPU-only jaxlib never sees a GPU flag.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import importlib.util

    has_cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    flags = os.environ.get("XLA_FLAGS", "")
    if has_cuda and "xla_gpu_triton_gemm_any" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_triton_gemm_any=True".strip()


_gpu_settings()  # JAX reads these when its backend starts, at the first computation, not at import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from brax.envs.wrappers import training as brax_wrappers  # noqa: E402
from mujoco_playground import registry  # noqa: E402
from mujoco_playground import wrapper as playground_wrapper  # noqa: E402
from mujoco_playground._src import mjx_env  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------

EPISODE_LENGTH = 1000
IMPLS = ("jax", "warp")


def dmc_env_names() -> tuple[str, ...]:
    """Names of the DeepMind Control Suite tasks that MuJoCo Playground provides."""
    return tuple(registry.dm_control_suite.ALL_ENVS)


def playground_env_names() -> tuple[str, ...]:
    """Every task in MuJoCo Playground's registry: DMC, locomotion and manipulation."""
    return tuple(registry.ALL_ENVS)


def env_name_check(name: str) -> tuple[bool, str]:
    """(is valid, error message listing the valid names), for `check_args`."""
    return name in playground_env_names(), (
        f"unknown task {name!r}; valid MuJoCo Playground tasks are the DMC tasks {', '.join(dmc_env_names())}; "
        f"the locomotion tasks {', '.join(registry.locomotion.ALL_ENVS)}; and the manipulation tasks "
        f"{', '.join(registry.manipulation.ALL_ENVS)}. To train on your own environment, pass it to main() "
        "(README, \"Your own environment\")")


def check_args(checks: list[tuple[bool, str]]) -> None:
    """Exit with every violated condition's message (scripts call this before compiling)."""
    errors = [message for ok, message in checks if not ok]
    if errors:
        sys.exit("error: " + "\n       ".join(errors))


def ppo_layout_checks(args) -> list[tuple[bool, str]]:
    """The flag checks every PPO-family script shares (backend, episode length, batch layout,
    evaluation), for `check_args`: one iteration is batch_size * num_minibatches sequences of
    unroll_length steps, spread evenly over num_envs environments. (The task name is checked
    where it is loaded, `load_playground_env`: a script given its own environment never uses it.)"""
    sequences = args.batch_size * args.num_minibatches
    return [
        (args.episode_length is None or args.episode_length > 0,
         f"--episode-length must be positive, got {args.episode_length}"),
        (args.impl in IMPLS, f"--impl must be one of {IMPLS}, got {args.impl!r}"),
        (min(args.num_envs, args.unroll_length, args.batch_size, args.num_minibatches, args.num_epochs) > 0,
         "--num-envs, --unroll-length, --batch-size, --num-minibatches and --num-epochs must be positive"),
        (sequences % max(args.num_envs, 1) == 0,
         f"--batch-size * --num-minibatches = {sequences} sequences per iteration must be a multiple of "
         f"--num-envs = {args.num_envs}, so that every environment runs whole sequences"),
        (args.eval_every > 0 and args.num_eval_envs > 0, "--eval-every and --num-eval-envs must be positive"),
    ]


# ---------------------------------------------------------------------------------------------
# Per-task settings: the values the released code sets per task, resolved in one place
# ---------------------------------------------------------------------------------------------

# What the newest release of the original code (bennidict23/GoRL, configs/tasks/*.toml and the
# profile overrides of configs/methods/*.toml) or MuJoCo Playground's tuned Brax PPO configs
# (which older releases read) set per task. Keys are Args field names; a nested dict under an
# algorithm's name applies to that algorithm only. A flag whose value depends on the task
# defaults to None, "the task's value", and `resolve_task_settings` fills it in; config.json
# records the resolved values. Per-stage exceptions of single tasks that the release also has
# (e.g. FingerTurnHard's stage-3 KL weight) are listed in the README, not reproduced.
TASK_SETTINGS: dict[str, dict] = {
    "BallInCup": {"discount": 0.95},  # Playground's brax_ppo_config
    "FingerSpin": {"discount": 0.95, "gorl_fm": {"refine_metric": "val_endpoint_mse"}},
    "FingerTurnHard": {"gorl_fm": {"max_grad_norm": 1.0}},
    "FishSwim": {"gorl_fm": {"refine_metric": "val_endpoint_mse"}},
    "WalkerWalk": {"gorl_fm": {"max_grad_norm": 1.0, "kl_beta": 3e-3}},
    "HopperStand": {"gorl_fm": {"decoder_hidden": (64, 64, 64, 64), "decoder_target_clip": 0.0}},
    "HumanoidStand": {"profile": "humanoid", "gorl_fm": {"refine_episodes": 128},
                      "gorl_diffusion": {"refine_episodes": 128}},
    "HumanoidRun": {"profile": "humanoid", "stage_steps": (60_000_000, 60_000_000)},
}

# Profiles of the release: every DMC task is "dm_control" unless TASK_SETTINGS says otherwise.
# The humanoid profile (paper 002's 21-D HumanoidStand / HumanoidRun) bounds the latent, clips
# the ratio at 0.3 in every stage, regresses the decoder onto the environment's (bounded)
# action, collects fewer refinement episodes and evaluates the stochastic policy.
_HUMANOID_GORL = {"bounded_latent": True, "stage0_clip_eps": 0.3, "clip_eps": 0.3, "refine_episodes": 1024,
                  "action_semantics": "bounded", "decoder_target_clip": 1.0, "deterministic_eval": False}
# Every method runs the humanoids' float32 matmuls at full precision (configs/tasks/Humanoid*.toml,
# [runtime]); elsewhere a GPU's default (TF32 on recent NVIDIA GPUs).
_HUMANOID_RUNTIME = {"matmul_precision": "highest"}
PROFILES: dict[str, dict] = {
    "dm_control": {},
    "humanoid": {
        "ppo": {"learning_rate": 1e-3, "clip_eps": 0.3, "max_grad_norm": 0.0, "deterministic_eval": False,
                **_HUMANOID_RUNTIME},
        "gorl_fm": {**_HUMANOID_GORL, **_HUMANOID_RUNTIME},
        "gorl_diffusion": {**_HUMANOID_GORL, "decoder_hidden": (128, 128, 128, 128), **_HUMANOID_RUNTIME},
        "gorl_sac": _HUMANOID_RUNTIME, "fpo": _HUMANOID_RUNTIME, "dppo": _HUMANOID_RUNTIME,
    },
}


def task_profile(env_name: str) -> str:
    return TASK_SETTINGS.get(env_name, {}).get("profile", "dm_control")


def resolve_task_settings(args, algo: str, defaults: dict):
    """`args` with every task-dependent flag left at None replaced by the task's value.

    `defaults` maps each task-dependent field of the algorithm's Args to its value on a task
    that sets nothing. Precedence: the task's entry for this algorithm, the task's entry for
    every algorithm, the task's profile for this algorithm, then `defaults`. A flag given on
    the command line (not None) always wins.
    """
    task = TASK_SETTINGS.get(args.env_name, {})
    profile = PROFILES[task_profile(args.env_name)]
    layers = (task.get(algo, {}), task, profile.get(algo, {}), defaults)
    resolved = {}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            resolved[name] = next(layer[name] for layer in layers if name in layer)
    return dataclasses.replace(args, **resolved)


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
        env = load_playground_env(env, impl)
    else:
        notice = action_range_notice(env)
        if notice:
            print(notice, flush=True)
    check_observation(env.observation_size)
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


MENAGERIE_MESSAGE = """MuJoCo Playground could not load {name!r}: its robot model comes from mujoco_menagerie,
which Playground clones with git into {path} on first use (this failed: {error}).
With no network here, clone it where there is one and copy it over:
    git clone https://github.com/deepmind/mujoco_menagerie.git
    git -C mujoco_menagerie checkout {commit}
    cp -r mujoco_menagerie {path}
(remove a partial {path} first). The DMC tasks need no download."""


def load_playground_env(name: str, impl: str = "jax"):
    """`registry.load(name)` on the given physics backend. An unknown name stops with the list of
    valid ones; a task whose assets are missing (the menagerie clone failed: no network, no git)
    stops with what to provide, not a git error."""
    ok, message = env_name_check(name)
    if not ok:
        sys.exit(f"error: {message}")
    if impl not in IMPLS:
        sys.exit(f"error: unknown impl {impl!r}; choose one of {IMPLS}")
    if name in dmc_env_names():
        return registry.load(name, config_overrides={"impl": impl})
    try:
        return registry.load(name, config_overrides={"impl": impl})
    except Exception as error:  # a failed clone, or the missing files of a partial one
        raise SystemExit("error: " + MENAGERIE_MESSAGE.format(
            name=name, path=mjx_env.MENAGERIE_PATH, commit=mjx_env.MENAGERIE_COMMIT_SHA,
            error=f"{type(error).__name__}: {error}")) from error


def check_observation(observation_size) -> None:
    """Observations are an array or a dict with a "state" entry (the actor's, the encoder's and
    the decoder's input); a "privileged_state" entry, when there is one, is the critic's."""
    if isinstance(observation_size, dict) and "state" not in observation_size:
        raise ValueError(f"the environment's observation is a dict with the keys {', '.join(observation_size)}; "
                         "it needs a \"state\" entry (the policy's input) and may have a \"privileged_state\" "
                         "entry (the critic's)")


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


def action_range_notice(env) -> str | None:
    """A line for a user's MJX environment whose actuators' ctrlrange is not [-1, 1]: the
    algorithms act in [-1, 1] (tanh), and scaling to the actuators is the environment's job."""
    model = getattr(env, "mj_model", None)
    if model is None or not model.nu:
        return None
    ranges = np.asarray(model.actuator_ctrlrange)
    limited = np.asarray(model.actuator_ctrllimited, bool) if hasattr(model, "actuator_ctrllimited") else True
    if np.all(~limited | ((ranges[:, 0] == -1) & (ranges[:, 1] == 1))):
        return None
    return (f"note: the environment receives actions in [-1, 1] (tanh of the policy's output); its actuators' ctrlrange "
            f"is {ranges.tolist()}. If its step() writes the action to data.ctrl unscaled, scale it there "
            "(MuJoCo Playground's convention: low + (a + 1) / 2 * (high - low)).")


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
# Playground's BraxAutoResetWrapper (DMC tasks) and Brax's AutoResetWrapper (gorl_sac's Gym tasks).
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


def normalizer_update(norm: Normalizer, batch: jax.Array) -> Normalizer:
    """Merge a batch (any leading shape) into the statistics without summing raw squares."""
    if isinstance(norm, dict):
        return {k: normalizer_update(norm[k], batch[k]) for k in norm}
    batch = batch.reshape(-1, norm.mean.shape[-1])
    n_b = batch.shape[0]
    mean_b = batch.mean(axis=0)
    m2_b = ((batch - mean_b) ** 2).sum(axis=0)
    count = norm.count + n_b
    delta = mean_b - norm.mean
    mean = norm.mean + delta * n_b / count
    m2 = norm.m2 + m2_b + delta**2 * norm.count * n_b / count
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
# GoRL pieces shared by gorl_fm.py and gorl_diffusion.py: latent regularizer, decoder targets
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


def gae(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminations: jax.Array,
    episode_dones: jax.Array,
    discount: float,
    lam: float,
) -> jax.Array:
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

    _, advantages = jax.lax.scan(
        backward, jnp.zeros_like(deltas[0]), (deltas, episode_dones), reverse=True
    )
    return advantages


def gae_release(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminations: jax.Array,
    truncations: jax.Array,
    discount: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
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


GAE_FORMS = ("standard", "release")


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
# The PPO family's epochs data and per-minibatch targets (ppo, fpo, dppo, and GoRL's latent PPO)
# ---------------------------------------------------------------------------------------------

ADVANTAGE_TIMINGS = ("rollout", "minibatch")
MINIBATCH_UNITS = ("transition", "sequence")
NORMALIZER_UPDATES = ("after", "before")


def ppo_update_checks(args) -> list[tuple[bool, str]]:
    """The checks of the flags that choose how a PPO-family update computes its targets."""
    return [
        (args.advantages in ADVANTAGE_TIMINGS, f"--advantages must be one of {ADVANTAGE_TIMINGS}, got {args.advantages!r}"),
        (args.minibatch_unit in MINIBATCH_UNITS,
         f"--minibatch-unit must be one of {MINIBATCH_UNITS}, got {args.minibatch_unit!r}"),
        (args.advantages != "minibatch" or args.minibatch_unit == "sequence",
         "--advantages minibatch runs GAE along each minibatch's sequences: it needs --minibatch-unit sequence"),
        (args.gae_form in GAE_FORMS, f"--gae-form must be one of {GAE_FORMS}, got {args.gae_form!r}"),
        (args.normalizer_update in NORMALIZER_UPDATES,
         f"--normalizer-update must be one of {NORMALIZER_UPDATES}, got {args.normalizer_update!r}"),
    ]


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


# ---------------------------------------------------------------------------------------------
# Run folder: config, CSV, TensorBoard, checkpoints, progress
# ---------------------------------------------------------------------------------------------


# Checkpoints are .npz files read with allow_pickle=False: the arrays, plus the tree's structure
# as JSON. Unlike a pickle, loading one cannot run code, so a checkpoint from anyone is safe to
# open. The structure knows dicts (string keys), lists, tuples, NamedTuples (this project's and
# optax's states, rebuilt only from those modules), None, bools, ints, floats and strings.
CHECKPOINT_FORMAT = "gorl-checkpoint/1"
_TREE_ENTRY = "__tree__"
_NAMEDTUPLE_MODULES = ("common", "ppo", "fpo", "dppo", "gorl_fm", "gorl_diffusion", "gorl_sac", "optax")


def _encode(node, arrays: dict):
    if isinstance(node, (jax.Array, np.ndarray, np.generic)):
        name = f"a{len(arrays)}"
        arrays[name] = np.asarray(node)
        return {"array": name}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"value": node}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        cls = type(node)
        return {"namedtuple": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f: _encode(getattr(node, f), arrays) for f in node._fields}}
    if isinstance(node, (list, tuple)):
        return {type(node).__name__: [_encode(x, arrays) for x in node]}
    if isinstance(node, dict) and all(isinstance(k, str) for k in node):
        return {"dict": {k: _encode(v, arrays) for k, v in node.items()}}
    raise TypeError(f"cannot checkpoint a {type(node).__name__}")


def _namedtuple_class(name: str):
    module, _, qualname = name.partition(":")
    if module.split(".")[0] not in _NAMEDTUPLE_MODULES:
        raise ValueError(f"a NamedTuple from module {module!r}, which checkpoints may not name")
    cls = sys.modules.get(module) or __import__(module, fromlist=["_"])
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
        raise ValueError(f"{name} is not a NamedTuple")
    return cls


def _decode(node: dict, arrays):
    kind, value = next(iter(node.items()))  # the first key says what the node is
    if kind == "array":
        return jnp.asarray(arrays[value])
    if kind == "value":
        return value
    if kind in ("list", "tuple"):
        items = [_decode(x, arrays) for x in value]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _decode(v, arrays) for k, v in value.items()}
    if kind == "namedtuple":
        fields = {k: _decode(v, arrays) for k, v in node["fields"].items()}
        return _namedtuple_class(value)(**fields)
    raise ValueError(f"unknown node {kind!r}")


def save_checkpoint(path: str, tree: Any) -> None:
    """Write a pytree (moved to host numpy) atomically, so an interrupt never leaves half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays: dict = {}
    structure = {"format": CHECKPOINT_FORMAT, "tree": _encode(jax.device_get(tree), arrays)}
    arrays[_TREE_ENTRY] = np.frombuffer(json.dumps(structure).encode(), dtype=np.uint8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Any:
    """The pytree `save_checkpoint` wrote, arrays on the device. A file that is missing,
    truncated, altered or not a checkpoint of this format stops with a message saying so."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        structure = json.loads(arrays.pop(_TREE_ENTRY).tobytes().decode())
        if structure.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {structure.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        return _decode(structure["tree"], arrays)
    except FileNotFoundError:
        sys.exit(f"error: checkpoint {path} does not exist")
    except Exception as e:  # zip, JSON, missing array, unknown class: one clear message
        sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {e}); checkpoints are "
                 f"written by save_checkpoint as .npz, and pickles are not loaded (loading one can run code)")


def args_from_run(args_cls, run_dir: str, **overrides):
    """The Args a run was started with (its config.json), for `--resume`."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        sys.exit(f"error: {run_dir!r} is not a run folder (no config.json)")
    with open(path) as f:
        config = json.load(f)
    fields = {f.name for f in dataclasses.fields(args_cls)}
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    return dataclasses.replace(args_cls(**config), **overrides)


def run_folder_name(args, exp_name: str, stamp: str | None = None) -> str:
    """<env>__<exp_name>__<seed>__<time>, CleanRL's run name."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", exp_name):
        sys.exit(f"error: --exp-name {exp_name!r}: use letters, digits, '.', '_' and '-' only")
    return f"{args.env_name}__{exp_name}__{args.seed}__{stamp or time.strftime('%Y%m%d-%H%M%S')}"


class Run:
    """The run folder `runs/<env>__<exp_name>__<seed>__<time>/` and the console progress line.

    `algo` is the script (plot.py imports it to load a policy); the experiment name is
    `args.exp_name`, else `default_exp_name` (an ablation's name), else `algo` (CleanRL's
    convention). config.json records both; `plot.py curves` groups runs by the name.
    """

    def __init__(self, args, algo: str, run_dir: str | None = None, default_exp_name: str | None = None,
                 seed_group: list[str] | None = None):
        exp_name = getattr(args, "exp_name", None) or default_exp_name or algo
        if run_dir is None:
            run_dir = os.path.join(args.runs_dir, run_folder_name(args, exp_name))
        self.dir = run_dir
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        config_path = os.path.join(run_dir, "config.json")
        self.new = not os.path.exists(config_path)  # (not a resumed run)
        if self.new:
            # seed_group: the folders of the seeds trained in the same process (--num-seeds).
            group = {"seed_group": seed_group} if seed_group else {}
            with open(config_path, "w") as f:
                json.dump({"algo": algo, **dataclasses.asdict(args), "exp_name": exp_name, **group}, f, indent=2)
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.rows: list[dict] = []
        if os.path.exists(self.csv_path):
            with open(self.csv_path) as f:
                self.rows = list(csv.DictReader(f))
        self.columns = list(self.rows[0].keys()) if self.rows else ["step", "wall_time"]
        self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
        self.wandb = None
        if getattr(args, "track", False):
            self.wandb = _wandb_run(args, run_dir, config_path)
        # A resumed run continues the wall-clock column where it stopped.
        self.start = time.time() - (float(self.rows[-1]["wall_time"]) if self.rows else 0.0)
        self.last_print = 0.0
        print(f"run folder: {run_dir}", flush=True)

    def forget_after(self, step: int, refinement_at_step: bool = False) -> None:
        """Drop logged rows past `step` (a resumed run repeats them from its checkpoint).

        A GoRL stage checkpoint is written before the refinement that follows it, which logs at
        the same step; `refinement_at_step` drops that row too, since resuming redoes it.
        """

        def repeated(r):
            at = int(float(r["step"]))
            return at > step or (refinement_at_step and at == step and any(
                k.startswith("refine/") and v not in (None, "") for k, v in r.items()))

        self.rows = [r for r in self.rows if not repeated(r)]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def checkpoint_path(self, name: str) -> str:
        return os.path.join(self.dir, "checkpoints", name)

    def log(self, step: int, metrics: dict) -> None:
        """Append one row to metrics.csv (new columns rewrite the header) and to TensorBoard."""
        metrics = {k: float(v) for k, v in metrics.items()}
        row = {"step": int(step), "wall_time": round(time.time() - self.start, 2), **metrics}
        for k, v in metrics.items():
            if math.isfinite(v):
                self.tb.add_scalar(k, v, int(step))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=int(step))
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        self.columns += new
        if new or len(self.rows) == 1:
            with open(self.csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(self.rows)
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        self.tb.flush()

    def progress(self, step: int, total: int, sps: float, force: bool = False, **fields) -> None:
        """One status line at most every 2 seconds (always when forced)."""
        now = time.time()
        if not force and now - self.last_print < 2.0:
            return
        self.last_print = now
        elapsed = now - self.start
        parts = [f"step {step:,}/{total:,} ({100 * step / max(total, 1):.1f}%)", f"{sps:,.0f} steps/s"]
        for k, v in fields.items():
            parts.append(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"elapsed {_hms(elapsed)}")
        print(" | ".join(parts), flush=True)

    def completed_stages(self) -> list[int]:
        """Stages K with a saved checkpoints/stageK.npz (GoRL's unit of resumption)."""
        names = glob.glob(os.path.join(self.dir, "checkpoints", "stage*.npz"))
        return sorted(int(re.search(r"stage(\d+)\.npz$", n).group(1)) for n in names)

    def write_stage_table(self, rows: list[dict]) -> None:
        """Print and save (stages.md) the evaluation return at each stage boundary: the S0..S3
        table of paper 002, with the return of the refined decoder under prior latents."""
        lines = ["| stage | steps at end | eval return at end | eval return, prior latents + refined decoder |",
                 "|---|---|---|---|"]
        for r in rows:
            refined = f"{r['refined_prior_return']:.1f}" if r.get("refined_prior_return") is not None else "-"
            lines.append(f"| S{r['stage']} | {r['step']:,} | {r['return']:.1f} | {refined} |")
        table = "\n".join(lines)
        print(table)
        with open(os.path.join(self.dir, "stages.md"), "w") as f:
            f.write(table + "\n")

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(args, run_dir: str, config_path: str):
    """A Weights & Biases run mirroring this run folder (CleanRL's --track): named and keyed by
    the folder, so --resume continues the same W&B run. wandb is imported only here."""
    try:
        import wandb
    except ImportError:
        sys.exit("error: --track needs Weights & Biases, which requirements.txt does not install: pip install wandb")
    with open(config_path) as f:
        config = json.load(f)
    name = os.path.basename(os.path.normpath(run_dir))
    return wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=name, config=config, dir=run_dir,
                      id=re.sub(r"[^A-Za-z0-9_-]", "-", name)[-64:], resume="allow")


# ---------------------------------------------------------------------------------------------
# Seeds in parallel: one process trains --num-seeds seeds, sharded over the local devices
# ---------------------------------------------------------------------------------------------


def seed_checks(args) -> list[tuple[bool, str]]:
    """The --num-seeds and --matmul-precision checks every script shares, for `check_args`."""
    return [(args.num_seeds >= 1, f"--num-seeds must be at least 1, got {args.num_seeds}"),
            (args.matmul_precision in MATMUL_PRECISIONS,
             f"--matmul-precision must be one of {MATMUL_PRECISIONS}, got {args.matmul_precision!r}")]


MATMUL_PRECISIONS = ("default", "high", "highest")


def compilation_cache_dir(backend: str) -> str | None:
    """Where compiled programs are kept between runs: $JAX_COMPILATION_CACHE_DIR if set, else
    on a GPU or TPU $XDG_CACHE_HOME/gorl/jax (~/.cache/gorl/jax); None (off) on a CPU, where
    XLA warns at length about every cached program it loads, and with GORL_COMPILATION_CACHE=0."""
    if os.environ.get("GORL_COMPILATION_CACHE", "1") == "0":
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if backend == "cpu":
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gorl", "jax")


def start_runtime(args) -> None:
    """Process-wide settings of a run, before anything is compiled: `--distributed`
    (`start_distributed`, which must come before JAX starts its backend), the float32 matmul
    precision (`args.matmul_precision`: on recent NVIDIA GPUs "default" is TF32, MJX physics
    included; the release runs the humanoids at "highest"), and a persistent compilation cache
    (a second run or seed skips the minutes of compiling; a cache already set wins)."""
    start_distributed(args.distributed)
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    cache = compilation_cache_dir(jax.default_backend())
    if cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache)
        print(f"compiled programs are cached in {cache} (GORL_COMPILATION_CACHE=0 turns this off)", flush=True)


def start_distributed(enabled: bool) -> None:
    """--distributed: join JAX's multi-host runtime (`jax.distributed.initialize`), which finds
    the coordinator, the process count and this process's id in the cluster's environment
    (SLURM, Open MPI, Kubernetes, Cloud TPU), else in JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID. Seeds need no communication: process p trains its own --num-seeds seeds,
    seed + p * num_seeds onwards, on its own devices, into its own run folders."""
    if enabled:
        counts = {name: int(os.environ[var]) for name, var in
                  (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")) if var in os.environ}
        jax.distributed.initialize(**counts)
        print(f"process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} local device(s)", flush=True)


def device_layout(num_seeds: int, num_envs: int, num_devices: int) -> str | None:
    """Which axis is split over the devices: "seeds" when there are at least as many seeds as
    devices, else "envs" (each seed's environments); None on one device. A layout that does not
    split evenly stops here, before anything is compiled, with the numbers."""
    if num_devices == 1:
        return None
    if num_seeds >= num_devices:
        if num_seeds % num_devices:
            sys.exit(f"error: --num-seeds {num_seeds} cannot be split evenly over {num_devices} devices: use a "
                     f"multiple of {num_devices}, or fewer seeds than devices (then the environments are split)")
        return "seeds"
    if num_envs % num_devices:
        sys.exit(f"error: {num_seeds} seed(s) on {num_devices} devices split each seed's environments, and "
                 f"--num-envs {num_envs} is not a multiple of {num_devices}")
    return "envs"


def over_seeds(x, fmt: str = ".1f") -> str:
    """A per-seed value for the console: the value for one seed, else the mean [min, max] of
    the seeds that have one; "-" while none has (no training episode has finished yet)."""
    x = np.asarray(x, dtype=float).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return "-"
    if x.size == 1:
        return format(x[0], fmt)
    return f"{format(x.mean(), fmt)} [{format(x.min(), fmt)}, {format(x.max(), fmt)}]"


def seed_slice(tree, i: int):
    """Seed i's part of a tree whose arrays all carry a leading seed axis (other leaves as they are)."""
    return jax.tree.map(lambda x: x[i] if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def stack_seeds(trees: list, what: str):
    """The seeds' trees in one, arrays stacked on a new leading axis; the other leaves (steps,
    stage numbers) must agree, since the seeds train in lockstep."""

    def stack(*xs):
        if isinstance(xs[0], (jax.Array, np.ndarray, np.generic)):
            return jnp.stack([jnp.asarray(x) for x in xs])
        if any(x != xs[0] for x in xs):
            sys.exit(f"error: the seeds' {what} disagree ({', '.join(map(str, xs))}); resume them one by one")
        return xs[0]

    return jax.tree.map(stack, *trees)


class Runs:
    """The seeds one process trains side by side (--num-seeds N: seed, seed+1, ..., seed+N-1),
    each with an ordinary run folder, so `plot.py curves` and `--resume` see separate runs.

    The whole training state carries a leading seed axis. `parallel(f)` turns a function of one
    seed's state into one over all seeds (`jax.vmap`, then `jax.jit`; with one seed, `f` itself
    on the squeezed axis): each seed computes what a run with that seed alone computes. With more
    than one local device the seed axis is sharded over them, or, with fewer seeds than devices,
    each seed's environments (a `Mesh` and `NamedSharding`s; parameters are then replicated). `log`, `progress`, `save` and the resume
    methods take per-seed arrays and write each seed's slice to its own folder.
    """

    def __init__(self, args, algo: str, default_exp_name: str | None = None):
        if args.resume:
            per_seed = [args_from_run(type(args), d, resume=d) for d in self._group(args.resume)]
        else:
            first = args.seed + jax.process_index() * args.num_seeds
            per_seed = [dataclasses.replace(args, seed=first + i) for i in range(args.num_seeds)]
        self.seeds = [a.seed for a in per_seed]
        self.devices = jax.local_devices()
        self.layout = device_layout(len(self.seeds), args.num_envs, len(self.devices))
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("devices",)) if self.layout else None
        self.num_envs = args.num_envs
        if args.resume:
            if len(per_seed) > 1:
                print(f"resuming the {len(per_seed)} seeds trained together: {', '.join(map(str, self.seeds))}")
            self.runs = [Run(a, algo, run_dir=a.resume) for a in per_seed]
        else:
            exp_name = getattr(args, "exp_name", None) or default_exp_name or algo
            stamp = time.strftime("%Y%m%d-%H%M%S")
            names = [run_folder_name(a, exp_name, stamp) for a in per_seed]
            group = names if len(names) > 1 else None
            self.runs = [Run(a, algo, run_dir=os.path.join(args.runs_dir, n), default_exp_name=default_exp_name,
                             seed_group=group) for a, n in zip(per_seed, names)]
        self.dir = self.runs[0].dir  # --resume of any seed's folder resumes the group
        if self.layout:
            print(f"{len(self.seeds)} seed(s) on {len(self.devices)} devices, the {self.layout} axis split",
                  flush=True)

    @staticmethod
    def _group(run_dir: str) -> list[str]:
        """The folders of the seeds trained with the run in `run_dir` (config.json's seed_group)."""
        path = os.path.join(run_dir, "config.json")
        if not os.path.exists(path):
            sys.exit(f"error: {run_dir!r} is not a run folder (no config.json)")
        with open(path) as f:
            names = json.load(f).get("seed_group")
        if not names:
            return [run_dir]
        dirs = [os.path.join(os.path.dirname(os.path.normpath(run_dir)), n) for n in names]
        for d in dirs:
            if not os.path.exists(os.path.join(d, "config.json")):
                sys.exit(f"error: {run_dir} was trained with the seeds of {', '.join(names)}, and {d} is missing")
        return dirs

    # -- the seed axis on the devices --------------------------------------------------------

    def _shardings(self, tree):
        """Where each leaf lives: split on the seed axis, or on the environment axis of every
        `env_state` (seed axis first, so axis 1), everything else replicated."""
        split = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("devices"))
        split_envs = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, "devices"))
        whole = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        if self.layout == "seeds":
            return jax.tree.map(lambda x: split if np.ndim(x) else whole, tree)

        def envs(x):
            return split_envs if np.ndim(x) >= 2 and np.shape(x)[1] == self.num_envs else whole

        def walk(node):
            if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple: a TrainState, or inside one
                return type(node)(*[jax.tree.map(envs, v) if f == "env_state" else walk(v)
                                    for f, v in zip(node._fields, node)])
            if isinstance(node, (tuple, list)):
                return type(node)(walk(v) for v in node)
            return jax.tree.map(lambda x: whole, node)

        return walk(tree)

    def place(self, tree):
        """`tree` (leading seed axis) on the devices, as `parallel`'s functions expect it."""
        return tree if self.mesh is None else jax.device_put(tree, self._shardings(tree))

    def parallel(self, fn: Callable, in_axes=0, donate_argnums=()) -> Callable:
        """`fn` of one seed, run for all seeds at once: vmapped over the leading seed axis of its
        arguments (`in_axes` as `jax.vmap`'s) and jitted, its outputs kept on the device layout."""
        if len(self.seeds) == 1 and self.mesh is None:
            # One seed: the plain function, its seed axis of length 1 dropped and put back, which
            # compiles MJX as a single run always did (vmap over MJX compiles markedly longer).
            def single(*args):
                axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
                args = [a if axis is None else jax.tree.map(lambda x: x[0], a) for a, axis in zip(args, axes)]
                return jax.tree.map(lambda x: x[None], fn(*args))

            return jax.jit(single, donate_argnums=donate_argnums)
        batched = jax.vmap(fn, in_axes=in_axes)
        if self.mesh is None:
            return jax.jit(batched, donate_argnums=donate_argnums)

        def placed(*args):
            out = batched(*args)
            return jax.lax.with_sharding_constraint(out, self._shardings(out))

        return jax.jit(placed, donate_argnums=donate_argnums)

    def keys(self) -> jax.Array:
        """Each seed's `jax.random.PRNGKey(seed)`, stacked: [num_seeds, 2]."""
        return self.place(jnp.stack([jax.random.PRNGKey(s) for s in self.seeds]))

    def split(self, key: jax.Array, num: int = 2) -> tuple:
        """`jax.random.split` of each seed's key: `num` arrays of [num_seeds, 2]."""
        keys = jax.vmap(lambda k: jax.random.split(k, num))(key)
        return tuple(keys[:, i] for i in range(num))

    # -- each seed's folder ------------------------------------------------------------------

    def log(self, step: int, metrics: dict) -> None:
        """One metrics.csv row per seed: seed i gets element i of each per-seed value (a scalar
        goes to every seed)."""
        metrics = {k: np.broadcast_to(np.asarray(v, dtype=float), (len(self.runs),)) for k, v in metrics.items()}
        for i, run in enumerate(self.runs):
            run.log(step, {k: v[i] for k, v in metrics.items()})

    def progress(self, step: int, total: int, sps: float, force: bool = False, **fields) -> None:
        """The progress line; a per-seed value shows as its mean [min, max] over seeds."""
        fields = {k: over_seeds(v, ".2f") if isinstance(v, (jax.Array, np.ndarray)) else v for k, v in fields.items()}
        self.runs[0].progress(step, total, sps, force, **fields)

    def save(self, name: str, tree) -> None:
        """checkpoints/<name> in each seed's folder: its slice of `tree`."""
        for i, run in enumerate(self.runs):
            save_checkpoint(run.checkpoint_path(name), seed_slice(tree, i))

    def load(self, name: str):
        """checkpoints/<name> of every seed, stacked and on the devices."""
        return self.place(stack_seeds([load_checkpoint(r.checkpoint_path(name)) for r in self.runs], name))

    def resume_latest(self) -> dict:
        """--resume of a baseline: every seed's checkpoints/latest.npz, rows after its step dropped."""
        for run in self.runs:
            if not os.path.exists(run.checkpoint_path("latest.npz")):
                sys.exit(f"error: {run.dir} has no checkpoint yet (one is written at every evaluation)")
        checkpoint = self.load("latest.npz")
        step = int(checkpoint["step"])
        for run in self.runs:
            run.forget_after(step)
        print(f"resuming from step {step:,}")
        return checkpoint

    def resume_last_stage(self) -> tuple[int, dict] | None:
        """--resume of a GoRL run: (K, stageK.npz of every seed) for the last stage all seeds
        completed, the rows after it (and its refinement's, which is redone) dropped; None before any."""
        completed = [run.completed_stages() for run in self.runs]
        if not all(completed):
            return None
        last = min(c[-1] for c in completed)
        checkpoint = self.load(f"stage{last}.npz")
        for run in self.runs:
            run.forget_after(checkpoint["step"], refinement_at_step=True)
        print(f"resuming after stage {last} at step {checkpoint['step']:,}")
        return last, checkpoint

    def resume_inside_stage(self) -> dict | None:
        """--resume of a GoRL run stopped inside a stage: every seed's checkpoints/latest.npz
        (written at each evaluation) when it lies in the stage after the last one all seeds
        completed, the rows after its step dropped; None when there is none (resume from the
        last completed stage instead)."""
        paths = [run.checkpoint_path("latest.npz") for run in self.runs]
        if not all(os.path.exists(p) for p in paths):
            return None
        completed = [run.completed_stages() for run in self.runs]
        next_stage = min(c[-1] for c in completed) + 1 if all(completed) else 0
        checkpoint = self.load("latest.npz")
        if checkpoint["stage"] != next_stage:
            return None  # written before the last completed stage ended
        for run in self.runs:
            run.forget_after(checkpoint["step"])
        print(f"resuming inside stage {next_stage} at step {checkpoint['step']:,}")
        return checkpoint

    def write_stage_table(self, rows: list[dict]) -> None:
        for i, run in enumerate(self.runs):
            if len(self.runs) > 1:
                print(f"seed {self.seeds[i]} ({run.dir}):")
            run.write_stage_table(seed_slice(rows, i))

    def close(self) -> None:
        for run in self.runs:
            run.close()
            if run.new and not run.rows and not os.listdir(os.path.join(run.dir, "checkpoints")):
                # Stopped before its first iteration (an error, Ctrl-C while compiling): nothing to keep.
                shutil.rmtree(run.dir, ignore_errors=True)
                print(f"nothing was trained: removed the empty run folder {run.dir}", flush=True)


def run_iterations(
    runs: Runs,
    iterate: Callable,
    carry: Any,
    key: jax.Array,
    *,
    step: int,
    end_step: int,
    steps_per_iteration: int,
    total_steps: int,
    eval_every: int,
    evaluate: Callable,
    on_eval: Callable | None = None,
    stage: int | None = None,
):
    """The host-side loop over jitted training iterations, from `step` to `end_step`.

    `iterate(carry, key) -> (carry, metrics)` is one jitted iteration (rollout + update) of
    every seed (`Runs.parallel`: `carry`, `key` [num_seeds, 2] and the metrics carry a leading
    seed axis); metrics come back to the host once per iteration. Losses are checked for NaN.
    Whenever the global step crosses a multiple of `eval_every` (and at `end_step`),
    `evaluate(carry, key)` runs (a dict of "eval/..." metrics with "eval/return", as
    `make_evaluator` gives) and `on_eval(carry, step, key)` may save checkpoints. Returns
    (carry, key, step, last evaluation return of each seed).
    """
    where = f"stage {stage}, " if stage is not None else ""
    last_eval = np.full(len(runs.seeds), np.nan)
    last_train = np.full(len(runs.seeds), np.nan)
    seconds: list[float] = []  # of this call's iterations
    compiles = iterate not in _started  # a later stage reuses the compiled iteration
    if compiles and step + steps_per_iteration <= end_step:
        _started.add(iterate)
        print(first_iteration_notice(steps_per_iteration * len(runs.seeds)), flush=True)
    while step + steps_per_iteration <= end_step:
        key, k_iter, k_eval = runs.split(key, 3)
        t0 = time.time()
        new_carry, metrics = iterate(carry, k_iter)
        metrics = {k: np.asarray(v, dtype=float) for k, v in jax.device_get(metrics).items()}
        seconds.append(time.time() - t0)
        sps = steps_per_iteration / seconds[-1]  # each seed's; the progress line shows all seeds'
        if compiles and len(seconds) == 2 and seconds[0] > 2 * seconds[1]:
            print(f"{where}the first iteration took {seconds[0]:.0f} s, the second {seconds[1]:.0f} s: "
                  f"compilation took about {seconds[0] - seconds[1]:.0f} s", flush=True)
        check_finite({k: v for k, v in metrics.items() if k.startswith("loss/")}, f"{where}step {step:,}")
        carry = new_carry
        step += steps_per_iteration
        if "train/episode_return" in metrics:
            new = metrics["train/episode_return"]
            last_train = np.where(np.isfinite(new), new, last_train)
        metrics["perf/steps_per_second"] = sps
        if stage is not None:
            metrics["stage"] = stage
        crossed = step // eval_every > (step - steps_per_iteration) // eval_every
        is_last = step + steps_per_iteration > end_step
        if crossed or is_last:
            metrics.update({k: np.asarray(v, dtype=float) for k, v in jax.device_get(evaluate(carry, k_eval)).items()})
            last_eval = metrics["eval/return"]
        runs.log(step, metrics)
        # The row before the checkpoint: a run stopped between the two resumes from the previous
        # checkpoint and drops the rows after it, so no row is lost or logged twice.
        if (crossed or is_last) and on_eval is not None:
            on_eval(carry, step, key)
        fields = {"stage": stage} if stage is not None else {}
        runs.progress(step, total_steps, sps * len(runs.seeds), force=crossed or is_last, **fields,
                      train_return=last_train, eval_return=last_eval)
    return carry, key, step, last_eval


# Training steps per second of one iteration on a 2-core CPU without a GPU (README, "On a CPU"):
# about 1k on contact-rich tasks (HopperStand) to 5k on simple ones (CartpoleBalance).
CPU_STEPS_PER_SECOND = (1_000, 5_000)
_cpu_warned = False
_started: set = set()  # the iteration functions run_iterations has run (and so compiled)


def first_iteration_notice(steps_per_iteration: int) -> str:
    """What the wait before the first progress line is; on a CPU with a large iteration, how long
    one iteration will take (once per process)."""
    global _cpu_warned
    notice = "compiling the training iteration and running it once (the first progress line follows it) ..."
    if jax.default_backend() == "cpu" and steps_per_iteration >= 100_000 and not _cpu_warned:
        _cpu_warned = True
        slow, fast = (steps_per_iteration / rate / 60 for rate in CPU_STEPS_PER_SECOND)
        notice += (f"\nnote: JAX runs on the CPU, and one iteration is {steps_per_iteration:,} environment steps: "
                   f"on a small CPU that takes about {fast:.0f}-{slow:.0f} min per iteration (MJX steps 1k-5k per "
                   "second there, by task), plus compilation. The README's 'On a CPU' commands learn in minutes; "
                   "the paper's settings want a GPU (README, 'On a GPU').")
    return notice


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_finite(metrics: dict, where: str) -> None:
    """Stop the run on a NaN/inf loss, naming where it happened (callers checkpoint before)."""
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]
    if bad:
        raise FloatingPointError(f"non-finite {', '.join(bad)} at {where}; the last good checkpoint is kept")
