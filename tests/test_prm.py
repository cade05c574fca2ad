"""The PRM (heads, loss, HF IO) against torch references, and the record -> batch pipeline's failure modes."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.models import checkpoints
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.prm import PRM, load_prm, masked_bce, prm_loss, save_prm
from edu_prm_jax.models.qwen2 import Qwen2
from edu_prm_jax.scoring import examples as prm_data
from edu_prm_jax.scoring.examples import PRMDataError, PRMExample, build_example, build_examples
from edu_prm_jax.training.packing import pack_examples
from edu_prm_jax.training.prm_train import make_eval_fn

VOCAB, HIDDEN, SEP = 61, 32, 60


# A test helper (the package streams batches through training.prm_train.PackedStream): shuffle and pack
# examples into fixed-shape batches.
def make_prm_batches(
    examples: list[PRMExample], seq_len: int, rows: int, seed: int = 0, pad_id: int = 0
) -> list[dict[str, np.ndarray]]:
    """Shuffle (by `seed`), pack into [rows, seq_len] batches: {tokens, positions, segment_ids, step_end_mask,
    loss_mask, targets}. The last batch is filled with empty rows (segment 0, no step ends) so every batch has
    one shape. An example longer than seq_len is an error naming its record id."""
    if not examples:
        raise PRMDataError("make_prm_batches: no examples")
    for ex in examples:
        if len(ex.tokens) > seq_len:
            raise PRMDataError(
                f"record {ex.record_id!r}: {len(ex.tokens)} tokens do not fit seq_len={seq_len}"
            )
    order = np.random.default_rng(seed).permutation(len(examples))
    packed = pack_examples(
        [
            {
                "tokens": examples[i].tokens,
                "step_end_mask": examples[i].step_end_mask.astype(np.int32),
                "loss_mask": examples[i].loss_mask.astype(np.int32),
                "targets": examples[i].targets,
            }
            for i in order
        ],
        seq_len,
        pad_id,
    )
    packed["step_end_mask"] = packed["step_end_mask"].astype(bool)
    packed["loss_mask"] = packed["loss_mask"].astype(bool)
    packed["targets"] = packed["targets"].astype(np.float32)
    n = len(packed["tokens"])
    total = -(-n // rows) * rows
    if total > n:
        for k, v in packed.items():
            fill = pad_id if k == "tokens" else 0
            packed[k] = np.concatenate([v, np.full((total - n, seq_len), fill, v.dtype)])
    return [{k: v[b : b + rows] for k, v in packed.items()} for b in range(0, total, rows)]



class IntTokenizer:
    """Whitespace-separated integers are the ids; '<extra_0>' is the separator (or two ids, for errors)."""

    def __init__(self, sep_ids=(SEP,)):
        self.sep_ids = list(sep_ids)

    def encode(self, text):
        return self.sep_ids if text == "<extra_0>" else [int(t) for t in text.split()]


def tiny_cfg(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        torch_dtype="float32",
    )
    return Qwen2Config(**(base | kw))


def jit_logits(prm, tokens, positions=None, segment_ids=None):
    """prm(tokens, ...) through one jitted function: op-by-op dispatch on 8 simulated devices is slow."""
    tokens = jnp.asarray(tokens)
    positions = (
        jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
    )
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    graphdef, state = nnx.split(prm)
    return np.asarray(_jit_forward(graphdef, state, tokens, jnp.asarray(positions), jnp.asarray(segment_ids)))


def alone_logits(prm, tokens, width):
    """Logits of one example by itself, right-padded to `width` so every call reuses one compilation."""
    n = len(tokens)
    padded = np.zeros((1, width), np.int32)
    padded[0, :n] = tokens
    segs = (np.arange(width) < n).astype(np.int32)[None]
    return jit_logits(prm, padded, segment_ids=jnp.asarray(segs))[0, :n]


def _merged_forward(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids)


_jit_forward = jax.jit(_merged_forward, static_argnums=0)


def np_bce(z, t, m, w):
    z, t, m = (np.asarray(a, np.float64) for a in (z, t, m))
    log_p = -np.logaddexp(0.0, -z)  # log sigmoid(z)
    log_q = -np.logaddexp(0.0, z)  # log sigmoid(-z) = log(1 - sigmoid(z))
    per = -(w * t * log_p + (1 - t) * log_q)
    return (per * m).sum() / max(m.sum(), 1.0)


# -------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("pos_weight", [1.0, 2.5])
def test_masked_bce_matches_numpy_float64(pos_weight):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, size=(3, 40)).astype(np.float32)
    z[0, :4] = [60.0, -60.0, 60.0, -60.0]  # saturated logits must stay finite and exact
    t = rng.uniform(0, 1, size=(3, 40)).astype(np.float32)
    t[:, ::3] = np.round(t[:, ::3])  # a mix of hard and soft targets, like the paper's data
    t[0, :4] = [1.0, 1.0, 0.0, 0.0]
    m = rng.uniform(size=(3, 40)) < 0.4
    m[0, :4] = True
    loss, metrics = masked_bce(jnp.asarray(z), jnp.asarray(t), jnp.asarray(m), pos_weight)
    np.testing.assert_allclose(float(loss), np_bce(z, t, m, pos_weight), rtol=1e-5)
    acc = (((1 / (1 + np.exp(-z.astype(np.float64)))) >= 0.5) == (t >= 0.5))[m].mean()
    assert float(metrics["step_accuracy"]) == pytest.approx(acc, abs=1e-6)
    assert float(metrics["num_steps"]) == m.sum()
    assert float(metrics["num_positive"]) == (t[m] >= 0.5).sum()
    # one saturated wrong step costs |z| (=60) per step, not inf/nan
    one = masked_bce(jnp.asarray([[-60.0]]), jnp.asarray([[1.0]]), jnp.asarray([[True]]))[0]
    assert float(one) == pytest.approx(60.0, rel=1e-6)
    empty = masked_bce(jnp.asarray(z), jnp.asarray(t), jnp.zeros_like(jnp.asarray(m)))[0]
    assert float(empty) == 0.0


def test_loss_ignores_non_step_positions():
    """Changing targets off the mask must not change the loss; changing one on it must."""
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9)), jnp.float32)
    m = jnp.asarray(np.arange(18).reshape(2, 9) % 4 == 3)
    t = jnp.full((2, 9), 0.3)
    base = float(masked_bce(z, t, m)[0])
    assert float(masked_bce(z, jnp.where(m, t, 0.9), m)[0]) == base
    assert float(masked_bce(z, jnp.where(m, 0.9, t), m)[0]) != base


# ---------------------------------------------------------------------------------------- torch reference


def _torch_prm(tmp_path, head):
    """A random float32 transformers Qwen2Model + an independent torch head, in the public PRM layout."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    # the same sizes as tiny_cfg(), written by its own HF export; the model code is transformers'
    hcfg = transformers.Qwen2Config(**(tiny_cfg().to_hf_dict() | {"max_position_embeddings": 128}),
                                    attn_implementation="eager")
    body = transformers.Qwen2Model(hcfg).to(torch.float32).eval()
    if head == "qwen_math":
        score = torch.nn.Sequential(
            torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 2)
        )
    else:
        score = torch.nn.Linear(HIDDEN, 1)
    with torch.no_grad():
        for name, p in list(body.named_parameters()) + list(score.named_parameters()):
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    tensors = {f"model.{k}": v.contiguous() for k, v in body.state_dict().items()}
    tensors |= {f"score.{k}": v.contiguous() for k, v in score.state_dict().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hcfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    if head == "qwen_math":
        raw["architectures"] = ["Qwen2ForProcessRewardModel"]
    else:
        raw |= {"architectures": ["Qwen2ForScalarProcessRewardModel"], "edu_prm_head": "scalar"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return body, score


def _torch_step_probs(body, score, head, tokens, ends):
    import torch

    with torch.no_grad():
        hidden = body(torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).last_hidden_state
        out = score(hidden)[0]
        probs = torch.softmax(out, -1)[:, 1] if head == "qwen_math" else torch.sigmoid(out[:, 0])
    return probs.numpy()[ends]


ITEMS = [
    ("1 2 3 4", ["5 6 7", "8 9", "10 11 12 13"]),
    ("14 15", ["16", "17 18 19 20 21", "22 23", "24"]),
    ("25 26 27 28 29 30", ["31 32"]),
]


@pytest.mark.parametrize("head", ["qwen_math", "scalar"])
def test_step_scores_match_torch_reference_and_export_roundtrip(tmp_path, head):
    import torch
    from safetensors.torch import load_file

    (tmp_path / "ref").mkdir()
    body, score = _torch_prm(tmp_path / "ref", head)
    prm = load_prm(tmp_path / "ref", separator_id=SEP)
    assert prm.head_spec.name == head
    tok = IntTokenizer()
    ours = prm_data.score_solutions(prm, tok, ITEMS)
    refs = []
    for (prompt, steps), got in zip(ITEMS, ours):
        ex = prm_data.encode_solution(tok, prompt, steps, head=head, separator_id=SEP)
        assert len(got) == len(steps)
        if head == "qwen_math":
            assert (ex.tokens[ex.step_ends] == SEP).all()
        ref = _torch_step_probs(body, score, head, ex.tokens, ex.step_ends)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
        refs.append(ref)

    save_prm(prm, tmp_path / "export", dtype="float32")
    raw = json.loads((tmp_path / "export" / "config.json").read_text())
    assert raw["edu_prm_head"] == head and raw["edu_prm_separator_id"] == SEP
    if head == "qwen_math":
        assert raw["architectures"] == ["Qwen2ForProcessRewardModel"]
    # reload in torch, by the public names only
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert not any(k.startswith("lm_head") for k in tensors)
    body2 = type(body)(body.config).to(torch.float32).eval()
    if head == "qwen_math":
        score2 = torch.nn.Sequential(
            torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 2)
        )
    else:
        score2 = torch.nn.Linear(HIDDEN, 1)
    body2.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    score2.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("score.")}, strict=True)
    for (prompt, steps), ref in zip(ITEMS, refs):
        ex = prm_data.encode_solution(tok, prompt, steps, head=head, separator_id=SEP)
        np.testing.assert_allclose(
            _torch_step_probs(body2, score2, head, ex.tokens, ex.step_ends), ref, atol=1e-6
        )
    # and back into JAX: bit-identical parameters give identical scores
    again = load_prm(tmp_path / "export")
    assert again.separator_id == SEP
    assert prm_data.score_solutions(again, tok, ITEMS) == ours


