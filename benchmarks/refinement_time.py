"""How long one GoRL-FM refinement takes at the released size on this machine.

A refinement (gorl_fm.py, between two stages) is: collect `--refine-episodes` full episodes with
the frozen encoder and the current decoder, then `--refine-steps` decoder steps of
`--refine-batch-size` actions x `--refine-draws` (latent, time) draws, validating every
`--refine-eval-every` steps. This script times the two jitted pieces of gorl_fm.py separately,
each compiled ahead of time so that compilation is reported apart:

  - collection at the given number of episodes (the released 4096 by default: 4.1M steps), each
    from a fresh start state, `--refine-envs` at a time (default: all in one batched rollout);
  - decoder training for `--timed-steps` steps (the released batch and draws), extrapolated
    linearly to `--refine-steps` (the released 50,000; the cost per step does not depend on the
    step index, and validation adds one evaluation per `--refine-eval-every` steps, included).

The encoder is the prior and the decoder the identity (a stage-0 boundary): the cost of a
refinement does not depend on the parameters' values.

    python benchmarks/refinement_time.py --env-name FingerSpin              # released size
    python benchmarks/refinement_time.py --refine-episodes 256 --timed-steps 100   # quicker
    python benchmarks/refinement_time.py --refine-episodes 256 --refine-envs 64 --collect-only  # batches of 64

On a GPU the same command measures the GPU (pass nothing else; JAX picks the device).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import gorl_fm  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-name", default="FingerSpin")
    p.add_argument("--refine-episodes", type=int, default=None, help="default: the task's released value")
    p.add_argument("--refine-envs", type=int, default=None,
                   help="environments collecting at once (default: all the episodes in one rollout)")
    p.add_argument("--collect-only", action="store_true", help="time the collection, not the decoder training")
    p.add_argument("--refine-steps", type=int, default=50_000)
    p.add_argument("--refine-batch-size", type=int, default=8192)
    p.add_argument("--refine-draws", type=int, default=8)
    p.add_argument("--timed-steps", type=int, default=200, help="decoder steps actually run and timed")
    ns = p.parse_args(argv)

    args = gorl_fm.resolve(gorl_fm.Args(env_name=ns.env_name, refine_episodes=ns.refine_episodes,
                                        refine_envs=ns.refine_envs,
                                        refine_batch_size=ns.refine_batch_size, refine_draws=ns.refine_draws))
    timed = dataclasses.replace(args, refine_steps=ns.timed_steps)
    gorl_fm.validate(timed)
    env = common.make_env(args.env_name, args.impl)
    obs_size, action_size = env.observation_size, env.action_size
    key = jax.random.PRNGKey(0)
    state = gorl_fm.TrainState(
        params={"encoder": gorl_fm.init_encoder(key, obs_size, action_size, args)},
        norm=common.normalizer_init(obs_size),
        decoder=gorl_fm.init_decoder(key, obs_size, action_size, args),
        decoder_norm=common.normalizer_init(obs_size),
    )
    collect, fit = gorl_fm.make_refinement(env, timed)
    print(f"{args.env_name} on {jax.devices()[0].platform}: {args.refine_episodes} episodes from "
          f"{args.refine_envs or args.refine_episodes} envs at a time; decoder {args.decoder_hidden}, batch {args.refine_batch_size} x "
          f"{args.refine_draws} draws", flush=True)

    t0 = time.time()
    collect_c = collect.lower(state, key).compile()
    compile_collect = time.time() - t0
    t0 = time.time()
    dataset, _ = jax.block_until_ready(collect_c(state, key))
    collect_s = time.time() - t0
    transitions = args.refine_episodes * common.EPISODE_LENGTH
    print(f"collection: {collect_s:.1f} s for {transitions:,} steps ({transitions / collect_s:,.0f} steps/s), "
          f"compiled in {compile_collect:.1f} s", flush=True)
    if ns.collect_only:
        return

    t0 = time.time()
    fit_c = fit.lower(state.decoder, dataset, key).compile()
    compile_fit = time.time() - t0
    t0 = time.time()
    jax.block_until_ready(fit_c(state.decoder, dataset, key))
    fit_s = time.time() - t0
    per_step = fit_s / ns.timed_steps
    print(f"decoder training: {fit_s:.1f} s for {ns.timed_steps} steps ({1e3 * per_step:.1f} ms/step, "
          f"compiled in {compile_fit:.1f} s) -> {ns.refine_steps:,} steps: {per_step * ns.refine_steps / 60:.1f} min")
    print(f"one refinement at this size: about {(collect_s + per_step * ns.refine_steps) / 60:.1f} min "
          f"(collection + training, compilation excluded)")


if __name__ == "__main__":
    main()
