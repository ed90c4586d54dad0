"""Throughput of ppo.py against raw environment stepping and Brax's own PPO trainer.

On one task and one number of environments, in one process, this measures

  (a) raw stepping: `common.make_env` stepped in a jitted `lax.scan` with random actions
      (and, for reference, the same task behind playground's `wrap_for_brax_training`, the
      wrapper stack Brax PPO uses);
  (b) ppo.py: the pieces its `main()` builds (environment, optimizer, parameters, the jitted
      `make_train_iteration`), driven by the same host loop as ppo.py's main() (one
      jitted iteration per call, metrics fetched to the host after each), plus its
      deterministic evaluation return at the end of the budget;
  (c) Brax PPO (`brax.training.agents.ppo.train`) on the same playground task (`impl="jax"`)
      with the same networks and hyperparameters, and its deterministic evaluation return at
      the same budget;

then prints steps/s, the ratios and the returns. The goal: ppo.py >= 1.2x Brax PPO steps/s
at an equal return.

How compilation is kept out of steps/s:
  - raw stepping and ppo.py are compiled ahead of time (`jit(...).lower(...).compile()`),
    and only the calls of the compiled function are timed;
  - Brax compiles its `training_epoch` inside its first epoch, and with jax 0.8.2 compiles it
    a second time inside its second epoch (see "Brax 0.14.2 with jax 0.8.2" below), so its
    steps/s is taken from the second to the last post-training progress callback (epochs 3..),
    from Brax's own `training/walltime` (per-epoch timing after `block_until_ready`,
    evaluations excluded). The wall-clock rate between those two callbacks (evaluations
    included) and every epoch's own steps/s are reported too.
  The budget is rounded down to a whole number of Brax epochs, so both trainers make exactly
  the same number of iterations.

Matching Brax's hyperparameters to ppo.py's (SPEC section 3):
  learning_rate, entropy_cost 0.01, discounting 0.995, gae_lambda 0.95, clipping_epsilon 0.2,
  reward_scaling 10, normalize_observations, unroll_length, batch_size, num_minibatches,
  num_updates_per_batch = num_epochs, max_grad_norm None, vf_loss_coefficient = 2 * vf_coef
  (Brax's value loss is `0.5 * vf_coefficient * mean(err^2)`, ours `vf_coef * mean(err^2)`), networks (32,)*4 / (256,)*5 SiLU, tanh-normal policy whose scale is
  softplus(.) + 1e-3 from the network output (Brax's `tanh_normal` default; ours is the same
  Gaussian over the pre-squash action). Evaluation: 128 environments, one 1000-step episode,
  deterministic policy (`deterministic_eval=True`) in both.
  Known differences that remain: Brax updates the normalizer before the epochs (ours after),
  excludes truncated steps from GAE (ours bootstraps from the true last observation), shuffles
  whole `unroll_length` sequences (ours shuffles single transitions, with GAE computed once over
  each environment's whole trajectory), and estimates the entropy by sampling (ours: Gaussian
  entropy in closed form).

CPU (the defaults: CartpoleBalance, 64 environments, 8 iterations of 7,680 steps; about 4
minutes of CPU time, most of it compilation; add --breakdown for the parts of ppo.py's iteration):

    python benchmarks/throughput.py --breakdown

On a shared machine the load changes between the three measurements; compare runs, not single
numbers. At this size the update (the 5 x 256 critic) dominates and returns are those of an
untrained policy; the GPU command below is the setting the 1.2x goal is about.

GPU, the paper's setting (2048 environments, 32 x 1024 sequences of 30 steps, 16 epochs;
983,040 steps per iteration), e.g. 20 iterations on a DMC task:

    python benchmarks/throughput.py --env-name CheetahRun --num-envs 2048 --batch-size 1024 \\
        --num-minibatches 32 --unroll-length 30 --num-epochs 16 --total-timesteps 19660800 \\
        --num-evals 5 --raw-steps 1000

(d) Seeds in one process (--seeds-axis 1 2 4, --two-devices; --only-seeds skips (a)-(c)): ppo.py's
iteration for N seeds as `ppo.py --num-seeds N` builds it (running.Runs: vmapped over a leading
seed axis, sharded over the local devices), total training steps/s of all seeds. On a CPU
--two-devices runs in a subprocess with 2 forced CPU devices (the same cores, split in two):

    python benchmarks/throughput.py --only-seeds --seeds-axis 1 2 4 --two-devices

On a 2-core CPU little is to be gained: one seed already keeps both cores busy. On a GPU the
iteration at the paper's size is 512 sequential minibatch updates (32 minibatches x 16 epochs)
of small networks, bound by kernel-launch latency rather than arithmetic, plus MJX stepping
2048 environments, which does not fill a large GPU on the simpler tasks: N vmapped seeds make
each launch do N times the work at about the same latency, so we expect the total steps/s of
2-4 seeds on one GPU to be well above one seed's (PureJaxRL saw the same), approaching N x on
the cheap tasks and less on contact-rich ones where MJX already fills the GPU; and with several
GPUs, the seed axis split over them, close to linear in the number of GPUs:

    python benchmarks/throughput.py --env-name CheetahRun --num-envs 2048 --batch-size 1024 \\
        --num-minibatches 32 --unroll-length 30 --num-epochs 16 --total-timesteps 19660800 \\
        --num-evals 5 --only-seeds --seeds-axis 1 2 4 --two-devices

Brax 0.14.2 with jax 0.8.2: it fails with jax 0.10 (`jax.device_put_replicated` is gone); with
the pinned jax 0.8.2 it runs, but
  - its `training_epoch` (a `pmap`, which jax 0.8 runs as a jit over a mesh named after the pmap
    axis 'i') is compiled twice: the first call gets the training state from
    `jax.device_put_replicated`, whose arrays are sharded over a mesh named
    '_device_put_replicated'; the outputs come back sharded over mesh 'i', so the second call
    misses the compilation cache and compiles again (seen with JAX_LOG_COMPILES=1: the two
    compilations differ only in the argument shardings). From the third epoch on it is cached;
    hence the timing from epoch 3 on and `--num-evals >= 5`.
  - its evaluation is compiled twice too: the first evaluation sees the normalizer's `std_eps`
    as a weakly typed Python float, later ones as a float32 array (explained by
    jax_explain_cache_misses). That costs only evaluation time, which the training steps/s
    excludes.
Playground tasks are passed unwrapped with
`wrap_env_fn=mujoco_playground.wrapper.wrap_for_brax_training` (as playground's notebooks do);
Brax's default wrapper is for Brax's own `PipelineEnv`s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402
import running  # noqa: E402
import ppo  # noqa: E402


@dataclasses.dataclass
class Args:
    env_name: str = "CartpoleBalance"
    """DMC task from MuJoCo Playground (MJX, impl=jax)"""
    num_envs: int = 64
    """parallel environments (all three measurements)"""
    unroll_length: int = 30
    """length of one collected sequence (Brax's unroll_length)"""
    batch_size: int = 32
    """sequences per minibatch"""
    num_minibatches: int = 8
    """minibatches per epoch; one iteration collects batch_size * num_minibatches sequences"""
    num_epochs: int = 4
    """optimization epochs per iteration (Brax's num_updates_per_batch)"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    total_timesteps: int = 61_440
    """training budget in environment steps (rounded down to whole Brax epochs)"""
    num_evals: int = 5
    """Brax progress points, the initial evaluation included; the budget is split into
    num_evals - 1 Brax epochs, of which the first two (compilations) are not timed (>= 5)"""
    num_eval_envs: int = 128
    """environments in one evaluation (one full episode each, deterministic policy)"""
    raw_steps: int = 500
    """steps per environment in one timed call of the raw-stepping scan"""
    raw_repeats: int = 5
    """timed calls of the raw-stepping scan (the best is reported)"""
    seed: int = 1
    """random seed (both trainers)"""
    breakdown: bool = False
    """also time the parts of ppo.py's iteration separately (rollout, value targets, minibatch
    epochs, shuffle + gather; four extra compiles)"""
    skip_brax: bool = False
    """skip the Brax PPO measurement"""
    skip_ppo: bool = False
    """skip the ppo.py measurement"""
    results_dir: str | None = "benchmarks/results"
    """write a JSON of the results here, relative to the repository root (None: do not write)"""
    seeds_axis: tuple[int, ...] = ()
    """(d) also time ppo.py's iteration with these numbers of seeds in one process (--num-seeds),
    e.g. 1 2 4: total training steps/s of all seeds"""
    two_devices: bool = False
    """(d) also time 2 seeds on 2 devices: in a subprocess with 2 forced CPU devices on a CPU,
    on the visible devices otherwise (at least 2)"""
    only_seeds: bool = False
    """measure only (d): no raw stepping, ppo.py or Brax"""


def ppo_args(args: Args) -> ppo.Args:
    return ppo.Args(
        env_name=args.env_name, seed=args.seed, impl="jax", total_timesteps=args.total_timesteps,
        num_envs=args.num_envs, unroll_length=args.unroll_length, batch_size=args.batch_size,
        num_minibatches=args.num_minibatches, num_epochs=args.num_epochs,
        learning_rate=args.learning_rate, num_eval_envs=args.num_eval_envs,
        # Every task-dependent flag given, so both trainers get the values listed above.
        discount=0.995, clip_eps=0.2, max_grad_norm=0.0, deterministic_eval=True, matmul_precision="default",
    )


def iterations(args: Args) -> tuple[int, int]:
    """(training iterations in the budget, iterations per Brax epoch)."""
    per_iteration = ppo.steps_per_iteration(ppo_args(args))
    epochs = args.num_evals - 1
    per_epoch = args.total_timesteps // (per_iteration * epochs)
    return per_epoch * epochs, per_epoch


def validate(args: Args) -> None:
    ppo.validate(ppo_args(args))
    n, _ = iterations(args)
    running.check_args([
        (args.num_evals >= 5, "--num-evals must be >= 5 (initial evaluation, two compiling Brax epochs, "
                              "two timed ones)"),
        (n > 0, f"--total-timesteps {args.total_timesteps:,} is less than num_evals - 1 = "
                f"{args.num_evals - 1} iterations of {ppo.steps_per_iteration(ppo_args(args)):,} steps"),
        (args.raw_steps > 0 and args.raw_repeats > 0, "--raw-steps and --raw-repeats must be positive"),
    ])


def timed_best(fn, *xs, repeats: int) -> float:
    """Best wall time of `repeats` calls of an already compiled function."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*xs))
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------
# (a) raw environment stepping
# ---------------------------------------------------------------------------------------------


