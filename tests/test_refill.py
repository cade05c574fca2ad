"""Slot refill (`sampling.decode.decode_refill`, `Sampler(refill=True)`): a pool of question blocks whose finished
blocks take the next waiting question. References: the records of the plain batch-by-batch loop (`decode`), equal
field by field (keys and steps are per question); for greedy decoding, whose question takes exactly as many loop
steps as it generates tokens, the loop steps of the pool equal the makespan of list scheduling (each block takes
the next question in input order as soon as it is free) computed here from the plain run's path lengths; and
`edu-prm sample`'s shards, equal byte for byte with refill on and off."""

import heapq

import numpy as np
import pytest
from test_sampling import (
    EOS,
    V,
    _scalar_prm,
    _tables,
    peaked_model,  # noqa: F401  (the fixture)
)
from tiny_policy import make_tiny_policy

from edu_prm_jax import cli, parallel
from edu_prm_jax.io.shards import read_shards
from edu_prm_jax.sampling.decode import DecodeParams, decode, decode_refill
from edu_prm_jax.sampling.engine import Sampler

QUESTIONS, BATCH, NEW = 11, 3, 310  # 4 batches, the last with a padding row; paths cross the 128 / 256 buckets


def _prompts(seed=0):
    """QUESTIONS token lists of 3..10 tokens: the batches' padded widths differ."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V - 1, n).tolist() for n in rng.integers(3, 11, QUESTIONS)]


def _batches(prompts):
    """(prompts [BATCH, width], prompt_lens, question_ids) per batch, padded as the engine pads them (widths
    5 or 10: a prompt bucket of 5)."""
    out = []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start:start + BATCH]
        arr = np.zeros((BATCH, -(-max(map(len, chunk)) // 5) * 5), np.int32)
        lens, ids = np.ones(BATCH, np.int32), np.full(BATCH, -1, np.int32)
        for i, toks in enumerate(chunk):
            arr[i, :len(toks)], lens[i], ids[i] = toks, len(toks), start + i
        out.append((arr, lens, ids))
    return out


CASES = {
    "edu": dict(mode="edu", num_leaves=4, tau=0.6),
    "ht": dict(mode="ht", num_leaves=3, temperature=0.2, seed=5),  # cool enough that some samples run long
    "p_edu": dict(mode="edu", num_leaves=4, tau=0.6, prune_below=0.45),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refilled_records_equal_the_batch_records(peaked_model, case):  # noqa: F811
    _, model = peaked_model
    p = DecodeParams(max_new_tokens=NEW, stop_at_answer=False, **CASES[case])
    prm = None
    if case == "p_edu":
        import jax

        prm = _scalar_prm(model, 0.0)
        prm.head.out.kernel[...] = 0.5 * jax.random.normal(jax.random.key(1), prm.head.out.kernel[...].shape)
    batches = _batches(_prompts())
    assert len({b[0].shape[1] for b in batches}) == 2  # the pool holds prompts of both widths
    plain = [decode(p, model, _tables(), *b, prm=prm) for b in batches]
    stats = {}
    refilled = list(decode_refill(p, model, _tables(), batches, prm=prm, stats=stats))
    m = p.num_leaves
    assert sorted((b, r) for b, r, _ in refilled) == [(q // BATCH, q % BATCH) for q in range(QUESTIONS)]
    for b, r, out in refilled:
        for key, got in out.items():
            per_question = key in ("pruned_tokens", "steps")
            want = plain[b][key][r:r + 1] if per_question else plain[b][key][r * m:(r + 1) * m]
            np.testing.assert_array_equal(got, want, err_msg=f"batch {b} row {r}: {key}")
    steps = np.concatenate([out["steps"][:BATCH] for out in plain])[:QUESTIONS]
    assert steps.max() == NEW and steps.min() < 20  # very different lengths: some run to max_new_tokens
    assert stats["loop_steps"] < sum(int(out["steps"].max()) for out in plain)
    assert stats["prefills"] == len(batches)
    if case == "p_edu":
        assert sum(int(out["pruned_tokens"].sum()) for out in plain) > 0


def _list_schedule_makespan(durations, blocks):
    """Loop steps of a pool of `blocks` that runs questions of these durations in order, each taking the first
    free block (all blocks free at step 0)."""
    free = [0] * blocks
    end = 0
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
        end = max(end, start + d)
    return end


def test_pending_questions_take_blocks_as_they_free_up(peaked_model):  # noqa: F811
    _, model = peaked_model
    p = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=NEW, stop_at_answer=False)
    batches = _batches(_prompts(1))
    plain = [decode(p, model, _tables(), *b) for b in batches]
    tokens = np.concatenate([out["gen_len"] for out in plain])[:QUESTIONS]  # a greedy path: one token a step
    stats = {}
    refilled = list(decode_refill(p, model, _tables(), batches, stats=stats))
    assert len(refilled) == QUESTIONS
    batch_steps = sum(int(out["gen_len"].max()) for out in plain)
    assert stats["loop_steps"] == _list_schedule_makespan(tokens.tolist(), BATCH) < batch_steps
    assert stats["segments"] >= QUESTIONS - BATCH  # a segment ends for every question that takes a block


class _IdTokenizer:
    """Token i is the text "t{i}" (EOS the last id): what `Sampler` asks of a tokenizer, for the tiny model."""

    vocab_size = V
    eos_token_ids = (EOS,)

    def decoded_token_texts(self):
        return [f"t{i}" for i in range(V)]

    def encode(self, text):
        return [int(t[1:]) for t in text.split()]

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


@pytest.mark.parametrize("case", ["edu", "ht"])
def test_sampler_trees_equal_with_and_without_refill(peaked_model, case):  # noqa: F811
    _, model = peaked_model
    p = DecodeParams(max_new_tokens=NEW, stop_at_answer=False, **CASES[case])
    prompts = _prompts(2)
    runs = {}
    for refill in (False, True):
        sampler = Sampler(model, _IdTokenizer(), p, batch_questions=BATCH, prompt_bucket=5, refill=refill)
        runs[refill] = (list(sampler.sample_trees(prompts, list(range(QUESTIONS)))), sampler.stats)
    (plain, plain_stats), (refilled, refill_stats) = runs[False], runs[True]
    assert refilled == plain  # Tree and Leaf are dataclasses: every field, floats exactly
    lengths = [len(leaf.token_ids) for tree in plain for leaf in tree.leaves]
    assert max(lengths) == NEW and min(lengths) < 20
    assert (plain_stats["refilled_runs"], refill_stats["refilled_runs"]) == (0, 1)
    assert refill_stats["loop_steps"] < plain_stats["loop_steps"]


@pytest.mark.needs_devices(2)
def test_a_multi_device_mesh_decodes_batch_by_batch(peaked_model):  # noqa: F811
    _, model = peaked_model
    p = DecodeParams(max_new_tokens=40, **CASES["edu"])
    prompts = _prompts(3)[:4]
    sampler = Sampler(model, _IdTokenizer(), p, mesh=parallel.make_mesh(data=2), batch_questions=2, prompt_bucket=10)
    sharded = list(sampler.sample_trees(prompts, list(range(4))))
    assert sampler.refill and sampler.stats["refilled_runs"] == 0 and sampler.stats["batches"] == 2
    one = list(Sampler(model, _IdTokenizer(), p, batch_questions=2, prompt_bucket=10).sample_trees(
        prompts, list(range(4))))
    for a, b in zip(sharded, one):
        assert [leaf.token_ids for leaf in a.leaves] == [leaf.token_ids for leaf in b.leaves]
        for x, y in zip(a.leaves, b.leaves):  # rows per device change float reduction order slightly
            np.testing.assert_allclose(x.entropies, y.entropies, atol=1e-5)


def test_sample_command_writes_the_same_trees_with_refill_on_and_off(tmp_path):
    policy = make_tiny_policy(tmp_path / "policy")
    shards = {}
    for refill in ("false", "true"):
        out = tmp_path / refill
        assert cli.main(["sample", f"--workdir={out}", f"--config.policy={policy}", "--config.questions=toy:test:10",
                         "--config.num_shards=2", "--config.batch_questions=3", "--config.refill=" + refill,
                         "--config.sampling.mode=ht", "--config.sampling.temperature=1.0",
                         "--config.sampling.max_new_tokens=200", "--config.sampling.num_leaves=4"]) == 0
        shards[refill] = {p.name: p.read_bytes() for p in sorted((out / "samples_ht").glob("trees-*.jsonl"))}
        lengths = [len(leaf["token_ids"]) for r in read_shards(out / "samples_ht", "trees") for leaf in r["leaves"]]
        assert max(lengths) == 200 and min(lengths) < 100  # a random policy's samples meet EOS at random
    assert len(shards["true"]) == 2 and shards["true"] == shards["false"]
