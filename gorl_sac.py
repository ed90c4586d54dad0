"""GoRL with a SAC encoder in latent space and a diffusion decoder (GoRL-SAC), JAX + MJX.

Paper 002, Appendix F.2: the off-policy instantiation of GoRL. The policy is split in two:
    z ~ pi_theta(z | s)       the *encoder*, SAC's actor: a tanh-free diagonal Gaussian over a
                              latent of the action's size, regularized toward the prior N(0, I)
    a = g_phi(s, z)           the *decoder*, a conditional diffusion model run as deterministic
                              DDIM from x_T = z (Appendix C.1)
and the environment receives tanh(a). SAC acts on the latent MDP induced by the frozen decoder:
its twin critics estimate Q(s, z), the actor's gradient flows through the critic only, never
through the denoising chain. Training alternates in stages (Algorithm 1):
    stage 0:  the decoder is the identity, g(s, z) = z, so latent SAC is Gaussian SAC
    stage m:  re-initialize the encoder to the prior N(0, I); run SAC in latent space with the
              decoder frozen and treated as part of the environment
    between:  freeze the encoder, collect *fresh* rollouts (s, a) with the current encoder and
              decoder (never the replay buffer), and fit the decoder by denoising from noise
              drawn fresh from the fixed prior (Eq. 4, 17)
Equation numbers are those of paper 001 (GoRL, first version), as in the SPEC; the SAC equations
are those of Haarnoja et al. (2018), "Soft Actor-Critic Algorithms and Applications".

Tasks: Hopper, Walker2d, HalfCheetah (Brax's MJX ports of the Gym tasks of the paper) and
every DMC task of MuJoCo Playground (see `make_env`).

    python gorl_sac.py --env-name Hopper --seed 1
    python gorl_sac.py --env-name Hopper --seed 1 --plain-sac     # the Gaussian SAC baseline
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from brax import envs as brax_envs

import common
import running


@dataclasses.dataclass
class Args(running.RunFlags):
    env_name: str = "Hopper"
    """task: Hopper, Walker2d, HalfCheetah (Brax MJX ports of the paper's Gym tasks) or a DMC task"""
    stage_steps: tuple[int, ...] = (2_000_000, 1_000_000, 1_000_000)
    """environment steps of latent SAC in each stage (stage 0 uses the identity decoder)"""
    plain_sac: bool = False
    """baseline: Gaussian SAC, i.e. the identity decoder, no refinement, one stage of sum(stage_steps)"""
    # --- latent SAC (the encoder), paper 002 Table 5
    num_envs: int = 16
    """parallel environments collecting transitions"""
    fresh_start_states: bool = True
    """redraw every environment's start state at each training chunk (off: reuse those of the first reset)"""
    chunk_length: int = 50
    """environment steps (of all num_envs environments) per jitted training call"""
    utd_ratio: float = 20.0
    """update-to-data ratio: gradient steps per environment transition (utd_ratio * num_envs per step)"""
    batch_size: int = 256
    """transitions per gradient step, sampled uniformly from the replay buffer"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (transitions); it is emptied at every stage boundary"""
    learning_starts: int = 5_000
    """transitions collected with the freshly re-initialized encoder (the prior) before the first
    gradient step of each stage"""
    learning_rate: float = 3e-4
    """Adam learning rate of the encoder, the critics and the entropy temperature"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target smoothing: target <- tau * critic + (1 - tau) * target after every gradient step"""
    init_alpha: float = 1.0
    """entropy temperature alpha at the start of stage 0 (later stages keep the last stage's)"""
    target_entropy: float | None = None
    """entropy target of the automatic temperature (default: -latent size)"""
    kl_beta: float = 1e-3
    """weight beta of KL(encoder || N(0, I)) in the actor loss (Eq. 3)"""
    reward_scaling: float = 1.0
    """multiply rewards by this for learning (returns are reported unscaled)"""
    encoder_hidden: tuple[int, ...] = (256, 256)
    """encoder (actor) hidden layer widths (SiLU)"""
    critic_hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of each of the two critics Q(s, z) (SiLU)"""
    # --- the diffusion decoder and its refinement (Appendix C.1, E.4)
    decoder_hidden: tuple[int, ...] = (64, 64, 64, 64)
    """noise-prediction network hidden layer widths (SiLU)"""
    diffusion_steps: int = 10
    """T: steps of the noise schedule, all of them taken by the DDIM sampler from x_T = z"""
    noise_schedule: Literal["linear", "cosine"] = "cosine"
    """alpha_bar_t over t = 0..T: cosine (Nichol & Dhariwal, Appendix C.1) or linear (1 down to 1e-3)"""
    denoised_clip: float | None = None
    """DDIM clips its clean-action estimate x_0 to [-c, c] (pre-squash); None: no clipping"""
    decoder_output: Literal["x0", "eps"] = "eps"
    """units of the network's learned output inside eps_phi: eps (noise units, Appendix C.1) or x0
    (clean action units, see gorl_diffusion.py)"""
    refine_envs: int = 64
    """parallel environments that collect a refinement dataset, each episode from a fresh start state"""
    refine_iterations: int = 2
    """batches of refine_envs full episodes in one refinement (64 x 2 x 1000 = 128k transitions)"""
    refine_epochs: int = 50
    """decoder training epochs over a refinement dataset"""
    refine_batch_size: int = 8192
    """decoder training minibatch size"""
    refine_learning_rate: float = 3e-4
    """Adam learning rate of the decoder"""
    # --- evaluation and bookkeeping
    eval_every: int = 100_000
    """evaluate every this many environment steps (global step axis across stages)"""
    num_eval_envs: int = 128
    """environments in one evaluation (one full episode each, deterministic policy)"""


# ---------------------------------------------------------------------------------------------
# Environments: the paper's Gym locomotion tasks through Brax's MJX ports, and the DMC suite
# ---------------------------------------------------------------------------------------------

# Paper 002 ran Hopper-v2, Walker2D-v2 and HalfCheetah-v2 (Table 5: observation sizes 11, 17, 17;
# action sizes 3, 6, 6). Brax's `hopper`, `walker2d` and `halfcheetah` are ports of exactly those
# Gym tasks (same MJCF models, reward terms, health ranges and early termination, same sizes);
# with backend="mjx" they step in MJX inside the same jit as SAC. Playground has no Gym tasks.
GYM_TASKS = {"Hopper": "hopper", "Walker2d": "walker2d", "HalfCheetah": "halfcheetah"}


def env_name_check(name: str) -> tuple[bool, str]:
    names = (*GYM_TASKS, *running.dmc_env_names())
    return name in names, (f"unknown task {name!r}; valid tasks are the Gym locomotion tasks "
                           f"{', '.join(GYM_TASKS)} and the DMC tasks: {', '.join(running.dmc_env_names())}")


def make_env(args: Args):
    """The environment this script trains on, before `common.make_env` wraps it (auto-reset,
    episode bookkeeping, tanh-squashed actions): a Gym task as a Brax environment, else the MuJoCo
    Playground task `args.env_name`. Brax's locomotion tasks terminate early (`done` without
    `truncation`: no bootstrap); the time limit truncates (`truncation` = 1: SAC bootstraps from
    `info["next_obs"]`, the true last observation). To train on your own task, return your
    environment here (a Playground `MjxEnv` or a Brax `Env`), or pass it to `main(args, env)`
    (README, "Your own environment")."""
    if args.env_name in GYM_TASKS:
        return brax_envs.get_environment(GYM_TASKS[args.env_name], backend="mjx")
    ok, message = env_name_check(args.env_name)
    if not ok:
        sys.exit(f"error: {message}")
    return running.load_playground_env(args.env_name, args.impl)


# ---------------------------------------------------------------------------------------------
# Budgets and flag validation
# ---------------------------------------------------------------------------------------------


def stage_budgets(args: Args) -> tuple[int, ...]:
    """Plain SAC runs the whole budget as one stage with the identity decoder."""
    return (sum(args.stage_steps),) if args.plain_sac else tuple(args.stage_steps)


def steps_per_chunk(args: Args) -> int:
    return args.chunk_length * args.num_envs


def updates_per_env_step(args: Args) -> int:
    """Gradient steps after each environment step of all num_envs environments."""
    return int(round(args.utd_ratio * args.num_envs))


def chunks_in_stage(args: Args, stage: int) -> int:
    """A stage runs whole chunks: its budget rounded down to a multiple of one chunk."""
    return stage_budgets(args)[stage] // steps_per_chunk(args)


def refine_dataset_size(args: Args) -> int:
    return args.refine_envs * args.refine_iterations * (args.episode_length or common.EPISODE_LENGTH)


# The task-dependent flags (None in Args) on a task that sets nothing; running.TASK_SETTINGS has
# the values every method takes per task, and this method sets none of its own.
TASK_DEFAULTS = {"matmul_precision": "default"}
TASK_SETTINGS: dict[str, dict] = {}


def resolve(args: Args) -> Args:
    """`args` with every task-dependent flag left at None set to the task's value."""
    return running.resolve_task_settings(args, TASK_SETTINGS, TASK_DEFAULTS)


