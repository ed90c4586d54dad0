"""Flow Policy Optimization (FPO, McAllister et al., 2025), a baseline of the GoRL paper, in JAX + MJX.

The policy is a conditional flow: a velocity network `v(x_t, t, s)` carries noise `x_0 ~ N(0, I)`
to the pre-squash action `x_1 = a` in 10 Euler steps; the environment receives `tanh(a)`. Its
likelihood is intractable, so PPO's ratio pi_new / pi_old is replaced by
`exp(L_cfm_old - L_cfm_new)`, the conditional flow matching (CFM) losses of the sampled action
estimated with 8 (t, eps) pairs drawn at rollout time. The rest is the PPO pipeline of ppo.py
(GoRL paper Appendix E, Tables 3-4): same rollout, GAE, critic and minibatch epochs; clip 0.05,
learning rate 3e-4, no entropy term (a flow policy has no cheap entropy).

As the release runs it (the FPO authors' code, akanazawa/fpo `playground/src/flow_policy/fpo.py`,
with configs/methods/fpo.toml): the network's output is scaled by 0.25, each pair's CFM loss is
the mean over the action dimensions of the error of the noise it implies ("u_but_supervise_as_eps":
the velocity error weighted by t^2 in our time direction), t is uniform in [0, 1], the log-ratio
is not clipped (a guard at +-20 only keeps exp() finite), and evaluation samples the policy
(noise at the start of the flow), as the release's "deterministic" evaluation does;
`--deterministic-eval` integrates from the noise's mean instead. Our time runs from noise (t = 0)
to action (t = 1), the release's the other way: the same model under t -> 1 - t.

Episode ends: `common.rollout` marks the 1000-step time limit as a truncation, not a
termination, and keeps the true last observation in `next_obs`; `common.gae` bootstraps a
truncated episode from V(next_obs), cuts the bootstrap only at a termination, and stops the
lambda-recursion at either, since the next row starts a new episode.

    python fpo.py --env-name HopperStand --seed 1
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
    """Adam learning rate (flow policy and critic)"""
    max_grad_norm: float | None = None
    """clip the global gradient norm to this value (None: no clipping, as in Brax PPO)"""
    discount: float | None = None
    """discount factor gamma (None: the task's value, 0.995; 0.95 on FingerSpin and BallInCup)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_eps: float = 0.05
    """clipping of the FPO ratio (FPO's recommendation for stability)"""
    max_log_ratio: float = 20.0
    """clip L_cfm_old - L_cfm_new to [-this, this] before exp, only so that it stays finite (released: no clip)"""
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
    num_flow_steps: int = 10
    """Euler steps from noise x_0 to the action x_1"""
    num_cfm_samples: int = 8
    """(t, eps) pairs per action estimating its CFM loss"""
    velocity_scale: float = 0.25
    """the network's output times this is the velocity (released: 0.25, so the initial policy is close to N(0, I))"""
    cfm_target: Literal["eps", "velocity"] = "eps"
    """CFM loss: eps, the error of the implied noise (released "u_but_supervise_as_eps"), or velocity, the plain CFM loss"""
    deterministic_eval: bool = False
    """evaluate from the noise's mean, x_0 = 0 (off: sample x_0, as the release's evaluation does)"""
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
# configs/methods/fpo.toml has them; running.TASK_SETTINGS has the values every method takes per
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
        (args.num_flow_steps > 0 and args.num_cfm_samples > 0,
         "--num-flow-steps and --num-cfm-samples must be positive"),
        (args.clip_eps > 0 and args.max_log_ratio > 0, "--clip-eps and --max-log-ratio must be positive"),
        (args.velocity_scale > 0, f"--velocity-scale must be positive, got {args.velocity_scale}"),
    ])


# ---------------------------------------------------------------------------------------------
# Networks: a velocity field v(x_t, t, s) (the flow policy) and a critic
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


def sample_action(params, obs, x_0, args: Args):
    """Euler integration of dx/dt = v(x, t, s) from x_0 at t = 0 to the action x_1."""
    dt = 1.0 / args.num_flow_steps

    def euler_step(x, i):
        t = jnp.full(x.shape[:-1], i * dt)
        return x + dt * velocity(params, obs, x, t, args.velocity_scale), None

    x_1, _ = jax.lax.scan(euler_step, x_0, jnp.arange(args.num_flow_steps))
    return x_1


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def cfm_losses(params, obs, action, t, eps, args: Args):
    """Per-pair conditional flow matching loss (FPO's l_theta(tau, eps); the path of GoRL Eq. 6),
    x_t = (1 - t) eps + t a, averaged over the action dimensions as released:
    "velocity": mean ||v(x_t, t, s) - (a - eps)||^2;
    "eps": mean ||eps - (x_t - t v(x_t, t, s))||^2 = t^2 times the velocity form, the error of
    the noise the velocity implies (FPO's "u_but_supervise_as_eps").
    A mean, not a sum: summed, the log-ratio and so the trust region would scale with A.

    obs [..., O], action [..., A], t [..., N], eps [..., N, A] -> [..., N]."""
    a = action[..., None, :]
    x_t = (1.0 - t[..., None]) * eps + t[..., None] * a
    obs = common.policy_input(obs)
    obs = jnp.broadcast_to(obs[..., None, :], (*eps.shape[:-1], obs.shape[-1]))
    v = velocity(params, obs, x_t, t, args.velocity_scale)
    if args.cfm_target == "eps":
        return jnp.mean((eps - (x_t - t[..., None] * v)) ** 2, axis=-1)
    return jnp.mean((v - (a - eps)) ** 2, axis=-1)


