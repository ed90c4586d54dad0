"""Diffusion Policy Policy Optimization (DPPO, Ren et al., 2024), a baseline of the GoRL paper, in JAX + MJX.

The policy is a conditional diffusion model over the pre-squash action (the environment receives
`tanh(a)`): starting from `x_K ~ N(0, I)`, each of the K = 10 denoising steps draws
`x_{k-1} ~ N(mu_theta(x_k, k, s), sigma^2 I)`, with `mu_theta` the DDPM posterior mean built from
an epsilon-prediction network and a cosine schedule. Those steps form an inner MDP whose
transitions have analytic Gaussian likelihoods, so the rollout records the whole chain
x_K, ..., x_0 and PPO runs on the chain's log-likelihood, the sum of the per-step log-densities
(the environment's advantage is shared by every step). The rest is the PPO pipeline of ppo.py
(GoRL paper Appendix E, Tables 3-4): clip 0.2, learning rate 3e-4, no entropy term.

Episode ends: `common.rollout` marks the 1000-step time limit as a truncation, not a
termination, and keeps the true last observation in `next_obs`; `common.gae` bootstraps a
truncated episode from V(next_obs), cuts the bootstrap only at a termination, and stops the
lambda-recursion at either, since the next row starts a new episode.

    python dppo.py --env-name HopperStand --seed 1
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

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
    num_seeds: int = 1
    """seeds trained side by side in this process: seed, seed+1, ..., each with its own run folder"""
    distributed: bool = False
    """join JAX's multi-host runtime (jax.distributed.initialize); each process trains its own seeds"""
    impl: str = "jax"
    """physics backend: jax (MJX) or warp (MuJoCo Warp)"""
    total_timesteps: int = 180_000_000
    """environment steps to train for"""
    num_envs: int = 2048
    """parallel environments"""
    fresh_start_states: bool = True
    """redraw every environment's start state at each iteration (off: reuse those of the first reset)"""
    unroll_length: int = 30
    """steps per collected sequence (Brax's term); GAE still runs over each environment's whole rollout"""
    batch_size: int = 1024
    """sequences (of unroll_length steps) per minibatch"""
    num_minibatches: int = 32
    """minibatches per epoch; one iteration collects batch_size * num_minibatches sequences"""
    num_epochs: int = 16
    """optimization epochs over each iteration's data"""
    learning_rate: float = 3e-4
    """Adam learning rate (diffusion policy and critic)"""
    max_grad_norm: float | None = None
    """clip the global gradient norm to this value (None: no clipping, as in Brax PPO)"""
    discount: float | None = None
    """discount factor gamma (None: the task's value, 0.995; 0.95 on FingerSpin and BallInCup)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_eps: float = 0.2
    """PPO ratio clipping"""
    max_log_ratio: float = 20.0
    """clip the chain's log-ratio to [-this, this] before exp, only so that it stays finite"""
    vf_coef: float = 0.25
    """value loss coefficient: the loss is vf_coef * mean((V - target)^2)"""
    reward_scaling: float = 10.0
    """multiply rewards by this for learning (returns are reported unscaled)"""
    num_denoising_steps: int = 10
    """K, the denoising steps (cosine schedule) that form the inner MDP"""
    denoising_std: float = 0.05
    """sigma, the fixed standard deviation of every denoising step's Gaussian"""
    denoised_clip: float = 3.0
    """the network's estimate of the clean action x_0 is clipped to [-this, this] (tanh(3) = 0.995)"""
    actor_hidden: tuple[int, ...] = (32, 32, 32, 32)
    """epsilon-prediction network hidden layer widths (SiLU)"""
    critic_hidden: tuple[int, ...] = (256, 256, 256, 256, 256)
    """critic hidden layer widths (SiLU)"""
    eval_every: int = 6_000_000
    """evaluate every this many environment steps"""
    num_eval_envs: int = 128
    """environments in one evaluation (one full episode each, deterministic policy)"""
    runs_dir: str = "runs"
    """where run folders are created"""
    exp_name: str | None = None
    """name of the experiment, in the run folder <env>__<exp_name>__<seed>__<time> (None: dppo)"""
    track: bool = False
    """mirror config.json and metrics.csv to Weights & Biases (pip install wandb; WANDB_MODE=offline needs no account)"""
    wandb_project: str = "gorl"
    """Weights & Biases project, with --track"""
    wandb_entity: str | None = None
    """Weights & Biases entity (user or team), with --track; None: your default entity"""
    resume: str | None = None
    """run folder to resume from its last checkpoint (its config.json replaces the other flags)"""


def steps_per_iteration(args: Args) -> int:
    return args.batch_size * args.num_minibatches * args.unroll_length


