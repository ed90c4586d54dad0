"""Every algorithm of the repository on one cheap task, the same budget and seeds, on CPU.

Runs ppo.py, gorl_fm.py, gorl_diffusion.py, fpo.py and dppo.py as subprocesses with the same
PPO sizes (environments, sequences, minibatches, epochs), the same environment-step budget and
the same seeds; the GoRL scripts split the budget into stages (--stage-fractions) and refine
their decoder between stages with small refinement settings (their refinement rollouts are extra
environment steps, refine_episodes x 1000 per boundary, as in the paper). Then it
reads each run's metrics.csv and writes

    <results-dir>/cpu_suite.md          algo | seeds | final eval return mean +- std | steps/s | wall-clock
    <results-dir>/cpu_suite_curves.png  eval return, mean +- std over seeds, stage ends dotted

steps/s is the mean of `perf/steps_per_second` (training iterations only, evaluation excluded)
over every iteration but the first of each run (the first one includes compilation).
Wall-clock is the whole subprocess (compilation, evaluations and refinement included).
A script that is not in the repository is skipped with a message; a run that fails is reported
as failed (its log is kept) and the suite goes on.

    python benchmarks/cpu_suite.py                                  # ~200k steps x 5 algos x 2 seeds
    python benchmarks/cpu_suite.py --algos ppo gorl_fm --seeds 1 2 --total-steps 61440 --eval-every 15360
    python benchmarks/cpu_suite.py --reuse                          # table + figure from existing runs

Run folders: <runs-dir>/<algo>/seed<k>/<env>__<algo>__<k>__<time>/, logs beside them.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import plot  # noqa: E402

ALGOS = ("ppo", "gorl_fm", "gorl_diffusion", "fpo", "dppo")
STAGED = ("gorl_fm", "gorl_diffusion")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--env-name", default="CartpoleBalance")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--total-steps", type=int, default=199_680,
                   help="environment-step budget of every algorithm (rounded down to whole iterations)")
    p.add_argument("--stage-fractions", type=float, nargs="+", default=[0.5, 0.5],
                   help="how the GoRL scripts split the budget into stages")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-minibatches", type=int, default=4)
    p.add_argument("--unroll-length", type=int, default=30)
    p.add_argument("--num-epochs", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=38_400)
    p.add_argument("--num-eval-envs", type=int, default=16)
    p.add_argument("--refine-envs", type=int, default=64)
    p.add_argument("--refine-episodes", type=int, default=128)
    p.add_argument("--refine-batch-size", type=int, default=1024)
    p.add_argument("--refine-steps", type=int, default=2000, help="gorl_fm's decoder steps per refinement")
    p.add_argument("--refine-epochs", type=int, default=20, help="gorl_diffusion's decoder epochs per refinement")
    p.add_argument("--runs-dir", default=os.path.join("benchmarks", "results", "cpu_suite_runs"))
    p.add_argument("--results-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--compile-cache", default=None,
                   help="JAX persistent compilation cache for the subprocesses (later seeds then skip "
                        "most compilation, which shortens their wall-clock; steps/s is unaffected)")
    p.add_argument("--reuse", action="store_true",
                   help="do not train where <runs-dir>/<algo>/seed<k> already holds a finished run")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to one run")
    p.add_argument("--seeds-in-one-process", action="store_true",
                   help="train an algorithm's seeds in one process (--num-seeds; the seeds must be consecutive) "
                        "instead of one process per seed")
    return p.parse_args(argv)


def steps_per_iteration(ns) -> int:
    return ns.batch_size * ns.num_minibatches * ns.unroll_length


def stage_steps(ns) -> list[int]:
    """The budget in whole iterations, split by --stage-fractions (every stage >= 1 iteration)."""
    iters = ns.total_steps // steps_per_iteration(ns)
    fractions = np.asarray(ns.stage_fractions, float) / sum(ns.stage_fractions)
    counts = [max(1, int(round(f * iters))) for f in fractions[:-1]]
    counts.append(max(1, iters - sum(counts)))
    return [c * steps_per_iteration(ns) for c in counts]


def command(ns, algo: str, seed: int, runs_dir: str, num_seeds: int = 1) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, f"{algo}.py"),
           "--env-name", ns.env_name, "--seed", str(seed), "--num-seeds", str(num_seeds), "--num-envs", str(ns.num_envs),
           "--batch-size", str(ns.batch_size), "--num-minibatches", str(ns.num_minibatches),
           "--unroll-length", str(ns.unroll_length), "--num-epochs", str(ns.num_epochs),
           "--eval-every", str(ns.eval_every), "--num-eval-envs", str(ns.num_eval_envs), "--runs-dir", runs_dir]
    if algo in STAGED:
        cmd += ["--stage-steps", *map(str, stage_steps(ns)),
                "--refine-envs", str(ns.refine_envs), "--refine-episodes", str(ns.refine_episodes),
                "--refine-batch-size", str(ns.refine_batch_size)]
        cmd += (["--refine-steps", str(ns.refine_steps)] if algo == "gorl_fm" else
                ["--refine-epochs", str(ns.refine_epochs)])
    else:
        budget = ns.total_steps // steps_per_iteration(ns) * steps_per_iteration(ns)
        cmd += ["--total-timesteps", str(budget)]
    return cmd


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


def run_all(ns) -> dict:
    env = dict(os.environ)
    if ns.compile_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(ns.compile_cache)
    results = {}
    for algo in ns.algos:
        if not os.path.isfile(os.path.join(ROOT, f"{algo}.py")):
            print(f"skipping {algo}: {algo}.py is not in the repository", flush=True)
            continue
        results[algo] = []
        if ns.seeds_in_one_process:
            results[algo] = run_seeds_together(ns, algo, env)
            continue
        for seed in ns.seeds:
            runs_dir = os.path.join(ns.runs_dir, algo, f"seed{seed}")
            log_path = os.path.join(ns.runs_dir, algo, f"seed{seed}.log")
            existing = find_run(runs_dir)
            if ns.reuse and existing and plot.metric_curve(plot.load_run(existing)["rows"], "eval/return")[0].size:
                wall = _read_wall(log_path)
                print(f"{algo} seed {seed}: reusing {existing}", flush=True)
                results[algo].append({"dir": existing, "ok": True, "wall": wall, **summarize(existing)})
                continue
            os.makedirs(runs_dir, exist_ok=True)
            cmd = command(ns, algo, seed, runs_dir)
            print(f"{algo} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            with open(log_path, "w") as log:
                try:
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                        timeout=ns.timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                wall = time.time() - t0
                log.write(f"\n[cpu_suite] wall_seconds {wall:.1f} returncode {rc}\n")
            run_dir = find_run(runs_dir)
            ok = rc == 0 and run_dir is not None
            entry = {"dir": run_dir, "ok": ok, "wall": wall, **(summarize(run_dir) if run_dir else {})}
            results[algo].append(entry)
            status = (f"return {entry['final_return']:.1f}, {entry['steps_per_second']:,.0f} steps/s"
                      if ok else f"FAILED (exit {rc}); see {log_path}")
            print(f"{algo} seed {seed}: {status}, {wall:.0f}s", flush=True)
    return results


def run_seeds_together(ns, algo: str, env: dict) -> list[dict]:
    """One process trains every seed (--num-seeds); each entry's wall is that process's share."""
    runs_dir = os.path.join(ns.runs_dir, algo, "seeds_together")
    log_path = os.path.join(ns.runs_dir, algo, "seeds_together.log")
    os.makedirs(runs_dir, exist_ok=True)
    cmd = command(ns, algo, ns.seeds[0], runs_dir, num_seeds=len(ns.seeds))
    print(f"{algo} seeds {ns.seeds} in one process: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                timeout=ns.timeout * len(ns.seeds)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.time() - t0
        log.write(f"\n[cpu_suite] wall_seconds {wall:.1f} returncode {rc}\n")
    entries = []
    for seed in ns.seeds:
        run_dir = find_run(runs_dir, seed)
        ok = rc == 0 and run_dir is not None
        entries.append({"dir": run_dir, "ok": ok, "wall": wall / len(ns.seeds), **(summarize(run_dir) if run_dir else {})})
    returns = ", ".join(f"{e['final_return']:.1f}" for e in entries if e["ok"])
    print(f"{algo}: " + (f"returns {returns}" if rc == 0 else f"FAILED (exit {rc}); see {log_path}") + f", {wall:.0f}s",
          flush=True)
    return entries


def _read_wall(log_path: str) -> float:
    try:
        for line in open(log_path):
            if line.startswith("[cpu_suite] wall_seconds"):
                return float(line.split()[2])
    except OSError:
        pass
    return math.nan


def table(ns, results: dict) -> str:
    lines = [f"Task {ns.env_name}; seeds {ns.seeds}; budget {ns.total_steps // steps_per_iteration(ns) * steps_per_iteration(ns):,} "
             f"environment steps ({ns.num_envs} envs, {ns.batch_size} x {ns.num_minibatches} sequences of "
             f"{ns.unroll_length} steps, {ns.num_epochs} epochs per iteration); GoRL stages {stage_steps(ns)}, "
             f"refinement {ns.refine_episodes} episodes from {ns.refine_envs} envs, batch {ns.refine_batch_size}, "
             f"{ns.refine_steps} steps (gorl_fm) / {ns.refine_epochs} epochs (gorl_diffusion). "
             f"Evaluation: {ns.num_eval_envs} envs, one 1000-step episode, deterministic policy."
             + (" A persistent compilation cache was shared by the runs (later runs compile less)." if ns.compile_cache else ""),
             "",
             ("Each algorithm's seeds were trained in one process (--num-seeds)." if ns.seeds_in_one_process
              else "One process per seed, one after another."),
             "",
             "| algo | seeds ok | final eval return (mean ± std) | refinement kept (min) | training steps/s "
             "| wall-clock, all seeds (s) |",
             "|---|---|---|---|---|---|"]
    for algo, entries in results.items():
        ok = [e for e in entries if e["ok"]]
        if not ok:
            lines.append(f"| {algo} | 0/{len(entries)} | failed | - | - | - |")
            continue
        r = np.array([e["final_return"] for e in ok])
        # Throughput of the training: one seed's rate when the seeds run one after another, the
        # sum of the seeds' rates when they run together.
        rates = [e["steps_per_second"] for e in ok]
        sps = np.nansum(rates) if ns.seeds_in_one_process else np.nanmean(rates)
        wall = np.nansum([e["wall"] for e in ok])
        kept = [k for e in ok for k in e.get("kept", [])]
        kept_text = f"{100 * min(kept):.0f}%" if kept else "-"
        lines.append(f"| {algo} | {len(ok)}/{len(entries)} | {r.mean():.1f} ± {r.std():.1f} | {kept_text} | {sps:,.0f} "
                     f"| {wall:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ns = parse(argv)
    if ns.seeds_in_one_process and ns.seeds != list(range(ns.seeds[0], ns.seeds[0] + len(ns.seeds))):
        sys.exit(f"error: --seeds-in-one-process trains consecutive seeds (--seed S --num-seeds N); got {ns.seeds}")
    results = run_all(ns)
    text = table(ns, results)
    print(text)
    os.makedirs(ns.results_dir, exist_ok=True)
    with open(os.path.join(ns.results_dir, "cpu_suite.md"), "w") as f:
        f.write("# CPU suite\n\n" + text + "\n")
    dirs = [e["dir"] for entries in results.values() for e in entries if e["ok"]]
    if dirs:
        plot.plot_curves(dirs, os.path.join(ns.results_dir, "cpu_suite_curves.png"))


if __name__ == "__main__":
    main()
