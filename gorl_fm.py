"""GoRL with a PPO encoder in latent space and a flow-matching decoder (GoRL-FM), JAX + MJX.

The policy is split in two (Zhang et al., GoRL):
    z ~ pi_theta(z | s)       the *encoder*, a diagonal Gaussian over a latent of the action's size
    a = g_phi(s, z)           the *decoder*, a conditional flow that maps the prior N(0, I) to actions
and the environment receives tanh(a). Training alternates in stages (Algorithm 1):
    stage 0:  the decoder is the identity, g(s, z) = z, so latent PPO is Gaussian PPO
    stage m:  re-initialize the encoder to the prior N(0, I); train it with PPO in latent space,
              the decoder frozen and treated as part of the environment (Eq. 5)
    between:  freeze the encoder, collect fresh rollouts (s, a), and fit the decoder by
              conditional flow matching from latents drawn fresh from the fixed prior (Eq. 4, 6)

Episode ends: `common.rollout` marks the 1000-step time limit as a truncation, not a
termination, and keeps the true last observation in `next_obs`; `common.gae` bootstraps a
truncated episode from V(next_obs), cuts the bootstrap only at a termination, and stops the
lambda-recursion at either, since the next row starts a new episode.

Read top to bottom: the flags and their per-task values, the encoder and critic, the decoder,
the policy, latent PPO (loss and iteration), the refinement, the evaluation, and `main()`,
which is Algorithm 1 line by line. The mathematics it shares with the other scripts is in
`common.py`; the running of a run (flags every script has, run folders, logging, checkpoints,
resume, seeds and devices) in `running.py`, which is not needed to follow the method.

    python gorl_fm.py --env-name HopperStand --seed 1
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
import tyro

import common
import running


@dataclasses.dataclass
class Args(running.RunFlags):
    stage_steps: tuple[int, ...] | None = None
    """environment steps of latent PPO in each stage (stage 0 uses the identity decoder); None:
    the task's value (60M 60M 30M 30M; 60M 60M on HumanoidRun)"""
    # --- latent PPO (the encoder), paper Appendix E, Table 4, as released (configs/methods/gorl_fm.toml)
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
    learning_rate: tuple[float, ...] | None = None
    """Adam learning rate of the encoder and critic, per stage (the last value for every later stage); None: the task's (1e-3; 3e-4 in stage 3 on WalkerWalk)"""
    discount: float | None = None
    """discount factor gamma; None: the task's value (0.995; 0.95 on FingerSpin and BallInCup)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    vf_coef: float = 0.25
    """value loss coefficient: the value loss is vf_coef * mean((V - target)^2)"""
    ent_coef: tuple[float, ...] = (0.01,)
    """entropy bonus weight of the latent policy, per stage (the last value for every later stage)"""
    advantages: Literal["rollout", "minibatch"] = "rollout"
    """when advantages and value targets are computed: rollout (once per iteration over each environment's whole rollout, critic from before the epochs) or minibatch (in the loss, on each minibatch's sequences, current critic: Brax's and the release's)"""
    minibatch_unit: Literal["transition", "sequence"] = "transition"
    """what the epochs shuffle into minibatches: transition (single steps) or sequence (whole unroll_length sequences, Brax's)"""
    gae_form: Literal["standard", "release"] = "standard"
    """standard (GAE(lambda), a truncation bootstrapped from the true last observation) or release (Brax's compute_gae: truncated steps left out, one-step policy advantage)"""
    normalizer_update: tuple[Literal["after", "before"], ...] | None = None
    """per stage: update the observation normalizer after the epochs (ratio 1 at the first minibatch) or before (Brax's order); None: the task's (after; before on FishSwim, as released)"""
    normalizer_variance: tuple[Literal["running", "batch"], ...] | None = None
    """per stage: the normalizer's variance, running (over every observation so far) or batch (the release's legacy_batch_only: each update keeps only the newest batch's squared deviations, over the growing count); None: the task's (running; batch on FishSwim)"""
    reward_scaling: float = 10.0
    """multiply rewards by this for learning (returns are reported unscaled)"""
    clip_eps: tuple[float, ...] | None = None
    """PPO ratio clipping per stage (the last value for every later stage); None: the task's value
    (0.15 in stage 0, 0.3 after; 0.3 throughout on humanoids)"""
    max_grad_norm: tuple[float, ...] | None = None
    """global gradient-norm clip per stage; None: the task's value (0.5 as released; 0.5 in stage
    0 and 1.0 after on FingerTurnHard and WalkerWalk, and in the paper's text)"""
    kl_beta: tuple[float, ...] | None = None
    """weight beta of the latent regularizer (Eq. 3) per stage; None: the task's value (5e-4 in
    stage 0, 1e-3 after; 3e-3 after on WalkerWalk; 0.01 in stage 3 on FingerTurnHard)"""
    latent_regularizer: Literal["kl", "l2"] = "kl"
    """kl: beta * KL(encoder || N(0, I)) in closed form (Eq. 3); l2: the release's beta * (mean mu^2
    + mean sigma^2), which pulls sigma towards 0 instead of 1"""
    bounded_latent: bool | None = None
    """latent z = tanh(u), u ~ N(mu, sigma^2), PPO on u (the release's humanoid profile); None: the
    task's value (on for HumanoidStand and HumanoidRun)"""
    encoder_hidden: tuple[int, ...] = (32, 32, 32, 32)
    """encoder hidden layer widths (SiLU)"""
    critic_hidden: tuple[int, ...] = (256, 256, 256, 256, 256)
    """critic hidden layer widths (SiLU)"""
    # --- the flow-matching decoder and its refinement, as released (gorl_fm.toml [collection], [decoder])
    decoder_hidden: tuple[int, ...] | None = None
    """velocity network hidden widths (SiLU); None: the task's value (128 x 4; 64 x 4 on HopperStand
    and in the paper's text)"""
    flow_steps: int = 10
    """Euler steps from x_0 = z to x_1 = a"""
    action_semantics: Literal["pre_squash", "bounded"] | None = None
    """pre_squash: the decoder outputs the pre-tanh action and the environment receives tanh(a);
    bounded: it outputs the environment's action, clipped to [-1, 1]; None: the task's value
    (bounded on humanoids)"""
    refine_episodes: int | None = None
    """full episodes collected for one refinement (encoder frozen, sampling z); None: the task's
    value (4096 as released; 1024 on HumanoidRun, 128 on HumanoidStand; the paper's text: 512)"""
    refine_envs: int | None = None
    """environments collecting them at once, each episode from a fresh start state; None: all of
    them in one batched rollout (the fewest sequential steps); a divisor of refine_episodes
    collects in batches to save memory (the release: 64)"""
    refine_steps: int = 50_000
    """decoder gradient steps in one refinement (the paper's text: 50 epochs, ~3,100 steps)"""
    refine_batch_size: int = 8192
    """actions per decoder gradient step, drawn with replacement from the training episodes"""
    refine_draws: int = 8
    """(prior latent, flow time) draws per action in each gradient step (the paper's text: 1)"""
    refine_learning_rate: float = 3e-4
    """Adam learning rate of the decoder"""
    decoder_target_clip: float | None = None
    """regression targets (the collected actions) clipped to [-c, c], 0: no clip; None: the task's
    value (3; none on HopperStand; 1 on humanoids, whose targets are bounded actions)"""
    decoder_init: Literal["fresh", "warm"] = "fresh"
    """fresh: each refinement trains a newly initialized decoder (the exact identity before
    training), as released; warm: continue training the current decoder (the paper's text)"""
    refine_val_fraction: float = 0.1
    """fraction of the collected episodes held out to select the decoder"""
    refine_eval_every: int = 100
    """validate every this many decoder steps (and before the first); the best decoder is kept"""
    refine_val_size: int = 65536
    """held-out transitions the validation metric averages over (fixed draws, so comparable)"""
    refine_metric: Literal["val_loss", "val_endpoint_mse"] | None = None
    """decoder selection: val_loss (flow-matching loss) or val_endpoint_mse (squared error of
    g(s, z), z a fixed prior draw, to the action); None: the task's value (val_endpoint_mse on
    FingerSpin and FishSwim)"""
    # --- ablations of paper 002 (Fig. 4) and the decoder-iteration study; off by default
    refine_latents: Literal["prior", "encoder"] = "prior"
    """decoder inputs during refinement: prior (fresh N(0, I) draws, the method) or encoder (the
    latents the encoder sampled in the refinement rollouts: the self-reconstruction ablation)"""
    encoder_reset: bool = True
    """re-initialize the encoder to the prior at every stage (--no-encoder-reset: keep training it)"""
    frozen_decoder: str | None = None
    """stage checkpoint (runs/.../checkpoints/stageK.npz) whose decoder is used, frozen, in every
    stage of this run: no refinement (train a fresh encoder against an earlier run's decoder)"""
    # --- evaluation and bookkeeping
    eval_every: int = 6_000_000
    """evaluate every this many environment steps (global step axis across stages)"""
    num_eval_envs: int = 128
    """environments in one evaluation (one full episode each)"""
    deterministic_eval: bool | None = None
    """evaluate the encoder's mean latent (True) or sampled latents; None: the task's value
    (sampled on humanoids, as released)"""


def make_env(args: Args):
    """The environment this script trains on, before `common.make_env` wraps it: the MuJoCo
    Playground task `args.env_name`. To train on your own task, return your environment here (a
    Playground `MjxEnv` or a Brax `Env`), or pass it to `main(args, env)` (README, "Your own
    environment")."""
    return running.load_playground_env(args.env_name, args.impl)


# The flags above that default to None, at their values on a task that sets nothing (the
# release's dm_control profile, configs/methods/gorl_fm.toml); then this method's values per
# task (configs/tasks/*.toml); running.TASK_SETTINGS has those every method shares (discounts).
TASK_DEFAULTS = {
    "matmul_precision": "default", "stage_steps": (60_000_000, 60_000_000, 30_000_000, 30_000_000), "discount": 0.995,
    "clip_eps": (0.15, 0.3), "max_grad_norm": (0.5, 0.5), "kl_beta": (5e-4, 1e-3), "bounded_latent": False,
    "decoder_hidden": (128, 128, 128, 128), "action_semantics": "pre_squash", "refine_episodes": 4096,
    "decoder_target_clip": 3.0, "refine_metric": "val_loss", "deterministic_eval": True,
    "normalizer_update": ("after",), "normalizer_variance": ("running",), "learning_rate": (1e-3,),
}
# The humanoid profile (paper 002's 21-D HumanoidStand / HumanoidRun) bounds the latent, clips
# the ratio at 0.3 in every stage, regresses the decoder onto the environment's (bounded)
# action, collects fewer refinement episodes and evaluates the stochastic policy.
HUMANOID = {"bounded_latent": True, "clip_eps": (0.3,), "refine_episodes": 1024, "action_semantics": "bounded",
            "decoder_target_clip": 1.0, "deterministic_eval": False}
TASK_SETTINGS = {
    "FingerSpin": {"refine_metric": "val_endpoint_mse"},
    "FingerTurnHard": {"max_grad_norm": (0.5, 1.0), "kl_beta": (5e-4, 1e-3, 1e-3, 1e-2)},
    # FishSwim's encoder normalizer as released (configs/tasks/FishSwim.toml, observation_stats_*).
    "FishSwim": {"refine_metric": "val_endpoint_mse", "normalizer_update": ("before",),
                 "normalizer_variance": ("batch",)},
    "WalkerWalk": {"max_grad_norm": (0.5, 1.0), "kl_beta": (5e-4, 3e-3), "learning_rate": (1e-3, 1e-3, 1e-3, 3e-4)},
    "HopperStand": {"decoder_hidden": (64, 64, 64, 64), "decoder_target_clip": 0.0},
    "HumanoidStand": {**HUMANOID, "refine_episodes": 128},
    "HumanoidRun": HUMANOID,
}


def resolve(args: Args) -> Args:
    """Fill the task-dependent flags (None) with the task's values."""
    return running.resolve_task_settings(args, TASK_SETTINGS, TASK_DEFAULTS)


def steps_per_iteration(args: Args) -> int:
    return args.batch_size * args.num_minibatches * args.unroll_length


def iterations_in_stage(args: Args, stage: int) -> int:
    """A stage runs whole iterations: its budget rounded down to a multiple of one iteration."""
    return args.stage_steps[stage] // steps_per_iteration(args)


def validate(args: Args) -> None:
    """Reject bad flag values before anything is compiled (task-dependent flags left at None
    are checked at the task's value)."""
    args = resolve(args)
    running.check_args([
        *running.ppo_layout_checks(args),
        *running.seed_checks(args),
        *running.staged_checks(args, steps_per_iteration(args)),
        *running.positive_checks(args, "refine_steps", "flow_steps"),
        (args.refine_steps % max(args.refine_eval_every, 1) == 0,
         f"--refine-steps {args.refine_steps} must be a multiple of --refine-eval-every {args.refine_eval_every}"),
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
    policy_size, _ = common.observation_sizes(obs_size)  # a dict observation's "state"
    params = common.mlp_init(key, [policy_size, *args.encoder_hidden, 2 * latent_size])
    params[-1] = {
        "w": jnp.zeros_like(params[-1]["w"]),
        "b": jnp.concatenate([jnp.zeros(latent_size), jnp.full(latent_size, common.unit_scale_bias())]),
    }
    return params


def encoder(params, obs):
    """Mean and scale of pi_theta(z | s)."""
    return common.gaussian_from_output(common.mlp_apply(params, common.policy_input(obs)))


def sample_latent(params, obs, key, bounded: bool):
    """z ~ pi_theta(z | s) at a normalized observation: (z, u, log pi(u | s)).

    u is the Gaussian sample PPO's ratio is taken on; z = u, or tanh(u) with a bounded latent
    (the release's humanoid profile; the tanh Jacobian depends on u alone and cancels in the ratio).
    """
    mean, scale = encoder(params, obs)
    u = mean + scale * jax.random.normal(key, mean.shape)
    return (jnp.tanh(u) if bounded else u), u, common.gaussian_log_prob(u, mean, scale)


def mean_latent(params, obs, bounded: bool):
    """The deterministic policy's latent: the encoder's mean (squashed with a bounded latent)."""
    mean, _ = encoder(params, obs)
    return jnp.tanh(mean) if bounded else mean


def critic(params, obs):
    return common.mlp_apply(params, common.critic_input(obs))[..., 0]


# ---------------------------------------------------------------------------------------------
# Decoder g_phi(s, z): a conditional flow, velocity field v_phi(x_t, t, s) (Appendix C.2)
# ---------------------------------------------------------------------------------------------


def init_decoder(key, obs_size: int, action_size: int, args: Args):
    """A zero output layer gives v = 0 everywhere, so the flow is static: g(s, z) = z exactly."""
    params = common.mlp_init(key, [obs_size + action_size + common.TIME_EMBEDDING_SIZE, *args.decoder_hidden, action_size])
    params[-1] = jax.tree.map(jnp.zeros_like, params[-1])
    return params


def velocity(params, obs, x_t, t):
    t = jnp.broadcast_to(t, x_t.shape[:-1])
    return common.mlp_apply(params, jnp.concatenate([obs, x_t, common.time_embedding(t)], axis=-1))


def decode(params, obs, z, flow_steps: int):
    """a = g_phi(s, z): Euler integration of dx/dt = v(x, t, s) from x_0 = z to x_1."""
    dt = 1.0 / flow_steps

    def euler_step(x, k):
        return x + dt * velocity(params, obs, x, k * dt), None

    a, _ = jax.lax.scan(euler_step, z, jnp.arange(flow_steps))
    return a


def flow_matching_loss(params, obs, actions, z, t):
    """Conditional flow matching (Eq. 6): along the straight path x_t = (1 - t) z + t a,
    regress v_phi(x_t, t, s) onto its velocity a - z. In refinement (Eq. 4) z is a fresh draw
    from the fixed prior N(0, I), never the encoder's latent, and t ~ U[0, 1]. `z` and `t` may
    carry leading axes of extra draws per action; `obs` and `actions` are broadcast to them."""
    obs = jnp.broadcast_to(obs, z.shape[:-1] + obs.shape[-1:])
    actions = jnp.broadcast_to(actions, z.shape)
    t = t[..., None]
    x_t = (1.0 - t) * z + t * actions
    v = velocity(params, obs, x_t, t[..., 0])
    return jnp.mean(jnp.sum((v - (actions - z)) ** 2, axis=-1))


def sample_actions(checkpoint, obs, key, num_samples: int, flow_steps: int, from_prior: bool = False,
                   bounded_latent: bool = False, action_semantics: str = "pre_squash"):
    """`num_samples` environment actions at one raw observation `obs`.

    Latents come from the encoder (or from the prior N(0, I) with `from_prior`), as for the
    action-density figure (paper Fig. 7). `checkpoint` is a stage checkpoint (see `main`).
    """
    obs = jnp.broadcast_to(obs, (num_samples, obs.shape[-1]))
    if from_prior:
        z = jax.random.normal(key, (num_samples, checkpoint["decoder"][-1]["b"].shape[-1]))
    else:
        z, _, _ = sample_latent(checkpoint["params"]["encoder"], common.normalize(checkpoint["norm"], obs), key, bounded_latent)
    decoder_obs = common.normalize(checkpoint["decoder_norm"], obs)
    return jnp.tanh(common.env_action(decode(checkpoint["decoder"], decoder_obs, z, flow_steps), action_semantics))


# ---------------------------------------------------------------------------------------------
# The training state, and the policy: a latent from the encoder, an action from the decoder
# ---------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """Everything a stage trains and runs with; checkpoints hold the first four fields."""

    params: dict  # {"encoder": ..., "critic": ...}: trained by latent PPO
    norm: common.Normalizer  # the encoder's and critic's observation statistics
    decoder: list  # g_phi, frozen during a stage, refitted between stages
    decoder_norm: common.Normalizer  # the statistics the decoder was fitted with, fixed with it
    opt_state: Any = None  # the stage's Adam state (`start_stage`)
    hp: dict | None = None  # the stage's learning rate, clips and KL weight, as arrays
    env_state: Any = None  # the batched training environments, mid-episode


STAGE_KEYS = ("params", "norm", "decoder", "decoder_norm")
RESUME_KEYS = (*STAGE_KEYS, "opt_state", "hp")  # and the environments: a stage in progress


def act(state: TrainState, obs, z, args: Args):
    """a = g_phi(s, z) for raw observations `obs`, the decoder seeing them through its own
    statistics: the action in the decoder's units (pre-squash, or bounded on humanoids);
    `common.env_action` gives what the environment receives. With `sample_latent` (or
    `mean_latent`) this is the whole policy, in training, refinement and evaluation."""
    return decode(state.decoder, common.normalize(state.decoder_norm, common.policy_input(obs)), z, args.flow_steps)


# ---------------------------------------------------------------------------------------------
# Latent PPO loss (Eq. 5 + the KL regularizer of Eq. 3)
# ---------------------------------------------------------------------------------------------


def latent_ppo_loss(params, batch, hp, args: Args):
    """PPO on the latent likelihood ratio pi_theta(z|s) / pi_old(z|s), the decoder frozen (Eq. 5),
    plus beta * KL(pi_theta(.|s) || N(0, I)) averaged over states (Eq. 3)."""
    mean, scale = encoder(params["encoder"], batch["obs"])
    log_prob = common.gaussian_log_prob(batch["latent"], mean, scale)
    # Advantages normalized per minibatch (Brax's normalize_advantage), computed here with the
    # current critic under --advantages minibatch.
    values = critic(params["critic"], batch["obs"])
    advantages, target, critic_metrics = common.minibatch_targets(
        batch, values, lambda obs: critic(params["critic"], obs), args)
    policy_loss, clip_fraction, approx_kl = common.clipped_surrogate(log_prob - batch["log_prob"], advantages,
                                                                     hp["clip_eps"])
    regularizer = common.latent_regularizer(mean, scale, args.latent_regularizer)
    value_loss = jnp.mean((values - target) ** 2)
    entropy = common.gaussian_entropy(scale).mean()
    loss = policy_loss + hp["kl_beta"] * regularizer + args.vf_coef * value_loss - hp["ent_coef"] * entropy
    return loss, {"loss/total": loss, "loss/policy": policy_loss, "loss/value": value_loss, "loss/kl_prior": regularizer,
                  "encoder/entropy": entropy, "encoder/clip_fraction": clip_fraction, "encoder/approx_kl": approx_kl,
                  **critic_metrics}


def stage_hyperparameters(args: Args, stage: int):
    """The stage's learning rate, clip, gradient-norm clip, KL and entropy weights, normalizer settings (stage 0 trains more
    conservatively, as released). Arrays, not Python floats, so that changing them between
    stages does not recompile the training iteration."""
    hp = {name: jnp.float32(running.per_stage(getattr(args, name), stage))
          for name in ("learning_rate", "clip_eps", "max_grad_norm", "kl_beta", "ent_coef")}
    return dict(hp, normalizer_before=jnp.float32(running.per_stage(args.normalizer_update, stage) == "before"),
                normalizer_keep_variance=jnp.float32(running.per_stage(args.normalizer_variance, stage) == "running"))


def clip_by_global_norm(grads, max_norm):
    norm = optax.tree.norm(grads)
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * factor, grads)


def make_train_iteration(env, optimizer, args: Args):
    rollout_steps = steps_per_iteration(args) // args.num_envs

    def update(carry, batch):
        params, opt_state, hp = carry
        grads, metrics = jax.grad(latent_ppo_loss, has_aux=True)(params, batch, hp, args)
        grads = clip_by_global_norm(grads, hp["max_grad_norm"])
        updates, opt_state = optimizer.update(grads, opt_state, params)  # Adam's direction ...
        updates = jax.tree.map(lambda u: -hp["learning_rate"] * u, updates)  # ... the stage's step size
        return (optax.apply_updates(params, updates), opt_state, hp), metrics

    def train_iteration(state, key):
        params, norm = state.params, state.norm
        k_rollout, k_sgd = jax.random.split(key)

        def policy(obs, key):
            # The decoder runs inside the rollout scan: it is part of the latent MDP's dynamics.
            z, u, log_prob = sample_latent(params["encoder"], common.normalize(norm, obs), key, args.bounded_latent)
            action = common.env_action(act(state, obs, z, args), args.action_semantics)
            return action, {"latent": u, "log_prob": log_prob}

        env_state, data = common.rollout(env, state.env_state, policy, k_rollout, rollout_steps,
                                         fresh_start_states=args.fresh_start_states)
        # The statistics with this rollout. In Brax's order ("before") the epochs already see them
        # (the first ratio is not 1); "after", the next rollout does. The stage's setting is in hp.
        updated = common.normalizer_update(norm, data["obs"], state.hp["normalizer_keep_variance"])
        epoch_norm = jax.tree.map(lambda new, old: jnp.where(state.hp["normalizer_before"] > 0, new, old), updated, norm)
        batch = common.ppo_epochs_data(data, epoch_norm, lambda obs: critic(params["critic"], obs), args,
                                       latent=data["latent"], log_prob=data["log_prob"])
        (params, opt_state, _), metrics = common.minibatch_sgd(
            update, (params, state.opt_state, state.hp), batch, k_sgd, args.num_epochs, args.num_minibatches,
            flatten=args.minibatch_unit == "sequence",
        )
        metrics["train/episode_return"], _ = common.completed_episode_return(data)
        metrics["train/action_abs_mean"] = jnp.abs(jnp.tanh(data["action"])).mean()
        state = state._replace(params=params, opt_state=opt_state, env_state=env_state, norm=updated)
        return state, metrics

    return train_iteration


# ---------------------------------------------------------------------------------------------
# Decoder refinement: a fresh dataset from the frozen encoder, then flow matching from the prior
# ---------------------------------------------------------------------------------------------


def refinement_inputs(batch, key, draws: int, refine_latents: str = "prior"):
    """The decoder's input latents z and flow times t, `draws` of each per action: [draws, B, .].

    GoRL draws z fresh from the fixed prior N(0, I) (Eq. 4). The ablation of Fig. 4a instead
    reuses the latents the encoder produced the actions with, a self-reconstruction loop.
    """
    k_z, k_t = jax.random.split(key)
    actions = batch["action"]
    if refine_latents == "encoder":
        z = jnp.broadcast_to(batch["latent"], (draws, *actions.shape))
    else:
        z = jax.random.normal(k_z, (draws, *actions.shape))
    return z, jax.random.uniform(k_t, (draws, *actions.shape[:-1]))


def make_refinement(env, args: Args):
    obs_size, _ = common.observation_sizes(env.observation_size)  # the decoder's input: the policy's
    action_size = env.action_size
    decoder_optimizer = optax.adam(args.refine_learning_rate)
    held_out = max(1, int(args.refine_episodes * args.refine_val_fraction)) * env.episode_length

    def collect(state, key):
        """Full episodes from the frozen encoder (sampling z) and the current decoder, each from a
        fresh start state: the observations [T, refine_episodes, .], the regression targets and
        the latents."""

        def policy(obs, key):
            z, _, _ = sample_latent(state.params["encoder"], common.normalize(state.norm, obs), key, args.bounded_latent)
            a = act(state, obs, z, args)
            target = common.regression_targets(a, args.action_semantics, args.decoder_target_clip)
            return common.env_action(a, args.action_semantics), {"latent": z, "target": target}

        data = common.collect_episodes(env, policy, key, args.refine_episodes, args.refine_envs or args.refine_episodes)
        # The decoder sees the policy's part of a dict observation; the critic's is not kept.
        dataset = {"obs": common.policy_input(data["obs"]), "action": data["target"], "latent": data["latent"]}
        return dataset, common.completed_episode_return(data)[0]

    def fit(decoder_params, dataset, key):
        """Eq. 4 as released: a decoder (fresh: the identity) fitted by flow matching from the
        prior on 90% of the episodes, the best decoder on the held-out 10% kept. Returns the
        decoder, the normalizer of its inputs (the training split's statistics) and metrics."""
        k_split, k_val, k_val_draws, k_init, k_fit = jax.random.split(key, 5)
        train, val = common.split_episodes(dataset, k_split, args.refine_val_fraction, env.episode_length)
        decoder_norm = common.normalizer_update(common.normalizer_init(obs_size), train["obs"])
        train = dict(train, obs=common.normalize(decoder_norm, train["obs"]))
        # A fixed held-out sample with fixed draws, so that validation scores are comparable.
        val_size = min(args.refine_val_size, held_out)
        val = jax.tree.map(lambda x: x[jax.random.permutation(k_val, held_out)[:val_size]], val)
        val = dict(val, obs=common.normalize(decoder_norm, val["obs"]))
        val_z, val_t = refinement_inputs(val, k_val_draws, args.refine_draws, args.refine_latents)

        def val_fn(params):
            if args.refine_metric == "val_endpoint_mse":
                # The release's endpoint error: g(s, z) against the action, z a fixed prior draw.
                a = decode(params, val["obs"][:4096], val_z[0, :4096], args.flow_steps)
                return jnp.mean((a - val["action"][:4096]) ** 2)
            return flow_matching_loss(params, val["obs"], val["action"], val_z, val_t)

        def loss_fn(params, batch, key):
            z, t = refinement_inputs(batch, key, args.refine_draws, args.refine_latents)
            return flow_matching_loss(params, batch["obs"], batch["action"], z, t)

        if args.decoder_init == "fresh":
            decoder_params = init_decoder(k_init, obs_size, action_size, args)
        decoder, metrics = common.fit_keep_best(
            loss_fn, val_fn, decoder_params, decoder_optimizer, train, k_fit,
            num_steps=args.refine_steps, batch_size=args.refine_batch_size, eval_every=args.refine_eval_every,
        )
        return decoder, decoder_norm, metrics

    return jax.jit(collect), jax.jit(fit)


def refine_decoder(state, key, collect, fit, evaluate, runs):
    """Algorithm 1, lines 14-18, between stage m-1 and stage m: freeze the encoder, collect fresh
    episodes with it and the current decoder, fit the decoder to map the prior onto those
    actions (Eq. 4), and check it: the return of the refined decoder under the prior's mean
    latent. Every seed at once (`collect`, `fit` and `evaluate` map over the seed axis). Returns
    the state with the new decoder and the refinement's metrics."""
    k_collect, k_fit, k_eval = runs.split(key, 3)
    t0 = time.time()
    dataset, collect_return = collect(state, k_collect)
    decoder, decoder_norm, metrics = fit(state.decoder, dataset, k_fit)
    # The decoder keeps the normalizer it was fitted with: it is a fixed function of the raw
    # state for the whole next stage, while the encoder's statistics move on.
    state = state._replace(decoder=decoder, decoder_norm=decoder_norm)
    metrics = {**jax.device_get(metrics), "refine/collect_return": jax.device_get(collect_return),
               "refine/prior_latent_return": jax.device_get(evaluate(state, k_eval, True)["eval/return"]),
               "refine/seconds": time.time() - t0}
    return state, metrics


def experiment_name(args: Args) -> str:
    """The method's name with each ablation that is on, so `plot.py curves` keeps them apart."""
    ablations = {"no_encoder_reset": not args.encoder_reset, "encoder_latents": args.refine_latents == "encoder",
                 "frozen_decoder": args.frozen_decoder is not None}
    return "_".join(["gorl_fm"] + [name for name, on in ablations.items() if on])


def make_evaluate(env, args: Args):
    """`evaluate(state, key, prior_latents=False)`: the encoder's mean latent (sampled latents
    without --deterministic-eval), then g(s, z); with `prior_latents`, the prior's mean z = 0:
    the refined decoder on its own. One compiled function for both (the flag is an array, not a
    static argument)."""
    evaluator = common.make_evaluator(env, args.num_eval_envs)

    @jax.jit
    def evaluate_jit(state, key, prior_latents):
        def policy(obs, key):
            enc_obs = common.normalize(state.norm, obs)
            if args.deterministic_eval:
                z = mean_latent(state.params["encoder"], enc_obs, args.bounded_latent)
            else:
                z, _, _ = sample_latent(state.params["encoder"], enc_obs, key, args.bounded_latent)
            z = jnp.where(prior_latents, jnp.zeros_like(z), z)
            return common.env_action(act(state, obs, z, args), args.action_semantics)

        return evaluator(policy, key)

    return lambda state, key, prior_latents=False: evaluate_jit(state, key, jnp.asarray(prior_latents))


def init_state(env, args: Args, key):
    """Algorithm 1, line 2: the identity decoder (or the one --frozen-decoder names), a critic
    and the environments; each stage creates its encoder (`start_stage`). Returns the state and
    the key to go on with."""
    key, k_critic, k_decoder, k_env = jax.random.split(key, 4)
    policy_size, critic_size = common.observation_sizes(env.observation_size)
    state = TrainState(
        params={"encoder": None, "critic": common.mlp_init(k_critic, [critic_size, *args.critic_hidden, 1])},
        norm=common.normalizer_init(env.observation_size),  # a dict observation: statistics per entry
        decoder=init_decoder(k_decoder, policy_size, env.action_size, args),  # stage 0: the identity
        decoder_norm=common.normalizer_init(policy_size),
        env_state=common.reset_envs(env, k_env, args.num_envs),
    )
    if args.frozen_decoder:
        source = running.load_checkpoint(args.frozen_decoder)
        state = state._replace(decoder=source["decoder"], decoder_norm=source["decoder_norm"])
    return state, key


def start_stage(state, key, hp, optimizer, env, args: Args):
    """Algorithm 1, lines 6-7: the decoder frozen, the encoder re-initialized to the prior
    N(0, I) (kept training with --no-encoder-reset); a fresh optimizer state and the stage's
    hyperparameters `hp`. The critic and normalizer carry over."""
    params = state.params
    if args.encoder_reset or params["encoder"] is None:
        params = dict(params, encoder=init_encoder(key, env.observation_size, env.action_size, args))
    return state._replace(params=params, opt_state=optimizer.init(params), hp=hp)


def main(args: Args, env=None) -> None:
    """Train on the task `args.env_name`, or on `env`, your own environment object (a Playground
    `MjxEnv` or a Brax `Env`; `args.env_name` then only names the run folder)."""
    args = running.start(args, Args, resolve, validate)  # --resume's flags, the task's values, checked
    env = common.make_env(make_env(args) if env is None else env, args.impl, args.episode_length)
    args = dataclasses.replace(args, episode_length=env.episode_length)  # recorded in config.json
    per_iter, num_stages = steps_per_iteration(args), len(args.stage_steps)
    stage_end = [sum(iterations_in_stage(args, m) for m in range(k + 1)) * per_iter for k in range(num_stages)]
    runs = running.Runs(args, "gorl_fm", total_steps=stage_end[-1], default_exp_name=experiment_name(args))
    optimizer = optax.scale_by_adam()  # each stage's learning rate scales the steps (stage_hyperparameters)

    # Every function below is one seed's, mapped over the leading seed axis of all seeds' states.
    init = runs.parallel(lambda key: init_state(env, args, key))
    new_encoder = runs.parallel(lambda state, key, hp: start_stage(state, key, hp, optimizer, env, args),
                                in_axes=(0, 0, None))
    train_iteration = runs.timed(runs.parallel(make_train_iteration(env, optimizer, args), donate_argnums=0), per_iter)
    collect, fit = (runs.parallel(f) for f in make_refinement(env, args))
    evaluate = runs.parallel(make_evaluate(env, args), in_axes=(0, 0, None))  # (state, key, prior_latents)

    def refine(state, key, stage):  # lines 14-18, before `stage`
        key, k_refine = runs.split(key)
        state, metrics = refine_decoder(state, k_refine, collect, fit, evaluate, runs)
        runs.log_refinement(step, stage, metrics)
        stage_rows[-1]["refined_prior_return"] = metrics["refine/prior_latent_return"]
        return state, key

    state, key = init(runs.keys())  # line 2
    step, stage_rows, first_stage, under_way = 0, [], 0, False
    if args.frozen_decoder:
        print(f"decoder frozen from {args.frozen_decoder}; no refinement in this run")
    if args.resume and (resumed := runs.resume_stages(state, STAGE_KEYS, RESUME_KEYS)):
        state, step, key, stage_rows, first_stage, under_way = resumed
    with runs:  # closes the run folders; Ctrl-C says how to resume
        if 0 < first_stage < num_stages and not under_way and not args.frozen_decoder:
            state, key = refine(state, key, first_stage)  # the resumed run's pending refinement
        for stage in range(first_stage, num_stages):  # line 4
            if not (under_way and stage == first_stage):
                key, k_encoder = runs.split(key)
                state = new_encoder(state, k_encoder, stage_hyperparameters(args, stage))  # lines 6-7
            print(f"stage {stage}: latent PPO from step {step:,} to {stage_end[stage]:,}")
            while step + per_iter <= stage_end[stage]:  # lines 9-13: latent PPO, the decoder frozen
                key, k_iter, k_eval = runs.split(key, 3)
                state, metrics = train_iteration(state, k_iter)
                step += per_iter
                evaluating = running.evaluation_due(step, per_iter, stage_end[stage], args.eval_every)
                if evaluating:
                    metrics.update(jax.device_get(evaluate(state, k_eval, False)))
                runs.log_iteration(step, metrics, stage)
                if evaluating and step + per_iter <= stage_end[stage]:  # (the row before the checkpoint)
                    runs.save_inside_stage(state, RESUME_KEYS, stage, step, key, stage_rows)
            stage_rows.append({"stage": stage, "step": step, "return": metrics["eval/return"]})
            runs.save_stage(state, STAGE_KEYS, stage, step, key, stage_rows)
            if stage + 1 < num_stages and not args.frozen_decoder:
                state, key = refine(state, key, stage + 1)
    runs.finish(step, stage_rows=stage_rows)


if __name__ == "__main__":
    main(tyro.cli(Args))