def test_load_rejects_mixed_or_missing_head(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    _torch_prm(tmp_path, "qwen_math")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["score.2.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"needs tensor\(s\) \['score.2.bias'\]"):
        load_prm(tmp_path)
    tensors["score.2.bias"] = torch.zeros(2)
    tensors["score.weight"] = torch.zeros(1, HIDDEN)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"head 'qwen_math' expected, but found \['score.weight'\]"):
        load_prm(tmp_path)


def test_from_policy_shares_backbone():
    policy = Qwen2(tiny_cfg(), nnx.Rngs(3))
    prm = PRM.from_policy(policy, "qwen_math", seed=1, separator_id=SEP)
    policy_params = checkpoints.flat_params(nnx.state(policy))
    shared = checkpoints.flat_params(nnx.state(prm.backbone))
    assert set(policy_params) - set(shared) == {"lm_head"}
    assert all(shared[k][...] is policy_params[k][...] for k in shared)  # the same arrays, not copies
    assert prm.backbone.lm_head is None
    axes = prm.head.hidden.kernel.get_metadata()["out_sharding"]
    assert axes == ("embed", "mlp")


@pytest.mark.needs_devices(8)
def test_from_policy_shards_over_a_mesh():
    """Built onto a data x fsdp x tensor = 2 x 2 x 2 mesh: the head's kernel split by the rules, the same logits."""
    policy = Qwen2(tiny_cfg(), nnx.Rngs(3))
    prm = PRM.from_policy(policy, "qwen_math", seed=1, separator_id=SEP)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 11)))
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = PRM.from_policy(policy, "qwen_math", seed=1, separator_id=SEP, mesh=mesh)
    assert sharded.head.hidden.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(jit_logits(sharded, tokens), jit_logits(prm, tokens), atol=1e-5)


