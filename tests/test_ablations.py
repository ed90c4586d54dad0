"""The paper's ablations as gorl_fm.py flags (off by default) change what they claim to.

  --refine-latents encoder  the decoder is refined on the encoder's own latents (Fig. 4a)
  --no-encoder-reset        the encoder keeps training across stages (Fig. 4b)
  --kl-beta the weight of KL(encoder || N(0, I)) in the loss, per stage (paper 001, Fig. 5)
  --frozen-decoder PATH     a fresh encoder against a decoder frozen from a saved stage (Fig. 5)

The two staged runs below go through gorl_fm.main() itself, on the pure-JAX two-mode bandit of
benchmarks/multimodal.py instead of an MJX task (common.make_env is patched): the flags act in
main's stage loop, which does not depend on the task, and the bandit compiles in seconds.
"""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import running
import gorl_fm
from benchmarks.multimodal import TwoModeBandit

OBS, ACT = TwoModeBandit.observation_size, TwoModeBandit.action_size
SMALL = dict(encoder_hidden=(8, 8), critic_hidden=(16,), decoder_hidden=(16, 16))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def identity_stage_dataset(n=2000, seed=0):
    """What a refinement collects after stage 0: the decoder is the identity, so every action
    equals the latent the encoder sampled for it. Laid out as a rollout: [n, 1 env, .]."""
    rng = np.random.default_rng(seed)
    latent = (rng.normal(size=(n, 1, ACT)) * 0.5 + 0.8).astype(np.float32)
    return {"obs": jnp.asarray(rng.normal(size=(n, 1, OBS)).astype(np.float32)),
            "action": jnp.asarray(latent), "latent": jnp.asarray(latent)}


def test_refinement_inputs_are_the_encoder_latents_not_prior_draws():
    data = jax.tree.map(lambda x: x[:, 0], identity_stage_dataset(4096))
    key = jax.random.PRNGKey(0)
    z_enc, t_enc = gorl_fm.refinement_inputs(data, key, 2, "encoder")
    z_prior, t_prior = gorl_fm.refinement_inputs(data, key, 2, "prior")
    np.testing.assert_array_equal(np.asarray(z_enc), np.broadcast_to(np.asarray(data["latent"]), (2, 4096, ACT)))
    k_z, _ = jax.random.split(key)
    np.testing.assert_array_equal(np.asarray(z_prior), np.asarray(jax.random.normal(k_z, (2, 4096, ACT))))
    np.testing.assert_array_equal(np.asarray(t_enc), np.asarray(t_prior))  # only z changes


@pytest.mark.parametrize("refine_latents", ["prior", "encoder"])
def test_refinement_fit_uses_the_flag(refine_latents):
    """Through make_refinement's `fit`: on a stage-0 dataset (action == latent), fitting the
    identity decoder on the encoder's latents is a self-reconstruction with nothing to learn (the
    flow-matching target a - z is 0, so the decoder stays exactly as it was), while prior
    latents make it learn the map from N(0, I) to the actions."""
    args = gorl_fm.resolve(gorl_fm.Args(**SMALL, refine_envs=1, refine_episodes=2, refine_batch_size=500,
                                        refine_steps=30, refine_eval_every=10, refine_val_size=1000,
                                        refine_latents=refine_latents, decoder_init="warm"))
    _, fit = gorl_fm.make_refinement(TwoModeBandit(), args)
    decoder = gorl_fm.init_decoder(jax.random.PRNGKey(0), OBS, ACT, args)
    refined, _, metrics = fit(decoder, identity_stage_dataset(), jax.random.PRNGKey(1))
    change = np.abs(flat(refined) - flat(decoder)).max()
    if refine_latents == "encoder":
        assert change == 0.0 and float(metrics["refine/loss_final"]) == 0.0
    else:
        assert change > 1e-3 and float(metrics["refine/loss_final"]) > 0.1


def test_kl_weight_reaches_the_loss_in_each_stage():
    args = gorl_fm.resolve(gorl_fm.Args(**SMALL, kl_beta=(0.03, 0.2)))
    assert float(gorl_fm.stage_hyperparameters(args, 0)["kl_beta"]) == pytest.approx(0.03)
    for stage in (1, 2, 3):
        assert float(gorl_fm.stage_hyperparameters(args, stage)["kl_beta"]) == pytest.approx(0.2)
    # An encoder off the prior (KL > 0): the loss grows by exactly beta * KL.
    params = {"encoder": common.mlp_init(jax.random.PRNGKey(0), [OBS, 8, 8, 2 * ACT]),
              "critic": common.mlp_init(jax.random.PRNGKey(1), [OBS, 16, 1])}
    rng = np.random.default_rng(0)
    batch = {"obs": jnp.asarray(rng.normal(size=(64, OBS)), jnp.float32),
             "latent": jnp.asarray(rng.normal(size=(64, ACT)), jnp.float32),
             "log_prob": jnp.zeros(64), "advantage": jnp.asarray(rng.normal(size=64), jnp.float32),
             "target": jnp.zeros(64)}
    for stage, beta in ((0, 0.03), (1, 0.2)):
        hp = gorl_fm.stage_hyperparameters(args, stage)
        loss, metrics = gorl_fm.latent_ppo_loss(params, batch, hp, args)
        kl = float(metrics["loss/kl_prior"])
        assert kl > 0.01
        loss_no_kl, _ = gorl_fm.latent_ppo_loss(params, batch, dict(hp, kl_beta=jnp.float32(0.0)), args)
        np.testing.assert_allclose(float(loss - loss_no_kl), beta * kl, rtol=1e-4)