# The task-dependent flags (None in Args) on a task that sets nothing, as the newest release's
# configs/methods/dppo.toml has them; common.TASK_SETTINGS overrides them per task.
TASK_DEFAULTS = {"discount": 0.995}


def resolve(args: Args) -> Args:
    """`args` with every task-dependent flag left at None set to the task's value."""
    return common.resolve_task_settings(args, "dppo", TASK_DEFAULTS)


def validate(args: Args) -> None:
    """Reject bad flag values before anything is compiled (task-dependent flags left at None
    are checked at the task's value)."""
    args = resolve(args)
    common.check_args([
        *common.ppo_layout_checks(args),
        *common.seed_checks(args),
        (0 < args.discount <= 1, f"--discount must be in (0, 1], got {args.discount}"),
        (args.total_timesteps >= steps_per_iteration(args),
         f"--total-timesteps {args.total_timesteps:,} is less than one iteration "
         f"({steps_per_iteration(args):,} steps = batch_size * num_minibatches * unroll_length)"),
        (args.num_denoising_steps > 0, "--num-denoising-steps must be positive"),
        (args.denoising_std > 0 and args.denoised_clip > 0,
         "--denoising-std and --denoised-clip must be positive"),
        (args.clip_eps > 0 and args.max_log_ratio > 0, "--clip-eps and --max-log-ratio must be positive"),
    ])


# ---------------------------------------------------------------------------------------------
# Cosine noise schedule (Nichol & Dhariwal, 2021)
# ---------------------------------------------------------------------------------------------


def cosine_schedule(num_steps: int, s: float = 0.008) -> dict[str, np.ndarray]:
    """beta_k, alpha_k and alpha_bar_k for k = 1..K (array index k - 1), and alpha_bar_{k-1}.

    alpha_bar(k) = f(k) / f(0), f(k) = cos^2(((k / K + s) / (1 + s)) pi / 2); betas capped at
    0.999 because f(K) = 0 would make the last one exactly 1 (no signal left to denoise from).
    """
    alpha_bar = common.cosine_alpha_bar(num_steps, s)
    alphas = alpha_bar[1:] / alpha_bar[:-1]
    betas = 1.0 - alphas
    alpha_bars, alpha_bars_prev = alpha_bar[1:], alpha_bar[:-1]
    return {"beta": betas, "alpha": alphas, "alpha_bar": alpha_bars, "alpha_bar_prev": alpha_bars_prev}


# ---------------------------------------------------------------------------------------------
# Networks: an epsilon-prediction network eps(x_k, k, s) (the diffusion policy) and a critic
# ---------------------------------------------------------------------------------------------


def init_params(key, obs_size: int, action_size: int, args: Args):
    k_actor, k_critic = jax.random.split(key)
    return {
        "actor": common.mlp_init(
            k_actor, [obs_size + action_size + common.TIME_EMBEDDING_SIZE, *args.actor_hidden, action_size]
        ),
        "critic": common.mlp_init(k_critic, [obs_size, *args.critic_hidden, 1]),
    }


def predict_noise(params, obs, x_k, k, num_steps: int):
    """eps_theta(x_k, k, s), the input being [normalized obs, x_k, embedding of k / K]."""
    t = jnp.broadcast_to(k / num_steps, x_k.shape[:-1])
    return common.mlp_apply(params, jnp.concatenate([obs, x_k, common.time_embedding(t)], axis=-1))


def critic(params, obs):
    return common.mlp_apply(params, obs)[..., 0]


def denoising_mean(params, obs, x_k, k, args: Args):
    """mu_theta(x_k, k, s): the DDPM posterior mean of q(x_{k-1} | x_k, x_0) (Ho et al. 2020, Eq. 7)
    at the network's estimate x_0 = (x_k - sqrt(1 - alpha_bar_k) eps) / sqrt(alpha_bar_k).

    `k` (1..K) may be an array broadcasting against x_k's leading axes. The estimate is clipped,
    as DPPO clips it to the action bounds: at k = K, alpha_bar_K ~ 2e-5 and an unclipped estimate
    would amplify the network's error about 200 times.
    """
    sched = {name: jnp.asarray(v, jnp.float32)[k - 1][..., None] for name, v in
             cosine_schedule(args.num_denoising_steps).items()}
    eps = predict_noise(params, obs, x_k, k, args.num_denoising_steps)
    x_0 = (x_k - jnp.sqrt(1.0 - sched["alpha_bar"]) * eps) / jnp.sqrt(sched["alpha_bar"])
    x_0 = jnp.clip(x_0, -args.denoised_clip, args.denoised_clip)
    coef_x0 = jnp.sqrt(sched["alpha_bar_prev"]) * sched["beta"] / (1.0 - sched["alpha_bar"])
    coef_xk = jnp.sqrt(sched["alpha"]) * (1.0 - sched["alpha_bar_prev"]) / (1.0 - sched["alpha_bar"])
    return coef_x0 * x_0 + coef_xk * x_k