def validate(args: Args) -> None:
    """Reject bad flag values before anything is compiled (task-dependent flags left at None
    are checked at the task's value)."""
    args = resolve(args)
    per_chunk = steps_per_chunk(args)
    updates = args.utd_ratio * args.num_envs
    running.check_args([
        *running.choice_checks(args),
        *running.seed_checks(args),
        (args.episode_length is None or args.episode_length > 0,
         f"--episode-length must be positive, got {args.episode_length}"),
        (args.impl == "jax" or args.env_name not in GYM_TASKS,
         f"--impl {args.impl} applies to DMC tasks only; {args.env_name} runs on Brax's MJX backend"),
        (min(args.num_envs, args.chunk_length, args.batch_size) > 0,
         "--num-envs, --chunk-length and --batch-size must be positive"),
        (args.utd_ratio > 0 and abs(updates - round(updates)) < 1e-6,
         f"--utd-ratio * --num-envs = {updates:g} gradient steps per environment step must be a positive "
         f"whole number"),
        (args.buffer_size >= args.num_envs, f"--buffer-size must hold at least --num-envs = {args.num_envs} transitions"),
        (0 <= args.learning_starts <= args.buffer_size,
         f"--learning-starts {args.learning_starts} must be in [0, --buffer-size {args.buffer_size}]"),
        (len(args.stage_steps) >= 1, "--stage-steps needs at least one stage"),
        (all(n >= per_chunk for n in stage_budgets(args)),
         f"every stage in --stage-steps {list(args.stage_steps)} must hold at least one chunk "
         f"({per_chunk:,} steps = chunk_length * num_envs)"),
        (all(n > args.learning_starts for n in stage_budgets(args)),
         f"every stage in --stage-steps {list(args.stage_steps)} must be longer than --learning-starts "
         f"{args.learning_starts}, or it would never make a gradient step"),
        (0 < args.tau <= 1 and 0 <= args.discount <= 1, "--tau must be in (0, 1] and --discount in [0, 1]"),
        (args.init_alpha > 0, "--init-alpha must be positive"),
        (min(args.refine_envs, args.refine_iterations, args.refine_epochs, args.diffusion_steps) > 0,
         "--refine-envs, --refine-iterations, --refine-epochs and --diffusion-steps must be positive"),
        (args.denoised_clip is None or args.denoised_clip > 0,
         f"--denoised-clip must be positive (or None for no clipping), got {args.denoised_clip}"),
        (0 < args.refine_batch_size <= refine_dataset_size(args),
         f"--refine-batch-size {args.refine_batch_size} must be in [1, the refinement dataset size "
         f"{refine_dataset_size(args):,} = refine_envs * refine_iterations * episode length]"),
        (args.eval_every > 0 and args.num_eval_envs > 0, "--eval-every and --num-eval-envs must be positive"),
    ])


# ---------------------------------------------------------------------------------------------
# Replay buffer: a fixed-size ring of transitions held on the device, updated inside jit
# ---------------------------------------------------------------------------------------------


