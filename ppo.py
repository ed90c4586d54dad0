"""Gaussian PPO, the baseline of the GoRL paper (Appendix E, Table 4), in JAX + MJX.

One training iteration collects `batch_size * num_minibatches` sequences of `unroll_length`
steps (Brax PPO's meaning: 32 x 1024 x 30 = 983,040 steps, 480 in each of 2048 environments),
computes GAE over each environment's whole 480-step trajectory, then makes `num_epochs` passes
over it in `num_minibatches` shuffled minibatches. The rollout and the update are one jitted
function; the policy outputs an unbounded action `a` and the environment receives `tanh(a)`.

Episode ends: `common.rollout` marks the 1000-step time limit as a truncation, not a
termination, and keeps the true last observation in `next_obs`; `common.gae` bootstraps a
truncated episode from V(next_obs), cuts the bootstrap only at a termination, and stops the
lambda-recursion at either, since the next row starts a new episode.

    python ppo.py --env-name HopperStand --seed 1
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
    learning_rate: float | None = None
    """Adam learning rate, actor and critic (None: the task's value, 3e-4; 1e-3 on humanoids)"""
    max_grad_norm: float | None = None
    """clip the global gradient norm to this value, 0: no clipping (None: the task's value, 0)"""
    discount: float | None = None
    """discount factor gamma (None: the task's value, 0.995; 0.95 on FingerSpin and BallInCup)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_eps: float | None = None
    """PPO ratio clipping (None: the task's value, 0.1; 0.3 on humanoids)"""
    vf_coef: float = 0.25
    """value loss coefficient: the loss is vf_coef * mean((V - target)^2)"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    entropy: Literal["tanh", "gaussian"] = "tanh"
    """entropy estimate: tanh (Brax's, of the squashed action, one sample per state) or gaussian (pre-squash, closed form)"""
    normalizer_update: Literal["after", "before"] = "after"
    """update the observation normalizer after the epochs (ratio 1 at the first minibatch) or before (Brax's order)"""
    advantages: Literal["rollout", "minibatch"] = "rollout"
    """when advantages and value targets are computed: rollout (once per iteration over each environment's whole rollout, critic from before the epochs) or minibatch (in the loss, on each minibatch's sequences, current critic: Brax's and the release's)"""
    minibatch_unit: Literal["transition", "sequence"] = "transition"
    """what the epochs shuffle into minibatches: transition (single steps) or sequence (whole unroll_length sequences, Brax's)"""
    gae_form: Literal["standard", "release"] = "standard"
    """standard (GAE(lambda), a truncation bootstrapped from the true last observation) or release (Brax's compute_gae: truncated steps left out, one-step policy advantage)"""
    reward_scaling: float = 10.0
    """multiply rewards by this for learning (returns are reported unscaled)"""
    actor_hidden: tuple[int, ...] = (32, 32, 32, 32)
    """actor hidden layer widths (SiLU)"""
    critic_hidden: tuple[int, ...] = (256, 256, 256, 256, 256)
    """critic hidden layer widths (SiLU)"""
    eval_every: int = 6_000_000
    """evaluate every this many environment steps"""
    num_eval_envs: int = 128
    """environments in one evaluation (one full episode each)"""
    deterministic_eval: bool | None = None
    """evaluate the mean action, else sample it (None: the task's value, True; False on humanoids)"""


def make_env(args: Args):
    """The environment this script trains on, before `common.make_env` wraps it: the MuJoCo
    Playground task `args.env_name`. To train on your own task, return your environment here (a
    Playground `MjxEnv` or a Brax `Env`), or pass it to `main(args, env)` (README, "Your own
    environment")."""
    return running.load_playground_env(args.env_name, args.impl)


# The task-dependent flags (None in Args) on a task that sets nothing, as the newest release's
# configs/methods/ppo.toml (dm_control profile) has them; then its humanoid profile.
# running.TASK_SETTINGS has the values every method takes per task (discounts, precision).
TASK_DEFAULTS = {"matmul_precision": "default", "learning_rate": 3e-4, "clip_eps": 0.1, "discount": 0.995, "max_grad_norm": 0.0,
                 "deterministic_eval": True}
HUMANOID = {"learning_rate": 1e-3, "clip_eps": 0.3, "max_grad_norm": 0.0, "deterministic_eval": False}
TASK_SETTINGS = {"HumanoidStand": HUMANOID, "HumanoidRun": HUMANOID}


def resolve(args: Args) -> Args:
    """`args` with every task-dependent flag left at None set to the task's value."""
    return running.resolve_task_settings(args, TASK_SETTINGS, TASK_DEFAULTS)


def steps_per_iteration(args: Args) -> int:
    return args.batch_size * args.num_minibatches * args.unroll_length


def validate(args: Args) -> None:
    """Reject bad flag values before anything is compiled (task-dependent flags left at None
    are checked at the task's value)."""
    args = resolve(args)
    running.check_args([
        *running.ppo_layout_checks(args),
        *running.seed_checks(args),
        (args.learning_rate > 0, f"--learning-rate must be positive, got {args.learning_rate}"),
        (args.clip_eps > 0, f"--clip-eps must be positive, got {args.clip_eps}"),
        (0 < args.discount <= 1, f"--discount must be in (0, 1], got {args.discount}"),
        (not args.max_grad_norm or args.max_grad_norm > 0,
         f"--max-grad-norm must be positive, or 0 for no clipping, got {args.max_grad_norm}"),
        (args.total_timesteps >= steps_per_iteration(args),
         f"--total-timesteps {args.total_timesteps:,} is less than one iteration "
         f"({steps_per_iteration(args):,} steps = batch_size * num_minibatches * unroll_length)"),
    ])


# ---------------------------------------------------------------------------------------------
# Networks: an actor (diagonal Gaussian over the pre-squash action) and a critic
# ---------------------------------------------------------------------------------------------


def init_params(key, observation_size, action_size: int, args: Args):
    """`observation_size`: the environment's (an int, or a dict of shapes whose "state" is the
    actor's input and "privileged_state", if any, the critic's)."""
    policy_size, critic_size = common.observation_sizes(observation_size)
    k_actor, k_critic = jax.random.split(key)
    return {
        "actor": common.mlp_init(k_actor, [policy_size, *args.actor_hidden, 2 * action_size]),
        "critic": common.mlp_init(k_critic, [critic_size, *args.critic_hidden, 1]),
    }


def actor(params, obs):
    return common.gaussian_from_output(common.mlp_apply(params, common.policy_input(obs)))


def critic(params, obs):
    return common.mlp_apply(params, common.critic_input(obs))[..., 0]


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def tanh_log_det_jacobian(u):
    """log |d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), elementwise;
    the right-hand side stays finite where tanh(u) rounds to +-1."""
    return 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))


def entropy_estimate(mean, scale, key, kind: str = "tanh"):
    """Per-state entropy of the policy: "gaussian" is the closed-form entropy of the pre-squash
    Gaussian N(mean, scale^2); "tanh" estimates the entropy of the squashed action tanh(u) as
    Brax's NormalTanhDistribution does, H[tanh(u)] = H[u] + E[log |d tanh(u)/du|], with the
    expectation taken at one reparameterized sample u = mean + scale * eps per state."""
    entropy = common.gaussian_entropy(scale)
    if kind == "gaussian":
        return entropy
    u = mean + scale * jax.random.normal(key, mean.shape)
    return entropy + jnp.sum(tanh_log_det_jacobian(u), axis=-1)


def ppo_loss(params, batch, key, args: Args):
    """Clipped surrogate + value regression - entropy bonus (Schulman et al., 2017).

    `key` draws the sample of the "tanh" entropy estimate. The value loss is
    vf_coef * mean((V - target)^2), the release's (Brax's 0.5 * vf_coefficient * MSE).
    """
    mean, scale = actor(params["actor"], batch["obs"])
    log_prob = common.gaussian_log_prob(batch["action"], mean, scale)
    values = critic(params["critic"], batch["obs"])
    advantages, target, critic_metrics = common.minibatch_targets(
        batch, values, lambda obs: critic(params["critic"], obs), args)
    policy_loss, clip_fraction, approx_kl = common.clipped_surrogate(
        log_prob - batch["log_prob"], advantages, args.clip_eps
    )
    value_loss = jnp.mean((values - target) ** 2)
    entropy = entropy_estimate(mean, scale, key, args.entropy).mean()
    loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy
    return loss, {
        "loss/total": loss,
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "policy/entropy": entropy,
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


def make_train_iteration(env, optimizer, args: Args):
    rollout_steps = steps_per_iteration(args) // args.num_envs

    def update(carry, batch):
        params, opt_state, key = carry
        key, k_loss = jax.random.split(key)  # a fresh key per minibatch for the entropy sample
        grads, metrics = jax.grad(ppo_loss, has_aux=True)(params, batch, k_loss, args)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), metrics

    def train_iteration(state, key):
        params, opt_state, norm, env_state = state
        k_rollout, k_sgd, k_loss = jax.random.split(key, 3)

        def policy(obs, key):
            mean, scale = actor(params["actor"], common.normalize(norm, obs))
            action = mean + scale * jax.random.normal(key, mean.shape)
            return action, {"log_prob": common.gaussian_log_prob(action, mean, scale)}

        env_state, data = common.rollout(env, env_state, policy, k_rollout, rollout_steps,
                                         fresh_start_states=args.fresh_start_states)
        if args.normalizer_update == "before":
            # Brax's order: the epochs see observations normalized with statistics that include
            # this rollout, so the first minibatch's ratio is not exactly 1.
            norm = common.normalizer_update(norm, data["obs"])
        batch = common.ppo_epochs_data(data, norm, lambda obs: critic(params["critic"], obs), args,
                                       action=data["action"], log_prob=data["log_prob"])
        (params, opt_state, _), metrics = common.minibatch_sgd(
            update, (params, opt_state, k_loss), batch, k_sgd, args.num_epochs, args.num_minibatches,
            flatten=args.minibatch_unit == "sequence",
        )
        if args.normalizer_update == "after":
            # Updated after the epochs, so the ratio above compares against the exact rollout policy.
            norm = common.normalizer_update(norm, data["obs"])
        metrics["train/episode_return"], _ = common.completed_episode_return(data)
        return TrainState(params, opt_state, norm, env_state), metrics

    return train_iteration


def act(params, norm, obs, key, deterministic: bool):
    """The evaluation policy: the mean pre-squash action, or a sample of the Gaussian."""
    mean, scale = actor(params["actor"], common.normalize(norm, obs))
    return mean if deterministic else mean + scale * jax.random.normal(key, mean.shape)


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
    runs = running.Runs(args, "ppo", total_steps=args.total_timesteps)  # a run folder per seed
    saved = runs.resume_latest() if args.resume else None  # before compiling: a folder without one is an error

    def init(key):
        key, k_init, k_env = jax.random.split(key, 3)
        params = init_params(k_init, env.observation_size, env.action_size, args)
        norm = common.normalizer_init(env.observation_size)
        return TrainState(params, optimizer.init(params), norm, common.reset_envs(env, k_env, args.num_envs)), key

    evaluator = common.make_evaluator(env, args.num_eval_envs)

    def evaluate(state, key):
        return evaluator(lambda obs, key: act(state.params, state.norm, obs, key, args.deterministic_eval), key)

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
