"""GoRL with a PPO encoder in latent space and a diffusion decoder (GoRL-Diff), JAX + MJX.

The policy is split in two (Zhang et al., GoRL):
    z ~ pi_theta(z | s)       the *encoder*, a diagonal Gaussian over a latent of the action's size
    a = g_phi(s, z)           the *decoder*, a conditional diffusion model whose deterministic DDIM
                              chain (eta = 0) starts from x_T = z and ends at the action x_0 = a
and the environment receives tanh(a). Training alternates in stages (Algorithm 1):
    stage 0:  the decoder is the identity, g(s, z) = z, so latent PPO is Gaussian PPO
    stage m:  re-initialize the encoder to the prior N(0, I); train it with PPO in latent space,
              the decoder frozen and treated as part of the environment (Eq. 5)
    between:  freeze the encoder, collect fresh rollouts (s, a), and fit the decoder's noise
              predictor by the DDPM loss with noise drawn fresh from the fixed prior (Eq. 4, 17)

    python gorl_diffusion.py --env-name HopperStand --seed 1

The decoder (Appendix C.1): an epsilon-prediction network, T = 10 diffusion steps on the cosine
schedule, trained with Eq. (17) and sampled with deterministic DDIM over all T steps. How its
zero-initialized network is made the exact identity is derived above `diffusion_schedule`.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

import common


@dataclasses.dataclass
class Args:
    env_name: str = "HopperStand"
    """DMC task from MuJoCo Playground (e.g. CheetahRun, FingerSpin, HopperStand, WalkerWalk)"""
    seed: int = 1
    """random seed"""
    impl: str = "jax"
    """physics backend: jax (MJX) or warp (MuJoCo Warp)"""
    stage_steps: tuple[int, ...] = (60_000_000, 60_000_000, 30_000_000, 30_000_000)
    """environment steps of latent PPO in each stage (stage 0 uses the identity decoder)"""
    # --- latent PPO (the encoder), paper Appendix E, Table 4
    num_envs: int = 2048
    """parallel environments"""
    unroll_length: int = 30
    """length of one collected sequence (Brax's unroll_length)"""
    batch_size: int = 1024
    """sequences per minibatch"""
    num_minibatches: int = 32
    """minibatches per epoch; one iteration collects batch_size * num_minibatches sequences"""
    num_epochs: int = 16
    """optimization epochs over each iteration's data"""
    learning_rate: float = 1e-3
    """Adam learning rate of the encoder and critic"""
    discount: float = 0.995
    """discount factor gamma"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    vf_coef: float = 0.25
    """value loss coefficient"""
    ent_coef: float = 0.01
    """entropy bonus coefficient of the latent policy"""
    reward_scaling: float = 10.0
    """multiply rewards by this for learning (returns are reported unscaled)"""
    stage0_clip_eps: float = 0.15
    """PPO ratio clipping in stage 0"""
    clip_eps: float = 0.3
    """PPO ratio clipping in stages 1 and later"""
    stage0_max_grad_norm: float = 0.5
    """global gradient-norm clip in stage 0"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip in stages 1 and later"""
    stage0_kl_beta: float = 5e-4
    """weight beta of KL(encoder || N(0, I)) in stage 0 (Eq. 3)"""
    kl_beta: float = 1e-3
    """weight beta of KL(encoder || N(0, I)) in stages 1 and later (Eq. 3)"""
    encoder_hidden: tuple[int, ...] = (32, 32, 32, 32)
    """encoder hidden layer widths (SiLU)"""
    critic_hidden: tuple[int, ...] = (256, 256, 256, 256, 256)
    """critic hidden layer widths (SiLU)"""
    # --- the diffusion decoder and its refinement (Appendix C.1, E.4)
    decoder_hidden: tuple[int, ...] = (64, 64, 64, 64)
    """noise-prediction network hidden layer widths (SiLU)"""
    diffusion_steps: int = 10
    """T: steps of the cosine noise schedule, all of them taken by the DDIM sampler from x_T = z"""
    denoised_clip: float | None = 5.0
    """DDIM clips its clean-action estimate x_0 to [-c, c] (pre-squash; tanh(5) = 0.99991), which
    bounds the ~30x amplification of noise-prediction errors at t = T; None: no clipping"""
    decoder_output: str = "x0"
    """units of the network's learned output inside eps_phi: x0 (clean action, scaled by
    -sqrt(abar_t / (1 - abar_t)): the same eps-prediction loss and sampler without the ~30x error
    amplification at t = T) or eps (noise units, as the original code)"""
    refine_envs: int = 64
    """parallel environments that collect a refinement dataset"""
    refine_iterations: int = 8
    """full episodes each refinement environment runs (8 x 64 x 1000 = 512k transitions)"""
    refine_epochs: int = 50
    """decoder training epochs over a refinement dataset"""
    refine_batch_size: int = 8192
    """decoder training minibatch size"""
    refine_learning_rate: float = 3e-4
    """Adam learning rate of the decoder"""
    # --- ablations of paper 002 (Fig. 4) and the decoder-iteration study; off by default
    refine_latents: str = "prior"
    """noise paired with each action in Eq. (17) during refinement: prior (fresh N(0, I) draws, the
    method) or encoder (the latent the encoder sampled for that action: the self-reconstruction ablation)"""
    encoder_reset: bool = True
    """re-initialize the encoder to the prior at every stage (--no-encoder-reset: keep training it)"""
    frozen_decoder: str | None = None
    """stage checkpoint (runs/.../checkpoints/stageK.pkl) whose decoder is used, frozen, in every
    stage of this run: no refinement (train a fresh encoder against an earlier run's decoder)"""
    # --- evaluation and bookkeeping
    eval_every: int = 6_000_000
    """evaluate every this many environment steps (global step axis across stages)"""
    num_eval_envs: int = 128
    """environments in one evaluation (one full episode each, deterministic policy)"""
    runs_dir: str = "runs"
    """where run folders are created"""
    resume: str | None = None
    """run folder to resume from its last completed stage (its config.json replaces the other flags)"""


def steps_per_iteration(args: Args) -> int:
    return args.batch_size * args.num_minibatches * args.unroll_length


def iterations_in_stage(args: Args, stage: int) -> int:
    """A stage runs whole iterations: its budget rounded down to a multiple of one iteration."""
    return args.stage_steps[stage] // steps_per_iteration(args)


def refine_dataset_size(args: Args) -> int:
    return args.refine_envs * args.refine_iterations * common.EPISODE_LENGTH


def validate(args: Args) -> None:
    """Reject bad flag values before anything is compiled."""
    per_iter = steps_per_iteration(args)
    common.check_args([
        *common.ppo_layout_checks(args),
        (len(args.stage_steps) >= 1, "--stage-steps needs at least one stage"),
        (all(n >= per_iter for n in args.stage_steps),
         f"every stage in --stage-steps {list(args.stage_steps)} must hold at least one iteration "
         f"({per_iter:,} steps = batch_size * num_minibatches * unroll_length)"),
        (min(args.refine_envs, args.refine_iterations, args.refine_epochs, args.diffusion_steps) > 0,
         "--refine-envs, --refine-iterations, --refine-epochs and --diffusion-steps must be positive"),
        (args.denoised_clip is None or args.denoised_clip > 0,
         f"--denoised-clip must be positive (or None for no clipping), got {args.denoised_clip}"),
        (args.decoder_output in ("eps", "x0"), f"--decoder-output must be eps or x0, got {args.decoder_output!r}"),
        (0 < args.refine_batch_size <= refine_dataset_size(args),
         f"--refine-batch-size {args.refine_batch_size} must be in [1, the refinement dataset size "
         f"{refine_dataset_size(args):,} = refine_envs * refine_iterations * {common.EPISODE_LENGTH}]"),
        (args.refine_latents in ("prior", "encoder"), f"--refine-latents must be prior or encoder, got {args.refine_latents!r}"),
        (args.frozen_decoder is None or os.path.isfile(args.frozen_decoder),
         f"--frozen-decoder {args.frozen_decoder!r} is not a file (expected runs/.../checkpoints/stageK.pkl)"),
    ])


# ---------------------------------------------------------------------------------------------
# Encoder pi_theta(z | s) and critic V(s)
# ---------------------------------------------------------------------------------------------


def init_encoder(key, obs_size: int, latent_size: int, args: Args):
    """An encoder whose output distribution is exactly the prior N(0, I) for every state.

    Zero output weights make it state-independent; a zero mean bias and a scale bias b with
    softplus(b) + 1e-3 = 1 make it the prior. The hidden layers are random, so the encoder can
    move away from the prior as soon as the output layer receives gradients.
    """
    params = common.mlp_init(key, [obs_size, *args.encoder_hidden, 2 * latent_size])
    params[-1] = {
        "w": jnp.zeros_like(params[-1]["w"]),
        "b": jnp.concatenate([jnp.zeros(latent_size), jnp.full(latent_size, common.unit_scale_bias())]),
    }
    return params


def encoder(params, obs):
    """Mean and scale of pi_theta(z | s)."""
    return common.gaussian_from_output(common.mlp_apply(params, obs))


def critic(params, obs):
    return common.mlp_apply(params, obs)[..., 0]


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
# Output units (--decoder-output). With eps, f_phi is in noise units, as in Appendix C.1. With
# x0 (the default), f = -(a_t / b_t) h_phi: then x0_hat = r_t x_t + h and the step is x_{t-1} = x_t + D_t h, so
# the network's error enters x_{t-1} scaled by D_t <= 1 instead of B_t (-31 at t = T). It is the
# same eps_phi trained by the same Eq. (17) (EDM's output preconditioning, Karras et al. 2022),
# and h = 0 is still the exact identity.


def diffusion_schedule(num_steps: int, decoder_output: str = "x0", s: float = 0.008) -> dict[str, jax.Array]:
    """The cosine schedule (Nichol & Dhariwal 2021) and the DDIM coefficients derived above.

    abar(t) = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2), betas capped at 0.999
    (f(T) = 0 would leave no signal at t = T). Arrays are indexed by t = 0..T; the step
    coefficients c, B, r, D and the network's output scale are defined for t >= 1 (entry 0 is
    unused). Computed in float64 so the float32 values carry no accumulated error.
    """
    abar = common.cosine_alpha_bar(num_steps, s)
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
    never the encoder's latent."""
    eps = predict_noise(params, obs, diffuse(actions, xi, t, sched), t, sched)
    return jnp.mean(jnp.sum((xi - eps) ** 2, axis=-1))


def sample_actions(state, obs, key, num_samples: int, diffusion_steps: int = 10, denoised_clip: float | None = 5.0,
                   decoder_output: str = "x0", from_prior: bool = False):
    """`num_samples` environment actions tanh(g(s, z)) at one raw observation `obs`.

    Latents come from the encoder (or from the prior N(0, I) with `from_prior`), as for the
    action-density figure (paper Fig. 7). `state` is a stage checkpoint (see `main`); pass the
    run's --diffusion-steps, --denoised-clip and --decoder-output.
    """
    obs = jnp.broadcast_to(obs, (num_samples, obs.shape[-1]))
    mean, scale = encoder(state["params"]["encoder"], common.normalize(state["norm"], obs))
    if from_prior:
        mean, scale = jnp.zeros_like(mean), jnp.ones_like(scale)
    z = mean + scale * jax.random.normal(key, mean.shape)
    decoder_obs = common.normalize(state["decoder_norm"], obs)
    sched = diffusion_schedule(diffusion_steps, decoder_output)
    return jnp.tanh(decode(state["decoder"], decoder_obs, z, sched, denoised_clip))


# ---------------------------------------------------------------------------------------------
# Latent PPO loss (Eq. 5 + the KL regularizer of Eq. 3)
# ---------------------------------------------------------------------------------------------


def latent_ppo_loss(params, batch, hp, args: Args):
    """PPO on the latent likelihood ratio pi_theta(z|s) / pi_old(z|s), the decoder frozen (Eq. 5),
    plus beta * KL(pi_theta(.|s) || N(0, I)) averaged over states (Eq. 3)."""
    mean, scale = encoder(params["encoder"], batch["obs"])
    log_prob = common.gaussian_log_prob(batch["latent"], mean, scale)
    policy_loss, clip_fraction = common.clipped_surrogate(
        log_prob - batch["log_prob"], batch["advantage"], hp["clip_eps"]
    )
    kl = common.kl_to_standard_normal(mean, scale).mean()
    value_loss = 0.5 * jnp.mean((critic(params["critic"], batch["obs"]) - batch["target"]) ** 2)
    entropy = common.gaussian_entropy(scale).mean()
    loss = policy_loss + hp["kl_beta"] * kl + args.vf_coef * value_loss - args.ent_coef * entropy
    return loss, {
        "loss/total": loss,
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "loss/kl_prior": kl,
        "encoder/entropy": entropy,
        "encoder/clip_fraction": clip_fraction,
    }


def stage_hyperparameters(args: Args, stage: int):
    """Stage 0 trains more conservatively (the released code's settings). Arrays, not Python
    floats, so that changing them between stages does not recompile the training iteration."""
    first = stage == 0
    return {
        "clip_eps": jnp.float32(args.stage0_clip_eps if first else args.clip_eps),
        "max_grad_norm": jnp.float32(args.stage0_max_grad_norm if first else args.max_grad_norm),
        "kl_beta": jnp.float32(args.stage0_kl_beta if first else args.kl_beta),
    }


def clip_by_global_norm(grads, max_norm):
    norm = optax.tree.norm(grads)
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * factor, grads)


