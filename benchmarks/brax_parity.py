"""Parity of ppo.py with Brax's PPO trainer at identical hyperparameters, difference by difference.

On CartpoleBalance (MJX, impl=jax), both trainers run with: 256 environments, batch_size 256,
16 minibatches, unroll 30 (122,880 environment steps per iteration, 480 per environment), 16
epochs, Adam lr 1e-3, clip 0.3, entropy 0.01, discount 0.995, GAE lambda 0.95, reward scaling 10,
advantages normalized per minibatch, no gradient clipping, value loss 0.25 x MSE (Brax's is
0.5 * vf_coefficient * MSE, so vf_coefficient=0.5), actor 4 x 32 / critic 5 x 256 SiLU, a
tanh-squashed Gaussian with scale softplus(.) + 1e-3. Evaluation: 128 environments, one
1000-step episode, deterministic policy, every 614,400 steps (5 iterations) at any budget, so a
shorter run's evaluations are a prefix of a longer one's; the table shows 1.23M and 2.46M.

Rows (each ppo.py row is "ppo" with one difference from Brax removed or put back, so the table
says which one matters):
  brax                 Brax 0.14.2 `brax.training.agents.ppo.train` (see benchmarks/throughput.py
                       for how it is called on a Playground task and why its first two epochs
                       compile; its steps/s is Brax's own training/walltime after the first epoch)
  ppo                  ppo.py as parity: entropy "tanh" (Brax's estimate), normalizer "after",
                       GAE once per iteration over each environment's 480 steps with the critic
                       from before the epochs, single-transition minibatches, truncations
                       bootstrapped from the true last observation
  entropy-gaussian     ppo.py with its old closed-form pre-squash Gaussian entropy
  normalizer-before    Brax's order: the normalizer updated before the epochs
  fresh-start-states   every environment's start state redrawn at each iteration (the other rows
                       reuse the start states of the first reset, as Brax does with its default
                       num_resets_per_eval=0, used here)
  sequence-minibatches minibatches of whole 30-step sequences (Brax's), GAE still per iteration
  gae-per-minibatch    GAE in the loss, per minibatch of sequences, with the current critic, so
                       advantages and value targets are refreshed at every epoch (Brax's and the
                       FPO code's)
  gae-form-release     Brax's compute_gae: truncated steps get no advantage or value target, and
                       the policy's advantage is r + gamma * target(t+1) - V(t)
  release-update       sequence minibatches, GAE per minibatch, Brax's GAE form and the
                       normalizer before: every difference of the update removed at once

Each (row, seed) writes one JSON file under benchmarks/results/brax_parity/; `--report` builds
the table from whatever files exist (each (row, seed) at its longest budget), so rows and seeds
can be run separately, in parallel or later:

    python benchmarks/brax_parity.py --rows brax --seeds 1 2        # ~20 min per seed, one core
    python benchmarks/brax_parity.py --rows ppo --seeds 1 2         # ~12 min per seed
    python benchmarks/brax_parity.py --rows ppo release-update --seeds 1 2 3 4 5 --total-steps 1228800
    python benchmarks/brax_parity.py --report
    python benchmarks/brax_parity.py --total-steps 614400 --seeds 1  # a quick end-to-end check

steps/s of ppo.py is timed on the ahead-of-time compiled iteration (evaluations excluded).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import sys
import time

import jax
import numpy as np
import optax
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402
import running  # noqa: E402
import ppo  # noqa: E402

# Every ppo.py row is "ppo" with one difference from Brax removed (or put back); "release-update"
# removes all the update's differences at once.
ROWS = {
    "brax": ("brax", None),
    "ppo": ("ppo.py (as parity: tanh entropy, normalizer after, cached start states)", {}),
    "entropy-gaussian": ("ppo.py, entropy gaussian", {"entropy": "gaussian"}),
    "normalizer-before": ("ppo.py, normalizer before", {"normalizer_update": "before"}),
    "fresh-start-states": ("ppo.py, fresh start states", {"fresh_start_states": True}),
    "sequence-minibatches": ("ppo.py, minibatches of whole sequences", {"minibatch_unit": "sequence"}),
    "gae-per-minibatch": ("ppo.py, GAE per minibatch (sequences, current critic)",
                          {"minibatch_unit": "sequence", "advantages": "minibatch"}),
    "gae-form-release": ("ppo.py, Brax's GAE form (truncations masked, one-step advantage)", {"gae_form": "release"}),
    "release-update": ("ppo.py, Brax's update (the four above together)",
                       {"minibatch_unit": "sequence", "advantages": "minibatch", "gae_form": "release",
                        "normalizer_update": "before"}),
}
EVAL_EVERY_ITERATIONS = 5  # 614,400 steps: the same evaluation points at every budget


@dataclasses.dataclass
class Args:
    rows: tuple[str, ...] = tuple(ROWS)
    """rows to run: brax, ppo, entropy-gaussian, normalizer-before, fresh-start-states, sequence-minibatches,
    gae-per-minibatch, gae-form-release, release-update"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds to run for every row"""
    total_steps: int = 2_457_600
    """training budget in environment steps (a multiple of 5 iterations of 122,880: evaluated every 614,400)"""
    env_name: str = "CartpoleBalance"
    """DMC task from MuJoCo Playground (MJX, impl=jax)"""
    report: bool = False
    """only build the table from the JSON files already written (each (row, seed) at its longest budget)"""
    overwrite: bool = False
    """rerun a (row, seed) whose JSON file exists (default: skip it)"""
    num_envs: int = 256
    """environments (the CPU check on FingerSpin: 64)"""
    batch_size: int = 256
    """sequences of 30 steps per minibatch (FingerSpin check: 64)"""
    num_minibatches: int = 16
    """minibatches per epoch (FingerSpin check: 4)"""
    checkpoints: tuple[int, ...] = (1_228_800, 2_457_600)
    """the steps the table reports (each a multiple of the evaluation interval, 5 iterations)"""
    results_dir: str = "benchmarks/results/brax_parity"
    """one JSON per (row, seed) here, relative to the repository root; the table goes beside it"""