def replay_init(capacity: int, example: dict) -> dict:
    """An empty ring shaped like `example` (a dict of [batch, ...] arrays) with `capacity` rows."""
    data = jax.tree.map(lambda x: jnp.zeros((capacity, *x.shape[1:]), x.dtype), example)
    return {"data": data, "position": jnp.zeros((), jnp.int32), "size": jnp.zeros((), jnp.int32)}


def replay_add(buffer: dict, batch: dict) -> dict:
    """Write a batch of transitions at the ring's position, overwriting the oldest rows."""
    capacity = jax.tree.leaves(buffer["data"])[0].shape[0]
    n = jax.tree.leaves(batch)[0].shape[0]
    rows = (buffer["position"] + jnp.arange(n)) % capacity
    data = jax.tree.map(lambda d, x: d.at[rows].set(x), buffer["data"], batch)
    return {"data": data, "position": (buffer["position"] + n) % capacity,
            "size": jnp.minimum(buffer["size"] + n, capacity)}


def replay_sample(buffer: dict, key: jax.Array, batch_size: int) -> dict:
    """`batch_size` transitions drawn uniformly (with replacement) from the filled rows."""
    rows = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer["size"], 1))
    return jax.tree.map(lambda d: d[rows], buffer["data"])


def replay_in_order(buffer: dict) -> dict:
    """The stored transitions oldest first (for inspection and tests; not used in training)."""
    capacity = jax.tree.leaves(buffer["data"])[0].shape[0]
    size, position = int(buffer["size"]), int(buffer["position"])
    rows = (np.arange(size) + (position - size)) % capacity
    return jax.tree.map(lambda d: d[rows], buffer["data"])


# ---------------------------------------------------------------------------------------------
# Encoder pi_theta(z | s) (SAC's actor) and twin critics Q(s, z)
# ---------------------------------------------------------------------------------------------


# The encoder's Gaussian. SAC maximizes entropy, and in an unbounded latent space a Gaussian's
# entropy grows with its scale without limit; tanh at the environment makes large latents free
# (no tanh log-det term as in action-space SAC, since the squash is not part of the latent
# policy). Left unbounded, the actor runs to huge latents where the critic can only extrapolate,
# and the critic diverges: with common.gaussian_from_output (scale up to 10, free mean) Q reached
# 1e9 within 10k steps on CartpoleBalance. So the mean is soft-bounded and the scale kept in a
# range around the prior's; the sample z = mean + scale * eps is still a Gaussian draw with an
# exact log-density, no tanh on z (the prior's mean 0 and scale 1 lie inside both ranges). Beyond
# 3 prior standard deviations the decoder has seen no training latents anyway.
LATENT_MEAN_BOUND = 3.0
LATENT_SCALE_MIN, LATENT_SCALE_MAX = 1e-2, 2.0
_LOG_SCALE_MIN, _LOG_SCALE_MAX = float(np.log(LATENT_SCALE_MIN)), float(np.log(LATENT_SCALE_MAX))


def latent_gaussian(out):
    """Mean = 3 tanh(raw / 3), log scale = a sigmoid between log 0.01 and log 2."""
    raw_mean, raw_scale = jnp.split(out, 2, axis=-1)
    mean = LATENT_MEAN_BOUND * jnp.tanh(raw_mean / LATENT_MEAN_BOUND)
    log_scale = _LOG_SCALE_MIN + (_LOG_SCALE_MAX - _LOG_SCALE_MIN) * jax.nn.sigmoid(raw_scale)
    return mean, jnp.exp(log_scale)


def prior_scale_bias() -> float:
    """The raw-scale bias b whose scale is 1: sigmoid(b) = -log_min / (log_max - log_min)."""
    u = -_LOG_SCALE_MIN / (_LOG_SCALE_MAX - _LOG_SCALE_MIN)
    return float(np.log(u / (1.0 - u)))


def init_encoder(key, obs_size: int, latent_size: int, args: Args):
    """An encoder whose output distribution is the prior N(0, I) for every state.

    Zero output weights make it state-independent; a zero mean bias and the scale bias of
    `prior_scale_bias` make it the prior (mean exactly 0, scale 1 to float precision). The
    hidden layers are random, so the encoder can move away from the prior as soon as the output
    layer receives gradients.
    """
    params = common.mlp_init(key, [obs_size, *args.encoder_hidden, 2 * latent_size])
    params[-1] = {
        "w": jnp.zeros_like(params[-1]["w"]),
        "b": jnp.concatenate([jnp.zeros(latent_size), jnp.full(latent_size, prior_scale_bias())]),
    }
    return params


def encoder(params, obs):
    """Mean and scale of pi_theta(z | s): a Gaussian in latent space, no tanh on z (the decoder's
    input is unbounded; the squash is applied to the decoder's output, at the environment)."""
    return latent_gaussian(common.mlp_apply(params, obs))


def sample_latent(params, obs, key):
    """Reparameterized z ~ pi_theta(z | s) and its log-density."""
    mean, scale = encoder(params, obs)
    z = mean + scale * jax.random.normal(key, mean.shape)
    return z, common.gaussian_log_prob(z, mean, scale), mean, scale


def init_critics(key, obs_size: int, latent_size: int, args: Args):
    """Two independent critics, their parameters stacked on a leading axis of size 2."""
    sizes = [obs_size + latent_size, *args.critic_hidden, 1]
    return jax.vmap(lambda k: common.mlp_init(k, sizes))(jax.random.split(key, 2))


def critics(params, obs, z):
    """Q_1(s, z) and Q_2(s, z), shape [2, batch]."""
    x = jnp.concatenate([obs, z], axis=-1)
    return jax.vmap(lambda p: common.mlp_apply(p, x)[..., 0])(params)


def polyak(target, online, tau: float):
    """Target smoothing: target <- tau * online + (1 - tau) * target, leaf by leaf."""
    return jax.tree.map(lambda t, o: tau * o + (1.0 - tau) * t, target, online)