def make_train_iteration(env, optimizer, args: Args):
    rollout_steps = steps_per_iteration(args) // args.num_envs
    sched = diffusion_schedule(args.diffusion_steps, args.decoder_output)

    def update(carry, batch):
        params, opt_state, hp = carry
        grads, metrics = jax.grad(latent_ppo_loss, has_aux=True)(params, batch, hp, args)
        grads = clip_by_global_norm(grads, hp["max_grad_norm"])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, hp), metrics

    def train_iteration(state, key):
        params, norm = state["params"], state["norm"]
        dec, dec_norm = state["decoder"], state["decoder_norm"]
        k_rollout, k_sgd = jax.random.split(key)

        def policy(obs, key):
            # The decoder runs inside the rollout scan: it is part of the latent MDP's dynamics.
            mean, scale = encoder(params["encoder"], common.normalize(norm, obs))
            z = mean + scale * jax.random.normal(key, mean.shape)
            action = decode(dec, common.normalize(dec_norm, obs), z, sched, args.denoised_clip)
            return action, {"latent": z, "log_prob": common.gaussian_log_prob(z, mean, scale)}

        env_state, data = common.rollout(env, state["env_state"], policy, k_rollout, rollout_steps)
        advantages, targets = common.value_targets(
            lambda obs: critic(params["critic"], common.normalize(norm, obs)),
            data, args.reward_scaling, args.discount, args.gae_lambda,
        )
        batch = {
            "obs": common.normalize(norm, data["obs"]),
            "latent": data["latent"],
            "log_prob": data["log_prob"],
            "advantage": advantages,
            "target": targets,
        }
        batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
        (params, opt_state, _), metrics = common.minibatch_sgd(
            update, (params, state["opt_state"], state["hp"]), batch, k_sgd, args.num_epochs, args.num_minibatches
        )
        metrics["train/episode_return"], _ = common.completed_episode_return(data)
        metrics["train/action_abs_mean"] = jnp.abs(jnp.tanh(data["action"])).mean()
        state = dict(state, params=params, opt_state=opt_state, env_state=env_state,
                     norm=common.normalizer_update(norm, data["obs"]))
        return state, metrics

    return train_iteration