def task_discount(env_name: str) -> float:
    """The task's discount (0.995; 0.95 on FingerSpin), given to both trainers."""
    return ppo.resolve(ppo.Args(env_name=env_name)).discount


def ppo_args(args: Args, seed: int, **overrides) -> ppo.Args:
    """ppo.py's Args with every hyperparameter given explicitly (nothing left to the task)."""
    return ppo.Args(
        env_name=args.env_name, seed=seed, impl="jax", total_timesteps=args.total_steps,
        num_envs=args.num_envs, unroll_length=30, batch_size=args.batch_size, num_minibatches=args.num_minibatches,
        num_epochs=16, learning_rate=1e-3, max_grad_norm=0.0, discount=task_discount(args.env_name), gae_lambda=0.95,
        clip_eps=0.3,
        vf_coef=0.25, ent_coef=0.01, reward_scaling=10.0, actor_hidden=(32,) * 4,
        critic_hidden=(256,) * 5, num_eval_envs=128, deterministic_eval=True, matmul_precision="default",
        entropy="tanh", normalizer_update="after", fresh_start_states=False,
    ) if not overrides else dataclasses.replace(ppo_args(args, seed), **overrides)


def per_iteration(args: Args) -> int:
    return ppo.steps_per_iteration(ppo_args(args, 1))


def validate(args: Args) -> None:
    n = args.total_steps // per_iteration(args)
    running.check_args([
        *[(r in ROWS, f"unknown row {r!r}; rows are {', '.join(ROWS)}") for r in args.rows],
        (n > 0 and n % EVAL_EVERY_ITERATIONS == 0 and args.total_steps == n * per_iteration(args),
         f"--total-steps {args.total_steps:,} must be a multiple of {EVAL_EVERY_ITERATIONS} iterations "
         f"of {per_iteration(args):,} steps"),
    ])
    ppo.validate(ppo_args(args, 1))


def result_path(args: Args, row: str, seed: int) -> str:
    return os.path.join(REPO, args.results_dir,
                        f"{args.env_name}_{args.num_envs}envs_{args.total_steps}_{row}_seed{seed}.json")


# ---------------------------------------------------------------------------------------------
# ppo.py rows: the pieces its main() builds, driven by the host loop of ppo.py's main()
# ---------------------------------------------------------------------------------------------