# ---------------------------------------------------------------------------------------------
# Decoder g_phi(s, z): a conditional diffusion model, noise predictor eps_phi(x_t, t, s) (App. C.1)
# ---------------------------------------------------------------------------------------------
#
# Why the noise predictor has a skip connection (the identity at initialization).
#
# Write a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t), with abar_0 = 1 (a_0 = 1, b_0 = 0). One DDIM
# step (eta = 0) with noise estimate eps estimates the clean action and re-noises it one level
# down:
#     x0_hat  = (x_t - b_t eps) / a_t
#     x_{t-1} = a_{t-1} x0_hat + b_{t-1} eps  =  A_t x_t + B_t eps,
#     A_t = a_{t-1} / a_t,   B_t = b_{t-1} - a_{t-1} b_t / a_t.
# A plain zero-initialized network (eps = 0) telescopes to x_0 = x_T / a_T = z / sqrt(abar_T),
# which for the capped cosine schedule with T = 10 is about 204 z: far from the identity. (The
# Bayes-optimal predictor for actions distributed as the prior itself, eps = b_t x_t, is not it
# either: each step multiplies by cos(theta_t - theta_{t-1}), in all 0.88 z.)
#
# The step leaves x_t unchanged if and only if eps = c_t x_t with c_t = (1 - A_t) / B_t. With
# abar_t = cos^2(theta_t), c_t = sin(mid_t) / cos(half_t), mid_t = (theta_{t-1} + theta_t) / 2,
# half_t = (theta_t - theta_{t-1}) / 2, so 0 < c_t < 1 and c_t is close to b_t at the middle of
# the step: c_t x_t is nearly the exact noise of a prior-distributed action. The network is
#     eps_phi(x_t, t, s) = c_t x_t + f_phi(s, x_t, t),
# f_phi an MLP with a zero output layer. Eq. (17) trains eps_phi as a whole and DDIM samples with
# eps_phi as a whole, so this is a fixed linear skip connection inside an ordinary
# epsilon-prediction diffusion model: training and sampling stay consistent. Substituting,
#     x_{t-1} = A_t x_t + B_t (c_t x_t + f) = x_t + B_t f,
# which is how `ddim` computes the step: with f = 0 it returns x_t bit for bit, so at
# initialization g(s, z) = z *exactly* (error 0, not just float precision), for every s and z
# with |z_i| <= denoised_clip (see below; every z when the clip is off).
#
# Clipping x0_hat. B_T is about -31 (abar_T = 2.4e-5), so an error in f at t = T moves x_{T-1}
# 31 times as far; diffusion policies clip x0_hat for this reason (DPPO, Diffusion Policy).
# After clipping, DDIM recomputes the noise from the clipped estimate x0c, which adds
# D_t (x0c - x0_hat) to the step, D_t = a_{t-1} - b_{t-1} a_t / b_t (D_1 = 1, so a = x0c).
# The correction is exactly 0 when nothing is clipped. At initialization x0_hat = r_t x_t with
# r_t = (1 - b_t c_t) / a_t = cos(mid_t) / cos(half_t) <= 1 and x_t = z throughout, so a latent
# with |z_i| <= clip is never clipped, and one beyond it ends at sign(z_i) * clip.
#
# Output units (--decoder-output). With eps (the default here), f_phi is in noise units, as in
# Appendix C.1. With x0 (gorl_diffusion.py's default), f = -(a_t / b_t) h_phi: then
# x0_hat = r_t x_t + h and the step is x_{t-1} = x_t + D_t h, so the network's error enters
# x_{t-1} scaled by D_t <= 1 instead of B_t (-31 at t = T). It is the same eps_phi trained by the
# same Eq. (17) (EDM's output preconditioning, Karras et al. 2022), and h = 0 is still the exact
# identity. gorl_sac.py keeps Appendix C.1's model by default: cosine schedule, eps, no clip.


def alpha_bar(num_steps: int, noise_schedule: str = "linear") -> np.ndarray:
    """abar_t for t = 0..T (abar_0 = 1), in float64.

    linear (the released code's default): abar decreases linearly from 1 to 1e-3 over t / T.
    cosine (the paper's Appendix C.1): Nichol & Dhariwal's, see `common.cosine_alpha_bar`.
    """
    if noise_schedule == "cosine":
        return common.cosine_alpha_bar(num_steps)
    return 1e-3 + (1.0 - 1e-3) * (1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps)


def diffusion_schedule(num_steps: int, decoder_output: str = "x0", noise_schedule: str = "linear") -> dict[str, jax.Array]:
    """The noise schedule and the DDIM coefficients derived above.

    Arrays are indexed by t = 0..T; the step coefficients c, B, r, D and the network's output
    scale are defined for t >= 1 (entry 0 is unused). Computed in float64 so the float32 values
    carry no accumulated error. The derivation holds for any abar decreasing from abar_0 = 1.
    """
    abar = alpha_bar(num_steps, noise_schedule)
    a, b = np.sqrt(abar), np.sqrt(1.0 - abar)
    A = a[:-1] / a[1:]
    B = b[:-1] - a[:-1] * b[1:] / a[1:]
    c = (1.0 - A) / B
    r = np.minimum((1.0 - b[1:] * c) / a[1:], 1.0)  # <= 1 in exact arithmetic; keep it so in float
    D = a[:-1] - b[:-1] * a[1:] / b[1:]
    out_scale = np.ones(num_steps) if decoder_output == "eps" else -a[1:] / b[1:]
    pad = lambda x: np.concatenate([[0.0], x])  # noqa: E731
    sched = {"alpha_bar": abar, "sqrt_alpha_bar": a, "sqrt_one_minus_alpha_bar": b, "skip": pad(c),
             "out_scale": pad(out_scale), "step": pad(B), "x0_ratio": pad(r), "clip_correction": pad(D)}
    return {k: jnp.asarray(v, jnp.float32) for k, v in sched.items()}


def init_decoder(key, obs_size: int, action_size: int, args: Args):
    """A zero output layer gives f = 0: every DDIM step is the identity, so g(s, z) = z exactly."""
    params = common.mlp_init(key, [obs_size + action_size + common.TIME_EMBEDDING_SIZE, *args.decoder_hidden, action_size])
    params[-1] = jax.tree.map(jnp.zeros_like, params[-1])
    return params


