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

    python gorl_fm.py --env-name HopperStand --seed 1
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
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
    # --- the flow-matching decoder and its refinement (Appendix C.2, E.4)
    decoder_hidden: tuple[int, ...] = (64, 64, 64, 64)
    """velocity network hidden layer widths (SiLU)"""
    flow_steps: int = 10
    """Euler steps from x_0 = z to x_1 = a"""
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
    """decoder inputs during refinement: prior (fresh N(0, I) draws, the method) or encoder (the
    latents the encoder sampled in the refinement rollouts: the self-reconstruction ablation)"""
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
        (min(args.refine_envs, args.refine_iterations, args.refine_epochs, args.flow_steps) > 0,
         "--refine-envs, --refine-iterations, --refine-epochs and --flow-steps must be positive"),
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
    from the fixed prior N(0, I), never the encoder's latent, and t ~ U[0, 1]."""
    t = t[..., None]
    x_t = (1.0 - t) * z + t * actions
    v = velocity(params, obs, x_t, t[..., 0])
    return jnp.mean(jnp.sum((v - (actions - z)) ** 2, axis=-1))


def sample_actions(state, obs, key, num_samples: int, flow_steps: int, from_prior: bool = False):
    """`num_samples` environment actions tanh(g(s, z)) at one raw observation `obs`.

    Latents come from the encoder (or from the prior N(0, I) with `from_prior`), as for the
    action-density figure (paper Fig. 7). `state` is a stage checkpoint (see `main`).
    """
    obs = jnp.broadcast_to(obs, (num_samples, obs.shape[-1]))
    mean, scale = encoder(state["params"]["encoder"], common.normalize(state["norm"], obs))
    if from_prior:
        mean, scale = jnp.zeros_like(mean), jnp.ones_like(scale)
    z = mean + scale * jax.random.normal(key, mean.shape)
    decoder_obs = common.normalize(state["decoder_norm"], obs)
    return jnp.tanh(decode(state["decoder"], decoder_obs, z, flow_steps))


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
            action = decode(dec, common.normalize(dec_norm, obs), z, args.flow_steps)
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
# Decoder refinement: a fresh dataset from the frozen encoder, then flow matching from the prior
# ---------------------------------------------------------------------------------------------


def refinement_inputs(batch, k_z, k_t, refine_latents: str = "prior"):
    """The decoder's input latents z and flow times t for one refinement minibatch.

    GoRL draws z fresh from the fixed prior N(0, I) (Eq. 4). The ablation of Fig. 4a instead
    reuses the latents the encoder produced the actions with, a self-reconstruction loop.
    """
    actions = batch["action"]
    if refine_latents == "encoder":
        z = batch["latent"]
    else:
        z = jax.random.normal(k_z, actions.shape)
    return z, jax.random.uniform(k_t, actions.shape[:-1])


def make_refinement(env, args: Args):
    decoder_optimizer = optax.adam(args.refine_learning_rate)
    num_minibatches = refine_dataset_size(args) // args.refine_batch_size

    def collect(state, key):
        """(observation, pre-squash action) pairs from the frozen encoder (sampling z) and the
        current decoder: refine_iterations full episodes in each of refine_envs environments."""
        k_reset, k_rollout = jax.random.split(key)
        env_state = common.reset_envs(env, k_reset, args.refine_envs)

        def policy(obs, key):
            mean, scale = encoder(state["params"]["encoder"], common.normalize(state["norm"], obs))
            z = mean + scale * jax.random.normal(key, mean.shape)
            decoder_obs = common.normalize(state["decoder_norm"], obs)
            return decode(state["decoder"], decoder_obs, z, args.flow_steps), {"latent": z}

        steps = args.refine_iterations * common.EPISODE_LENGTH
        _, data = common.rollout(env, env_state, policy, k_rollout, steps)
        dataset = {k: data[k].reshape(-1, data[k].shape[-1]) for k in ("obs", "action", "latent")}
        return dataset, common.completed_episode_return(data)[0]

    def fit(decoder_params, decoder_norm, dataset, key):
        """Eq. 4: minimize the flow-matching loss over the dataset, latents from the fixed prior."""

        def update(carry, batch):
            params, opt_state, key = carry
            key, k_z, k_t = jax.random.split(key, 3)
            z, t = refinement_inputs(batch, k_z, k_t, args.refine_latents)
            loss, grads = jax.value_and_grad(flow_matching_loss)(params, batch["obs"], batch["action"], z, t)
            updates, opt_state = decoder_optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), {"loss": loss}

        k_sgd, k_carry, k_z, k_t = jax.random.split(key, 4)
        data = dict(dataset, obs=common.normalize(decoder_norm, dataset["obs"]))
        carry = (decoder_params, decoder_optimizer.init(decoder_params), k_carry)
        (params, _, _), metrics = common.minibatch_sgd(update, carry, data, k_sgd, args.refine_epochs, num_minibatches)
        head = jax.tree.map(lambda x: x[: args.refine_batch_size], data)
        z, t = refinement_inputs(head, k_z, k_t, args.refine_latents)
        final_loss = flow_matching_loss(params, head["obs"], head["action"], z, t)
        return params, {"refine/loss_mean": metrics["loss"], "refine/loss_final": final_loss}

    return jax.jit(collect), jax.jit(fit)


def main(args: Args) -> None:
    if args.resume:
        args = common.args_from_run(Args, args.resume, resume=args.resume)
    validate(args)

    env = common.make_env(args.env_name, args.impl)
    obs_size, action_size = env.observation_size, env.action_size
    optimizer = optax.adam(args.learning_rate)
    run = common.Run(args, "gorl_fm", run_dir=args.resume)
    per_iter = steps_per_iteration(args)
    total_steps = sum(iterations_in_stage(args, m) for m in range(len(args.stage_steps))) * per_iter

    train_iteration = jax.jit(make_train_iteration(env, optimizer, args), donate_argnums=0)
    collect, fit = make_refinement(env, args)
    evaluator = common.make_evaluator(env, args.num_eval_envs)

    @jax.jit
    def evaluate(state, key, prior_latents=False):
        """Deterministic policy: the encoder's mean latent (or the prior's mean, 0), then g(s, z)."""

        def act(obs):
            z, _ = encoder(state["params"]["encoder"], common.normalize(state["norm"], obs))
            z = jnp.where(prior_latents, jnp.zeros_like(z), z)
            return decode(state["decoder"], common.normalize(state["decoder_norm"], obs), z, args.flow_steps)

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
                print(f"refined decoder before stage {stage}: flow-matching loss {metrics['refine/loss_final']:.4f}, "
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
        print(f"interrupted; resume from the last completed stage with: python gorl_fm.py --resume {run.dir}")
        raise
    finally:
        run.close()
    print(f"done: {step:,} steps in {time.time() - start:.0f}s")
    run.write_stage_table(stage_rows)
    print(f"run folder: {run.dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
