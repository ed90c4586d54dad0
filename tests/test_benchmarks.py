"""The benchmarks build the algorithm files' pieces themselves, so a change of those pieces
(a flag that became task-dependent, a new state type) can break them silently: check that
they still construct complete settings and, for the pure-JAX one, run end to end."""

import dataclasses
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ppo  # noqa: E402
from benchmarks import brax_parity, multimodal, throughput  # noqa: E402


@pytest.mark.parametrize("make", [lambda: throughput.ppo_args(throughput.Args()),
                                  lambda: brax_parity.ppo_args(brax_parity.Args(), 1)],
                         ids=["throughput", "brax_parity"])
def test_benchmark_ppo_settings_leave_nothing_to_the_task(make):
    """Brax receives these values too: a task-dependent flag left at None would reach it as None."""
    args = make()
    assert all(getattr(args, name) is not None for name in ppo.TASK_DEFAULTS)
    ppo.validate(args)


@pytest.mark.slow
def test_multimodal_benchmark_runs_end_to_end(tmp_path):
    multimodal.main(["--seeds", "1", "--stage-steps", "1024", "1024", "--num-envs", "64", "--unroll-length", "4",
                     "--batch-size", "16", "--num-minibatches", "4", "--num-epochs", "1", "--refine-envs", "2",
                     "--refine-batch-size", "256", "--refine-steps", "100", "--num-samples", "200",
                     "--out-dir", str(tmp_path)])
    table = (tmp_path / "multimodal.md").read_text()
    assert "| GoRL-FM | 1 | S1 |" in table and "| PPO | 1 | S1 |" in table
    assert (tmp_path / "multimodal_density.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# benchmarks/cpu_suite.py: commands, parts, reference rows and the table (no MJX compilation)
# ---------------------------------------------------------------------------------------------


def _entry(seed, ret, ok=True, kept=()):
    return {"seed": seed, "dir": None, "ok": ok, "final_return": ret, "steps_per_second": 1000.0, "wall": 10.0,
            "kept": list(kept)}


def test_cpu_suite_table_has_reference_rows_per_seed_values_and_the_stage0_row():
    from benchmarks import cpu_suite

    ns = cpu_suite.parse(["--seeds", "1", "2", "3"])
    results = {"ppo": [_entry(1, 210.0), _entry(2, 250.5), _entry(3, 190.25)],
               "gorl_fm": [_entry(1, 300.0, kept=[0.95]), _entry(2, 320.0, kept=[1.02]), _entry(3, 0.0, ok=False)],
               cpu_suite.STAGE0: [_entry(s, 200.0 + s) for s in (1, 2, 3)],
               "fpo": [_entry(s, 0.0, ok=False) for s in (1, 2, 3)]}
    refs = {"zero action": [0.0, 0.125, 0.0], "random N(0,1) pre-squash": [30.25, 28.75, 29.0]}
    text = cpu_suite.table(ns, "CartpoleSwingup", results, refs)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "per seed (1, 2, 3)" in rows["algo"]
    # The reference rows come first, with each seed's value.
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| algo")]
    assert lines[0].startswith("| zero action | 3/3 | 0.0 ± 0.1 | 0.0, 0.1, 0.0 |")
    assert lines[1].startswith("| random N(0,1) pre-squash | 3/3 | 29.3 ± 0.7 | 30.2, 28.8, 29.0 |")
    assert rows["ppo"].startswith("| ppo | 3/3 | 216.9 ± 25.1 | 210.0, 250.5, 190.2 | - | 3,000 |")
    assert rows["gorl_fm"].startswith("| gorl_fm | 2/3 | 310.0 ± 10.0 | 300.0, 320.0, failed | 95% |")
    assert rows["gorl_fm (stage 0 only)"].startswith(
        "| gorl_fm (stage 0 only) | 3/3 | 202.0 ± 0.8 | 201.0, 202.0, 203.0 | - |")
    assert rows["fpo"] == "| fpo | 0/3 | failed | failed, failed, failed | - | - | - |"
    # Reference rows that could not be computed are still listed.
    assert "| zero action | - | not computed |" in cpu_suite.table(ns, "CartpoleSwingup", results, None)


def test_cpu_suite_gives_every_row_the_same_flags_and_stage0_one_stage():
    from benchmarks import cpu_suite

    ns = cpu_suite.parse(["--total-steps", "100000", "--extra-args", "fpo=--learning-rate 1e-3"])
    budget = cpu_suite.budget(ns)
    assert budget == 100000 // 7680 * 7680 and sum(cpu_suite.stage_steps(ns)) == budget

    def flags(row):
        cmd = cpu_suite.command(ns, row, "CartpoleSwingup", 1, "runs", num_seeds=3)
        assert cmd[1].endswith(f"{cpu_suite.script(row)}.py")
        return cmd[2:]

    def shared(cmd):  # the flags every row gets (those before the row's own budget flags)
        return cmd[:cmd.index("--runs-dir") + 2]

    base = shared(flags("ppo"))
    assert base[base.index("--num-seeds") + 1] == "3" and base[base.index("--num-epochs") + 1] == str(ns.num_epochs)
    for row in cpu_suite.ROWS:
        assert shared(flags(row)) == base, row
    for row in ("ppo", "dppo"):
        assert flags(row)[len(base):] == ["--total-timesteps", str(budget)]
    assert flags("fpo")[len(base):] == ["--total-timesteps", str(budget), "--learning-rate", "1e-3"]
    stage0 = flags(cpu_suite.STAGE0)
    assert cpu_suite.script(cpu_suite.STAGE0) == "gorl_fm"
    assert stage0[len(base):] == ["--stage-steps", str(budget), "--exp-name", cpu_suite.STAGE0]
    assert not any(f.startswith("--refine") for f in stage0)
    gorl = flags("gorl_fm")
    steps = gorl[gorl.index("--stage-steps") + 1:gorl.index("--refine-episodes")]
    assert len(steps) == 2 and sum(map(int, steps)) == budget and "--refine-steps" in gorl
    assert "--refine-epochs" in flags("gorl_diffusion")


@pytest.mark.parametrize("num_parts", [1, 2, 3])
def test_cpu_suite_parts_share_every_run_once(num_parts):
    from benchmarks import cpu_suite

    argv = ["--env-names", "CartpoleSwingup", "ReacherEasy"]
    every = cpu_suite.all_jobs(cpu_suite.parse(argv))
    assert len(every) == 2 * len(cpu_suite.ROWS)
    shares = [cpu_suite.my_jobs(cpu_suite.parse(argv + ["--part", f"{k}/{num_parts}"]))
              for k in range(1, num_parts + 1)]
    assert sorted(job for share in shares for job in share) == sorted(every)
    assert all(shares)
    costs = [sum(cpu_suite.estimate_seconds(cpu_suite.parse(argv), row) for _, row in share) for share in shares]
    assert max(costs) < 1.5 * sum(costs) / num_parts


def test_cpu_suite_rejects_a_bad_part_and_extra_args():
    from benchmarks import cpu_suite

    for argv in (["--part", "3/2"], ["--part", "1"], ["--extra-args", "sac=--x 1"], ["--extra-args", "ppo"]):
        with pytest.raises(SystemExit):
            cpu_suite.parse(argv)


def test_cpu_suite_reference_rows_evaluate_zero_and_random_actions(tmp_path, monkeypatch):
    """On the pure-JAX stand-in task: one value per seed, reproducible, the zero action as the
    evaluator scores it, the random policy different; --reuse reads them back from reference.json."""
    import jax.numpy as jnp

    import common
    from benchmarks import cpu_suite
    from fake_env import FakeEnv

    monkeypatch.setattr(common, "make_env", lambda name: FakeEnv())
    refs = cpu_suite.reference_returns("Fake", [1, 2], num_eval_envs=4)
    assert set(refs) == set(cpu_suite.REFERENCES) and all(len(v) == 2 for v in refs.values())
    evaluator = common.make_evaluator(FakeEnv(), 4)
    import jax

    zero = float(evaluator(lambda obs, key: jnp.zeros((obs.shape[0], 2)), jax.random.PRNGKey(2))["eval/return"])
    assert refs["zero action"][1] == pytest.approx(zero)
    assert refs["random N(0,1) pre-squash"] != refs["zero action"]
    assert cpu_suite.reference_returns("Fake", [1, 2], num_eval_envs=4) == refs

    ns = cpu_suite.parse(["--seeds", "1", "2", "--num-eval-envs", "4", "--runs-dir", str(tmp_path)])
    assert cpu_suite.references(ns, "Fake") == refs
    assert (tmp_path / "Fake" / "reference.json").exists()
    monkeypatch.setattr(cpu_suite, "reference_returns", lambda *a: pytest.fail("recomputed despite --reuse"))
    ns.reuse = True
    assert cpu_suite.references(ns, "Fake") == refs


@pytest.mark.parametrize("row", [r for r, (_, overrides) in brax_parity.ROWS.items() if overrides is not None])
def test_brax_parity_rows_are_valid_ppo_settings(row):
    ppo.validate(brax_parity.ppo_args(brax_parity.Args(), 1, **brax_parity.ROWS[row][1]))


def test_brax_parity_report_takes_each_seeds_longest_run(tmp_path):
    import json

    args = brax_parity.Args(results_dir=str(tmp_path))

    def write(row, seed, total, returns, sps=1000.0):
        result = {"row": row, "seed": seed, "total_steps": total, "steps_per_second": sps,
                  "eval_returns": [[s, r] for s, r in returns]}
        path = brax_parity.result_path(dataclasses.replace(args, total_steps=total), row, seed)
        with open(path, "w") as f:
            json.dump(result, f)

    half, full = args.checkpoints
    write("ppo", 1, half, [(half, 100.0)])
    write("ppo", 1, full, [(half, 100.0), (full, 300.0)])
    write("ppo", 2, half, [(half, 200.0)])
    write("release-update", 1, half, [(half, 999.0)])  # another row's file is not "ppo"'s
    results = brax_parity.load_results(args, "ppo")
    assert [(r["seed"], r["total_steps"]) for r in results] == [(1, full), (2, half)]
    table = brax_parity.report(args)
    ppo_line = next(line for line in table.splitlines() if line.startswith("| ppo.py (as parity"))
    # mean 150, standard error std([100, 200], ddof=1) / sqrt(2) = 50; one seed at 2.46M
    assert "| 2 | 150.0 +- 50.0 | 300.0 | 1: 100 / 300; 2: 200 / - |" in ppo_line