# ------------------------------------------------------------------------------------------- records


def _record(**kw):
    return {
        "id": "rec-7",
        "prompt_ids": [1, 2, 3],
        "step_ids": [[4, 5], [6], [7, 8, 9]],
        "labels": [1.0, 0.5, 0.0],
    } | kw


def test_build_example_marks_spans_both_heads():
    ex = build_example(_record(), head="scalar")
    assert ex.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert ex.step_ends.tolist() == [4, 5, 8]
    assert ex.targets[ex.step_ends].tolist() == [1.0, 0.5, 0.0] and ex.targets.sum() == 1.5
    ex = build_example(_record(), head="qwen_math", separator_id=SEP)
    assert ex.tokens.tolist() == [1, 2, 3, 4, 5, SEP, 6, SEP, 7, 8, 9, SEP]
    assert ex.step_ends.tolist() == [5, 7, 11]


def test_step_token_supervision_labels_every_token_of_a_step():
    ex = build_example(_record(), head="scalar", supervise="step_tokens")
    assert ex.targets.tolist() == [0, 0, 0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    assert ex.loss_mask.tolist() == [False] * 3 + [True] * 6 and ex.step_ends.tolist() == [4, 5, 8]
    ex = build_example(_record(), head="qwen_math", separator_id=SEP, supervise="step_tokens")
    assert ex.targets.tolist() == [0, 0, 0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert ex.loss_mask.sum() == 9
    assert build_example(_record(), head="scalar").loss_mask.tolist() == [i in (4, 5, 8) for i in range(9)]
    batch = make_prm_batches([build_example(_record(), head="scalar", supervise="step_tokens")], 16, 1)[0]
    assert batch["loss_mask"][0].tolist() == [False] * 3 + [True] * 6 + [False] * 7
    with pytest.raises(ValueError, match="supervise"):
        build_example(_record(), head="scalar", supervise="all")


BAD = [
    (dict(labels=[1.0, 0.0]), "labels"),
    (dict(labels=[1.0, 1.2, 0.0]), r"labels\[1\]"),
    (dict(labels=[1.0, -0.1, 0.0]), r"labels\[1\]"),
    (dict(labels=[1.0, float("nan"), 0.0]), r"labels\[1\]"),
    (dict(labels=[1.0, "1", 0.0]), r"labels\[1\]"),
    (dict(step_ids=[[4, 5], [], [7]]), r"step_ids\[1\]"),
    (dict(step_ids=[[4, 5], [6, SEP], [7]]), r"step_ids\[1\].*separator"),
    (dict(step_ids=[[4, 5], [6], [7, VOCAB + 5]]), r"step_ids\[2\]\[1\]"),
    (dict(step_ids=[[4, 5], [6.0], [7]]), r"step_ids\[1\]\[0\]"),
    (dict(step_ids=[]), "step_ids"),
]


@pytest.mark.parametrize("change,field", BAD)
def test_malformed_records_raise_with_id_and_field(change, field):
    with pytest.raises(PRMDataError, match=rf"rec-7.*{field}"):
        build_example(_record(**change), head="qwen_math", separator_id=SEP, vocab_size=VOCAB)


def test_missing_field_and_index_as_id():
    rec = _record()
    del rec["id"], rec["labels"]
    with pytest.raises(PRMDataError, match=r"record 1: missing field 'labels'"):
        build_examples([_record(id=None), rec], head="scalar")


def test_truncation_is_an_error_or_a_counted_drop():
    with pytest.raises(PRMDataError, match=r"rec-7.*max_len=10.*1 of 3 step end"):
        build_example(_record(), head="qwen_math", separator_id=SEP, max_len=10)
    exact_fit = build_example(_record(), head="qwen_math", separator_id=SEP, max_len=12)
    assert exact_fit is not None and len(exact_fit.tokens) == 12 and exact_fit.step_ends.tolist() == [5, 7, 11]
    exs, stats = build_examples(
        [_record(), _record(id="short", step_ids=[[4], [5], [6]])],
        head="qwen_math",
        separator_id=SEP,
        max_len=10,
        on_overflow="drop",
    )
    assert [e.record_id for e in exs] == ["short"] and stats.dropped_too_long == 1 and stats.steps == 3


def test_separator_must_be_one_token():
    assert prm_data.separator_ids(IntTokenizer()) == SEP
    with pytest.raises(PRMDataError, match="<extra_0>.*2 tokens"):
        prm_data.separator_ids(IntTokenizer(sep_ids=(12, 13)))


def test_qwen_math_needs_a_separator():
    prm = PRM(tiny_cfg(), "qwen_math", rngs=nnx.Rngs(0))
    with pytest.raises(PRMDataError, match="separator"):
        prm_data.score_solutions(prm, IntTokenizer(), ITEMS)


# ------------------------------------------------------------------------------------------- packing


def test_packing_does_not_change_step_logits():
    rng = np.random.default_rng(5)
    prm = PRM(tiny_cfg(), "qwen_math", rngs=nnx.Rngs(2), separator_id=SEP)
    records = [
        {
            "id": f"r{i}",
            "prompt_ids": rng.integers(1, 59, rng.integers(1, 6)).tolist(),
            "step_ids": [rng.integers(1, 59, rng.integers(1, 5)).tolist() for _ in range(rng.integers(1, 5))],
            "labels": rng.uniform(size=8).round(2).tolist(),
        }
        for i in range(12)
    ]
    for r in records:
        r["labels"] = r["labels"][: len(r["step_ids"])]
    examples, stats = build_examples(records, head="qwen_math", separator_id=SEP)
    batches = make_prm_batches(examples, seq_len=40, rows=2, seed=0)
    assert {b["tokens"].shape for b in batches} == {(2, 40)}
    assert sum(int(b["step_end_mask"].sum()) for b in batches) == stats.steps
    by_tokens = {tuple(e.tokens.tolist()): e for e in examples}
    seen = 0
    for b in batches:
        packed = jit_logits(prm, b["tokens"], jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))
        for r in range(2):
            for seg in set(b["segment_ids"][r].tolist()) - {0}:
                cols = np.flatnonzero(b["segment_ids"][r] == seg)
                ex = by_tokens[tuple(b["tokens"][r, cols].tolist())]
                alone = alone_logits(prm, ex.tokens, 40)
                np.testing.assert_allclose(
                    packed[r, cols][ex.step_end_mask], alone[ex.step_end_mask], atol=1e-5
                )
                np.testing.assert_array_equal(b["targets"][r, cols], ex.targets)
                np.testing.assert_array_equal(b["step_end_mask"][r, cols], ex.step_end_mask)
                seen += 1
    assert seen == len(examples)


def test_score_solutions_batch_invariant_and_compiles_per_bucket():
    prm = PRM(tiny_cfg(), "scalar", rngs=nnx.Rngs(4))
    tok = IntTokenizer()
    together = prm_data.score_solutions(prm, tok, ITEMS, batch_size=2)
    for item, got in zip(ITEMS, together):
        ex = prm_data.encode_solution(tok, *item, head="scalar")
        alone = jax.nn.sigmoid(alone_logits(prm, ex.tokens, 32))
        np.testing.assert_allclose(got, np.asarray(alone)[ex.step_ends], atol=1e-5)
    before = prm_data._step_logits._cache_size()
    prm_data.score_solutions(prm, tok, [("1 2 3", ["4"] * k) for k in range(1, 20)], batch_size=2)
    assert prm_data._step_logits._cache_size() == before  # all lengths < 64: the same bucket, no retrace


# ------------------------------------------------------------------------------------------- learning


def _synthetic(rng, n, bad=5):
    """Steps of 1-4 tokens; a step is wrong (label 0) iff it contains token `bad`."""
    records = []
    for i in range(n):
        steps = []
        for _ in range(rng.integers(2, 6)):
            step = rng.integers(1, 40, rng.integers(1, 5))
            step[step == bad] = 6
            if rng.uniform() < 0.4:
                step[rng.integers(len(step))] = bad
            steps.append(step.tolist())
        records.append(
            {
                "id": i,
                "prompt_ids": rng.integers(1, 40, 3).tolist(),
                "step_ids": steps,
                "labels": [0.0 if bad in s else 1.0 for s in steps],
            }
        )
    return records


def _auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    return ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )


