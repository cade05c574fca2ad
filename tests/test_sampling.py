"""The sampler against independent references: numpy float64 statistics, transformers' greedy `generate`,
teacher-forced transformers logits for every EDU leaf, and a chi-square test of temperature sampling."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import make_hf_qwen2, make_peaked_qwen2
from tree_reference import distinct_prefixes

from edu_prm_jax import parallel
from edu_prm_jax.models.checkpoints import load_hf_model
from edu_prm_jax.records.trees import step_spans
from edu_prm_jax.sampling.decode import STOP_NAMES, DecodeParams, Tables, decode
from edu_prm_jax.sampling.engine import distinct_tokens, slots_to_leaves
from edu_prm_jax.sampling.stats import entropy_and_logz, filter_logits, mask_logits
from edu_prm_jax.sampling.stopping import build_stop_tables

V = 48
EOS = V - 1
decode_module = importlib.import_module("edu_prm_jax.sampling.decode")  # the package re-exports a `decode` function


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    """A random tiny Qwen2 whose LM head is scaled up, so entropies range from near 0 to near log V."""
    d = tmp_path_factory.mktemp("peaked")
    hf = make_peaked_qwen2(d, vocab=V, seed=3)
    return hf, load_hf_model(d)


def _tables(symbols=(), eos=(EOS,)):
    stop = build_stop_tables([f"t{i}" for i in range(V)], V, list(eos))
    sym = np.zeros(V, bool)
    sym[list(symbols)] = True
    return Tables.build(stop, sym, V, V)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.as_tensor([ids])).logits[0].double().numpy()


def _np_entropy(z):
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1))).sum(-1)


def _np_logprobs(z, token_ids):
    """log softmax(z)[token] per position, at temperature 1, in float64."""
    m = z.max(-1, keepdims=True)
    log_z = np.log(np.exp(z - m).sum(-1)) + m[:, 0]
    return z[np.arange(len(token_ids)), token_ids] - log_z


def test_ht_records_temperature_one_logprobs_of_the_sampled_tokens(peaked_model):
    """Best-of-N's policy_logprob selector reads these: they must be the policy's own (T=1) log-probabilities
    of what was sampled, not those of the tempered sampling distribution."""
    hf, model = peaked_model
    prompts = np.random.default_rng(4).integers(0, V - 1, (2, 5)).astype(np.int32)
    p = DecodeParams(mode="ht", num_leaves=3, max_new_tokens=10, temperature=0.5, seed=7)
    out = decode(p, model, _tables(), prompts, np.array([5, 5]), np.arange(2))
    for q in range(2):
        for leaf in slots_to_leaves(out, q * 3, 3):
            z = _hf_logits(hf, prompts[q].tolist() + leaf.token_ids)[len(prompts[q]) - 1: -1]
            np.testing.assert_allclose(leaf.logprobs, _np_logprobs(z, leaf.token_ids), atol=2e-3)
            assert not np.allclose(leaf.logprobs, _np_logprobs(z / 0.5, leaf.token_ids), atol=2e-3)


def test_entropy_and_logprob_match_numpy_float64():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 1000)) * np.array([[0.01], [1], [5], [30], [200], [0]])
    logits[5, 17] = 80.0  # one token holds essentially all the mass
    h, log_z = entropy_and_logz(jnp.asarray(logits, jnp.float32))
    z64 = logits.astype(np.float64)
    ref_logz = np.log(np.exp(z64 - z64.max(-1, keepdims=True)).sum(-1)) + z64.max(-1)
    np.testing.assert_allclose(np.asarray(h), _np_entropy(z64), atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(log_z), ref_logz, rtol=1e-6)
    assert abs(float(h[0]) - np.log(1000)) < 1e-3  # nearly uniform
    # masked padding rows: exact zero probability, no NaN
    mask = jnp.arange(1000) < 700
    hm, _ = entropy_and_logz(mask_logits(jnp.asarray(logits, jnp.float32), mask))
    np.testing.assert_allclose(np.asarray(hm), _np_entropy(z64[:, :700]), atol=2e-4, rtol=1e-5)
    assert np.isfinite(np.asarray(hm)).all()


def test_greedy_equals_transformers_generate(peaked_model):
    hf, model = peaked_model
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, V - 1, n).tolist() for n in (5, 9, 3)]
    arr = np.zeros((3, 16), np.int32)
    for i, p in enumerate(prompts):
        arr[i, :len(p)] = p
    out = decode(DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=20), model, _tables(), arr,
                 np.array([len(p) for p in prompts]), np.arange(3))
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.as_tensor([p]), do_sample=False, max_new_tokens=20, eos_token_id=EOS,
                          pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        ref = ref[0, len(p):].tolist()
        ours = out["tokens"][i, : out["gen_len"][i]].tolist()
        assert ours == ref


@pytest.mark.parametrize("layout", ["heads_first", "positions_first"])
@pytest.mark.parametrize("mode", ["fixed", "budget"])
def test_edu_invariants_by_teacher_forcing(peaked_model, mode, layout, monkeypatch):
    """Every leaf's recorded entropies and logprobs are transformers' on its own tokens, in either KV cache
    layout (`Qwen2Config.cache_layout`; an H200 run found heads-first entropies off by up to 0.13 nats)."""
    hf, model = peaked_model
    monkeypatch.setattr(model, "cfg", model.cfg.replace(cache_layout=layout))
    tau, k, m = 0.6, 2, 8
    symbols = set(range(0, V, 5))
    prompts = np.random.default_rng(2).integers(0, V - 1, (2, 6)).astype(np.int32)
    p = DecodeParams(mode="edu", num_leaves=m, max_new_tokens=14, tau=tau, branch_k=k, threshold_mode=mode)
    out = decode(p, model, _tables(symbols), prompts, np.array([6, 6]), np.arange(2))
    n_anchor_total = 0
    for q in range(2):
        leaves = slots_to_leaves(out, q * m, m)
        assert 1 <= len(leaves) <= m
        children_at = {}
        for leaf in leaves:
            ids = prompts[q].tolist() + leaf.token_ids
            z = _hf_logits(hf, ids)[len(prompts[q]) - 1: -1]  # logits that produced each generated token
            ent = _np_entropy(z)
            np.testing.assert_allclose(leaf.entropies, ent, atol=2e-3)
            np.testing.assert_allclose(leaf.logprobs, _np_logprobs(z, leaf.token_ids), atol=2e-3)
            top = np.argsort(-z, axis=-1, kind="stable")[:, :k]
            qualifying = [t for t in range(len(leaf.token_ids)) if ent[t] > tau and top[t, 0] not in symbols]
            assert leaf.high_entropy == qualifying  # also right at a child's fork position
            for t, tok in enumerate(leaf.token_ids):
                if t in leaf.anchors:
                    assert ent[t] > tau and top[t, 0] not in symbols
                    assert tok in top[t]
                    children_at.setdefault((tuple(leaf.token_ids[:t]), t), set()).add(tok)
                else:
                    assert tok == top[t, 0], f"non-anchor token {t} is not the argmax"
                    qualifies = ent[t] > tau and top[t, 0] not in symbols
                    # a qualifying position that did not branch is only allowed once the slot budget is spent
                    assert not qualifies or len(leaves) == m or len(leaf.anchors) == p.max_anchors
        for leaf in leaves:  # dense step supervision relies on this: inside a step no path leaves the prefix
            def below(n, leaf=leaf, leaves=leaves):
                return {i for i, other in enumerate(leaves) if other.token_ids[:n] == leaf.token_ids[:n]}
            for start, end in step_spans(len(leaf.token_ids), leaf.anchors):
                assert all(below(j) == below(end) for j in range(start + 1, end + 1))
        for toks in children_at.values():
            n_anchor_total += 1
            if len(leaves) < m:
                assert len(toks) == k
        assert distinct_tokens(leaves) == distinct_prefixes(leaf.token_ids for leaf in leaves)
    assert n_anchor_total > 0, "the test model must branch somewhere"


def _last_fork_prefers_higher_entropy(out, q, m):
    """At the step of the last fork, did the forking slot have at least the entropy of the running slot that
    did not fork (both paths' own entropies at that position)?"""
    leaves = slots_to_leaves(out, q * m, m)
    child = max(leaves, key=lambda leaf: leaf.fork_pos)
    t = child.fork_pos
    parent = next(leaf for leaf in leaves if leaf.slot == child.parent_slot)
    other = next(leaf for leaf in leaves if leaf.slot not in (child.slot, parent.slot) and leaf.fork_pos < t)
    return parent.entropies[t] >= other.entropies[t]


def test_budget_mode_forks_highest_entropy_first(peaked_model):
    # 3 slots, tau = 0 (every position qualifies): the root forks at step 0, then two running paths compete for
    # the one free slot at step 1. Budget mode must give it to the higher-entropy path; fixed mode to the first.
    _, model = peaked_model
    n = 8
    prompts = np.random.default_rng(5).integers(0, V - 1, (n, 6)).astype(np.int32)
    verdicts = {}
    for mode in ("budget", "fixed"):
        p = DecodeParams(mode="edu", num_leaves=3, max_new_tokens=14, tau=0.0, branch_k=2, threshold_mode=mode)
        out = decode(p, model, _tables(), prompts, np.full(n, 6), np.arange(n))
        assert all(len(slots_to_leaves(out, q * 3, 3)) == 3 for q in range(n))  # the budget is spent
        verdicts[mode] = [_last_fork_prefers_higher_entropy(out, q, 3) for q in range(n)]
    assert all(verdicts["budget"])
    assert not all(verdicts["fixed"])  # the check can tell the two rules apart on these prompts


def test_stop_strings_end_generation_after_the_first_match(peaked_model):
    _, model = peaked_model
    prompts = np.random.default_rng(8).integers(0, V - 1, (2, 5)).astype(np.int32)
    p = DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=16)
    free = decode(p, model, _tables(), prompts, np.full(2, 5), np.arange(2))
    ref = [free["tokens"][i, : free["gen_len"][i]].tolist() for i in range(2)]
    start = next(j for j in range(2, len(ref[0]) - 1) if EOS not in ref[0][j:j + 2])
    stop = ref[0][start:start + 2]  # a two-token sequence the first question generates (EOS would stop it anyway)
    never = [EOS, EOS, EOS]  # a longer one that cannot occur (EOS ends generation first): exercises the padding
    stop_tables = build_stop_tables([f"t{i}" for i in range(V)], V, [EOS], [stop, never])
    out = decode(p, model, Tables.build(stop_tables, np.zeros(V, bool), V, V), prompts, np.full(2, 5), np.arange(2))
    for i in range(2):
        hits = [j + 2 for j in range(len(ref[i]) - 1) if ref[i][j:j + 2] == stop]
        want = ref[i][: hits[0]] if hits else ref[i]
        assert out["tokens"][i, : out["gen_len"][i]].tolist() == want
        assert (STOP_NAMES[int(out["stop"][i])] == "stop_string") == bool(hits)