# ---------------------------------------------------------------------------------------------
# Decoder refinement: a fresh dataset from the frozen encoder, then Eq. (17) from the prior
# ---------------------------------------------------------------------------------------------


def refinement_inputs(batch, k_xi, k_t, num_steps: int, refine_latents: str = "prior"):
    """The noise xi paired with each action and the diffusion step t for one refinement minibatch.

    GoRL draws xi fresh from the fixed prior N(0, I) (Eq. 4): x_T ~ N(0, I) is where DDIM
    starts from z, so the decoder learns to map the prior to the action distribution. The
    ablation of Fig. 4a instead pairs each action with the latent the encoder produced it from,
    a self-reconstruction loop.
    """
    actions = batch["action"]
    if refine_latents == "encoder":
        xi = batch["latent"]
    else:
        xi = jax.random.normal(k_xi, actions.shape)
    return xi, jax.random.randint(k_t, actions.shape[:-1], 1, num_steps + 1)


def make_refinement(env, args: Args):
    decoder_optimizer = optax.adam(args.refine_learning_rate)
    num_minibatches = refine_dataset_size(args) // args.refine_batch_size
    sched = diffusion_schedule(args.diffusion_steps, args.decoder_output)

    def collect(state, key):
        """(observation, pre-squash action) pairs from the frozen encoder (sampling z) and the
        current decoder: refine_iterations full episodes in each of refine_envs environments."""
        k_reset, k_rollout = jax.random.split(key)
        env_state = common.reset_envs(env, k_reset, args.refine_envs)

        def policy(obs, key):
            mean, scale = encoder(state["params"]["encoder"], common.normalize(state["norm"], obs))
            z = mean + scale * jax.random.normal(key, mean.shape)
            decoder_obs = common.normalize(state["decoder_norm"], obs)
            return decode(state["decoder"], decoder_obs, z, sched, args.denoised_clip), {"latent": z}

        steps = args.refine_iterations * common.EPISODE_LENGTH
        _, data = common.rollout(env, env_state, policy, k_rollout, steps)
        dataset = {k: data[k].reshape(-1, data[k].shape[-1]) for k in ("obs", "action", "latent")}
        return dataset, common.completed_episode_return(data)[0]

    def fit(decoder_params, decoder_norm, dataset, key):
        """Eq. 4: minimize the diffusion loss over the dataset, noise from the fixed prior."""

        def update(carry, batch):
            params, opt_state, key = carry
            key, k_xi, k_t = jax.random.split(key, 3)
            xi, t = refinement_inputs(batch, k_xi, k_t, args.diffusion_steps, args.refine_latents)
            loss, grads = jax.value_and_grad(diffusion_loss)(params, batch["obs"], batch["action"], xi, t, sched)
            updates, opt_state = decoder_optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), {"loss": loss}

        k_sgd, k_carry, k_xi, k_t = jax.random.split(key, 4)
        data = dict(dataset, obs=common.normalize(decoder_norm, dataset["obs"]))
        carry = (decoder_params, decoder_optimizer.init(decoder_params), k_carry)
        (params, _, _), metrics = common.minibatch_sgd(update, carry, data, k_sgd, args.refine_epochs, num_minibatches)
        head = jax.tree.map(lambda x: x[: args.refine_batch_size], data)
        xi, t = refinement_inputs(head, k_xi, k_t, args.diffusion_steps, args.refine_latents)
        final_loss = diffusion_loss(params, head["obs"], head["action"], xi, t, sched)
        return params, {"refine/loss_mean": metrics["loss"], "refine/loss_final": final_loss}

    return jax.jit(collect), jax.jit(fit)