def noise_residual(params, obs, x_t, t, sched):
    """f_phi(s, x_t, t), the learned part of eps_phi (noise units): the network's output times the
    output scale. The input is [normalized obs, x_t, embedding of t / T]; t in 1..T, an array
    broadcasting against x_t's leading axes."""
    num_steps = sched["alpha_bar"].shape[0] - 1
    t = jnp.broadcast_to(t, x_t.shape[:-1])
    out = common.mlp_apply(params, jnp.concatenate([obs, x_t, common.time_embedding(t / num_steps)], axis=-1))
    return sched["out_scale"][t][..., None] * out


def predict_noise(params, obs, x_t, t, sched):
    """eps_phi(x_t, t, s) = c_t x_t + f_phi(s, x_t, t)."""
    return sched["skip"][t][..., None] * x_t + noise_residual(params, obs, x_t, t, sched)


def ddim(residual, z, sched, denoised_clip: float | None):
    """Deterministic DDIM (eta = 0) from x_T = z down to x_0, given `residual(x_t, t) = f`.

    Each step is x_{t-1} = x_t + B_t f (= A_t x_t + B_t eps_phi, derived above), plus the clip
    correction D_t (x0c - x0_hat), which is exactly 0 where the estimate is inside the clip.
    """
    num_steps = sched["alpha_bar"].shape[0] - 1

    def step(x, t):
        f = residual(x, t)
        x_prev = x + sched["step"][t] * f
        if denoised_clip is not None:
            x0_hat = sched["x0_ratio"][t] * x - sched["sqrt_one_minus_alpha_bar"][t] / sched["sqrt_alpha_bar"][t] * f
            x_prev = x_prev + sched["clip_correction"][t] * (jnp.clip(x0_hat, -denoised_clip, denoised_clip) - x0_hat)
        return x_prev, None

    a, _ = jax.lax.scan(step, z, jnp.arange(num_steps, 0, -1))
    return a


def decode(params, obs, z, sched, denoised_clip: float | None):
    """a = g_phi(s, z): the DDIM chain started at x_T = z (Appendix C.1)."""
    return ddim(lambda x, t: noise_residual(params, obs, x, t, sched), z, sched, denoised_clip)


def diffuse(actions, xi, t, sched):
    """The forward process (Eq. 16): a_t = sqrt(abar_t) a_0 + sqrt(1 - abar_t) xi."""
    return sched["sqrt_alpha_bar"][t][..., None] * actions + sched["sqrt_one_minus_alpha_bar"][t][..., None] * xi


def diffusion_loss(params, obs, actions, xi, t, sched):
    """Denoising loss (Eq. 17): regress eps_phi(a_t, t, s) onto the noise xi that made a_t from the
    action, t ~ U{1..T}. In refinement (Eq. 4) xi is a fresh draw from the fixed prior N(0, I),
    never the encoder's latent. `xi` and `t` may carry leading axes of extra draws per action;
    `obs` and `actions` are broadcast to them."""
    obs = jnp.broadcast_to(obs, xi.shape[:-1] + obs.shape[-1:])
    actions = jnp.broadcast_to(actions, xi.shape)
    eps = predict_noise(params, obs, diffuse(actions, xi, t, sched), t, sched)
    return jnp.mean(jnp.sum((xi - eps) ** 2, axis=-1))


# ---------------------------------------------------------------------------------------------
# SAC losses in latent space (Haarnoja et al., 2018, "SAC: algorithms and applications")
# ---------------------------------------------------------------------------------------------


def critic_loss(critic_params, encoder_params, target_params, alpha, batch, key, args: Args):
    """Soft Bellman residual (their Eq. 5) of both critics on latent transitions (s, z, r, s'):
        y = r + gamma (1 - termination) (min_j Qbar_j(s', z') - alpha log pi(z' | s')),  z' ~ pi(.|s')
    A time-limit truncation is not a termination: s' is then the true last observation."""
    next_z, next_log_prob, _, _ = sample_latent(encoder_params, batch["next_obs"], key)
    next_q = jnp.min(critics(target_params, batch["next_obs"], next_z), axis=0)
    soft_value = next_q - alpha * next_log_prob
    target = args.reward_scaling * batch["reward"] + args.discount * (1.0 - batch["termination"]) * soft_value
    target = jax.lax.stop_gradient(target)
    q = critics(critic_params, batch["obs"], batch["latent"])
    loss = 0.5 * jnp.sum(jnp.mean((q - target) ** 2, axis=-1))
    return loss, {"loss/critic": loss, "sac/q": q.mean(), "sac/target": target.mean()}


def actor_loss(encoder_params, critic_params, alpha, obs, key, kl_beta: float):
    """Their Eq. 7 in latent space, z reparameterized, plus the prior regularizer of Eq. 3:
        E_s[ E_z~pi[alpha log pi(z|s) - min_j Q_j(s, z)] + beta KL(pi(.|s) || N(0, I)) ].
    Gradients reach the encoder through the critic; the decoder is not involved."""
    z, log_prob, mean, scale = sample_latent(encoder_params, obs, key)
    q = jnp.min(critics(critic_params, obs, z), axis=0)
    kl = common.kl_to_standard_normal(mean, scale).mean()
    loss = jnp.mean(alpha * log_prob - q) + kl_beta * kl
    return loss, {"loss/actor": loss, "sac/entropy": -log_prob.mean(), "sac/kl_prior": kl,
                  "log_prob": jax.lax.stop_gradient(log_prob.mean())}


def temperature_loss(log_alpha, log_prob, target_entropy: float):
    """Automatic entropy temperature (their Eq. 18): J(alpha) = E[-alpha (log pi(z|s) + H_target)],
    with alpha = exp(log_alpha) and log pi from the actor step (no gradient to the encoder)."""
    return -jnp.exp(log_alpha) * (log_prob + target_entropy)


def init_sac(key, obs_size: int, latent_size: int, args: Args, optimizer):
    """A fresh SAC learner: encoder at the prior, new twin critics, targets equal to them, alpha
    at its initial value, new optimizer states. Called at the start of every stage (which then
    keeps the previous stage's alpha)."""
    k_encoder, k_critic = jax.random.split(key)
    params = {
        "encoder": init_encoder(k_encoder, obs_size, latent_size, args),
        "critic": init_critics(k_critic, obs_size, latent_size, args),
        "log_alpha": jnp.log(jnp.float32(args.init_alpha)),
    }
    params["target_critic"] = jax.tree.map(jnp.copy, params["critic"])
    opt_state = {k: optimizer.init(params[k]) for k in ("encoder", "critic", "log_alpha")}
    return params, opt_state


