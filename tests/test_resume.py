"""A GoRL run stopped inside a stage resumes inside it, from its last evaluation.

The runs go through the scripts' main() on the pure-JAX stand-in task (tests/fake_env.py). A
run is interrupted (KeyboardInterrupt, as Ctrl-C or a preemption's signal handler gives) right
after the checkpoint of an evaluation in the middle of stage 1, then resumed with --resume. The
checkpoint holds the stage's encoder, critic, optimizer state and settings, normalizer, decoder,
the environments' state and the key, so on the CPU the resumed run reproduces the
uninterrupted one: the same evaluation returns and losses at every step, the same final step
and stage table. (On a GPU the same holds up to the nondeterminism of its reductions.)
"""

import csv
import glob
import os

import jax
import numpy as np
import pytest

import common
import running
import gorl_diffusion
import gorl_fm

LAYOUT = dict(env_name="CartpoleBalance", num_envs=4, batch_size=4, num_minibatches=2, unroll_length=7,
              num_epochs=2, encoder_hidden=(16,), critic_hidden=(16,), decoder_hidden=(16,),
              stage_steps=(112, 224), eval_every=56, num_eval_envs=4, refine_episodes=2, refine_batch_size=500,
              refine_draws=2, refine_val_size=1000, refine_eval_every=10)
FLAGS = {gorl_fm: dict(LAYOUT, refine_steps=20), gorl_diffusion: dict(LAYOUT, refine_epochs=10, refine_batch_size=7,
                                                                            learning_rate=(1e-3, 3e-4))}
ON_CPU = jax.default_backend() == "cpu"


@pytest.fixture
def fake_task(monkeypatch):
    from fake_env import FakeEnv

    monkeypatch.setattr(common, "make_env", lambda *args, **kwargs: FakeEnv())


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def columns(run_dir, names=("eval/return", "loss/total", "refine/prior_latent_return")):
    """{(step, column): value} of the logged numbers that training determines (no times)."""
    return {(int(r["step"]), k): float(r[k]) for r in rows(run_dir) for k in names if r.get(k)}


@pytest.mark.slow
@pytest.mark.skipif(not ON_CPU, reason="bit-equal reproduction is a CPU property")
@pytest.mark.parametrize("module", [gorl_fm, gorl_diffusion], ids=lambda m: m.__name__)
def test_a_run_stopped_inside_a_stage_resumes_inside_it(module, fake_task, tmp_path, monkeypatch, capsys):
    module.main(module.Args(**FLAGS[module], runs_dir=str(tmp_path / "whole")))
    (whole,) = glob.glob(str(tmp_path / "whole" / "*"))

    # The same run, stopped right after the checkpoint of stage 1's first evaluation (step 168).
    save = running.Runs.save_inside_stage
    saved_steps = []

    def save_then_stop(runs, state, keys, stage, step, key, stage_rows):
        save(runs, state, keys, stage, step, key, stage_rows)
        saved_steps.append((stage, step))
        if stage == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(running.Runs, "save_inside_stage", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        module.main(module.Args(**FLAGS[module], runs_dir=str(tmp_path / "stopped")))
    (stopped,) = glob.glob(str(tmp_path / "stopped" / "*"))
    assert saved_steps == [(0, 56), (1, 168)]  # inside stages only: a stage's end is its stage checkpoint
    assert "resume from the last checkpoint with: python" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(stopped, "checkpoints"))) == ["latest.npz", "stage0.npz"]
    monkeypatch.setattr(running.Runs, "save_inside_stage", save)

    module.main(module.Args(resume=stopped))
    out = capsys.readouterr().out
    assert "resuming inside stage 1 at step 168" in out
    assert "refined decoder before" not in out  # the stage's decoder came with the checkpoint
    # The resumed part trains as the uninterrupted run did: every logged number, bit for bit.
    expected, got = columns(whole), columns(stopped)
    assert sorted(got) == sorted(expected)
    assert max(step for step, _ in got) == 336
    for k in expected:
        assert got[k] == expected[k], k
    assert [r["step"] for r in rows(stopped)] == [r["step"] for r in rows(whole)]  # no row twice
    with open(os.path.join(whole, "stages.md")) as a, open(os.path.join(stopped, "stages.md")) as b:
        assert a.read() == b.read()
    final = {d: running.load_checkpoint(os.path.join(d, "checkpoints", "stage1.npz")) for d in (whole, stopped)}
    for a, b in zip(jax.tree.leaves(final[whole]["params"]), jax.tree.leaves(final[stopped]["params"])):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_from_a_completed_stage_is_not_resumed_inside(fake_task, tmp_path, monkeypatch, capsys):
    """Stopped during the refinement after stage 0: latest.npz (inside stage 0) is older than
    stage0.npz, so the run resumes after stage 0 and redoes the refinement."""
    module = gorl_fm

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "refine_decoder", stop)
    with pytest.raises(KeyboardInterrupt):
        module.main(module.Args(**FLAGS[module], runs_dir=str(tmp_path)))
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    assert int(running.load_checkpoint(os.path.join(run_dir, "checkpoints", "latest.npz"))["stage"]) == 0
    monkeypatch.undo()
    monkeypatch.setattr(common, "make_env", lambda *a, **k: __import__("fake_env").FakeEnv())
    capsys.readouterr()
    module.main(module.Args(resume=run_dir))
    out = capsys.readouterr().out
    assert "resuming after stage 0 at step 112" in out and "refined decoder before stage 1" in out
    assert max(int(r["step"]) for r in rows(run_dir)) == 336