def test_temperature_sampling_matches_softmax_chi_square(tmp_path):
    hf = make_hf_qwen2(tmp_path, vocab=12, hidden=16, heads=2, kv_heads=1, seed=4)
    with torch.no_grad():
        hf.lm_head.weight.mul_(6.0)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_hf_model(tmp_path)
    prompt = [3, 1, 4]
    temp = 0.7
    z = _hf_logits(hf, prompt)[-1]
    expected = np.exp((z - z.max()) / temp)
    expected /= expected.sum()
    stop = build_stop_tables([f"t{i}" for i in range(12)], 12, [])
    tables = Tables.build(stop, np.zeros(12, bool), 12, 12)
    q = 32
    p = DecodeParams(mode="ht", num_leaves=64, max_new_tokens=1, temperature=temp, seed=7)
    out = decode(p, model, tables, np.tile(np.array(prompt + [0], np.int32), (q, 1)), np.full(q, 3), np.arange(q))
    counts = np.bincount(out["tokens"][:, 0], minlength=12)
    n = counts.sum()
    keep = expected * n >= 5
    chi2 = (((counts[keep] - n * expected[keep]) ** 2) / (n * expected[keep])).sum()
    chi2 += ((counts[~keep].sum() - n * expected[~keep].sum()) ** 2) / max(n * expected[~keep].sum(), 1e-9)
    assert chi2 < 40.0, (counts, n * expected)  # df <= 11; 40 is far beyond the 99.99th percentile