def make_sac_update(optimizer, target_entropy: float, args: Args):
    """One gradient step: critics, then the encoder against the updated critics, then the
    temperature, then the Polyak update of the target critics."""

    def apply(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def sac_update(carry, key, buffer, norm):
        params, opt_state = carry
        k_batch, k_critic, k_actor = jax.random.split(key, 3)
        batch = replay_sample(buffer, k_batch, args.batch_size)
        batch = dict(batch, obs=common.normalize(norm, batch["obs"]),
                     next_obs=common.normalize(norm, batch["next_obs"]))
        alpha = jnp.exp(params["log_alpha"])

        grads, critic_metrics = jax.grad(critic_loss, has_aux=True)(
            params["critic"], params["encoder"], params["target_critic"], alpha, batch, k_critic, args)
        critic, critic_opt = apply(grads, opt_state["critic"], params["critic"])

        grads, actor_metrics = jax.grad(actor_loss, has_aux=True)(
            params["encoder"], critic, alpha, batch["obs"], k_actor, args.kl_beta)
        enc, enc_opt = apply(grads, opt_state["encoder"], params["encoder"])

        log_prob = actor_metrics.pop("log_prob")
        alpha_loss, grads = jax.value_and_grad(temperature_loss)(params["log_alpha"], log_prob, target_entropy)
        log_alpha, alpha_opt = apply(grads, opt_state["log_alpha"], params["log_alpha"])

        params = {"encoder": enc, "critic": critic, "log_alpha": log_alpha,
                  "target_critic": polyak(params["target_critic"], critic, args.tau)}
        opt_state = {"encoder": enc_opt, "critic": critic_opt, "log_alpha": alpha_opt}
        metrics = {**critic_metrics, **actor_metrics, "loss/temperature": alpha_loss, "sac/alpha": alpha}
        return (params, opt_state), metrics

    return sac_update


# ---------------------------------------------------------------------------------------------
# The jitted training chunk: chunk_length environment steps, each followed by UTD updates
# ---------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """Everything a stage trains and runs with; checkpoints hold the first four fields."""

    params: dict | None  # {"encoder", "critic", "target_critic", "log_alpha"}: the stage's SAC learner
    norm: common.Normalizer  # the encoder's and critics' observation statistics
    decoder: list  # g_phi, frozen during a stage, refitted between stages
    decoder_norm: common.Normalizer  # the statistics the decoder was fitted with, fixed with it
    opt_state: Any = None  # Adam states of the encoder, the critics and log alpha
    buffer: dict | None = None  # the stage's replay ring (emptied at every stage)
    env_state: Any = None  # the batched training environments, mid-episode


STAGE_KEYS = ("params", "norm", "decoder", "decoder_norm")


def make_act(args: Args):
    """The latent policy's environment action: a = g(s, z), or a = z for plain SAC."""
    sched = diffusion_schedule(args.diffusion_steps, args.decoder_output, args.noise_schedule)

    def act(state, obs, z):
        if args.plain_sac:
            return z
        return decode(state.decoder, common.normalize(state.decoder_norm, obs), z, sched, args.denoised_clip)

    return act


def make_train_chunk(env, optimizer, target_entropy: float, args: Args):
    sac_update = make_sac_update(optimizer, target_entropy, args)
    num_updates = updates_per_env_step(args)
    act = make_act(args)

    def learn(operands):
        params, opt_state, buffer, norm, key = operands
        (params, opt_state), metrics = jax.lax.scan(
            lambda carry, k: sac_update(carry, k, buffer, norm), (params, opt_state),
            jax.random.split(key, num_updates))
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    def env_step(state, key):
        k_act, k_learn = jax.random.split(key)
        env_state, norm = state.env_state, state.norm
        obs = env_state.obs
        z, _, _, _ = sample_latent(state.params["encoder"], common.normalize(norm, obs), k_act)
        action = act(state, obs, z)
        next_env_state = env.step(env_state, action)
        truncation = next_env_state.info["truncation"]
        transition = {
            "obs": obs,
            "latent": z,  # SAC's action in the latent MDP; the decoder is part of the dynamics
            "reward": next_env_state.reward,
            "next_obs": next_env_state.info["next_obs"],  # the true next observation, also at a reset
            "termination": next_env_state.done * (1.0 - truncation),
        }
        buffer = replay_add(state.buffer, transition)
        norm = common.normalizer_update(norm, obs)

        # Warm-up: no gradient step until the stage's buffer holds learning_starts transitions.
        operands = (state.params, state.opt_state, buffer, norm, k_learn)
        skip_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(learn, operands)[2])
        params, opt_state, metrics = jax.lax.cond(
            buffer["size"] >= args.learning_starts, learn,
            lambda ops: (ops[0], ops[1], skip_metrics), operands)
        learned = (buffer["size"] >= args.learning_starts).astype(jnp.float32)

        done = next_env_state.done
        info = {"learned": learned, "episodes": done.sum(),
                "return_sum": (next_env_state.info["episode_metrics"]["sum_reward"] * done).sum(),
                "action_abs": jnp.abs(jnp.tanh(action)).mean(), "latent_abs": jnp.abs(z).mean()}
        state = state._replace(params=params, opt_state=opt_state, buffer=buffer, norm=norm, env_state=next_env_state)
        return state, (metrics, info)

    def train_chunk(state, key):
        if args.fresh_start_states:
            key, k_starts = jax.random.split(key)
            state = state._replace(env_state=common.redraw_start_states(env, state.env_state, k_starts))
        state, (metrics, info) = jax.lax.scan(env_step, state, jax.random.split(key, args.chunk_length))
        n_learned = info["learned"].sum()
        # Averages over the environment steps that made gradient steps (zeros during warm-up).
        metrics = jax.tree.map(lambda m: (m * info["learned"]).sum() / jnp.maximum(n_learned, 1.0), metrics)
        episodes = info["episodes"].sum()
        metrics.update({
            "train/episode_return": jnp.where(episodes > 0, info["return_sum"].sum() / jnp.maximum(episodes, 1), jnp.nan),
            "train/episodes": episodes,
            "train/action_abs_mean": info["action_abs"].mean(),
            "train/latent_abs_mean": info["latent_abs"].mean(),
            "sac/gradient_steps": n_learned * num_updates,
            "buffer/size": state.buffer["size"],
        })
        return state, metrics

    return train_chunk