def compile_raw_stepping(env, args: Args, key, squash: bool = False):
    """`env.step` with random actions in a scan, compiled ahead of time; returns a
    zero-argument function that runs it once. `squash` applies tanh to the actions
    (common.make_env does it itself)."""

    def run(state, key):
        def step(state, key):
            action = jax.random.normal(key, (args.num_envs, env.action_size))
            action = jnp.tanh(action) if squash else action
            return env.step(state, action), None

        state, _ = jax.lax.scan(step, state, jax.random.split(key, args.raw_steps))
        return state

    k_reset, k_run = jax.random.split(key)
    state = jax.jit(env.reset)(jax.random.split(k_reset, args.num_envs))
    compiled = jax.jit(run).lower(state, k_run).compile()
    return lambda: compiled(state, k_run)


def raw_stepping(envs: dict, args: Args, key) -> dict:
    """Best steps/s of each compiled stepping function, the calls interleaved so that a
    change in the machine's load hits all of them alike."""
    runs = {name: compile_raw_stepping(env, args, key, squash) for name, (env, squash) in envs.items()}
    best = {name: math.inf for name in runs}
    for _ in range(args.raw_repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], timed_best(fn, repeats=1))
    return {name: args.num_envs * args.raw_steps / seconds for name, seconds in best.items()}


