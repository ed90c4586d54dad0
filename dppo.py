"""Diffusion Policy Policy Optimization (DPPO, Ren et al., 2024), a baseline of the GoRL paper, in JAX + MJX.

As the GoRL release runs it: the FPO authors' code (akanazawa/fpo, `playground/src/flow_policy/
fpo.py`, `loss_mode="denoising_mdp"`, with the release's scalar-sigma patch and
configs/methods/dppo.toml). The policy is a K = 10 step Euler SDE over the pre-squash action
(the environment receives `tanh(a)`): from `x ~ N(0, I)` at t = 1, each step on the time grid
1, 0.9, ..., 0.1 is `x <- x + dt * v(x, t, s) + sigma * noise` with dt = -0.1, `v` = 0.25 times a
network's output, and sigma = 0.05 at every step, the last included; no estimate of the clean
action is formed or clipped. Each step is a Gaussian with an analytic likelihood, so the steps
form an inner MDP (Ren et al.): the rollout records the chain and the K per-step
log-likelihoods, and PPO clips each step's ratio separately (clip 0.2) and averages the
surrogate over the steps, every step sharing the environment step's advantage. At
initialization the output scale keeps the flow small, so actions spread about like N(0, 1)
before tanh, as PPO's initial Gaussian. The rest is the PPO pipeline of ppo.py (GoRL paper
Appendix E, Tables 3-4): learning rate 3e-4, no entropy term. Evaluation samples the policy, as
the release's "deterministic" evaluation does (it removes only a feather noise that is 0);
`--deterministic-eval` runs the chain of means from x = 0 instead.

The paper's text describes DPPO with a cosine DDPM; that form (epsilon prediction, the clean
estimate clipped, one ratio for the whole chain) started as a saturated bang-bang policy (97% of
|tanh a| > 0.95 at init; this one 7%) and scored 137-157 on CartpoleBalance where this one's chain
of means scores 421-485 (61,440 steps, 64 envs, seeds 1-3),
and it is not what produced the paper's numbers, so it is not kept.

Episode ends: `common.rollout` marks the 1000-step time limit as a truncation, not a
termination, and keeps the true last observation in `next_obs`; `common.gae` bootstraps a
truncated episode from V(next_obs), cuts the bootstrap only at a termination, and stops the
lambda-recursion at either, since the next row starts a new episode.

    python dppo.py --env-name HopperStand --seed 1
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
import tyro

import common
import running


@dataclasses.dataclass
class Args(running.RunFlags):
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
    """PPO clipping of each denoising step's ratio"""
    max_log_ratio: float = 20.0
    """clip each step's log-ratio to [-this, this] before exp, only so that it stays finite (released: no clip)"""
    vf_coef: float = 0.25
    """value loss coefficient: the loss is vf_coef * mean((V - target)^2)"""
    advantages: Literal["rollout", "minibatch"] = "rollout"
    """when advantages and value targets are computed: rollout (once per iteration over each environment's whole rollout, critic from before the epochs) or minibatch (in the loss, on each minibatch's sequences, current critic: Brax's and the release's)"""
    minibatch_unit: Literal["transition", "sequence"] = "transition"
    """what the epochs shuffle into minibatches: transition (single steps) or sequence (whole unroll_length sequences, Brax's)"""
    gae_form: Literal["standard", "release"] = "standard"
    """standard (GAE(lambda), a truncation bootstrapped from the true last observation) or release (Brax's compute_gae: truncated steps left out, one-step policy advantage)"""
    normalizer_update: Literal["after", "before"] = "after"
    """update the observation normalizer after the epochs (ratio 1 at the first minibatch) or before (Brax's order)"""
    reward_scaling: float = 10.0
    """multiply rewards by this for learning (returns are reported unscaled)"""
    num_denoising_steps: int = 10
    """K, the Euler SDE steps from noise (t = 1) to the action (t = 0) that form the inner MDP"""
    denoising_std: float = 0.05
    """sigma, the standard deviation of the noise every step adds (the last included)"""
    velocity_scale: float = 0.25
    """the network's output times this is the velocity (released: 0.25, so the initial policy is close to N(0, I))"""
    deterministic_eval: bool = False
    """evaluate the chain of means from x = 0 (off: the sampled policy, as the release's evaluation does)"""
    actor_hidden: tuple[int, ...] = (32, 32, 32, 32)
    """velocity network hidden layer widths (SiLU)"""
    critic_hidden: tuple[int, ...] = (256, 256, 256, 256, 256)
    """critic hidden layer widths (SiLU)"""
    eval_every: int = 6_000_000
    """evaluate every this many environment steps"""
    num_eval_envs: int = 128
    """environments in one evaluation (one full episode each, deterministic policy)"""


