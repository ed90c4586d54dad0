"""Every algorithm of the repository on a task where learning shows, the same budget and seeds, on CPU.

Runs ppo.py, gorl_fm.py, gorl_diffusion.py, fpo.py and dppo.py as subprocesses with the same
PPO sizes (environments, sequences, minibatches, epochs), the same environment-step budget, the
same evaluation settings and the same seeds; the GoRL scripts split the budget into stages
(--stage-fractions) and refine their decoder between stages with small refinement settings
(their refinement rollouts are extra environment steps, refine_episodes x 1000 per boundary, as
in the paper). One more row, `gorl_fm (stage 0 only)`, runs gorl_fm.py with a single stage of
the whole budget: latent PPO through the identity decoder with GoRL's stage-0 settings (lr 1e-3,
clip 0.15, gradient clip 0.5, KL 5e-4) and no refinement, so the table shows what the decoder
adds beyond those settings.

Every table also has two reference rows, computed here with common.make_env /
common.make_evaluator over the same number of evaluation environments and full 1000-step
episodes, one evaluation per seed (key PRNGKey(seed)): "zero action" (a = 0) and "random N(0,1)
pre-squash" (a ~ N(0, I) at every step; the environment applies tanh). A method learns on the
task only where it ends clearly above both. (The scripts derive their evaluation keys from their
own training key chains, so their evaluation start states are other draws from the same
distribution; the per-seed reference values show how much a draw of 32 start states moves.)

The default task is CartpoleSwingup, where neither reference learns anything (zero action 0.0,
random about 30 over 32 envs) and PPO at this scale climbs steadily: one seed of ppo.py with the
default sizes below scored 212, 333, 449, 478 and 551 at 0.74M, 1.47M, 2.21M, 2.95M and 3.69M
steps (2026-12-05), far from the task's ceiling of about 850-900, so the budget ranks methods.
CartpoleBalance, the task of earlier versions, rewards doing nothing (zero action about 698,
random about 337, more than PPO at 300k steps): it showed wiring, not learning. FingerSpin,
ReacherEasy, PendulumSwingup, AcrobotSwingup and BallInCup also score low with both references,
but PPO did not move on FingerSpin in 460k steps, and the others have sparse rewards.

Defaults: 3 seeds in one process per row (--num-seeds 3); 2,457,600 steps per seed (320
iterations of 64 envs x 64 x 4 sequences of 30 steps), 4 epochs (the update is most of an
iteration on a CPU: 4 epochs run 3.6x the steps per second of 16; in about the same CPU time,
one ppo.py seed reached 206 at 460k steps with 16 epochs and 242 at 1.23M with 4); GoRL
stages 1,228,800 + 1,228,800 with one refinement (128 episodes, all at once, batch 1024;
gorl_fm 2,000 steps, gorl_diffusion 20 epochs); evaluation every 491,520 steps on 32 envs.

Writes

    <results-dir>/cpu_suite.md          per task: algo | seeds ok | final eval return mean +- std |
                                        per seed | refinement kept | steps/s | wall-clock
    <results-dir>/cpu_suite_curves.png  eval return, mean +- std over seeds, stage ends dotted

steps/s is the mean of `perf/steps_per_second` (training iterations only, evaluation excluded)
over every iteration but the first of each run (the first one includes compilation); with the
seeds in one process it is the sum over the seeds. Wall-clock is the whole subprocess
(compilation, evaluations and refinement included). A script that is not in the repository is
skipped with a message; a run that fails is reported as failed (its log is kept) and the suite
goes on.

The default suite as two halves side by side, each pinned to one core of a 2-core CPU (about
50-60 min each, estimated from one-core measurements by `estimate_seconds`; each part prints
its estimate), then the report, with the parts' flags and no --part (a minute: the reference rows):

    taskset -c 0 python benchmarks/cpu_suite.py --part 1/2
    taskset -c 1 python benchmarks/cpu_suite.py --part 2/2
    python benchmarks/cpu_suite.py --reuse                           # table + figure of both halves

A part trains its share of the (task, row) runs and prints their returns; the `--reuse` call
trains only what is not finished (a run that failed, or reached less than the budget) and builds
the table. Other uses:

    python benchmarks/cpu_suite.py                                   # everything, one run after another
    python benchmarks/cpu_suite.py --algos ppo gorl_fm --seeds 1 2 --total-steps 61440 --eval-every 15360
    python benchmarks/cpu_suite.py --env-names CartpoleSwingup ReacherEasy --part 1/2   # a table per task
    python benchmarks/cpu_suite.py --no-seeds-in-one-process         # one process per seed (slower)
    python benchmarks/cpu_suite.py --extra-args fpo="--learning-rate 1e-3"   # flags for one row only

Every row evaluates with its script's default policy: ppo and GoRL the deterministic one (mean
action; mean latent through the decoder), fpo and dppo the sampled one, as released. For their
deterministic chains add --extra-args fpo=--deterministic-eval --extra-args dppo=--deterministic-eval
(to the parts and the report alike).

Run folders: <runs-dir>/<env>/<row>/seeds_together/ (or seed<k>/) with the runs
<env>__<exp>__<k>__<time>/, logs beside them; reference rows: <runs-dir>/<env>/reference.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import plot  # noqa: E402

ALGOS = ("ppo", "gorl_fm", "gorl_diffusion", "fpo", "dppo")
STAGE0 = "gorl_fm_stage0"  # gorl_fm.py with one stage of the whole budget (exp name of its runs)
ROWS = ("ppo", "gorl_fm", STAGE0, "gorl_diffusion", "fpo", "dppo")
SCRIPTS = {STAGE0: "gorl_fm"}  # the script of a row, where it is not the row's name
LABELS = {STAGE0: "gorl_fm (stage 0 only)"}
STAGED = ("gorl_fm", "gorl_diffusion")  # rows with stages and refinements
REFERENCES = ("zero action", "random N(0,1) pre-squash")
DEFAULT_ENVS = ("CartpoleSwingup",)

# One-core costs on this project's 2-core CPU (2026-12-05, CartpoleSwingup, 64 envs, 64 x 4
# sequences of 30 steps, 4 epochs; the other core busy): training steps/s of the 3 seeds of one
# process together (ppo: measured with 3 seeds; gorl_fm and its stage 0: one seed, which ran at
# the 3 seeds' total in the 16-epoch measurements; gorl_diffusion, fpo, dppo: guessed from the
# ratios in the README's CartpoleBalance table, rounded down), the share of an iteration's time
# that the update takes at 4 epochs (the rest is the rollout: 0.27 s of 1.97 s), and seconds
# per seed of one refinement (collection + decoder fit) at the default refinement settings.
# They balance --part and give the printed estimate; the table reports what the runs measured.
SPS = {"ppo": 11_700, "gorl_fm": 9_800, STAGE0: 10_200, "gorl_diffusion": 9_500, "fpo": 7_500, "dppo": 7_500}
UPDATE_SHARE = 0.86
REFINE_SECONDS = {"gorl_fm": 170, "gorl_diffusion": 130}
PROCESS_SECONDS = 60  # start-up and compilation of one process
EVAL_SECONDS = 3  # one evaluation of one seed (32 envs x 1000 steps)


def label(row: str) -> str:
    return LABELS.get(row, row)


def script(row: str) -> str:
    return SCRIPTS.get(row, row)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=list(ROWS), choices=ROWS,
                   help=f"rows to train ({STAGE0}: {LABELS[STAGE0]})")
    p.add_argument("--env-names", nargs="+", default=list(DEFAULT_ENVS), help="one table per task")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--total-steps", type=int, default=2_457_600,
                   help="environment-step budget of every row (rounded down to whole iterations)")
    p.add_argument("--stage-fractions", type=float, nargs="+", default=[0.5, 0.5],
                   help="how gorl_fm and gorl_diffusion split the budget into stages")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-minibatches", type=int, default=4)
    p.add_argument("--unroll-length", type=int, default=30)
    p.add_argument("--num-epochs", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=491_520)
    p.add_argument("--num-eval-envs", type=int, default=32)
    p.add_argument("--refine-envs", type=int, default=None,
                   help="environments collecting a refinement at once (default: all its episodes)")
    p.add_argument("--refine-episodes", type=int, default=128)
    p.add_argument("--refine-batch-size", type=int, default=1024)
    p.add_argument("--refine-steps", type=int, default=2000, help="gorl_fm's decoder steps per refinement")
    p.add_argument("--refine-epochs", type=int, default=20, help="gorl_diffusion's decoder epochs per refinement")
    p.add_argument("--extra-args", action="append", default=[], metavar="ROW=FLAGS",
                   help="more flags for one row's command, e.g. fpo='--learning-rate 1e-3' (once per row)")
    p.add_argument("--part", default=None, metavar="K/N",
                   help="train only the K-th of N shares of the (task, row) runs, balanced by estimated time; "
                        "then build the table of all shares with --reuse")
    p.add_argument("--runs-dir", default=os.path.join("benchmarks", "results", "cpu_suite_runs"))
    p.add_argument("--results-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--compile-cache", default=None,
                   help="JAX persistent compilation cache for the subprocesses (later seeds then skip "
                        "most compilation, which shortens their wall-clock; steps/s is unaffected)")
    p.add_argument("--reuse", action="store_true",
                   help="do not train a run that is already finished in <runs-dir> (nor recompute the reference rows)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to one seed's run")
    p.add_argument("--seeds-in-one-process", action=argparse.BooleanOptionalAction, default=True,
                   help="train a row's seeds in one process (--num-seeds; the seeds must be consecutive) "
                        "instead of one process per seed")
    ns = p.parse_args(argv)
    ns.extra = parse_extra_args(p, ns.extra_args)
    if ns.part is not None:
        try:
            k, n = map(int, ns.part.split("/"))
            assert 1 <= k <= n
        except (ValueError, AssertionError):
            p.error(f"--part wants K/N with 1 <= K <= N, got {ns.part!r}")
        ns.part = (k, n)
    return ns


def parse_extra_args(p, items: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for item in items:
        row, sep, flags = item.partition("=")
        if not sep or row not in ROWS:
            p.error(f"--extra-args wants ROW=FLAGS with ROW one of {', '.join(ROWS)}; got {item!r}")
        extra.setdefault(row, []).extend(shlex.split(flags))
    return extra


def steps_per_iteration(ns) -> int:
    return ns.batch_size * ns.num_minibatches * ns.unroll_length


def budget(ns) -> int:
    """The environment-step budget in whole iterations."""
    return ns.total_steps // steps_per_iteration(ns) * steps_per_iteration(ns)


def stage_steps(ns) -> list[int]:
    """The budget in whole iterations, split by --stage-fractions (every stage >= 1 iteration)."""
    iters = ns.total_steps // steps_per_iteration(ns)
    fractions = np.asarray(ns.stage_fractions, float) / sum(ns.stage_fractions)
    counts = [max(1, int(round(f * iters))) for f in fractions[:-1]]
    counts.append(max(1, iters - sum(counts)))
    return [c * steps_per_iteration(ns) for c in counts]


def command(ns, row: str, env_name: str, seed: int, runs_dir: str, num_seeds: int = 1) -> list[str]:
    """The subprocess of one row: every row gets the same task, seeds, PPO sizes, budget and
    evaluation flags; the staged rows add their stages and refinement settings."""
    cmd = [sys.executable, os.path.join(ROOT, f"{script(row)}.py"),
           "--env-name", env_name, "--seed", str(seed), "--num-seeds", str(num_seeds), "--num-envs", str(ns.num_envs),
           "--batch-size", str(ns.batch_size), "--num-minibatches", str(ns.num_minibatches),
           "--unroll-length", str(ns.unroll_length), "--num-epochs", str(ns.num_epochs),
           "--eval-every", str(ns.eval_every), "--num-eval-envs", str(ns.num_eval_envs), "--runs-dir", runs_dir]
    if row in STAGED:
        cmd += ["--stage-steps", *map(str, stage_steps(ns)),
                *(["--refine-envs", str(ns.refine_envs)] if ns.refine_envs else []),
                "--refine-episodes", str(ns.refine_episodes),
                "--refine-batch-size", str(ns.refine_batch_size)]
        cmd += (["--refine-steps", str(ns.refine_steps)] if row == "gorl_fm" else
                ["--refine-epochs", str(ns.refine_epochs)])
    elif row == STAGE0:
        cmd += ["--stage-steps", str(budget(ns)), "--exp-name", STAGE0]
    else:
        cmd += ["--total-timesteps", str(budget(ns))]
    return cmd + ns.extra.get(row, [])


def estimate_seconds(ns, row: str) -> float:
    """Wall-clock of one row on one core (all seeds), from the measured costs above."""
    seeds = len(ns.seeds)
    processes = 1 if ns.seeds_in_one_process else seeds
    per_step = (1 - UPDATE_SHARE + UPDATE_SHARE * ns.num_epochs / 4) / SPS[row]  # SPS is at 4 epochs
    train = seeds * budget(ns) * per_step  # sizes other than the defaults: a rough guess
    evals = seeds * (budget(ns) // ns.eval_every + 1) * EVAL_SECONDS * ns.num_eval_envs / 32
    refine = 0.0
    if row in STAGED:
        refine = seeds * (len(stage_steps(ns)) - 1) * REFINE_SECONDS[row] * ns.refine_episodes / 128
    return processes * PROCESS_SECONDS + train + evals + refine


def all_jobs(ns) -> list[tuple[str, str]]:
    return [(env, row) for env in ns.env_names for row in ROWS if row in ns.algos]


def split_jobs(jobs: list[tuple[str, str]], num_parts: int, cost) -> list[list[tuple[str, str]]]:
    """Share the (task, row) runs among `num_parts` processes: longest first, each to the least
    loaded part (deterministic: every part computes the same split). Each share keeps the order
    of `jobs`."""
    loads, parts = [0.0] * num_parts, [[] for _ in range(num_parts)]
    for job in sorted(jobs, key=lambda j: -cost(j)):
        i = int(np.argmin(loads))
        parts[i].append(job)
        loads[i] += cost(job)
    return [[j for j in jobs if j in part] for part in parts]


def my_jobs(ns) -> list[tuple[str, str]]:
    jobs = all_jobs(ns)
    if ns.part is None:
        return jobs
    k, n = ns.part
    return split_jobs(jobs, n, lambda job: estimate_seconds(ns, job[1]))[k - 1]


def find_run(runs_dir: str, seed: int | None = None) -> str | None:
    """The newest run folder in `runs_dir` (of `seed`, if given)."""
    if not os.path.isdir(runs_dir):
        return None
    dirs = sorted(d for d in os.listdir(runs_dir) if os.path.isfile(os.path.join(runs_dir, d, "config.json"))
                  and (seed is None or d.split("__")[2] == str(seed)))
    return os.path.join(runs_dir, dirs[-1]) if dirs else None


def summarize(run_dir: str) -> dict:
    """Final evaluation return, mean training steps/s (first iteration excluded), last step, and
    for GoRL the share of each stage's final return that its refined decoder kept with prior
    latents (refine/prior_latent_return / the stage's last eval/return)."""
    rows = plot.load_run(run_dir)["rows"]
    _, evals = plot.metric_curve(rows, "eval/return")
    steps, sps = plot.metric_curve(rows, "perf/steps_per_second")
    kept, last_eval = [], math.nan
    for r in rows:
        if math.isfinite(r.get("refine/prior_latent_return", math.nan)) and last_eval > 0:
            kept.append(r["refine/prior_latent_return"] / last_eval)
        if math.isfinite(r.get("eval/return", math.nan)):
            last_eval = r["eval/return"]
    return {"final_return": float(evals[-1]) if len(evals) else math.nan,
            "steps_per_second": float(np.mean(sps[1:])) if len(sps) > 1 else math.nan,
            "steps": int(steps[-1]) if len(steps) else 0, "kept": kept}


def finished(ns, run_dir: str | None) -> bool:
    """A run that reached the budget and evaluated (what --reuse keeps)."""
    if run_dir is None:
        return False
    rows = plot.load_run(run_dir)["rows"]
    steps, _ = plot.metric_curve(rows, "eval/return")
    return bool(steps.size) and steps[-1] >= budget(ns)


def _run_process(cmd: list[str], log_path: str, env: dict, timeout: float):
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.time() - t0
        log.write(f"\n[cpu_suite] wall_seconds {wall:.1f} returncode {rc}\n")
    return rc, wall


def run_all(ns, jobs: list[tuple[str, str]]) -> dict:
    """Train (or, with --reuse, find) every (task, row) run of `jobs`: {env: {row: [entry per seed]}}."""
    env = dict(os.environ)
    if ns.compile_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(ns.compile_cache)
    results: dict = {}
    for env_name, row in jobs:
        if not os.path.isfile(os.path.join(ROOT, f"{script(row)}.py")):
            print(f"skipping {label(row)}: {script(row)}.py is not in the repository", flush=True)
            continue
        run = run_seeds_together if ns.seeds_in_one_process else run_seeds_apart
        results.setdefault(env_name, {})[row] = run(ns, env_name, row, env)
    return results


def run_seeds_apart(ns, env_name: str, row: str, env: dict) -> list[dict]:
    """One process per seed, one after another."""
    entries = []
    for seed in ns.seeds:
        runs_dir = os.path.join(ns.runs_dir, env_name, row, f"seed{seed}")
        log_path = os.path.join(ns.runs_dir, env_name, row, f"seed{seed}.log")
        existing = find_run(runs_dir)
        if ns.reuse and finished(ns, existing):
            print(f"{env_name} {label(row)} seed {seed}: reusing {existing}", flush=True)
            entries.append({"seed": seed, "dir": existing, "ok": True, "wall": _read_wall(log_path),
                            **summarize(existing)})
            continue
        os.makedirs(runs_dir, exist_ok=True)
        cmd = command(ns, row, env_name, seed, runs_dir)
        print(f"{env_name} {label(row)} seed {seed}: {shlex.join(cmd[1:])}", flush=True)
        rc, wall = _run_process(cmd, log_path, env, ns.timeout)
        run_dir = find_run(runs_dir)
        ok = rc == 0 and run_dir is not None
        entry = {"seed": seed, "dir": run_dir, "ok": ok, "wall": wall, **(summarize(run_dir) if run_dir else {})}
        entries.append(entry)
        status = (f"return {entry['final_return']:.1f}, {entry['steps_per_second']:,.0f} steps/s"
                  if ok else f"FAILED (exit {rc}); see {log_path}")
        print(f"{env_name} {label(row)} seed {seed}: {status}, {wall:.0f}s", flush=True)
    return entries


def run_seeds_together(ns, env_name: str, row: str, env: dict) -> list[dict]:
    """One process trains every seed (--num-seeds); each entry's wall is that process's share."""
    runs_dir = os.path.join(ns.runs_dir, env_name, row, "seeds_together")
    log_path = os.path.join(ns.runs_dir, env_name, row, "seeds_together.log")
    existing = [find_run(runs_dir, seed) for seed in ns.seeds]
    if ns.reuse and all(finished(ns, d) for d in existing):
        print(f"{env_name} {label(row)} seeds {ns.seeds}: reusing {os.path.dirname(existing[0])}", flush=True)
        wall = _read_wall(log_path)
        return [{"seed": seed, "dir": d, "ok": True, "wall": wall / len(ns.seeds), **summarize(d)}
                for seed, d in zip(ns.seeds, existing)]
    os.makedirs(runs_dir, exist_ok=True)
    cmd = command(ns, row, env_name, ns.seeds[0], runs_dir, num_seeds=len(ns.seeds))
    print(f"{env_name} {label(row)} seeds {ns.seeds} in one process: {shlex.join(cmd[1:])}", flush=True)
    rc, wall = _run_process(cmd, log_path, env, ns.timeout * len(ns.seeds))
    entries = []
    for seed in ns.seeds:
        run_dir = find_run(runs_dir, seed)
        ok = rc == 0 and run_dir is not None
        entries.append({"seed": seed, "dir": run_dir, "ok": ok, "wall": wall / len(ns.seeds),
                        **(summarize(run_dir) if run_dir else {})})
    returns = ", ".join(f"{e['final_return']:.1f}" for e in entries if e["ok"])
    print(f"{env_name} {label(row)}: " + (f"returns {returns}" if rc == 0 else f"FAILED (exit {rc}); see {log_path}")
          + f", {wall:.0f}s", flush=True)
    return entries


def _read_wall(log_path: str) -> float:
    try:
        for line in open(log_path):
            if line.startswith("[cpu_suite] wall_seconds"):
                return float(line.split()[2])
    except OSError:
        pass
    return math.nan


# ---------------------------------------------------------------------------------------------
# Reference rows: what a policy that learned nothing scores on the task
# ---------------------------------------------------------------------------------------------


def reference_returns(env_name: str, seeds: list[int], num_eval_envs: int) -> dict[str, list[float]]:
    """{reference row: [evaluation return of each seed]}: the zero action and a fresh N(0, I)
    pre-squash action at every step (the environment applies tanh), each evaluated as the
    scripts evaluate (common.make_evaluator: `num_eval_envs` environments, one full episode),
    with the key PRNGKey(seed) for each seed."""
    import jax
    import jax.numpy as jnp

    import common

    env = common.make_env(env_name)
    evaluator = common.make_evaluator(env, num_eval_envs)

    def shape(obs):
        return (jax.tree.leaves(obs)[0].shape[0], env.action_size)

    policies = {"zero action": lambda obs, key: jnp.zeros(shape(obs)),
                "random N(0,1) pre-squash": lambda obs, key: jax.random.normal(key, shape(obs))}
    out = {}
    for name, policy in policies.items():
        evaluate = jax.jit(lambda key, policy=policy: evaluator(policy, key)["eval/return"])
        out[name] = [float(evaluate(jax.random.PRNGKey(seed))) for seed in seeds]
    return out


def references(ns, env_name: str) -> dict[str, list[float]]:
    """The reference rows of `env_name`, from <runs-dir>/<env>/reference.json when --reuse finds
    them there for the same seeds and evaluation size, else computed (and saved)."""
    path = os.path.join(ns.runs_dir, env_name, "reference.json")
    key = {"env_name": env_name, "seeds": list(ns.seeds), "num_eval_envs": ns.num_eval_envs}
    if ns.reuse and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in key} == key:
            return saved["returns"]
    print(f"{env_name}: evaluating the reference rows ({', '.join(REFERENCES)}) ...", flush=True)
    t0 = time.time()
    returns = reference_returns(env_name, ns.seeds, ns.num_eval_envs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**key, "returns": returns, "seconds": time.time() - t0}, f, indent=1)
    return returns


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def header(ns, env_name: str) -> str:
    return (f"Task {env_name}; seeds {ns.seeds}; budget {budget(ns):,} environment steps ({ns.num_envs} envs, "
            f"{ns.batch_size} x {ns.num_minibatches} sequences of {ns.unroll_length} steps, {ns.num_epochs} epochs per "
            f"iteration); GoRL stages {stage_steps(ns)}, refinement {ns.refine_episodes} episodes from "
            f"{ns.refine_envs or ns.refine_episodes} envs at a time, batch {ns.refine_batch_size}, {ns.refine_steps} steps (gorl_fm) / "
            f"{ns.refine_epochs} epochs (gorl_diffusion); {label(STAGE0)}: gorl_fm.py with one stage of "
            f"{budget(ns):,} steps (identity decoder, stage-0 settings, no refinement). Evaluation: "
            f"{ns.num_eval_envs} envs, one 1000-step episode, each script's default evaluation policy (fpo, dppo: "
            f"sampled, as released); the reference rows "
            f"use the same number of envs, one evaluation per seed (key PRNGKey(seed))."
            + (" A persistent compilation cache was shared by the runs (later runs compile less)." if ns.compile_cache
               else "")
            + (" Extra flags: " + "; ".join(f"{r}: {shlex.join(f)}" for r, f in ns.extra.items()) + "."
               if ns.extra else ""))