# ---------------------------------------------------------------------------------------------
# (b) ppo.py
# ---------------------------------------------------------------------------------------------


def bench_ppo(args: Args) -> dict:
    """ppo.py's training iteration, built as its main() builds it, after an AOT compile."""
    pargs = ppo_args(args)
    n_iter, _ = iterations(args)
    per_iteration = ppo.steps_per_iteration(pargs)
    env = common.make_env(pargs.env_name, pargs.impl)
    optimizer = optax.chain(
        optax.clip_by_global_norm(pargs.max_grad_norm) if pargs.max_grad_norm else optax.identity(),
        optax.adam(pargs.learning_rate),
    )
    key = jax.random.PRNGKey(pargs.seed)
    key, k_init, k_env = jax.random.split(key, 3)
    params = ppo.init_params(k_init, env.observation_size, env.action_size, pargs)
    env_state = jax.jit(common.reset_envs, static_argnums=(0, 2))(env, k_env, pargs.num_envs)
    state = ppo.TrainState(params, optimizer.init(params), common.normalizer_init(env.observation_size), env_state)
    train_iteration = ppo.make_train_iteration(env, optimizer, pargs)

    t0 = time.perf_counter()
    compiled = jax.jit(train_iteration, donate_argnums=0).lower(state, key).compile()
    compile_s = time.perf_counter() - t0

    evaluator = common.make_evaluator(env, pargs.num_eval_envs)

    @jax.jit
    def evaluate(state, key):
        params, _, norm, _ = state
        return evaluator(lambda obs, key: ppo.actor(params["actor"], common.normalize(norm, obs))[0], key)

    # The host loop of ppo.py's main(), without the evaluations and logging.
    iteration_seconds = []
    train_return = math.nan
    for _ in range(n_iter):
        key, k_iter, _ = jax.random.split(key, 3)
        t0 = time.perf_counter()
        state, metrics = compiled(state, k_iter)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        iteration_seconds.append(time.perf_counter() - t0)
        if math.isfinite(metrics["train/episode_return"]):
            train_return = metrics["train/episode_return"]
    key, k_eval = jax.random.split(key)
    t0 = time.perf_counter()
    eval_return = float(evaluate(state, k_eval)["eval/return"])
    eval_s = time.perf_counter() - t0

    train_s = sum(iteration_seconds)
    result = {
        "steps": n_iter * per_iteration,
        "steps_per_second": n_iter * per_iteration / train_s,
        "iteration_seconds": iteration_seconds,
        "train_seconds": train_s,
        "compile_seconds": compile_s,
        "eval_seconds_incl_compile": eval_s,
        "eval_return": eval_return,
        "train_return": train_return,
    }
    if args.breakdown:
        result["breakdown"] = ppo_breakdown(env, optimizer, pargs, state, key)
    return result