def test_tiny_prm_learns_step_errors():
    start = time.time()
    rng = np.random.default_rng(0)
    train, _ = build_examples(_synthetic(rng, 500), head="qwen_math", separator_id=SEP)
    held, _ = build_examples(_synthetic(rng, 100), head="qwen_math", separator_id=SEP)
    batches = make_prm_batches(train, seq_len=64, rows=8, seed=0)
    prm = PRM(tiny_cfg(), "qwen_math", rngs=nnx.Rngs(0), separator_id=SEP)
    graphdef, state = nnx.split(prm)
    tx = optax.adamw(3e-3, weight_decay=0.01)
    opt_state = tx.init(state)

    @jax.jit
    def train_step(state, opt_state, batch):
        grad_fn = jax.value_and_grad(lambda s: prm_loss(nnx.merge(graphdef, s), batch), has_aux=True)
        (loss, metrics), grads = grad_fn(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, metrics

    for step in range(300):
        state, opt_state, metrics = train_step(state, opt_state, batches[step % len(batches)])
    nnx.update(prm, state)
    scores, labels = [], []
    for b in make_prm_batches(held, seq_len=64, rows=8, seed=1):
        probs = np.asarray(
            jax.nn.sigmoid(
                jit_logits(prm, b["tokens"], jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))
            )
        )
        scores.append(probs[b["step_end_mask"]])
        labels.append(b["targets"][b["step_end_mask"]])
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    auroc = _auroc(scores, labels)
    assert 0.2 < labels.mean() < 0.8
    print(f"held-out step AUROC {auroc:.4f}, {time.time() - start:.1f}s")
    assert auroc > 0.9, f"held-out step AUROC {auroc:.3f} (final train loss {float(metrics['loss']):.3f})"
    assert time.time() - start < 60


