"""The GPU check: run once on a GPU machine, from the repository root, in at most 9 minutes.

Each step runs as a child process under its own timeout, in order of importance; a step that
no longer fits the overall budget is skipped and listed as such. One report file (markdown)
is written after every step, so an interrupted check still leaves what it measured:

  1. environment: devices, Python, JAX / jaxlib / CUDA plugin, MuJoCo, Playground and Brax
     versions, nvidia-smi's GPU line, and the relative error of a float32 matmul against
     float64 at the default precision (TF32 on recent NVIDIA GPUs) and at "highest";
  2. a subset of the tests (the math and the wiring, not the CPU-sized end-to-end runs);
  3. steps/s and compile time of ppo.py and gorl_fm.py (stage 0, latent PPO) at the paper's
     2048 environments, 3 iterations of 983,040 steps, on CartpoleBalance and HopperStand,
     with --num-seeds 1 and 4;
  4. one GoRL-FM refinement at reduced size on HopperStand: collection of 4096 episodes at
     once (4096 environments) and of 256 episodes 64 at a time (extrapolated to 4096), each
     timed apart, and 200 decoder steps of the released batch;
  5. the GPU memory in use, sampled with nvidia-smi every half second: its peak per step.

    python benchmarks/gpu_check.py                      # in an environment that has everything
    bash benchmarks/gpu_check.sh                        # makes that environment first (see there)
    python benchmarks/gpu_check.py --quick              # CPU-sized steps: checks this script anywhere

Without a GPU the steps still run (on the CPU, slowly): use --quick, which shrinks every step
(64 environments, small refinement) so the whole check runs in a few minutes; the memory
column then says "n/a". Report: benchmarks/results/gpu_check.md (--out).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import plot  # noqa: E402  (the run-folder readers)
ITERATION = 983_040  # the paper's iteration: 2048 envs x 480 steps

ENVIRONMENT = r"""
import importlib.metadata as md, platform, sys
import numpy as np
import jax, jax.numpy as jnp
print("python", platform.python_version(), "| backend", jax.default_backend(), "| devices", jax.devices())
for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "mujoco", "mujoco-mjx", "playground", "brax", "optax"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
a, b = (np.random.default_rng(i).standard_normal((1024, 1024)).astype(np.float32) for i in (0, 1))
exact = a.astype(np.float64) @ b.astype(np.float64)
for precision in ("default", "highest"):
    with jax.default_matmul_precision(precision):
        got = np.asarray(jnp.asarray(a) @ jnp.asarray(b), dtype=np.float64)
    print(f"float32 matmul relative error at {precision}: {np.abs(got - exact).max() / np.abs(exact).max():.2e}")
import common  # the project imports on this JAX
env = common.make_env("CartpoleBalance")
print("CartpoleBalance builds: observation", env.observation_size, "action", env.action_size)
"""


class MemorySampler:
    """Peak of nvidia-smi's memory.used (MiB, first GPU) while a step runs; None without nvidia-smi."""

    def __init__(self):
        self.available = shutil.which("nvidia-smi") is not None
        self.peak, self._stop = None, threading.Event()

    def _read(self):
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return int(out[0]) if out else None

    def _loop(self):
        while not self._stop.wait(0.5):
            try:
                used = self._read()
            except Exception:  # noqa: BLE001 - sampling must never stop the check
                continue
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def run_step(command, timeout, env=None):
    """(return code or 'timeout', seconds, output, peak GPU MiB)."""
    start = time.time()
    with MemorySampler() as memory:
        try:
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            rc, output = result.returncode, result.stdout + result.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    return rc, time.time() - start, output, memory.peak