def bench_seeds(args: Args, num_seeds: int) -> dict:
    """ppo.py's iteration for `num_seeds` seeds in one process, as its main() builds it with
    --num-seeds (running.Runs: vmapped over the seed axis, sharded over the visible devices),
    after an AOT compile; the same host loop as (b). Total steps/s of all seeds."""
    import tempfile

    pargs = dataclasses.replace(ppo_args(args), num_seeds=num_seeds, runs_dir=tempfile.mkdtemp())
    n_iter, _ = iterations(args)
    env = common.make_env(pargs.env_name, pargs.impl)
    optimizer = optax.chain(
        optax.clip_by_global_norm(pargs.max_grad_norm) if pargs.max_grad_norm else optax.identity(),
        optax.adam(pargs.learning_rate),
    )
    runs = running.Runs(pargs, "ppo")

    def init(key):  # ppo.main's
        key, k_init, k_env = jax.random.split(key, 3)
        params = ppo.init_params(k_init, env.observation_size, env.action_size, pargs)
        norm = common.normalizer_init(env.observation_size)
        return ppo.TrainState(params, optimizer.init(params), norm, common.reset_envs(env, k_env, pargs.num_envs)), key

    state, key = runs.parallel(init)(runs.keys())
    t0 = time.perf_counter()
    compiled = runs.parallel(ppo.make_train_iteration(env, optimizer, pargs), donate_argnums=0).lower(
        state, key).compile()
    compile_s = time.perf_counter() - t0
    seconds = []
    for _ in range(n_iter):
        key, k_iter, _ = runs.split(key, 3)
        t0 = time.perf_counter()
        state, metrics = compiled(state, k_iter)
        jax.device_get(metrics)
        seconds.append(time.perf_counter() - t0)
    runs.close()
    steps = n_iter * ppo.steps_per_iteration(pargs) * num_seeds
    return {"num_seeds": num_seeds, "devices": len(runs.devices), "layout": runs.layout,
            "steps_per_second": steps / sum(seconds), "compile_seconds": compile_s}