def fpo_log_ratio(params, batch, args: Args):
    """log of FPO's ratio estimate r = exp(L_old - L_new), L = (1/N) sum_i l(t_i, eps_i) (McAllister et al.).

    The pairs and the old losses were stored at rollout time, so with unchanged parameters this
    is exactly 0. The losses are averaged over pairs before the exponential, as FPO defines it.
    The clip only keeps exp() finite (the release has none).
    """
    new = cfm_losses(params, batch["obs"], batch["action"], batch["cfm_t"], batch["cfm_eps"], args)
    log_ratio = batch["cfm_loss"].mean(axis=-1) - new.mean(axis=-1)
    return jnp.clip(log_ratio, -args.max_log_ratio, args.max_log_ratio), new


def fpo_loss(params, batch, args: Args):
    """PPO's clipped surrogate with the FPO ratio + value regression; no entropy term."""
    log_ratio, cfm_new = fpo_log_ratio(params["actor"], batch, args)
    # Advantages normalized per minibatch (Brax's normalize_advantage), computed here with the
    # current critic under --advantages minibatch.
    values = critic(params["critic"], batch["obs"])
    advantages, target, critic_metrics = common.minibatch_targets(
        batch, values, lambda obs: critic(params["critic"], obs), args)
    policy_loss, clip_fraction, approx_kl = common.clipped_surrogate(log_ratio, advantages, args.clip_eps)
    value_loss = jnp.mean((values - target) ** 2)
    loss = policy_loss + args.vf_coef * value_loss
    return loss, {
        "loss/total": loss,
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "policy/cfm_loss": cfm_new.mean(),
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


def make_policy(actor_params, norm, args: Args):
    """Sampling policy for the rollout: an action from noise, plus its (t, eps) pairs and old CFM losses."""

    def policy(obs, key):
        k_x0, k_t, k_eps = jax.random.split(key, 3)
        obs = common.normalize(norm, obs)
        action_size = actor_params[-1]["b"].shape[0]
        x_0 = jax.random.normal(k_x0, (*common.policy_input(obs).shape[:-1], action_size))
        action = sample_action(actor_params, obs, x_0, args)
        t = jax.random.uniform(k_t, (*common.policy_input(obs).shape[:-1], args.num_cfm_samples))
        eps = jax.random.normal(k_eps, (*common.policy_input(obs).shape[:-1], args.num_cfm_samples, action_size))
        return action, {"cfm_t": t, "cfm_eps": eps, "cfm_loss": cfm_losses(actor_params, obs, action, t, eps, args)}

    return policy


def make_train_iteration(env, optimizer, args: Args):
    rollout_steps = steps_per_iteration(args) // args.num_envs

    def update(carry, batch):
        params, opt_state = carry
        grads, metrics = jax.grad(fpo_loss, has_aux=True)(params, batch, args)
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
                                       action=data["action"], cfm_t=data["cfm_t"], cfm_eps=data["cfm_eps"], cfm_loss=data["cfm_loss"])
        (params, opt_state), metrics = common.minibatch_sgd(
            update, (params, opt_state), batch, k_sgd, args.num_epochs, args.num_minibatches,
            flatten=args.minibatch_unit == "sequence",
        )
        if args.normalizer_update == "after":
            # Updated after the epochs, so the old CFM losses stay those of the exact rollout inputs.
            norm = common.normalizer_update(norm, data["obs"])
        metrics["train/episode_return"], _ = common.completed_episode_return(data)
        return TrainState(params, opt_state, norm, env_state), metrics

    return train_iteration


def act(params, norm, obs, action_size: int, args: Args):
    """The deterministic evaluation policy: the flow integrated from the noise's mean, x_0 = 0."""
    x_0 = jnp.zeros((*common.policy_input(obs).shape[:-1], action_size))
    return sample_action(params["actor"], common.normalize(norm, obs), x_0, args)


def act_sampled(params, norm, obs, key, action_size: int, args: Args):
    """The released evaluation policy: the flow integrated from a fresh draw x_0 ~ N(0, I)."""
    x_0 = jax.random.normal(key, (*common.policy_input(obs).shape[:-1], action_size))
    return sample_action(params["actor"], common.normalize(norm, obs), x_0, args)


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
    runs = running.Runs(args, "fpo", total_steps=args.total_timesteps)  # a run folder per seed
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
        return evaluator(lambda obs, key: act_sampled(state.params, state.norm, obs, key, env.action_size, args), key)

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