def make_env(args: Args):
    """The environment this script trains on, before `common.make_env` wraps it: the MuJoCo
    Playground task `args.env_name`. To train on your own task, return your environment here (a
    Playground `MjxEnv` or a Brax `Env`), or pass it to `main(args, env)` (README, "Your own
    environment")."""
    return running.load_playground_env(args.env_name, args.impl)


def steps_per_iteration(args: Args) -> int:
    return args.batch_size * args.num_minibatches * args.unroll_length


# The task-dependent flags (None in Args) on a task that sets nothing, as the newest release's
# configs/methods/dppo.toml has them; running.TASK_SETTINGS has the values every method takes per
# task (discounts, precision), and this method sets none of its own.
TASK_DEFAULTS = {"matmul_precision": "default", "discount": 0.995}
TASK_SETTINGS: dict[str, dict] = {}


def resolve(args: Args) -> Args:
    """`args` with every task-dependent flag left at None set to the task's value."""
    return running.resolve_task_settings(args, TASK_SETTINGS, TASK_DEFAULTS)


def validate(args: Args) -> None:
    """Reject bad flag values before anything is compiled (task-dependent flags left at None
    are checked at the task's value)."""
    args = resolve(args)
    running.check_args([
        *running.ppo_layout_checks(args),
        *running.seed_checks(args),
        (0 < args.discount <= 1, f"--discount must be in (0, 1], got {args.discount}"),
        (args.total_timesteps >= steps_per_iteration(args),
         f"--total-timesteps {args.total_timesteps:,} is less than one iteration "
         f"({steps_per_iteration(args):,} steps = batch_size * num_minibatches * unroll_length)"),
        (args.num_denoising_steps > 0, "--num-denoising-steps must be positive"),
        (args.denoising_std > 0 and args.velocity_scale > 0,
         "--denoising-std and --velocity-scale must be positive"),
        (args.clip_eps > 0 and args.max_log_ratio > 0, "--clip-eps and --max-log-ratio must be positive"),
    ])


# ---------------------------------------------------------------------------------------------
# Networks: a velocity network v(x_t, t, s) (the denoising policy) and a critic
# ---------------------------------------------------------------------------------------------


def init_params(key, observation_size, action_size: int, args: Args):
    """`observation_size`: the environment's (an int, or a dict of shapes whose "state" is the
    actor's input and "privileged_state", if any, the critic's)."""
    policy_size, critic_size = common.observation_sizes(observation_size)
    k_actor, k_critic = jax.random.split(key)
    return {
        "actor": common.mlp_init(
            k_actor, [policy_size + action_size + common.TIME_EMBEDDING_SIZE, *args.actor_hidden, action_size]
        ),
        "critic": common.mlp_init(k_critic, [critic_size, *args.critic_hidden, 1]),
    }


def velocity(params, obs, x_t, t, scale: float):
    """v(x_t, t, s) = scale * network([normalized obs, x_t, embedding of t])."""
    obs = common.policy_input(obs)
    return scale * common.mlp_apply(params, jnp.concatenate([obs, x_t, common.time_embedding(t)], axis=-1))


def critic(params, obs):
    return common.mlp_apply(params, common.critic_input(obs))[..., 0]


def time_grid(num_steps: int) -> tuple[jax.Array, float]:
    """The K step start times 1, 1 - 1/K, ..., 1/K (noise at t = 1, the action at t = 0) and the
    (negative) step dt = -1/K."""
    return 1.0 - jnp.arange(num_steps) / num_steps, -1.0 / num_steps


def step_mean(params, obs, x, t, dt: float, args: Args):
    """The mean of a denoising step's Gaussian: the Euler step x + dt v(x, t, s) (`time_grid`)."""
    return x + dt * velocity(params, obs, x, jnp.broadcast_to(t, x.shape[:-1]), args.velocity_scale)


# ---------------------------------------------------------------------------------------------
# The denoising MDP: K Gaussian steps of an Euler SDE, each with an analytic likelihood
# ---------------------------------------------------------------------------------------------