def bench_two_devices(args: Args) -> dict:
    """bench_seeds(args, 2) on 2 devices; on a CPU, in a subprocess that forces 2 CPU devices
    (XLA_FLAGS=--xla_force_host_platform_device_count=2; JAX fixes its devices when it starts)."""
    if jax.default_backend() != "cpu":
        return bench_seeds(args, 2)
    import subprocess

    code = (f"import sys, json; sys.path.insert(0, {REPO!r}); from benchmarks import throughput as t; "
            f"a = t.Args(**json.loads(sys.argv[1])); print('RESULT', json.dumps(t.bench_seeds(a, 2)))")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(args))], env=env,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"2-device measurement failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def ppo_breakdown(env, optimizer, pargs: ppo.Args, state, key) -> dict:
    """Time the parts of ppo.py's iteration separately: the rollout (policy + environment),
    the value targets (critic on obs and next_obs + GAE), and the minibatch epochs. These are
    re-assembled here from ppo.py's and common.py's functions, in the order its
    `train_iteration` calls them."""
    params, opt_state, norm, env_state = state
    rollout_steps = ppo.steps_per_iteration(pargs) // pargs.num_envs

    def policy(params, obs, key):
        mean, scale = ppo.actor(params["actor"], common.normalize(norm, obs))
        action = mean + scale * jax.random.normal(key, mean.shape)
        return action, {"log_prob": common.gaussian_log_prob(action, mean, scale)}

    def rollout(params, env_state, key):
        return common.rollout(env, env_state, functools.partial(policy, params), key, rollout_steps)

    def targets(params, data):
        return common.value_targets(
            lambda obs: ppo.critic(params["critic"], common.normalize(norm, obs)),
            data, pargs.reward_scaling, pargs.discount, pargs.gae_lambda,
        )

    def update(carry, batch):
        params, opt_state = carry
        grads, metrics = jax.grad(ppo.ppo_loss, has_aux=True)(params, batch, pargs)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def sgd(params, opt_state, batch, key):
        return common.minibatch_sgd(update, (params, opt_state), batch, key,
                                    pargs.num_epochs, pargs.num_minibatches)

    def gather_only(batch, key):
        # The per-epoch shuffle + gather of the whole batch, without the gradient steps.
        n = jax.tree.leaves(batch)[0].shape[0]
        size = n // pargs.num_minibatches

        def epoch(carry, key):
            perm = jax.random.permutation(key, n)[: size * pargs.num_minibatches]
            perm = perm.reshape(pargs.num_minibatches, size)
            mb = jax.tree.map(lambda x: x[perm], batch)
            return carry + sum(jnp.sum(x) for x in jax.tree.leaves(mb)), None

        return jax.lax.scan(epoch, 0.0, jax.random.split(key, pargs.num_epochs))[0]

    k_roll, k_sgd = jax.random.split(key)
    c_rollout = jax.jit(rollout).lower(params, env_state, k_roll).compile()
    _, data = c_rollout(params, env_state, k_roll)
    c_targets = jax.jit(targets).lower(params, data).compile()
    advantages, value_target = c_targets(params, data)
    batch = {
        "obs": common.normalize(norm, data["obs"]), "action": data["action"],
        "log_prob": data["log_prob"], "advantage": advantages, "target": value_target,
    }
    batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    c_sgd = jax.jit(sgd).lower(params, opt_state, batch, k_sgd).compile()
    c_gather = jax.jit(gather_only).lower(batch, k_sgd).compile()
    repeats = 3
    return {
        "rollout_seconds": timed_best(c_rollout, params, env_state, k_roll, repeats=repeats),
        "value_targets_seconds": timed_best(c_targets, params, data, repeats=repeats),
        "sgd_seconds": timed_best(c_sgd, params, opt_state, batch, k_sgd, repeats=repeats),
        "shuffle_gather_seconds": timed_best(c_gather, batch, k_sgd, repeats=repeats),
    }


# ---------------------------------------------------------------------------------------------
# (c) Brax PPO
# ---------------------------------------------------------------------------------------------