def test_top_k_and_top_p_filters():
    z = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda f: np.asarray(f[0] > -1e29)  # noqa: E731
    assert kept(filter_logits(z, 1.0, 2, 1.0)).tolist() == [True, True, False, False]
    assert kept(filter_logits(z, 1.0, 0, 0.8)).tolist() == [True, True, False, False]
    assert kept(filter_logits(z, 1.0, 0, 0.81)).tolist() == [True, True, True, False]


@pytest.mark.needs_devices(8)
@pytest.mark.parametrize("mode", ["edu", "ht"])
def test_sharded_rollouts_equal_single_device(peaked_model, mode, monkeypatch):
    _, model = peaked_model
    prompts = np.random.default_rng(6).integers(0, V - 1, (8, 6)).astype(np.int32)
    p = DecodeParams(mode=mode, num_leaves=4, max_new_tokens=10, tau=0.6, temperature=1.0)
    args = (p, model, _tables(), prompts, np.full(8, 6), np.arange(8))
    single = decode(*args)
    mesh = parallel.make_mesh(data=8)
    traced_rows = []  # the question rows each traced rollout loop sees: 1 per device when the mesh is used
    loop = decode_module._decode_loop
    monkeypatch.setattr(decode_module, "_decode_loop", lambda *a: traced_rows.append(a[4].shape[0]) or loop(*a))
    decode_module._sharded_decode.cache_clear()  # trace again, so the loop is seen
    sharded = decode(*args, mesh=mesh)
    assert traced_rows == [1]
    for key in single:
        if single[key].dtype.kind == "f":  # batch size per device changes float reduction order slightly
            np.testing.assert_allclose(single[key], sharded[key], atol=1e-5, err_msg=key)
        else:  # tokens, tree structure and stop reasons must be identical
            np.testing.assert_array_equal(single[key], sharded[key], err_msg=key)
    assert len(jax.devices()) == 8