# The "diffusion noise scale sigma_t = 0.05" of the GoRL paper (Appendix E.3) is read as a fixed
# standard deviation for every denoising step's Gaussian, rather than the DDPM posterior std
# floored at a minimum (DPPO's released configurations use such a floor): the policy's randomness then comes mostly from x_K,
# and each step's likelihood is that of a narrow Gaussian around mu_theta.


def denoise(params, obs, x_K, noise, args: Args):
    """Run the K denoising steps from x_K with the given standard-normal noise [K, ..., A].

    Returns the chain [..., K + 1, A] in sampling order (x_K, ..., x_0; the action is the last
    entry) and its log-likelihood [...], the sum of the K per-step Gaussian log-densities.
    """

    def step(x_k, inputs):
        k, z = inputs
        mean = denoising_mean(params, obs, x_k, k, args)
        x_prev = mean + args.denoising_std * z
        log_prob = common.gaussian_log_prob(x_prev, mean, jnp.full_like(mean, args.denoising_std))
        return x_prev, (x_prev, log_prob)

    ks = jnp.arange(args.num_denoising_steps, 0, -1)
    _, (xs, log_probs) = jax.lax.scan(step, x_K, (ks, noise))
    chain = jnp.concatenate([x_K[None], xs], axis=0)
    return jnp.moveaxis(chain, 0, -2), log_probs.sum(axis=0)


def chain_log_prob(params, obs, chain, args: Args):
    """log p_theta(x_{K-1}, ..., x_0 | x_K, s) = sum_k log N(x_{k-1}; mu_theta(x_k, k, s), sigma^2 I)
    (DPPO's denoising-MDP likelihood), all K steps evaluated in one batched network call.

    obs [..., O], chain [..., K + 1, A] -> [...]."""
    num_steps = args.num_denoising_steps
    x_k, x_prev = chain[..., :-1, :], chain[..., 1:, :]
    ks = jnp.arange(num_steps, 0, -1)
    obs = jnp.broadcast_to(obs[..., None, :], (*x_k.shape[:-1], obs.shape[-1]))
    mean = denoising_mean(params, obs, x_k, ks, args)
    log_probs = common.gaussian_log_prob(x_prev, mean, jnp.full_like(mean, args.denoising_std))
    return log_probs.sum(axis=-1)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def dppo_loss(params, batch, args: Args):
    """Clipped surrogate on the chain's likelihood ratio + value regression; no entropy term.

    The ratio is that of the whole chain, exp(sum_k log-ratio_k), with the environment step's
    advantage; DPPO's code instead clips each step's ratio separately.
    """
    log_prob = chain_log_prob(params["actor"], batch["obs"], batch["chain"], args)
    # Steps with sigma = 0.05 make the chain's log-ratio move fast; the clip only keeps exp() finite.
    log_ratio = jnp.clip(log_prob - batch["log_prob"], -args.max_log_ratio, args.max_log_ratio)
    # Advantages normalized per minibatch (Brax's normalize_advantage).
    advantages = (batch["advantage"] - batch["advantage"].mean()) / (batch["advantage"].std() + 1e-8)
    policy_loss, clip_fraction, approx_kl = common.clipped_surrogate(log_ratio, advantages, args.clip_eps)
    value_loss = jnp.mean((critic(params["critic"], batch["obs"]) - batch["target"]) ** 2)
    loss = policy_loss + args.vf_coef * value_loss
    return loss, {
        "loss/total": loss,
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "policy/log_ratio": log_ratio.mean(),
        "policy/clip_fraction": clip_fraction,
        "policy/approx_kl": approx_kl,
    }


class TrainState(NamedTuple):
    """What one training iteration hands to the next."""

    params: dict  # {"actor": ..., "critic": ...}
    opt_state: Any
    norm: common.Normalizer  # observation statistics, shared by actor and critic
    env_state: Any  # the batched environments, mid-episode


# ---------------------------------------------------------------------------------------------
# One training iteration: rollout, advantages, minibatch epochs (all under one jit)
# ---------------------------------------------------------------------------------------------


def make_policy(actor_params, norm, args: Args):
    """Sampling policy for the rollout: the action x_0, the whole chain and its log-likelihood."""

    def policy(obs, key):
        k_start, k_noise = jax.random.split(key)
        obs = common.normalize(norm, obs)
        action_size = actor_params[-1]["b"].shape[0]
        x_K = jax.random.normal(k_start, (*obs.shape[:-1], action_size))
        noise = jax.random.normal(k_noise, (args.num_denoising_steps, *x_K.shape))
        chain, log_prob = denoise(actor_params, obs, x_K, noise, args)
        return chain[..., -1, :], {"chain": chain, "log_prob": log_prob}

    return policy