def denoise(params, obs, x_start, noise, args: Args):
    """Run the K steps x <- x + dt v(x, t, s) + sigma * noise from x_start (t = 1) to the action (t = 0).

    `noise` [K, ..., A] is standard normal (zeros: the chain of means). Returns the chain
    [..., K + 1, A] in sampling order (the action is the last entry) and the per-step
    log-likelihoods [..., K].
    """
    ts, dt = time_grid(args.num_denoising_steps)

    def step(x, inputs):
        t, z = inputs
        mean = step_mean(params, obs, x, t, dt, args)
        x_next = mean + args.denoising_std * z
        return x_next, (x_next, common.gaussian_log_prob(x_next, mean, jnp.full_like(mean, args.denoising_std)))

    _, (xs, log_probs) = jax.lax.scan(step, x_start, (ts, noise))
    chain = jnp.concatenate([x_start[None], xs], axis=0)
    return jnp.moveaxis(chain, 0, -2), jnp.moveaxis(log_probs, 0, -1)


def step_log_probs(params, obs, chain, args: Args):
    """log N(x_{k+1}; x_k + dt v(x_k, t_k, s), sigma^2 I) for every step k of a stored chain
    (DPPO's denoising-MDP likelihoods), all K steps in one batched network call.

    obs [..., O], chain [..., K + 1, A] -> [..., K]."""
    ts, dt = time_grid(args.num_denoising_steps)
    x, x_next = chain[..., :-1, :], chain[..., 1:, :]
    obs = common.policy_input(obs)
    obs = jnp.broadcast_to(obs[..., None, :], (*x.shape[:-1], obs.shape[-1]))
    mean = step_mean(params, obs, x, ts, dt, args)
    return common.gaussian_log_prob(x_next, mean, jnp.full_like(mean, args.denoising_std))


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def dppo_loss(params, batch, args: Args):
    """PPO's clipped surrogate on each denoising step's likelihood ratio, averaged over the steps
    and the samples (DPPO, Ren et al. 2024, Eq. 6: every step of the inner MDP shares the
    environment step's advantage), + value regression; no entropy term.

    One ratio per step, each clipped separately, as the release computes it: the ratio of the
    whole chain, a product of K ratios, would leave the clip band after small per-step moves.
    """
    log_prob = step_log_probs(params["actor"], batch["obs"], batch["chain"], args)
    # With sigma = 0.05 a step's log-ratio moves fast; the clip only keeps exp() finite.
    log_ratio = jnp.clip(log_prob - batch["log_prob"], -args.max_log_ratio, args.max_log_ratio)
    # Advantages normalized per minibatch (Brax's normalize_advantage), computed here with the
    # current critic under --advantages minibatch.
    values = critic(params["critic"], batch["obs"])
    advantages, target, critic_metrics = common.minibatch_targets(
        batch, values, lambda obs: critic(params["critic"], obs), args)
    policy_loss, clip_fraction, approx_kl = common.clipped_surrogate(log_ratio, advantages[..., None], args.clip_eps)
    value_loss = jnp.mean((values - target) ** 2)
    loss = policy_loss + args.vf_coef * value_loss
    return loss, {
        "loss/total": loss,
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "policy/log_ratio": log_ratio.mean(),
        "policy/clip_fraction": clip_fraction,
        "policy/approx_kl": approx_kl,
        **critic_metrics,
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


def sample(actor_params, obs, key, args: Args):
    """The stochastic policy: x_start ~ N(0, I) and fresh noise at every step. obs normalized."""
    k_start, k_noise = jax.random.split(key)
    action_size = actor_params[-1]["b"].shape[0]
    x_start = jax.random.normal(k_start, (*common.policy_input(obs).shape[:-1], action_size))
    noise = jax.random.normal(k_noise, (args.num_denoising_steps, *x_start.shape))
    return denoise(actor_params, obs, x_start, noise, args)


def make_policy(actor_params, norm, args: Args):
    """Sampling policy for the rollout: the action, the whole chain and its per-step log-likelihoods."""

    def policy(obs, key):
        chain, log_prob = sample(actor_params, common.normalize(norm, obs), key, args)
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
        if args.normalizer_update == "before":
            # Brax's order: the epochs see statistics that include this rollout (ratio not 1 at first).
            norm = common.normalizer_update(norm, data["obs"])
        batch = common.ppo_epochs_data(data, norm, lambda obs: critic(params["critic"], obs), args,
                                       chain=data["chain"], log_prob=data["log_prob"])
        (params, opt_state), metrics = common.minibatch_sgd(
            update, (params, opt_state), batch, k_sgd, args.num_epochs, args.num_minibatches,
            flatten=args.minibatch_unit == "sequence",
        )
        if args.normalizer_update == "after":
            # Updated after the epochs, so the ratio above compares against the exact rollout policy.
            norm = common.normalizer_update(norm, data["obs"])
        metrics["train/episode_return"], _ = common.completed_episode_return(data)
        return TrainState(params, opt_state, norm, env_state), metrics

    return train_iteration


def act(params, norm, obs, action_size: int, args: Args):
    """The deterministic evaluation policy: start from the noise's mean, x = 0 at t = 1, and
    inject no noise in the steps, so the action is the chain of means."""
    x_start = jnp.zeros((*common.policy_input(obs).shape[:-1], action_size))
    noise = jnp.zeros((args.num_denoising_steps, *x_start.shape))
    return denoise(params["actor"], common.normalize(norm, obs), x_start, noise, args)[0][..., -1, :]


def act_sampled(params, norm, obs, key, args: Args):
    """The released evaluation policy: the rollout's stochastic policy (start and step noise drawn)."""
    return sample(params["actor"], common.normalize(norm, obs), key, args)[0][..., -1, :]


def main(args: Args, env=None) -> None:
    """Train on the task `args.env_name`, or on `env`, your own environment object (a Playground
    `MjxEnv` or a Brax `Env`; `args.env_name` then only names the run folder)."""
    args = running.start(args, Args, resolve, validate)  # --resume's flags, the task's values, checked
    env = common.make_env(make_env(args) if env is None else env, args.impl, args.episode_length)
    args = dataclasses.replace(args, episode_length=env.episode_length)  # recorded in config.json
    optimizer = optax.chain(
        optax.clip_by_global_norm(args.max_grad_norm) if args.max_grad_norm else optax.identity(),
        optax.adam(args.learning_rate),
    )
    per_iter = steps_per_iteration(args)
    runs = running.Runs(args, "dppo", total_steps=args.total_timesteps)  # a run folder per seed
    saved = runs.resume_latest() if args.resume else None  # before compiling: a folder without one is an error

    def init(key):
        key, k_init, k_env = jax.random.split(key, 3)
        params = init_params(k_init, env.observation_size, env.action_size, args)
        norm = common.normalizer_init(env.observation_size)
        return TrainState(params, optimizer.init(params), norm, common.reset_envs(env, k_env, args.num_envs)), key

    evaluator = common.make_evaluator(env, args.num_eval_envs)

    def evaluate(state, key):
        if args.deterministic_eval:
            return evaluator(lambda obs, key: act(state.params, state.norm, obs, env.action_size, args), key)
        return evaluator(lambda obs, key: act_sampled(state.params, state.norm, obs, key, args), key)

    # Every function below is one seed's, mapped over the leading seed axis of all seeds' states.
    init = runs.parallel(init)
    train_iteration = runs.timed(runs.parallel(make_train_iteration(env, optimizer, args), donate_argnums=0), per_iter)
    evaluate = runs.parallel(evaluate)

    state, key = init(runs.keys())

    step = 0
    if saved:
        state = state._replace(params=saved["params"], opt_state=saved["opt_state"], norm=saved["norm"])
        key, step = saved["key"], int(saved["step"])

    def save(state, step, key):
        runs.save("latest.npz", {
            "params": state.params, "opt_state": state.opt_state, "norm": state.norm, "step": step, "key": key})

    final_return = float("nan")
    with runs:  # closes the run folders; Ctrl-C says how to resume
        while step + per_iter <= args.total_timesteps:
            key, k_iter, k_eval = runs.split(key, 3)
            state, metrics = train_iteration(state, k_iter)
            step += per_iter
            evaluating = running.evaluation_due(step, per_iter, args.total_timesteps, args.eval_every)
            if evaluating:
                metrics.update(jax.device_get(evaluate(state, k_eval)))
                final_return = metrics["eval/return"]
            runs.log_iteration(step, metrics)
            if evaluating:  # (the row before the checkpoint: none lost or repeated)
                save(state, step, key)
    runs.finish(step, final_return=final_return)


if __name__ == "__main__":
    main(tyro.cli(Args))