def _scalar_prm(model, bias):
    from edu_prm_jax.models.prm import PRM

    prm = PRM.from_policy(model, head="scalar", seed=0)
    prm.head.out.kernel[...] = jnp.zeros_like(prm.head.out.kernel[...])
    prm.head.out.bias[...] = jnp.full_like(prm.head.out.bias[...], bias)
    return prm


def test_p_edu_prunes_low_scoring_paths_and_keeps_one(peaked_model):
    _, model = peaked_model
    prompts = np.random.default_rng(8).integers(0, V - 1, (2, 6)).astype(np.int32)
    p = DecodeParams(mode="edu", num_leaves=6, max_new_tokens=14, tau=0.6, prune_below=0.2)
    args = (p, model, _tables(), prompts, np.array([6, 6]), np.arange(2))
    plain = decode(*args)
    confident = decode(*args, prm=_scalar_prm(model, 50.0))  # every step scores ~1: nothing is pruned
    for key in plain:
        np.testing.assert_array_equal(plain[key], confident[key], err_msg=key)
    doubtful = decode(*args, prm=_scalar_prm(model, -50.0))  # every step scores ~0
    assert doubtful["pruned_tokens"].sum() > 0
    for q in range(2):
        leaves = slots_to_leaves(doubtful, q * 6, 6)
        assert len(leaves) >= 1  # the last running path of a question is never pruned
        assert all(leaf.stop_reason != "pruned" for leaf in leaves)


def test_changing_seed_tau_or_temperature_compiles_nothing(peaked_model):
    import importlib

    decode_mod = importlib.import_module("edu_prm_jax.sampling.decode")  # the module, not the re-exported function

    _, model = peaked_model
    prompts = np.random.default_rng(9).integers(0, V - 1, (2, 6)).astype(np.int32)
    run = lambda **kw: decode(DecodeParams(mode="ht", num_leaves=2, max_new_tokens=6, **kw), model, _tables(),  # noqa
                              prompts, np.array([6, 3]), np.arange(2))
    first = run(seed=0, tau=1.0, temperature=0.7)
    size = decode_mod._decode_jit._cache_size()
    second = run(seed=1, tau=0.5, temperature=1.3)
    assert decode_mod._decode_jit._cache_size() == size
    assert not np.array_equal(first["tokens"], second["tokens"])  # the new seed and temperature took effect


def test_padding_rows_do_not_run(peaked_model):
    _, model = peaked_model
    prompts = np.random.default_rng(10).integers(0, V - 1, (3, 6)).astype(np.int32)
    out = decode(DecodeParams(mode="greedy", num_leaves=1, max_new_tokens=8), model, _tables(), prompts,
                 np.array([6, 6, 1]), np.array([0, 1, -1]))
    assert out["gen_len"][2] == 0 and not out["used"][2]