def test_remat_gives_the_same_gradients_with_less_activation_memory():
    cfg = tiny_cfg().replace(num_hidden_layers=6)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 40, (4, 64)), jnp.int32)
    batch = {"tokens": tokens, "targets": jnp.ones(tokens.shape) * 0.7, "step_end_mask": tokens % 3 == 0}
    grads, temp = {}, {}
    for mode in ("none", "full"):
        graphdef, state = nnx.split(PRM(cfg.replace(remat=mode), "scalar", rngs=nnx.Rngs(0)))
        grad_fn = jax.jit(jax.grad(lambda s, g=graphdef: prm_loss(nnx.merge(g, s), batch)[0]))
        grads[mode] = grad_fn(state)
        temp[mode] = grad_fn.lower(state).compile().memory_analysis().temp_size_in_bytes
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["full"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert temp["full"] < temp["none"]
    with pytest.raises(Exception, match="remat"):
        cfg.replace(remat="sometimes")


def test_held_out_eval_matches_numpy_on_plain_forwards():
    prm = PRM(tiny_cfg(), "scalar", rngs=nnx.Rngs(4))
    records = [_record(), _record(id="b", step_ids=[[10, 11], [12, 13, 14], [15]], labels=[1.0, 1.0, 1.0]),
               _record(id="c", step_ids=[[20], [21], [22]], labels=[0.0, 0.0, 0.0])]
    examples = [build_example(r, head="scalar") for r in records]
    got = make_eval_fn(examples, rows=2, pos_weight=2.5, groups=["q", "q", "q"])(prm, 0)
    z = np.concatenate([alone_logits(prm, ex.tokens, 16)[ex.step_ends] for ex in examples])
    t = np.concatenate([ex.targets[ex.step_ends] for ex in examples])
    assert got["loss"] == pytest.approx(np_bce(z, t, np.ones_like(z), 2.5), rel=1e-5)
    assert got["step_accuracy"] == pytest.approx(np.mean((z >= 0) == (t >= 0.5)))
    assert got["steps"] == 9