def _stats(values) -> str:
    r = np.asarray(values, float)
    return f"{r.mean():.1f} ± {r.std():.1f}"


def table(ns, env_name: str, results: dict, refs: dict[str, list[float]] | None) -> str:
    """The markdown table of one task: the reference rows, then one row per trained row of
    `results` ({row: [entry per seed]}; an entry has seed, ok, final_return, steps_per_second,
    wall and, for GoRL, kept)."""
    lines = [header(ns, env_name), "",
             ("Each row's seeds were trained in one process (--num-seeds); steps/s is all seeds' together."
              if ns.seeds_in_one_process else "One process per seed, one after another; steps/s is one seed's."),
             "",
             f"| algo | seeds ok | final eval return (mean ± std) | per seed ({', '.join(map(str, ns.seeds))}) "
             "| refinement kept (min) | training steps/s | wall-clock, all seeds (s) |",
             "|---|---|---|---|---|---|---|"]
    for name in REFERENCES:
        values = (refs or {}).get(name)
        if values:
            lines.append(f"| {name} | {len(values)}/{len(values)} | {_stats(values)} | "
                         f"{', '.join(f'{v:.1f}' for v in values)} | - | - | - |")
        else:
            lines.append(f"| {name} | - | not computed | - | - | - | - |")
    for row, entries in results.items():
        ok = [e for e in entries if e["ok"]]
        per_seed = ", ".join(f"{e['final_return']:.1f}" if e["ok"] else "failed" for e in entries)
        if not ok:
            lines.append(f"| {label(row)} | 0/{len(entries)} | failed | {per_seed} | - | - | - |")
            continue
        # Throughput of the training: one seed's rate when the seeds run one after another, the
        # sum of the seeds' rates when they run together.
        rates = [e["steps_per_second"] for e in ok]
        sps = np.nansum(rates) if ns.seeds_in_one_process else np.nanmean(rates)
        wall = np.nansum([e["wall"] for e in ok])
        kept = [k for e in ok for k in e.get("kept", [])]
        kept_text = f"{100 * min(kept):.0f}%" if kept else "-"
        lines.append(f"| {label(row)} | {len(ok)}/{len(entries)} | {_stats([e['final_return'] for e in ok])} "
                     f"| {per_seed} | {kept_text} | {sps:,.0f} | {wall:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ns = parse(argv)
    if ns.seeds_in_one_process and ns.seeds != list(range(ns.seeds[0], ns.seeds[0] + len(ns.seeds))):
        sys.exit(f"error: --seeds-in-one-process trains consecutive seeds (--seed S --num-seeds N); got {ns.seeds}")
    jobs = my_jobs(ns)
    estimate = sum(estimate_seconds(ns, row) for _, row in jobs)
    what = f"part {ns.part[0]}/{ns.part[1]}" if ns.part else "the suite"
    print(f"{what}: {', '.join(f'{e} {label(r)}' for e, r in jobs)}; about {estimate / 60:.0f} min on one core "
          "(estimated; finished runs are reused with --reuse)", flush=True)
    results = run_all(ns, jobs)
    if ns.part:
        print(f"part {ns.part[0]}/{ns.part[1]} done; when every part is, build the table with the same flags, "
              "no --part, and --reuse", flush=True)
        return
    texts = []
    for env_name in ns.env_names:
        refs = references(ns, env_name)
        texts.append(table(ns, env_name, results.get(env_name, {}), refs))
    text = "\n\n".join(texts)
    print(text)
    os.makedirs(ns.results_dir, exist_ok=True)
    with open(os.path.join(ns.results_dir, "cpu_suite.md"), "w") as f:
        f.write("# CPU suite\n\n" + text + "\n")
    dirs = [e["dir"] for rows in results.values() for entries in rows.values() for e in entries if e["ok"]]
    if dirs:
        plot.plot_curves(dirs, os.path.join(ns.results_dir, "cpu_suite_curves.png"))


if __name__ == "__main__":
    main()