def training_figures(runs_dir, num_seeds, steps):
    """steps/s of all seeds together (each seed's metrics.csv has its own rate: the median over
    the iterations after the first, times the seeds) and the compilation time (first iteration
    minus a later one)."""
    paths = sorted(glob.glob(os.path.join(runs_dir, "*", "metrics.csv")))
    if not paths:
        return "no iterations logged"
    _, rates = plot.metric_curve(plot.load_run(os.path.dirname(paths[0]))["rows"], "perf/steps_per_second")
    if len(rates) < 2:
        return "no iterations logged"
    first, later = rates[0], sorted(rates[1:])[len(rates[1:]) // 2]
    total = later * max(num_seeds, len(paths))
    return (f"{total:,.0f} steps/s ({num_seeds} seed(s) together); first iteration {steps / first:.1f} s, "
            f"a later one {steps / later:.1f} s: compilation about {steps / first - steps / later:.0f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check.md"))
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check (9 minutes)")
    p.add_argument("--quick", action="store_true", help="CPU-sized steps, to check this script without a GPU")
    ns = p.parse_args(argv)

    if ns.quick:  # 64 envs x 60 steps per iteration
        layout = ["--num-envs", "64", "--batch-size", "64", "--num-minibatches", "2", "--unroll-length", "30",
                  "--num-epochs", "2", "--num-eval-envs", "8"]
        iteration = 64 * 2 * 30
        tasks, seeds = ["CartpoleBalance"], [1, 2]
        refine = [("64 envs, all episodes at once", ["--refine-episodes", "64", "--timed-steps", "100",
                                                       "--refine-batch-size", "1024"]),
                  ("64 envs at a time", ["--refine-episodes", "128", "--refine-envs", "64", "--collect-only"])]
        tests = ["tests/test_fpo.py"]
    else:
        layout = ["--num-envs", "2048"]  # the rest are the paper's defaults: 1024 x 32 x 30, 16 epochs
        iteration = ITERATION
        tasks, seeds = ["CartpoleBalance", "HopperStand"], [1, 4]
        refine = [("4096 envs, all episodes at once", ["--env-name", "HopperStand", "--refine-episodes", "4096",
                                                       "--timed-steps", "200"]),
                  ("64 envs at a time (256 episodes; x16 for 4096)",
                   ["--env-name", "HopperStand", "--refine-episodes", "256", "--refine-envs", "64", "--collect-only"])]
        tests = ["tests/test_common.py", "tests/test_running.py", "tests/test_wiring.py", "tests/test_fpo.py", "tests/test_dppo.py",
                 "tests/test_gorl_fm.py"]
    budget_steps = 3 * iteration

    steps = [("environment", [sys.executable, "-c", ENVIRONMENT], 90, None),
             ("tests (subset)", [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                                 *tests], 180, None)]
    order = [("ppo", tasks[0], seeds[0]), ("gorl_fm", tasks[-1], seeds[0]), ("ppo", tasks[-1], seeds[0]),
             ("ppo", tasks[0], seeds[-1]), ("gorl_fm", tasks[0], seeds[0])]
    runs_root = tempfile.mkdtemp(prefix="gpu-check-runs-")
    for i, (algo, task, n) in enumerate(order[:2]):
        steps.append(training_step(algo, task, n, layout, budget_steps, runs_root, i))
    steps += [(f"refinement: {what}", [sys.executable, "benchmarks/refinement_time.py", *flags], 150, None)
              for what, flags in refine[:1]]
    for i, (algo, task, n) in enumerate(order[2:], start=2):
        steps.append(training_step(algo, task, n, layout, budget_steps, runs_root, i))
    steps += [(f"refinement: {what}", [sys.executable, "benchmarks/refinement_time.py", *flags], 120, None)
              for what, flags in refine[1:]]
    for i, (algo, task) in enumerate([("ppo", tasks[-1]), ("gorl_fm", tasks[-1]), ("gorl_fm", tasks[0])], start=10):
        steps.append(training_step(algo, task, seeds[-1], layout, budget_steps, runs_root, i))

    steps = list({step[0]: step for step in steps}.values())  # --quick has one task: no step twice
    start, results = time.time(), []
    for name, command, timeout, runs_dir in steps:
        left = ns.budget - (time.time() - start)
        if left < min(timeout, 60):
            results.append({"step": name, "rc": "skipped (time)", "seconds": 0, "summary": "", "memory": None})
            write_report(ns.out, results, ns, time.time() - start)
            continue
        print(f"[{time.time() - start:5.0f} s] {name} ...", flush=True)
        rc, seconds, output, memory = run_step(command, min(timeout, left))
        summary = summarize(output, runs_dir, command, iteration)
        results.append({"step": name, "rc": rc, "seconds": seconds, "summary": summary, "memory": memory,
                        "command": " ".join(command[:2] + ["..."] if "-c" in command else command),
                        "tail": "" if rc == 0 else output[-1500:]})
        print(f"         {rc} in {seconds:.0f} s: {summary.splitlines()[0] if summary else ''}", flush=True)
        write_report(ns.out, results, ns, time.time() - start)
    shutil.rmtree(runs_root, ignore_errors=True)
    print(f"report: {ns.out}")


def training_step(algo, task, num_seeds, layout, budget_steps, runs_root, index):
    runs_dir = os.path.join(runs_root, str(index))
    budget = ["--total-timesteps", str(budget_steps)] if algo == "ppo" else ["--stage-steps", str(budget_steps)]
    command = [sys.executable, f"{algo}.py", "--env-name", task, "--num-seeds", str(num_seeds), *layout, *budget,
               "--eval-every", str(10 * budget_steps), "--runs-dir", runs_dir]
    return (f"{algo}.py {task}, {num_seeds} seed(s)", command, 150, runs_dir)


def summarize(output, runs_dir, command, iteration):
    if runs_dir is not None:
        seeds = int(command[command.index("--num-seeds") + 1])
        return training_figures(runs_dir, seeds, iteration)
    keep = ("python", "jax", "mujoco", "playground", "brax", "optax", "float32", "builds", "passed", "failed",
            "collection", "decoder training", "one refinement", "error")
    lines = [line for line in output.splitlines() if line.split(" ")[0].lower().rstrip(":") in keep
             or any(k in line for k in ("passed", "failed", "collection:", "decoder training:", "relative error"))]
    return "\n".join(dict.fromkeys(lines))  # in order, without repeats


def write_report(path, results, ns, elapsed):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines = [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f} s of a {ns.budget:.0f} s budget"
             f"{', --quick' if ns.quick else ''})", "",
             "| step | result | seconds | peak GPU memory (MiB) |", "|---|---|---|---|"]
    for r in results:
        memory = "n/a" if r["memory"] is None else f"{r['memory']:,}"
        lines.append(f"| {r['step']} | {r['rc']} | {r['seconds']:.0f} | {memory} |")
    for r in results:
        if r.get("summary") or r.get("tail"):
            lines += ["", f"## {r['step']}", "", f"`{r.get('command', '')}`", "", "```", r["summary"]]
            if r.get("tail"):
                lines += ["--- end of the output ---", r["tail"]]
            lines.append("```")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