# ---------------------------------------------------------------------------------------------
# Decoder refinement: a fresh dataset from the frozen encoder, then denoising from the prior
# ---------------------------------------------------------------------------------------------


def make_refinement(env, args: Args):
    decoder_optimizer = optax.adam(args.refine_learning_rate)
    num_minibatches = refine_dataset_size(args) // args.refine_batch_size
    sched = diffusion_schedule(args.diffusion_steps, args.decoder_output, args.noise_schedule)
    act = make_act(args)

    def collect(state, key):
        """(observation, pre-squash action) pairs from the frozen encoder (sampling z) and the
        current decoder: refine_iterations batches of refine_envs full episodes, each episode
        from a fresh start state. Fresh rollouts, not the replay buffer (paper 002, F.2)."""

        def policy(obs, key):
            z, _, _, _ = sample_latent(state.params["encoder"], common.normalize(state.norm, obs), key)
            return act(state, obs, z), {}

        data = common.collect_episodes(env, policy, key, args.refine_envs * args.refine_iterations, args.refine_envs)
        dataset = {k: data[k].reshape(-1, data[k].shape[-1]) for k in ("obs", "action")}
        return dataset, common.completed_episode_return(data)[0]

    def fit(decoder_params, decoder_norm, dataset, key):
        """Eq. 4: minimize the denoising loss over the dataset, the noise xi (the decoder's
        latent) drawn fresh from the fixed prior N(0, I) and the step t uniform in 1..T."""
        T = args.diffusion_steps

        def draw(batch, key):
            k_noise, k_step = jax.random.split(key)
            actions = batch["action"]
            xi = jax.random.normal(k_noise, actions.shape)
            return xi, jax.random.randint(k_step, actions.shape[:-1], 1, T + 1)

        def update(carry, batch):
            params, opt_state, key = carry
            key, k_draw = jax.random.split(key)
            xi, t = draw(batch, k_draw)
            loss, grads = jax.value_and_grad(diffusion_loss)(params, batch["obs"], batch["action"], xi, t, sched)
            updates, opt_state = decoder_optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), {"loss": loss}

        k_sgd, k_carry, k_final = jax.random.split(key, 3)
        data = dict(dataset, obs=common.normalize(decoder_norm, dataset["obs"]))
        carry = (decoder_params, decoder_optimizer.init(decoder_params), k_carry)
        (params, _, _), metrics = common.minibatch_sgd(update, carry, data, k_sgd, args.refine_epochs, num_minibatches)
        head = jax.tree.map(lambda x: x[: args.refine_batch_size], data)
        xi, t = draw(head, k_final)
        final_loss = diffusion_loss(params, head["obs"], head["action"], xi, t, sched)
        return params, {"refine/loss_mean": metrics["loss"], "refine/loss_final": final_loss}

    return jax.jit(collect), jax.jit(fit)


# ---------------------------------------------------------------------------------------------
# main: the stage loop
# ---------------------------------------------------------------------------------------------


def make_evaluate(env, args: Args):
    """`evaluate(state, key, prior_latents=False)`: deterministic policy, the encoder's mean
    latent (or the prior's mean, 0), then g(s, z). One compiled function for both uses (the flag
    is an array, not a static argument)."""
    evaluator = common.make_evaluator(env, args.num_eval_envs)
    act = make_act(args)

    @jax.jit
    def evaluate_jit(state, key, prior_latents):
        def policy(obs, key):
            z, _ = encoder(state.params["encoder"], common.normalize(state.norm, obs))
            return act(state, obs, jnp.where(prior_latents, jnp.zeros_like(z), z))

        return evaluator(policy, key)

    return lambda state, key, prior_latents=False: evaluate_jit(state, key, jnp.asarray(prior_latents))


def refine_decoder(state, key, collect, fit, evaluate, runs, args: Args):
    """Algorithm 1, lines 14-18, between stage m-1 and stage m: freeze the encoder, collect
    fresh rollouts with it and the current decoder, fit the decoder to map the prior onto those
    actions (Eq. 4), and check it: the return of the refined decoder under the prior's mean.
    Every seed at once (`collect`, `fit` and `evaluate` map over the seed axis). Returns the
    state with the new decoder and the refinement's metrics."""
    k_collect, k_fit, k_eval = runs.split(key, 3)
    t0 = time.time()
    dataset, collect_return = collect(state, k_collect)
    # The decoder keeps the normalizer it was fitted with: it is a fixed function of the raw
    # state for the whole next stage, while the encoder's statistics move on.
    decoder, metrics = fit(state.decoder, state.norm, dataset, k_fit)
    state = state._replace(decoder=decoder, decoder_norm=jax.tree.map(jnp.copy, state.norm))
    metrics = {**jax.device_get(metrics), "refine/collect_return": jax.device_get(collect_return),
               "refine/prior_latent_return": jax.device_get(evaluate(state, k_eval, True)["eval/return"]),
               "refine/transitions": refine_dataset_size(args), "refine/seconds": time.time() - t0}
    return state, metrics