def bench_brax(args: Args) -> dict:
    from brax.training.agents.ppo import networks as ppo_networks
    from brax.training.agents.ppo import train as ppo_train
    from mujoco_playground import registry, wrapper

    pargs = ppo_args(args)
    n_iter, _ = iterations(args)
    per_iteration = ppo.steps_per_iteration(pargs)
    environment = registry.load(args.env_name, config_overrides={"impl": "jax"})
    network_factory = functools.partial(
        ppo_networks.make_ppo_networks,
        policy_hidden_layer_sizes=pargs.actor_hidden,
        value_hidden_layer_sizes=pargs.critic_hidden,
        activation=jax.nn.silu,
        distribution_type="tanh_normal",  # softplus(.) + 1e-3 scale from the network output
    )
    points: list[tuple[float, int, dict]] = []

    def progress_fn(step, metrics):
        points.append((time.perf_counter(), int(step), {k: float(v) for k, v in metrics.items()}))
        ret = metrics.get("eval/episode_reward", math.nan)
        print(f"  brax: step {int(step):,}  eval return {float(ret):.1f}", flush=True)

    t_start = time.perf_counter()
    ppo_train.train(
        environment=environment,
        num_timesteps=n_iter * per_iteration,
        num_envs=pargs.num_envs,
        episode_length=common.EPISODE_LENGTH,
        action_repeat=1,
        wrap_env_fn=wrapper.wrap_for_brax_training,
        learning_rate=pargs.learning_rate,
        entropy_cost=pargs.ent_coef,
        discounting=pargs.discount,
        unroll_length=pargs.unroll_length,
        batch_size=pargs.batch_size,
        num_minibatches=pargs.num_minibatches,
        num_updates_per_batch=pargs.num_epochs,
        normalize_observations=True,
        reward_scaling=pargs.reward_scaling,
        clipping_epsilon=pargs.clip_eps,
        gae_lambda=pargs.gae_lambda,
        max_grad_norm=pargs.max_grad_norm or None,
        vf_loss_coefficient=2 * pargs.vf_coef,  # Brax: 0.5 * vf_coefficient * MSE; ppo.py: vf_coef * MSE
        network_factory=network_factory,
        seed=pargs.seed,
        num_evals=args.num_evals,
        num_eval_envs=pargs.num_eval_envs,
        deterministic_eval=True,
        progress_fn=progress_fn,
    )
    total_s = time.perf_counter() - t_start

    trained = [p for p in points if p[1] > 0]  # post-training callbacks, one per Brax epoch
    walltimes = [0.0] + [m["training/walltime"] for _, _, m in trained]
    epoch_seconds = [b - a for a, b in zip(walltimes[:-1], walltimes[1:])]
    # Epochs 1 and 2 compile (see the module docstring); time from the end of epoch 2.
    (t_first, s_first, m_first), (t_last, s_last, m_last) = trained[1], trained[-1]
    timed_steps = s_last - s_first
    train_s = m_last["training/walltime"] - m_first["training/walltime"]
    return {
        "steps": s_last,
        "steps_per_second": timed_steps / train_s,
        "steps_per_second_wallclock_incl_evals": timed_steps / (t_last - t_first),
        "epoch_steps_per_second": [(s_last // len(trained)) / t for t in epoch_seconds],
        "timed_steps": timed_steps,
        "train_seconds_timed": train_s,
        "first_epoch_seconds_incl_compile": epoch_seconds[0],
        "second_epoch_seconds_incl_recompile": epoch_seconds[1],
        "total_seconds": total_s,
        "eval_return": m_last["eval/episode_reward"],
        "eval_returns": [(s, m.get("eval/episode_reward", math.nan)) for _, s, m in points],
    }


# ---------------------------------------------------------------------------------------------


def main(args: Args) -> None:
    validate(args)
    n_iter, per_epoch = iterations(args)
    pargs = ppo_args(args)
    per_iteration = ppo.steps_per_iteration(pargs)
    budget = n_iter * per_iteration
    print(f"task {args.env_name}, {args.num_envs} envs, {args.batch_size} x {args.num_minibatches} "
          f"sequences of {args.unroll_length} steps, {args.num_epochs} epochs: {per_iteration:,} steps "
          f"per iteration; budget {n_iter} iterations = {budget:,} steps; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
    t_all = time.perf_counter()
    key = jax.random.PRNGKey(args.seed)
    results: dict = {"args": dataclasses.asdict(args), "budget_steps": budget,
                     "steps_per_iteration": per_iteration, "iterations": n_iter,
                     "device": str(jax.devices()[0]), "jax": jax.__version__}

    if not args.only_seeds:
        print("(a) raw stepping ...", flush=True)
        from mujoco_playground import registry, wrapper

        raw = raw_stepping({
            "common": (common.make_env(args.env_name, "jax"), False),
            "brax_wrapper": (wrapper.wrap_for_brax_training(
                registry.load(args.env_name, config_overrides={"impl": "jax"})), True),
        }, args, key)
        results["raw_sps"], results["raw_sps_brax_wrapper"] = raw["common"], raw["brax_wrapper"]
    if not args.skip_ppo and not args.only_seeds:
        print("(b) ppo.py ...", flush=True)
        results["ppo"] = bench_ppo(args)
    if not args.skip_brax and not args.only_seeds:
        print("(c) Brax PPO ...", flush=True)
        results["brax"] = bench_brax(args)
    results["seeds"] = []
    for n in args.seeds_axis:
        print(f"(d) ppo.py, {n} seed(s) in one process ...", flush=True)
        results["seeds"].append(bench_seeds(args, n))
    if args.two_devices:
        print("(d) ppo.py, 2 seeds on 2 devices ...", flush=True)
        results["seeds"].append(bench_two_devices(args))
    results["total_wall_seconds"] = time.perf_counter() - t_all

    report(results)
    if args.results_dir:
        results_dir = os.path.join(REPO, args.results_dir)
        os.makedirs(results_dir, exist_ok=True)
        path = os.path.join(results_dir,
                            f"throughput_{args.env_name}_{args.num_envs}envs_{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {path}")


def report(r: dict) -> None:
    rows = []
    if "raw_sps" in r:
        rows += [("raw env steps/s (common.make_env)", f"{r['raw_sps']:,.0f}"),
                 ("raw env steps/s (wrap_for_brax_training)", f"{r['raw_sps_brax_wrapper']:,.0f}")]
    p, b = r.get("ppo"), r.get("brax")
    if p:
        rows += [("ppo.py steps/s", f"{p['steps_per_second']:,.0f}"),
                 ("ppo.py / raw", f"{p['steps_per_second'] / r['raw_sps']:.3f}"),
                 ("ppo.py eval return", f"{p['eval_return']:.1f}"),
                 ("ppo.py compile s | train s", f"{p['compile_seconds']:.1f} | {p['train_seconds']:.1f}"),
                 ("ppo.py s per iteration: first | median",
                  f"{p['iteration_seconds'][0]:.3f} | {float(np.median(p['iteration_seconds'])):.3f}")]
        if "breakdown" in p:
            d = p["breakdown"]
            iteration = r["steps_per_iteration"] / p["steps_per_second"]
            rows += [(f"  per iteration ({iteration:.3f} s): rollout s", f"{d['rollout_seconds']:.3f}"),
                     ("  value targets (critic x2 + GAE) s", f"{d['value_targets_seconds']:.3f}"),
                     ("  minibatch epochs s", f"{d['sgd_seconds']:.3f}"),
                     ("    of which shuffle + gather s", f"{d['shuffle_gather_seconds']:.3f}")]
    if b:
        rows += [("Brax PPO steps/s (training/walltime)", f"{b['steps_per_second']:,.0f}"),
                 ("Brax PPO steps/s (wall clock, evals incl.)", f"{b['steps_per_second_wallclock_incl_evals']:,.0f}"),
                 ("Brax / raw", f"{b['steps_per_second'] / r['raw_sps']:.3f}"),
                 ("Brax PPO eval return", f"{b['eval_return']:.1f}"),
                 ("Brax steps/s of each epoch", ", ".join(f"{x:,.0f}" for x in b["epoch_steps_per_second"])),
                 ("Brax epoch 1 | epoch 2 (compiles) | total s",
                  f"{b['first_epoch_seconds_incl_compile']:.1f} | {b['second_epoch_seconds_incl_recompile']:.1f}"
                  f" | {b['total_seconds']:.1f}")]
    if p and b:
        ratio = p["steps_per_second"] / b["steps_per_second"]
        rows += [("ratio ppo.py / Brax steps/s", f"{ratio:.3f}  (goal >= 1.2: {'met' if ratio >= 1.2 else 'NOT met'})")]
    one = next((x["steps_per_second"] for x in r["seeds"] if x["num_seeds"] == 1 and x["devices"] == 1), None)
    for x in r["seeds"]:
        speedup = f" ({x['steps_per_second'] / one:.2f}x one seed)" if one else ""
        rows.append((f"ppo.py, {x['num_seeds']} seed(s) on {x['devices']} device(s), total steps/s",
                     f"{x['steps_per_second']:,.0f}{speedup}"))
    rows += [("budget steps | iterations", f"{r['budget_steps']:,} | {r['iterations']}"),
             ("benchmark wall time s", f"{r['total_wall_seconds']:.0f}")]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main(tyro.cli(Args))
