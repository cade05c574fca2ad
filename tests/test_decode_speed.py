"""Cache-length buckets (`sampling.decode.cache_lengths`): the bucketed loop attends over a cache that grows by
phases, and its records equal the single-length loop's (`cache_buckets=False`, the loop before buckets) bit for
bit: tokens, entropies, logprobs, anchors, parents, stops, for greedy / HT / EDU / P-EDU, a scanned model's
stacked cache and MCTS-EDU's stop at an anchor, over runs that cross every bucket. A wrong transition (a
position lost or left stale when the cache is padded, a loop that ends early or a step counted twice) changes
the tokens at once. The tiny models here get the same float kernels at every cache length on XLA:CPU (checked:
a length-dependent kernel would fail these tests, not pass them)."""

import importlib

import jax
import numpy as np
import pytest
from flax import nnx
from hf_reference import make_peaked_qwen2
from test_sampling import (
    EOS,
    V,
    _scalar_prm,
    _tables,
    peaked_model,  # noqa: F401  (the fixture)
)

from edu_prm_jax import parallel
from edu_prm_jax.models.checkpoints import load_hf_model
from edu_prm_jax.sampling.decode import DecodeParams, ExpansionParams, cache_lengths, decode, decode_fn, split_params

decode_module = importlib.import_module("edu_prm_jax.sampling.decode")
WIDTH, NEW = 10, 310  # prompts padded to 10: buckets of 128 and 256 slots, then 320 = 10 + 310
QUESTIONS = 8


def test_cache_lengths_hand_worked():
    assert cache_lengths(32, 1024) == (128, 256, 512, 1056)  # 1024 > 0.8 x 1056: the last bucket is the final one
    assert cache_lengths(32, 96) == (128,)  # short runs keep the one length they had
    assert cache_lengths(200, 200) == (256, 400)  # 128 holds no new token after a 200-token prompt
    assert cache_lengths(10, 310) == (128, 256, 320)
    assert cache_lengths(10, 300) == (128, 310)  # 256 > 0.8 x 310
    assert cache_lengths(32, 1024, buckets=False) == (1056,)