def test_bad_ablation_values_are_rejected_before_compiling(tmp_path):
    with pytest.raises(SystemExit, match="refine-latents"):
        gorl_fm.validate(gorl_fm.resolve(gorl_fm.Args(env_name="CartpoleBalance", refine_latents="posterior")))
    with pytest.raises(SystemExit, match="frozen-decoder"):
        gorl_fm.validate(gorl_fm.resolve(gorl_fm.Args(env_name="CartpoleBalance",
                                                      frozen_decoder=str(tmp_path / "missing.npz"))))


TINY = dict(**SMALL, env_name="CartpoleBalance", num_envs=16, batch_size=16, num_minibatches=2, unroll_length=4,
            num_epochs=2, refine_envs=2, refine_episodes=2, refine_batch_size=500, refine_steps=20,
            refine_eval_every=10, refine_val_size=1000, refine_draws=2, eval_every=128, num_eval_envs=4, stage_steps=(256, 256))


def staged_run(tmp_path, monkeypatch, name, **flags):
    """gorl_fm.main on the bandit; returns the run folder, its stage checkpoints and how many
    times the encoder was initialized to the prior."""
    monkeypatch.setattr(common, "make_env", lambda *a, **k: TwoModeBandit())
    calls = []
    real_init = gorl_fm.init_encoder

    def counting_init_encoder(*args, **kwargs):
        calls.append(1)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(gorl_fm, "init_encoder", counting_init_encoder)
    runs_dir = str(tmp_path / name)
    gorl_fm.main(gorl_fm.Args(**TINY, runs_dir=runs_dir, **flags))
    monkeypatch.setattr(gorl_fm, "init_encoder", real_init)
    (run_dir,) = [os.path.join(runs_dir, d) for d in os.listdir(runs_dir)]
    stages = [running.load_checkpoint(os.path.join(run_dir, "checkpoints", f"stage{m}.npz")) for m in (0, 1)]
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return run_dir, stages, len(calls), rows


@pytest.mark.slow
def test_staged_runs_encoder_latents_no_reset_and_frozen_decoder(tmp_path, monkeypatch):
    # Run A: --refine-latents encoder --no-encoder-reset.
    # (No target clip: clipped targets would differ from their latents where |z| > 3.)
    run_a, (a0, a1), inits_a, rows_a = staged_run(tmp_path, monkeypatch, "a", seed=1, refine_latents="encoder",
                                                  encoder_reset=False, decoder_target_clip=0.0)
    # The encoder was initialized once (stage 0) and kept training through stage 1: its stage-1
    # weights are stage 0's plus a few updates, not a fresh random initialization.
    assert inits_a == 1
    assert os.path.basename(run_a).startswith("CartpoleBalance__gorl_fm_no_encoder_reset_encoder_latents__1__")
    w0, w1 = np.asarray(a0["params"]["encoder"][0]["w"]), np.asarray(a1["params"]["encoder"][0]["w"])
    small_args = gorl_fm.resolve(gorl_fm.Args(**SMALL))
    fresh = np.asarray(gorl_fm.init_encoder(jax.random.PRNGKey(0), OBS, ACT, small_args)[0]["w"])
    assert np.abs(w1 - w0).max() < 0.2 * np.abs(fresh - w0).max()
    # Stage 0's output layer was trained off the prior, and stage 1 did not start over from it.
    assert np.abs(np.asarray(a1["params"]["encoder"][-1]["w"])).max() > 0
    # The refinement ran (its rows are logged) on the encoder's own latents. After stage 0 the
    # decoder is the identity, so every collected action equals its latent: self-reconstruction
    # has nothing to learn, and the refined decoder is still exactly the identity (with prior
    # latents it would have moved).
    assert any(r.get("refine/loss_final") not in (None, "") for r in rows_a)
    assert float(next(r["refine/loss_final"] for r in rows_a if r.get("refine/loss_final"))) == 0.0
    z = jnp.linspace(-2.0, 2.0, 9)[:, None] * jnp.ones(ACT)
    np.testing.assert_array_equal(np.asarray(gorl_fm.decode(a1["decoder"], jnp.zeros((9, OBS)), z, 10)), np.asarray(z))
    assert np.abs(flat(a1["decoder_norm"]) - flat(a0["decoder_norm"])).max() > 0  # refit statistics

    # Run B: a fresh encoder against run A's stage-1 decoder, frozen (defaults otherwise).
    source = os.path.join(run_a, "checkpoints", "stage1.npz")
    run_b, (b0, b1), inits_b, rows_b = staged_run(tmp_path, monkeypatch, "b", seed=2, frozen_decoder=source)
    assert os.path.basename(run_b).startswith("CartpoleBalance__gorl_fm_frozen_decoder__2__")
    assert inits_b == 2  # the default: the encoder is re-initialized to the prior at every stage
    for b in (b0, b1):
        np.testing.assert_array_equal(flat(b["decoder"]), flat(a1["decoder"]))
        np.testing.assert_array_equal(flat(b["decoder_norm"]), flat(a1["decoder_norm"]))
    own = gorl_fm.init_decoder(jax.random.split(jax.random.PRNGKey(2), 4)[2], OBS, ACT, small_args)
    assert np.abs(flat(own) - flat(a1["decoder"])).max() > 0  # not B's own initial decoder
    assert not any(k.startswith("refine/") and r[k] not in (None, "") for r in rows_b for k in r)
    # A fresh encoder: stage 1 of B does not continue stage 0's.
    assert np.abs(np.asarray(b1["params"]["encoder"][0]["w"]) - np.asarray(b0["params"]["encoder"][0]["w"])).max() > 0.05