def main(args: Args) -> None:
    if args.resume:
        args = common.args_from_run(Args, args.resume, resume=args.resume)
    validate(args)

    env = common.make_env(args.env_name, args.impl)
    obs_size, action_size = env.observation_size, env.action_size
    optimizer = optax.adam(args.learning_rate)
    run = common.Run(args, "gorl_diffusion", run_dir=args.resume)
    per_iter = steps_per_iteration(args)
    total_steps = sum(iterations_in_stage(args, m) for m in range(len(args.stage_steps))) * per_iter

    train_iteration = jax.jit(make_train_iteration(env, optimizer, args), donate_argnums=0)
    collect, fit = make_refinement(env, args)
    evaluator = common.make_evaluator(env, args.num_eval_envs)
    sched = diffusion_schedule(args.diffusion_steps, args.decoder_output)

    @jax.jit
    def evaluate(state, key, prior_latents=False):
        """Deterministic policy: the encoder's mean latent (or the prior's mean, 0), then DDIM."""

        def act(obs):
            z, _ = encoder(state["params"]["encoder"], common.normalize(state["norm"], obs))
            z = jnp.where(prior_latents, jnp.zeros_like(z), z)
            return decode(state["decoder"], common.normalize(state["decoder_norm"], obs), z, sched, args.denoised_clip)

        return evaluator(act, key)

    key = jax.random.PRNGKey(args.seed)
    key, k_critic, k_decoder, k_env = jax.random.split(key, 4)
    state = {
        "params": {"encoder": None, "critic": common.mlp_init(k_critic, [obs_size, *args.critic_hidden, 1])},
        "norm": common.normalizer_init(obs_size),
        "decoder": init_decoder(k_decoder, obs_size, action_size, args),  # stage 0: the identity
        "decoder_norm": common.normalizer_init(obs_size),
    }
    if args.frozen_decoder:
        source = common.load_checkpoint(args.frozen_decoder)
        state.update(decoder=source["decoder"], decoder_norm=source["decoder_norm"])
        print(f"decoder frozen from {args.frozen_decoder}; no refinement in this run")
    step, first_stage, stage_rows = 0, 0, []
    done = run.completed_stages() if args.resume else []
    if done:
        saved = common.load_checkpoint(run.checkpoint_path(f"stage{done[-1]}.pkl"))
        state = {k: saved[k] for k in ("params", "norm", "decoder", "decoder_norm")}
        step, key, stage_rows, first_stage = saved["step"], saved["key"], saved["stage_rows"], done[-1] + 1
        run.forget_after(step, refinement_at_step=True)
        print(f"resuming after stage {done[-1]} at step {step:,}")
    state["env_state"] = jax.jit(common.reset_envs, static_argnums=(0, 2))(env, k_env, args.num_envs)

    start = time.time()
    try:
        for stage in range(first_stage, len(args.stage_steps)):
            if stage > 0 and args.frozen_decoder is None:
                # ---- decoder refinement between stage m-1 and stage m (encoder frozen)
                key, k_collect, k_fit, k_eval = jax.random.split(key, 4)
                t0 = time.time()
                dataset, collect_return = collect(state, k_collect)
                # The decoder keeps the normalizer it was fitted with: it is a fixed function of
                # the raw state for the whole next stage, while the encoder's statistics move on.
                decoder, metrics = fit(state["decoder"], state["norm"], dataset, k_fit)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                common.check_finite(metrics, f"decoder refinement before stage {stage}, step {step:,}")
                state = dict(state, decoder=decoder, decoder_norm=jax.tree.map(jnp.copy, state["norm"]))
                refined_return = float(evaluate(state, k_eval, True))
                metrics.update({"refine/collect_return": float(collect_return),
                                "refine/prior_latent_return": refined_return,
                                "refine/seconds": time.time() - t0})
                run.log(step, metrics)
                stage_rows[-1]["refined_prior_return"] = refined_return
                print(f"refined decoder before stage {stage}: diffusion loss {metrics['refine/loss_final']:.4f}, "
                      f"eval return with prior latents {refined_return:.1f} ({metrics['refine/seconds']:.0f}s)")
            # ---- stage m: encoder re-initialized to the prior, latent PPO with the decoder frozen
            key, k_encoder = jax.random.split(key)
            params = state["params"]
            if args.encoder_reset or params["encoder"] is None:
                params = dict(params, encoder=init_encoder(k_encoder, obs_size, action_size, args))
            state = dict(state, params=params, opt_state=optimizer.init(params),
                         hp=stage_hyperparameters(args, stage))
            end_step = step + iterations_in_stage(args, stage) * per_iter
            print(f"stage {stage}: latent PPO from step {step:,} to {end_step:,}")
            state, key, step, stage_return = common.run_iterations(
                run, train_iteration, state, key, step=step, end_step=end_step, steps_per_iteration=per_iter,
                total_steps=total_steps, eval_every=args.eval_every, evaluate=evaluate, stage=stage,
            )
            stage_rows.append({"stage": stage, "step": step, "return": stage_return})
            # Stage m's encoder, critic, normalizer and the decoder it ran with. Resuming after it
            # repeats only the refinement, from the same key, so the result is the same.
            common.save_checkpoint(run.checkpoint_path(f"stage{stage}.pkl"), {
                **{k: state[k] for k in ("params", "norm", "decoder", "decoder_norm")},
                "step": step, "key": key, "stage_rows": stage_rows,
            })
    except KeyboardInterrupt:
        print(f"interrupted; resume from the last completed stage with: python gorl_diffusion.py --resume {run.dir}")
        raise
    finally:
        run.close()
    print(f"done: {step:,} steps in {time.time() - start:.0f}s")
    run.write_stage_table(stage_rows)
    print(f"run folder: {run.dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