def run_ppo(args: Args, row: str, seed: int) -> dict:
    pargs = ppo_args(args, seed, **ROWS[row][1])
    ppo.validate(pargs)
    n_iter = args.total_steps // per_iteration(args)
    eval_every = EVAL_EVERY_ITERATIONS
    env = common.make_env(pargs.env_name, pargs.impl)
    optimizer = optax.chain(
        optax.clip_by_global_norm(pargs.max_grad_norm) if pargs.max_grad_norm else optax.identity(),
        optax.adam(pargs.learning_rate),
    )
    key = jax.random.PRNGKey(seed)
    key, k_init, k_env = jax.random.split(key, 3)
    params = ppo.init_params(k_init, env.observation_size, env.action_size, pargs)
    env_state = jax.jit(common.reset_envs, static_argnums=(0, 2))(env, k_env, pargs.num_envs)
    state = ppo.TrainState(params, optimizer.init(params), common.normalizer_init(env.observation_size), env_state)
    t0 = time.perf_counter()
    train_iteration = jax.jit(ppo.make_train_iteration(env, optimizer, pargs), donate_argnums=0)
    compiled = train_iteration.lower(state, key).compile()
    compile_s = time.perf_counter() - t0
    evaluator = common.make_evaluator(env, pargs.num_eval_envs)

    @jax.jit
    def evaluate(state, key):
        params, _, norm, _ = state
        return evaluator(lambda obs, k: ppo.act(params, norm, obs, k, pargs.deterministic_eval), key)

    iteration_seconds, eval_returns, train_returns = [], [], []
    for i in range(1, n_iter + 1):
        key, k_iter, k_eval = jax.random.split(key, 3)
        t0 = time.perf_counter()
        state, metrics = compiled(state, k_iter)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        iteration_seconds.append(time.perf_counter() - t0)
        running.check_finite({k: v for k, v in metrics.items() if k.startswith("loss/")}, f"iteration {i}")
        train_returns.append(metrics["train/episode_return"])
        if i % eval_every == 0:
            ret = float(evaluate(state, k_eval)["eval/return"])
            eval_returns.append((i * per_iteration(args), ret))
            print(f"  {row} seed {seed}: step {i * per_iteration(args):,}  eval return {ret:.1f}  "
                  f"({per_iteration(args) / iteration_seconds[-1]:,.0f} steps/s)", flush=True)
    train_s = sum(iteration_seconds)
    return {
        "steps_per_second": n_iter * per_iteration(args) / train_s,
        "eval_returns": eval_returns,
        "train_returns": train_returns,
        "iteration_seconds": iteration_seconds,
        "compile_seconds": compile_s,
        "ppo_args": dataclasses.asdict(pargs),
    }


# ---------------------------------------------------------------------------------------------
# Brax row
# ---------------------------------------------------------------------------------------------


def run_brax(args: Args, seed: int) -> dict:
    from brax.training.agents.ppo import networks as ppo_networks
    from brax.training.agents.ppo import train as ppo_train
    from mujoco_playground import registry, wrapper

    p = ppo_args(args, seed)
    environment = registry.load(args.env_name, config_overrides={"impl": "jax"})
    network_factory = functools.partial(
        ppo_networks.make_ppo_networks,
        policy_hidden_layer_sizes=p.actor_hidden,
        value_hidden_layer_sizes=p.critic_hidden,
        activation=jax.nn.silu,
        distribution_type="tanh_normal",  # softplus(.) + 1e-3 scale from the network output
    )
    points: list[tuple[int, dict]] = []

    def progress_fn(step, metrics):
        points.append((int(step), {k: float(v) for k, v in metrics.items()}))
        print(f"  brax seed {seed}: step {int(step):,}  eval return "
              f"{float(metrics.get('eval/episode_reward', math.nan)):.1f}", flush=True)

    t_start = time.perf_counter()
    brax_kwargs = dict(
        num_timesteps=args.total_steps, num_envs=p.num_envs, episode_length=common.EPISODE_LENGTH,
        action_repeat=1, learning_rate=p.learning_rate, entropy_cost=p.ent_coef,
        discounting=p.discount, unroll_length=p.unroll_length, batch_size=p.batch_size,
        num_minibatches=p.num_minibatches, num_updates_per_batch=p.num_epochs,
        normalize_observations=True, reward_scaling=p.reward_scaling, clipping_epsilon=p.clip_eps,
        gae_lambda=p.gae_lambda, max_grad_norm=None, normalize_advantage=True,
        vf_loss_coefficient=2 * p.vf_coef,  # Brax: 0.5 * vf_coefficient * MSE = 0.25 * MSE
        seed=seed, num_evals=args.total_steps // per_iteration(args) // EVAL_EVERY_ITERATIONS + 1, num_eval_envs=p.num_eval_envs, deterministic_eval=True,
    )
    ppo_train.train(environment=environment, wrap_env_fn=wrapper.wrap_for_brax_training,
                    network_factory=network_factory, progress_fn=progress_fn, **brax_kwargs)
    total_s = time.perf_counter() - t_start
    trained = [(s, m) for s, m in points if s > 0]
    # Epochs 1 and 2 compile (see benchmarks/throughput.py); time the later ones.
    (s_first, m_first), (s_last, m_last) = trained[1], trained[-1]
    timed_s = m_last.get("training/walltime", math.nan) - m_first.get("training/walltime", math.nan)
    return {
        "steps_per_second": (s_last - s_first) / timed_s if timed_s > 0 else math.nan,
        "eval_returns": [(s, m.get("eval/episode_reward", math.nan)) for s, m in trained],
        "total_seconds": total_s,
        "brax_kwargs": brax_kwargs,
    }


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def load_results(args: Args, row: str) -> list[dict]:
    """One result per seed of `row`: the file of its longest budget (evaluation points are the
    same at every budget, and a shorter run's are a prefix of a longer run's)."""
    by_seed: dict[int, dict] = {}
    pattern = os.path.join(REPO, args.results_dir, f"{args.env_name}_{args.num_envs}envs_*_{row}_seed*.json")
    for path in glob.glob(pattern):
        result = json.load(open(path))
        if result["row"] != row:  # e.g. "ppo" must not pick up "release-update-ppo"
            continue
        if result["seed"] not in by_seed or result["total_steps"] > by_seed[result["seed"]]["total_steps"]:
            by_seed[result["seed"]] = result
    return [by_seed[seed] for seed in sorted(by_seed)]