def _prompts(seed=0):
    """QUESTIONS prompts of 3..WIDTH tokens, right-padded to WIDTH."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, WIDTH + 1, QUESTIONS)
    lens[0] = WIDTH
    prompts = np.zeros((QUESTIONS, WIDTH), np.int32)
    for i, n in enumerate(lens):
        prompts[i, :n] = rng.integers(0, V - 1, n)
    return prompts, lens


def _assert_same_records(bucketed, single):
    assert bucketed.keys() == single.keys()
    for key in single:
        np.testing.assert_array_equal(bucketed[key], single[key], err_msg=key)


CASES = {
    "greedy": dict(mode="greedy", num_leaves=1),
    "ht": dict(mode="ht", num_leaves=3, temperature=0.2, seed=5),  # cool enough that some samples run long
    "edu": dict(mode="edu", num_leaves=4, tau=0.6),
    "edu_budget": dict(mode="edu", num_leaves=4, tau=0.6, threshold_mode="budget", edu_greedy=False,
                       temperature=0.2, seed=5),
}


@pytest.mark.parametrize("case", [*CASES, "p_edu"])
def test_bucketed_records_equal_the_single_length_loop(peaked_model, case):  # noqa: F811
    _, model = peaked_model
    prompts, lens = _prompts()
    kw = CASES["edu"] if case == "p_edu" else CASES[case]
    p = DecodeParams(max_new_tokens=NEW, stop_at_answer=False, prune_below=0.45, **kw)
    prm = _scalar_prm(model, 0.0) if case == "p_edu" else None
    if prm is not None:  # a PRM that scores paths differently: some are pruned
        prm.head.out.kernel[...] = 0.5 * jax.random.normal(jax.random.key(1), prm.head.out.kernel[...].shape)
    args = (p, model, _tables(), prompts, lens, np.arange(QUESTIONS))
    bucketed = decode(*args, prm=prm, cache_buckets=True)  # asked for: off by default off a CPU
    single = decode(*args, prm=prm, cache_buckets=False)
    _assert_same_records(bucketed, single)
    used = bucketed["used"]
    assert bucketed["gen_len"][used].max() > 256 - WIDTH  # some path wrote into the last bucket
    assert bucketed["gen_len"][used].min() < 128 - WIDTH  # and some stopped in the first
    if case.startswith("edu") or case == "p_edu":
        assert (bucketed["parent"] >= 0).any()  # forks copied cache rows inside some bucket
    if case == "p_edu":
        assert bucketed["pruned_tokens"].sum() > 0


def test_bucket_transitions_in_a_stacked_cache_with_a_prm(tmp_path):
    """A scanned model keeps every layer's cache in one stacked array; the PRM's cache grows alongside."""
    make_peaked_qwen2(tmp_path, vocab=V, seed=3)
    model = load_hf_model(tmp_path, scan_layers=True)
    prm = _scalar_prm(model, 0.0)
    prm.head.out.kernel[...] = 0.5 * jax.random.normal(jax.random.key(1), prm.head.out.kernel[...].shape)
    assert model.stacked and prm.backbone.stacked
    prompts, lens = _prompts(1)
    p = DecodeParams(mode="edu", num_leaves=4, max_new_tokens=NEW, tau=0.6, stop_at_answer=False, prune_below=0.45)
    args = (p, model, _tables(), prompts, lens, np.arange(QUESTIONS))
    bucketed = decode(*args, prm=prm, cache_buckets=True)  # asked for: off by default off a CPU
    _assert_same_records(bucketed, decode(*args, prm=prm, cache_buckets=False))
    assert bucketed["gen_len"].max() > 256 - WIDTH


def test_stop_at_anchor_expansions_across_buckets(peaked_model):  # noqa: F811
    """MCTS-EDU expansions (`ExpansionParams`) stop at their next anchor; with most tokens in the symbol set
    anchors are rare, so some expansions run on into the later buckets."""
    _, model = peaked_model
    prompts, lens = _prompts(2)
    p = ExpansionParams(mode="edu", num_leaves=2, branch_k=2, max_anchors=1, max_new_tokens=NEW, tau=0.6,
                        stop_at_answer=False)
    args = (p, model, _tables(symbols=range(8, V)), prompts, lens, np.arange(QUESTIONS))
    bucketed = decode(*args, cache_buckets=True)
    _assert_same_records(bucketed, decode(*args, cache_buckets=False))
    stops = bucketed["stop"][bucketed["used"]]
    assert (stops == decode_module.STOP_ANCHOR).any()
    assert bucketed["gen_len"].max() > 128 - WIDTH


def test_each_while_loop_carries_its_bucket_length(peaked_model):  # noqa: F811
    """The program is one `while` per bucket, each carrying caches of that bucket's static length (no longer)."""
    _, model = peaked_model
    graphdef, state = nnx.split(model)
    p, knobs = split_params(DecodeParams(mode="edu", num_leaves=2, max_new_tokens=NEW))
    prompts, lens = _prompts()
    jaxpr = jax.make_jaxpr(decode_fn(p, graphdef, cache_buckets=True))(knobs, state, None, _tables(), prompts, lens,
                                                   np.arange(QUESTIONS))
    loops = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "while"]
    lengths = cache_lengths(WIDTH, NEW)
    assert len(loops) == len(lengths) == 3
    for loop, length in zip(loops, lengths):
        dims = {d for v in loop.invars if v.aval.ndim == 4 and v.aval.shape[0] == 2 * QUESTIONS for d in v.aval.shape}
        assert length in dims, (length, dims)
        assert not dims & (set(lengths) - {length}), (length, dims)


def test_a_short_run_keeps_one_loop_and_its_length(peaked_model):  # noqa: F811
    _, model = peaked_model
    graphdef, state = nnx.split(model)
    p, knobs = split_params(DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=20))
    prompts, lens = _prompts()
    jaxpr = jax.make_jaxpr(decode_fn(p, graphdef, cache_buckets=True))(knobs, state, None, _tables(), prompts, lens,
                                                   np.arange(QUESTIONS))
    assert [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns].count("while") == 1


@pytest.mark.needs_devices(8)
def test_sharded_bucketed_rollouts_equal_one_device(peaked_model):  # noqa: F811
    """Under the rollout `shard_map` each device runs its own buckets over its own questions."""
    _, model = peaked_model
    prompts, lens = _prompts(3)
    p = DecodeParams(mode="edu", num_leaves=4, max_new_tokens=NEW, tau=0.6, stop_at_answer=False)
    args = (p, model, _tables(eos=(EOS, 5)), prompts, lens, np.arange(QUESTIONS))
    single = decode(*args, cache_buckets=True)
    sharded = decode(*args, mesh=parallel.make_mesh(data=8), cache_buckets=True)
    assert single["gen_len"].max() > 256 - WIDTH
    for key in single:
        if single[key].dtype.kind == "f":  # rows per device change float reduction order slightly
            np.testing.assert_allclose(single[key], sharded[key], atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(single[key], sharded[key], err_msg=key)


def test_inconsistent_prompt_lengths_are_refused(peaked_model):  # noqa: F811
    _, model = peaked_model
    prompts, lens = _prompts()
    lens[2] = WIDTH + 1
    with pytest.raises(ValueError, match="prompt_lens: each must be in 1..10"):
        decode(DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=4), model, _tables(), prompts, lens,
               np.arange(QUESTIONS))
