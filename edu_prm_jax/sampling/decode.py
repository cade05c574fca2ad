"""The jitted rollout loop: one prefill per question, then a `lax.while_loop` over a pool of slots.

Both samplers run here. A question owns M slots (rows q*M .. q*M+M-1 of the batch):
- HT: all M slots start as copies of the prefilled prompt and sample independently at temperature T.
- EDU: slot 0 starts; at an anchor (H > tau and a non-symbol top-1 token) a path forks: it keeps the top-1
  token and each of the next K-1 tokens goes to a free slot, whose KV-cache rows and history are copied from the
  parent inside the loop. In "budget" mode the highest-entropy candidates get the free slots first.
Per step only scalars leave the logits (entropy, chosen-token logprob); the [B, T, V] history is never built.
Randomness is keyed by (seed, question id, slot, step), so results do not depend on how questions are sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edu_prm_jax.models.qwen2 import KVCache
from edu_prm_jax.sampling.stats import entropy_and_logz, mask_logits, sample_tokens, top_k_small
from edu_prm_jax.sampling.stopping import StopTables

RUNNING, STOP_EOS, STOP_ANSWER, STOP_STRING, STOP_LENGTH, STOP_PRUNED = range(6)
STOP_NAMES = {RUNNING: "running", STOP_EOS: "eos", STOP_ANSWER: "answer", STOP_STRING: "stop_string",
              STOP_LENGTH: "max_new_tokens", STOP_PRUNED: "pruned"}


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    """Static (compile-time) sampler settings; see configs/sample.py for the user-facing fields."""

    mode: str = "edu"  # "edu" (tree), "ht" (independent samples) or "greedy" (one argmax path per question)
    num_slots: int = 4  # M: leaves per question (EDU budget) or samples per question (HT)
    max_new_tokens: int = 256
    temperature: float = 0.7  # HT sampling temperature; also EDU non-anchor tokens when edu_greedy=False
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    edu_greedy: bool = True  # EDU: non-anchor positions greedy (default) or sampled
    tau: float = 1.0  # entropy threshold (nats)
    branch_k: int = 2  # children per anchor (top-K tokens)
    threshold_mode: str = "fixed"  # "fixed": lowest slot first; "budget": highest entropy first
    max_anchors: int = 16  # per path; also the width of the anchor record
    stop_at_answer: bool = True  # stop a path when its \boxed{...} closes
    seed: int = 0
    prune_below: float = 0.2  # P-EDU (when a PRM is passed): prune a path whose newest step scores below this

    def __post_init__(self) -> None:
        if self.mode not in ("edu", "ht", "greedy"):
            raise ValueError(f"mode must be 'edu', 'ht' or 'greedy', got {self.mode!r}")
        if self.mode == "greedy" and self.num_slots != 1:
            raise ValueError("greedy mode decodes one path per question: num_slots must be 1")
        if self.threshold_mode not in ("fixed", "budget"):
            raise ValueError(f"threshold_mode must be 'fixed' or 'budget', got {self.threshold_mode!r}")
        if self.branch_k < 2 and self.mode == "edu":
            raise ValueError("branch_k must be >= 2 for EDU sampling")


# Settings that only change values, never shapes or code paths: traced, so changing them recompiles nothing.
DYNAMIC_FIELDS = ("seed", "tau", "temperature", "top_p", "prune_below")


def split_params(p: DecodeParams) -> tuple[DecodeParams, dict[str, jax.Array]]:
    """(compile-time params with the dynamic fields canonicalised, the dynamic values as device scalars)."""
    knobs = {"seed": jnp.asarray(p.seed, jnp.uint32)}
    knobs.update({k: jnp.asarray(getattr(p, k), jnp.float32) for k in DYNAMIC_FIELDS if k != "seed"})
    static = dataclasses.replace(p, seed=0, tau=0.0, temperature=1.0, prune_below=0.0,
                                 top_p=1.0 if p.top_p >= 1.0 else 0.5)  # only "is nucleus on" stays static
    return static, knobs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Tables:
    """Per-vocabulary tables as device arrays (not static: changing them does not recompile)."""

    vocab_mask: jax.Array
    symbol: jax.Array
    eos: jax.Array
    has_boxed: jax.Array
    opens: jax.Array
    closes: jax.Array
    stop_seqs: jax.Array

    @classmethod
    def build(cls, stop: StopTables, symbol_mask: np.ndarray, model_vocab: int, tokenizer_vocab: int) -> Tables:
        def fit(a, fill):
            out = np.full((model_vocab,), fill, a.dtype)
            n = min(model_vocab, a.shape[0])
            out[:n] = a[:n]
            return jnp.asarray(out)

        return cls(jnp.asarray(np.arange(model_vocab) < tokenizer_vocab), fit(symbol_mask, False),
                   fit(stop.eos, False), fit(stop.has_boxed, False), fit(stop.opens, 0), fit(stop.closes, 0),
                   jnp.asarray(stop.stop_seqs))


def _row_keys(seed: jax.Array, question_ids: jax.Array, num_slots: int, step: jax.Array) -> jax.Array:
    base = jax.random.key(seed)
    slots = jnp.arange(num_slots)

    def one(q, s):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, q), s), step)

    return jax.vmap(lambda q: jax.vmap(lambda s: one(q, s))(slots))(question_ids).reshape(-1)


def _fork_plan(p: DecodeParams, cand, prio, used, topk_tokens):
    """Which candidates branch and into which free slots. All arrays [Q, M] (topk_tokens [Q, M, K]).

    Returns (src [Q, M] slot each slot copies from (itself if none), child_token [Q, M], is_child [Q, M],
    is_anchor [Q, M])."""
    q_n, m_n = cand.shape
    k1 = p.branch_k - 1
    idx = jnp.arange(m_n)
    # rank among candidates: higher priority first, ties by slot index
    better = (prio[:, None, :] > prio[:, :, None]) | ((prio[:, None, :] == prio[:, :, None]) &
                                                      (idx[None, None, :] < idx[None, :, None]))
    rank = jnp.sum(better & cand[:, None, :], axis=-1)
    free = ~used
    n_free = jnp.sum(free, axis=-1, keepdims=True)
    order_key = jnp.where(free, jnp.cumsum(free, axis=-1) - 1, m_n + idx)
    free_slots = jnp.argsort(order_key, axis=-1)  # free_slots[q, r] = r-th free slot
    src = jnp.broadcast_to(idx, (q_n, m_n))
    child_token = jnp.zeros((q_n, m_n), jnp.int32)
    is_child = jnp.zeros((q_n, m_n), bool)
    rows = jnp.arange(q_n)[:, None]
    for j in range(k1):
        target = rank * k1 + j
        ok = cand & (target < n_free)
        dest = jnp.where(ok, jnp.take_along_axis(free_slots, jnp.minimum(target, m_n - 1), -1), m_n)
        src = src.at[rows, dest].set(jnp.broadcast_to(idx, (q_n, m_n)), mode="drop")
        child_token = child_token.at[rows, dest].set(topk_tokens[:, :, j + 1], mode="drop")
        is_child = is_child.at[rows, dest].set(True, mode="drop")
    is_anchor = cand & (rank * k1 < n_free)
    return src, child_token, is_child, is_anchor


def _decode_loop(p: DecodeParams, knobs: dict[str, jax.Array], model: nnx.Module, tables: Tables,
                 prompts: jax.Array, prompt_lens: jax.Array, question_ids: jax.Array,
                 prm: nnx.Module | None = None) -> dict[str, jax.Array]:
    """The rollout loop. With `prm` (a scalar-head PRM) this is P-EDU: the PRM reads every generated token in
    lockstep with the policy (its own KV cache, forked alongside), and at each step boundary (a position that
    qualifies as an anchor) a path whose just-finished step scores below `prune_below` is dropped and its slot
    freed; if every running path of a question is weak, the best-scoring one is spared."""
    q_n, plen = prompts.shape
    m_n, g_n, a_n = p.num_slots, p.max_new_tokens, p.max_anchors
    b_n = q_n * m_n
    cfg = model.cfg
    cache = KVCache.zeros(cfg, q_n, plen + g_n)
    hidden, cache = model.backbone(prompts, cache=cache, write_index=jnp.zeros((q_n,), jnp.int32))
    last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)
    logits = model.logits(last)[:, 0]  # [Q, V]
    expand = jnp.repeat(jnp.arange(q_n), m_n)
    cache = cache.gather_rows(expand)
    logits = logits[expand]
    prm_cache = None
    if prm is not None:
        prm_cache = KVCache.zeros(prm.backbone.cfg, q_n, plen + g_n)
        _, prm_cache = prm.backbone.backbone(prompts, cache=prm_cache,
                                                      write_index=jnp.zeros((q_n,), jnp.int32))
        prm_cache = prm_cache.gather_rows(expand)  # the prompt scores nothing: last_score starts at 1
    slot = jnp.tile(jnp.arange(m_n), q_n)
    start = (slot == 0) if p.mode != "ht" else jnp.ones((b_n,), bool)
    start = start & (question_ids >= 0)[expand]  # padding rows of a short batch never run
    state = dict(
        step=jnp.int32(0), logits=logits, cache=cache, cache_len=prompt_lens[expand].astype(jnp.int32),
        tokens=jnp.zeros((b_n, g_n), jnp.int32), logprobs=jnp.zeros((b_n, g_n), jnp.float32),
        entropies=jnp.zeros((b_n, g_n), jnp.float32), gen_len=jnp.zeros((b_n,), jnp.int32),
        active=start, used=start, stop=jnp.zeros((b_n,), jnp.int32),
        parent=jnp.full((b_n,), -1, jnp.int32), fork_pos=jnp.zeros((b_n,), jnp.int32),
        anchors=jnp.full((b_n, a_n), -1, jnp.int32), n_anchors=jnp.zeros((b_n,), jnp.int32),
        box_on=jnp.zeros((b_n,), bool), box_depth=jnp.zeros((b_n,), jnp.int32),
        high_entropy=jnp.zeros((b_n, g_n), bool), prm_cache=prm_cache, last_score=jnp.ones((b_n,), jnp.float32),
        pruned_tokens=jnp.zeros((q_n,), jnp.int32),
    )
    seq_w = tables.stop_seqs.shape[1]
    row_ids = jnp.arange(b_n)

    def body(s):
        t = s["step"]
        z = mask_logits(s["logits"], tables.vocab_mask)
        ent, log_z = entropy_and_logz(z)
        kk = max(p.branch_k, 1) if p.mode == "edu" else 1  # only EDU forks use the runners-up
        topk = top_k_small(z, kk)  # [B, K]
        greedy = p.mode == "greedy" or (p.mode == "edu" and p.edu_greedy)
        if greedy:
            tok = topk[:, 0]
        else:
            keys = _row_keys(knobs["seed"], question_ids, m_n, t)
            tok = sample_tokens(z, keys, knobs["temperature"], p.top_k, knobs["top_p"], nucleus=p.top_p < 1.0)
        history = ("tokens", "logprobs", "entropies", "gen_len", "active", "used", "stop", "parent", "fork_pos",
                   "anchors", "n_anchors", "box_on", "box_depth", "cache_len", "high_entropy", "last_score")
        qualifies = (ent > knobs["tau"]) & ~tables.symbol[topk[:, 0]]
        if prm is not None:
            s = dict(s)
            weak = (s["active"] & qualifies & (t > 0) & (s["last_score"] < knobs["prune_below"])).reshape(q_n, m_n)
            survivors = jnp.sum(s["active"].reshape(q_n, m_n) & ~weak, axis=-1, keepdims=True)
            # if every running path is weak, the best-scoring one (lowest slot on ties) is spared
            best = jnp.argmax(jnp.where(weak, s["last_score"].reshape(q_n, m_n), -jnp.inf), axis=-1)
            spare = (survivors == 0) & (jnp.arange(m_n)[None, :] == best[:, None])
            prune = (weak & ~spare).reshape(-1)
            own = (s["gen_len"] - s["fork_pos"]) * prune
            s["pruned_tokens"] = s["pruned_tokens"] + own.reshape(q_n, m_n).sum(-1)
            s["stop"] = jnp.where(prune, STOP_PRUNED, s["stop"])
            s["active"], s["used"] = s["active"] & ~prune, s["used"] & ~prune
        if p.mode == "edu":
            cand = s["active"] & qualifies & (s["n_anchors"] < a_n)
            prio = ent if p.threshold_mode == "budget" else -slot.astype(jnp.float32)
            src, child_tok, is_child, is_anchor = _fork_plan(
                p, cand.reshape(q_n, m_n), prio.reshape(q_n, m_n), s["used"].reshape(q_n, m_n),
                topk.reshape(q_n, m_n, kk))
            is_anchor = is_anchor.reshape(-1)
            # the anchor is recorded before copying, so children inherit it
            s["anchors"] = s["anchors"].at[row_ids, jnp.where(is_anchor, s["n_anchors"], a_n)].set(t, mode="drop")
            s["n_anchors"] = s["n_anchors"] + is_anchor
            tok = jnp.where(is_anchor, topk[:, 0], tok)
            src_row = (jnp.arange(q_n)[:, None] * m_n + src).reshape(-1)
            is_child = is_child.reshape(-1)
            s = dict(s)

            def adopt(rows):  # children take their source row's state; skipped on the (most) steps without a fork
                return jax.tree.map(
                    lambda a: jnp.where(is_child.reshape((-1,) + (1,) * (a.ndim - 1)), a[src_row], a), rows)

            forked = jnp.any(is_child)
            rows = ({name: s[name] for name in history}, z, ent, log_z, qualifies)
            hist, z, ent, log_z, qualifies = jax.lax.cond(forked, adopt, lambda r: r, rows)
            s.update(hist)
            for name in ("cache", "prm_cache") if prm is not None else ("cache",):
                s[name] = jax.lax.cond(forked, lambda c: c.gather_rows(src_row), lambda c: c, s[name])
            tok = jnp.where(is_child, child_tok.reshape(-1), tok)
            s["parent"] = jnp.where(is_child, src.reshape(-1), s["parent"])  # a slot index within the question
            s["fork_pos"] = jnp.where(is_child, t, s["fork_pos"])
        active = s["active"]
        logp = jnp.take_along_axis(z, tok[:, None], -1)[:, 0] - log_z
        write = jnp.where(active, t, g_n)
        s["tokens"] = s["tokens"].at[row_ids, write].set(tok, mode="drop")
        s["logprobs"] = s["logprobs"].at[row_ids, write].set(logp, mode="drop")
        s["entropies"] = s["entropies"].at[row_ids, write].set(ent, mode="drop")
        s["high_entropy"] = s["high_entropy"].at[row_ids, write].set(qualifies, mode="drop")
        s["gen_len"] = s["gen_len"] + active
        # stops
        eos = tables.eos[tok]
        box_on = s["box_on"] | tables.has_boxed[tok]
        depth = jnp.where(tables.has_boxed[tok], 0, s["box_depth"]) + tables.opens[tok] - tables.closes[tok]
        closed = box_on & (tables.closes[tok] > 0) & (depth <= 0) & \
            ((s["box_depth"] > 0) | (tables.opens[tok] > 0)) if p.stop_at_answer else jnp.zeros_like(eos)
        s["box_on"], s["box_depth"] = box_on & ~closed, jnp.where(closed, 0, depth)
        last = s["gen_len"][:, None] - seq_w + jnp.arange(seq_w)[None]  # the newest seq_w positions, -1 before 0
        tail = jnp.where(last >= 0, jnp.take_along_axis(s["tokens"], jnp.maximum(last, 0), axis=1), -1)
        matched = jnp.any(jnp.all((tables.stop_seqs[None] == -1) | (tables.stop_seqs[None] == tail[:, None]), -1), -1)
        reason = jnp.select([eos, closed, matched, s["gen_len"] >= g_n],
                            [STOP_EOS, STOP_ANSWER, STOP_STRING, STOP_LENGTH], RUNNING)
        stopping = active & (reason != RUNNING)
        s["stop"] = jnp.where(stopping, reason, s["stop"])
        s["active"] = active & ~stopping
        logits, cache = model(tok[:, None], cache=s["cache"], write_index=s["cache_len"])
        s["logits"], s["cache"] = logits[:, 0], cache
        if prm is not None:
            prm_hidden, s["prm_cache"] = prm.backbone.backbone(tok[:, None], cache=s["prm_cache"],
                                                               write_index=s["cache_len"])
            score = jax.nn.sigmoid(prm.head(prm_hidden)[:, 0])
            s["last_score"] = jnp.where(active, score, s["last_score"])
        s["cache_len"] = s["cache_len"] + active
        s["step"] = t + 1
        return s

    def cond(s):
        return (s["step"] < g_n) & jnp.any(s["active"])

    out = jax.lax.while_loop(cond, body, state)
    return {k: out[k] for k in ("tokens", "logprobs", "entropies", "gen_len", "used", "stop", "parent", "fork_pos",
                                "anchors", "n_anchors", "high_entropy", "pruned_tokens")}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode_jit(p: DecodeParams, graphdef: Any, prm_graphdef: Any, knobs: dict, state: Any, prm_state: Any,
                tables: Tables, prompts, prompt_lens, question_ids):
    prm = nnx.merge(prm_graphdef, prm_state) if prm_graphdef is not None else None
    return _decode_loop(p, knobs, nnx.merge(graphdef, state), tables, prompts, prompt_lens, question_ids, prm)


def decode(p: DecodeParams, model: nnx.Module, tables: Tables, prompts: np.ndarray, prompt_lens: np.ndarray,
           question_ids: np.ndarray, mesh: Mesh | None = None, prm: nnx.Module | None = None
           ) -> dict[str, np.ndarray]:
    """Run the rollout loop for a bucket of questions; returns host arrays with rows q*M + m.

    With a mesh whose 'data' axis is > 1, questions are sharded over 'data' with `jax.shard_map` (manual over
    'data' only, so params keep their fsdp/tensor sharding) and each device forks within its own questions.
    """
    graphdef, state = nnx.split(model)
    p, knobs = split_params(p)
    if prm is not None and getattr(prm, "uses_separator", False):
        raise ValueError("P-EDU needs a scalar-head PRM (scores at a step's last token); this PRM reads an "
                         "inserted separator token")
    prm_graphdef, prm_state = nnx.split(prm) if prm is not None else (None, None)
    args = (jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32),
            jnp.asarray(question_ids, jnp.int32))
    if mesh is None or mesh.shape.get("data", 1) == 1:
        out = _decode_jit(p, graphdef, prm_graphdef, knobs, state, prm_state, tables, *args)
    else:
        from edu_prm_jax.parallel import state_shardings

        state = jax.device_put(state, state_shardings(state, mesh))  # no-op when already placed
        if prm_state is not None:
            prm_state = jax.device_put(prm_state, state_shardings(prm_state, mesh))
        tables = jax.device_put(tables, NamedSharding(mesh, PartitionSpec()))
        out = _sharded_decode(p, graphdef, prm_graphdef, mesh)(knobs, state, prm_state, tables, *args)
    return {k: np.asarray(v) for k, v in out.items()}


@functools.lru_cache(maxsize=32)
def _sharded_decode(p: DecodeParams, graphdef: Any, prm_graphdef: Any, mesh: Mesh):
    data = PartitionSpec("data")

    def local(knobs, state, prm_state, tables, prompts, prompt_lens, question_ids):
        prm = nnx.merge(prm_graphdef, prm_state) if prm_graphdef is not None else None
        return _decode_loop(p, knobs, nnx.merge(graphdef, state), tables, prompts, prompt_lens, question_ids, prm)

    rep = PartitionSpec()
    fn = jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, rep, rep, data, data, data), out_specs=data,
                       axis_names={"data"}, check_vma=False)
    jitted = jax.jit(fn)

    def run(knobs, state, prm_state, tables, prompts, prompt_lens, question_ids):
        put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))  # noqa: E731
        rep_put = lambda x: jax.device_put(x, NamedSharding(mesh, rep))  # noqa: E731
        return jitted(jax.tree.map(rep_put, knobs), state, prm_state, tables, put(prompts), put(prompt_lens),
                      put(question_ids))

    return run