def start_stage(state, key, optimizer, obs_size: int, action_size: int, args: Args):
    """Algorithm 1, lines 6-7: a fresh SAC learner in the new latent MDP, the decoder frozen.

    The refined decoder changed what every latent means: a stored (s, z, r, s') was produced by
    the *old* decoder's action g_old(s, z), so under g_new the same z leads to another action
    and the transition is not a sample of the new latent MDP. Q(s, z) learned on those
    transitions is likewise a value of the old latent MDP. Relabeling would need
    g_new^{-1}(s, a) for every stored action (an approximate DDIM inversion), so we take the
    simple correct option: empty the replay buffer and re-initialize the critics, their targets
    and the optimizer states together with the encoder (to the prior). Nothing is lost that the
    next steps do not recover: with z ~ N(0, I) the refined decoder reproduces the previous
    stage's action distribution, so the learning_starts warm-up transitions, collected with the
    prior encoder, come from the previous policy, on-policy for the fresh learner, and the new
    critics start there.

    The entropy temperature alpha is kept: it is the multiplier of the entropy constraint on a
    Gaussian over the same latent space with the same prior, which refinement does not change.
    Reset to init_alpha, it made the fresh encoder first widen past the prior (scale up to 2),
    into latents the decoder never saw, losing the previous policy the prior reproduces
    (CartpoleBalance, alpha 0.02 -> 0.1: the eval return fell from 383 with prior latents to 240
    over stage 1). Stage 0 runs the same way with the identity decoder and alpha = init_alpha.
    """
    params, opt_state = init_sac(key, obs_size, action_size, args, optimizer)
    if state.params is not None:
        params["log_alpha"] = state.params["log_alpha"]
    example = {"obs": jnp.zeros((1, obs_size)), "latent": jnp.zeros((1, action_size)),
               "reward": jnp.zeros((1,)), "next_obs": jnp.zeros((1, obs_size)), "termination": jnp.zeros((1,))}
    return state._replace(params=params, opt_state=opt_state, buffer=replay_init(args.buffer_size, example))


def main(args: Args, env=None) -> None:
    """Train on the task `args.env_name`, or on `env`, your own environment object (a Playground
    `MjxEnv` or a Brax `Env`; `args.env_name` then only names the run folder)."""
    args = running.start(args, Args, resolve, validate)  # --resume's flags, the task's values, checked
    env = common.make_env(make_env(args) if env is None else env, args.impl, args.episode_length)
    args = dataclasses.replace(args, episode_length=env.episode_length)  # recorded in config.json
    if isinstance(env.observation_size, dict):
        sys.exit(f"error: gorl_sac.py takes array observations; this environment's is a dict with the keys "
                 f"{', '.join(env.observation_size)}. Train it with a PPO-family script (they give the policy "
                 "\"state\" and the critic \"privileged_state\"), or return obs[\"state\"] from its step().")
    obs_size, action_size = env.observation_size, env.action_size
    target_entropy = -float(action_size) if args.target_entropy is None else args.target_entropy
    optimizer = optax.adam(args.learning_rate)
    budgets, per_chunk = stage_budgets(args), steps_per_chunk(args)
    total_steps = sum(chunks_in_stage(args, m) for m in range(len(budgets))) * per_chunk
    runs = running.Runs(args, "gorl_sac", total_steps=total_steps, default_exp_name="sac_plain" if args.plain_sac else None)

    def init(key):
        key, k_decoder, k_env = jax.random.split(key, 3)
        state = TrainState(params=None, norm=common.normalizer_init(obs_size), decoder_norm=common.normalizer_init(obs_size),
                           decoder=init_decoder(k_decoder, obs_size, action_size, args),  # stage 0: the identity
                           env_state=env.reset(jax.random.split(k_env, args.num_envs)))
        return state, key

    # Every function below is one seed's, mapped over the leading seed axis of all seeds' states.
    init = runs.parallel(init)
    new_learner = runs.parallel(lambda state, key: start_stage(state, key, optimizer, obs_size, action_size, args))
    train_chunk = runs.timed(runs.parallel(make_train_chunk(env, optimizer, target_entropy, args), donate_argnums=0),
                             per_chunk)
    collect, fit = (runs.parallel(f) for f in make_refinement(env, args))
    evaluate = runs.parallel(make_evaluate(env, args), in_axes=(0, 0, None))  # (state, key, prior_latents)

    def refine(state, key, stage):  # lines 14-18, before `stage`
        key, k_refine = runs.split(key)
        state, metrics = refine_decoder(state, k_refine, collect, fit, evaluate, runs, args)
        runs.log_refinement(step, stage, metrics)
        stage_rows[-1]["refined_prior_return"] = metrics["refine/prior_latent_return"]
        return state, key

    state, key = init(runs.keys())  # line 2
    step, stage_rows, first_stage = 0, [], 0
    if args.resume and (resumed := runs.resume_stages(state, STAGE_KEYS)):  # after the last completed stage
        state, step, key, stage_rows, first_stage, _ = resumed

    print(f"{args.env_name}: {'plain Gaussian SAC' if args.plain_sac else 'GoRL-SAC'}, stages "
          f"{[f'{chunks_in_stage(args, m) * per_chunk:,}' for m in range(len(budgets))]} steps, "
          f"{updates_per_env_step(args)} gradient steps per step of {args.num_envs} environments")
    with runs:  # closes the run folders; Ctrl-C says how to resume
        if 0 < first_stage < len(budgets):
            state, key = refine(state, key, first_stage)  # the resumed run's pending refinement
        for stage in range(first_stage, len(budgets)):  # line 4
            key, k_sac = runs.split(key)
            state = new_learner(state, k_sac)  # lines 6-7
            end_step = step + chunks_in_stage(args, stage) * per_chunk
            print(f"stage {stage}: latent SAC from step {step:,} to {end_step:,}")
            while step + per_chunk <= end_step:  # lines 9-13: latent SAC, the decoder frozen
                key, k_chunk, k_eval = runs.split(key, 3)
                state, metrics = train_chunk(state, k_chunk)
                step += per_chunk
                if running.evaluation_due(step, per_chunk, end_step, args.eval_every):
                    metrics.update(jax.device_get(evaluate(state, k_eval, False)))
                runs.log_iteration(step, metrics, stage)
            stage_rows.append({"stage": stage, "step": step, "return": metrics["eval/return"]})
            runs.save_stage(state, STAGE_KEYS, stage, step, key, stage_rows)  # (not the buffer: each stage empties it)
            if stage + 1 < len(budgets):
                state, key = refine(state, key, stage + 1)
    runs.finish(step, stage_rows=stage_rows)


if __name__ == "__main__":
    main(tyro.cli(Args))