def eval_return_at(result: dict, step: int) -> float:
    return next((v for s, v in result["eval_returns"] if s == step), math.nan)


def mean_and_standard_error(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{np.mean(xs):.1f} +- {np.std(xs, ddof=1) / math.sqrt(len(xs)):.1f}"


def report(args: Args) -> str:
    at = [f"{c / 1e6:.2f}M" for c in args.checkpoints]
    lines = [f"{args.env_name}, {args.num_envs} envs: eval return (128 envs, deterministic policy) at "
             f"{' and '.join(at)} steps, mean +- standard error over seeds, and each seed's value "
             f"(seed: {' / '.join(at)})",
             "",
             f"| row | seeds | {' | '.join('at ' + a for a in at)} | per seed | steps/s |",
             "|---|---|" + "---|" * len(at) + "---|---|"]
    for row, (label, _) in ROWS.items():
        results = load_results(args, row)
        if not results:
            continue
        columns = [mean_and_standard_error([eval_return_at(r, c) for r in results]) for c in args.checkpoints]
        per_seed = "; ".join(f"{r['seed']}: " + " / ".join(
            "-" if math.isnan(eval_return_at(r, c)) else f"{eval_return_at(r, c):.0f}" for c in args.checkpoints)
            for r in results)
        speed = [r["steps_per_second"] for r in results if not math.isnan(r["steps_per_second"])]
        lines.append(f"| {label} | {len(results)} | {' | '.join(columns)} | {per_seed} | "
                     f"{np.median(speed) if speed else math.nan:,.0f} |")
    table = "\n".join(lines)
    path = os.path.join(REPO, args.results_dir, f"table_{args.env_name}_{args.num_envs}envs.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"table written to {path}")
    return table


def main(args: Args) -> None:
    validate(args)
    if not args.report:
        print(f"{args.env_name}: {args.total_steps // per_iteration(args)} iterations of "
              f"{per_iteration(args):,} steps; rows {', '.join(args.rows)}; seeds {args.seeds}; "
              f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
        for seed in args.seeds:
            for row in args.rows:
                path = result_path(args, row, seed)
                if os.path.exists(path) and not args.overwrite:
                    print(f"{row} seed {seed}: {path} exists, skipped", flush=True)
                    continue
                print(f"{row} seed {seed} ...", flush=True)
                t0 = time.perf_counter()
                result = run_brax(args, seed) if row == "brax" else run_ppo(args, row, seed)
                result.update(row=row, label=ROWS[row][0], seed=seed, env_name=args.env_name,
                              total_steps=args.total_steps, wall_seconds=time.perf_counter() - t0,
                              jax=jax.__version__, device=str(jax.devices()[0]),
                              time=time.strftime("%Y-%m-%d %H:%M:%S"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "w") as f:
                    json.dump(result, f, indent=1)
                os.replace(path + ".tmp", path)
                print(f"{row} seed {seed}: done in {result['wall_seconds']:.0f}s, "
                      f"{result['steps_per_second']:,.0f} steps/s -> {path}", flush=True)
    report(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