def make_train_iteration(env, optimizer, args: Args):
    rollout_steps = steps_per_iteration(args) // args.num_envs

    def update(carry, batch):
        params, opt_state = carry
        grads, metrics = jax.grad(dppo_loss, has_aux=True)(params, batch, args)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def train_iteration(state, key):
        params, opt_state, norm, env_state = state
        k_rollout, k_sgd = jax.random.split(key)
        policy = make_policy(params["actor"], norm, args)
        env_state, data = common.rollout(env, env_state, policy, k_rollout, rollout_steps,
                                         fresh_start_states=args.fresh_start_states)
        advantages, targets = common.value_targets(
            lambda obs: critic(params["critic"], common.normalize(norm, obs)),
            data, args.reward_scaling, args.discount, args.gae_lambda,
        )
        batch = {
            "obs": common.normalize(norm, data["obs"]),
            "chain": data["chain"],
            "log_prob": data["log_prob"],
            "advantage": advantages,
            "target": targets,
        }
        batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
        (params, opt_state), metrics = common.minibatch_sgd(
            update, (params, opt_state), batch, k_sgd, args.num_epochs, args.num_minibatches
        )
        # Updated after the epochs, so the ratio above compares against the exact rollout policy.
        norm = common.normalizer_update(norm, data["obs"])
        metrics["train/episode_return"], _ = common.completed_episode_return(data)
        # How much of the return targets the critic explained before this iteration's epochs.
        metrics["critic/explained_variance"] = common.explained_variance(targets - advantages, targets)
        return TrainState(params, opt_state, norm, env_state), metrics

    return train_iteration


def act(params, norm, obs, action_size: int, args: Args):
    """The deterministic evaluation policy: start from the noise's mean, x_K = 0, and inject no
    noise in the denoising steps, so the action is the chain of means."""
    x_K = jnp.zeros((*obs.shape[:-1], action_size))
    noise = jnp.zeros((args.num_denoising_steps, *x_K.shape))
    return denoise(params["actor"], common.normalize(norm, obs), x_K, noise, args)[0][..., -1, :]


def main(args: Args) -> None:
    if args.resume:
        args = common.args_from_run(Args, args.resume, resume=args.resume)
    args = resolve(args)  # config.json records the resolved values
    validate(args)
    common.start_distributed(args.distributed)

    env = common.make_env(args.env_name, args.impl)
    optimizer = optax.chain(
        optax.clip_by_global_norm(args.max_grad_norm) if args.max_grad_norm else optax.identity(),
        optax.adam(args.learning_rate),
    )
    runs = common.Runs(args, "dppo")  # a run folder per seed

    def init(key):
        key, k_init, k_env = jax.random.split(key, 3)
        params = init_params(k_init, env.observation_size, env.action_size, args)
        norm = common.normalizer_init(env.observation_size)
        return TrainState(params, optimizer.init(params), norm, common.reset_envs(env, k_env, args.num_envs)), key

    evaluator = common.make_evaluator(env, args.num_eval_envs)

    def evaluate(state, key):
        return evaluator(lambda obs, key: act(state.params, state.norm, obs, env.action_size, args), key)

    # Every seed at once: each function below maps one seed's state over the leading seed axis.
    state, key = runs.parallel(init)(runs.keys())
    train_iteration = runs.parallel(make_train_iteration(env, optimizer, args), donate_argnums=0)
    evaluate = runs.parallel(evaluate)

    step = 0
    if args.resume:
        saved = runs.resume_latest()
        state = state._replace(params=saved["params"], opt_state=saved["opt_state"], norm=saved["norm"])
        key, step = saved["key"], int(saved["step"])

    def save(state, step, key):
        runs.save("latest.npz", {
            "params": state.params, "opt_state": state.opt_state, "norm": state.norm, "step": step, "key": key})

    start = time.time()
    try:
        state, key, step, final_return = common.run_iterations(
            runs, train_iteration, state, key,
            step=step, end_step=args.total_timesteps, steps_per_iteration=steps_per_iteration(args),
            total_steps=args.total_timesteps, eval_every=args.eval_every, evaluate=evaluate,
            on_eval=save,
        )
    except KeyboardInterrupt:
        print(f"interrupted; resume with: python dppo.py --resume {runs.dir}")
        raise
    finally:
        runs.close()
    print(f"done: {step:,} steps in {time.time() - start:.0f}s, final evaluation return {common.over_seeds(final_return)}")
    for run in runs.runs:
        print(f"run folder: {run.dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
