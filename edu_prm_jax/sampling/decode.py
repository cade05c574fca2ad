"""The jitted rollout loop: one prefill per question, then a `lax.while_loop` over a pool of slots.

Both samplers run here. A question owns M slots (rows q*M .. q*M+M-1 of the batch), M = `num_leaves`:
- HT: all M slots start as copies of the prefilled prompt and sample independently at temperature T.
- EDU: slot 0 starts; at an anchor (`anchor_qualifies`: H > tau and a non-symbol top-1 token) a path forks: it
  keeps the top-1 token and each of the next K-1 tokens goes to a free slot, whose KV-cache rows and history are
  copied from the parent inside the loop (`fork_plan`). In "budget" mode the highest-entropy candidates get the
  free slots first (`fork_priority`). The rule and the plan live in `anchors.py`.
One loop step runs these phases, in this order (`_decode_loop`'s `body`):
  1. read the next-token distribution of every row (entropy, top-K, the anchor rule) and propose a token;
  2. P-EDU only: at a step boundary, prune a path whose just-finished step scored low (frees its slot);
     MCTS-EDU expansions only (`ExpansionParams`): a path that may fork no more stops at its next anchor;
  3. EDU only: plan the forks and apply them (record anchors, copy parent rows into the children's slots);
  4. record the chosen token (id, logprob, entropy, high-entropy flag);
  5. detect stops (EOS, a closed \\boxed{...}, a stop string, the length limit);
  6. advance the policy (and the PRM) by the chosen token.
Per step only scalars leave the logits (entropy, chosen-token logprob); the [B, T, V] history is never built.
Randomness is keyed by (seed, question id, slot, step), so results do not depend on how questions are sharded.
On a mesh, questions are split over the sharding rules' `rollout` mesh axes (a `shard_map` manual over those
axes only); parameters, the KV cache and activations follow the same rules on the remaining axes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edu_prm_jax import parallel
from edu_prm_jax.models.qwen2 import KVCache
from edu_prm_jax.sampling.anchors import (
    anchor_qualifies,
    branch_candidates,
    fork_plan,
    fork_priority,
    spent_anchor,
)
from edu_prm_jax.sampling.stats import entropy_and_logz, mask_logits, sample_tokens, top_k_small
from edu_prm_jax.sampling.stopping import StopTables

RUNNING, STOP_EOS, STOP_ANSWER, STOP_STRING, STOP_LENGTH, STOP_PRUNED, STOP_ANCHOR = range(7)
STOP_NAMES = {RUNNING: "running", STOP_EOS: "eos", STOP_ANSWER: "answer", STOP_STRING: "stop_string",
              STOP_LENGTH: "max_new_tokens", STOP_PRUNED: "pruned", STOP_ANCHOR: "anchor"}


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    """Static (compile-time) sampler settings; see configs/sample.py for the user-facing fields."""

    mode: str = "edu"  # "edu" (tree), "ht" (independent samples) or "greedy" (one argmax path per question)
    # M, the slots per question: EDU's leaf budget (at most M leaves per question), HT's samples per question,
    # 1 for greedy. The config field `sampling.num_leaves` sets it.
    num_leaves: int = 4
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
    # Stop a path at a qualifying position where it may fork no more (it has max_anchors anchors), before it emits
    # that position's token: stop reason "anchor". A class constant, not a field, so it is in no tree record's
    # `params` and no sampling fingerprint: plain sampling never stops there; `ExpansionParams` turns it on.
    stop_at_anchor: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.mode not in ("edu", "ht", "greedy"):
            raise ValueError(f"mode must be 'edu', 'ht' or 'greedy', got {self.mode!r}")
        if self.mode == "greedy" and self.num_leaves != 1:
            raise ValueError("greedy mode decodes one path per question: num_leaves must be 1")
        if self.threshold_mode not in ("fixed", "budget"):
            raise ValueError(f"threshold_mode must be 'fixed' or 'budget', got {self.threshold_mode!r}")
        if self.branch_k < 2 and self.mode == "edu":
            raise ValueError("branch_k must be >= 2 for EDU sampling")


@dataclasses.dataclass(frozen=True)
class ExpansionParams(DecodeParams):
    """DecodeParams of an MCTS-EDU expansion (`evaluation.mcts`): EDU sampling whose paths stop at the first
    anchor they may not fork at. With num_leaves = branch_k and max_anchors = 1, a prefix decodes greedily to its
    next anchor, forks the top-K tokens there (the same in-graph fork as EDU sampling), and each of the K paths
    stops just before ITS next anchor (reason "anchor"), or earlier at EOS, an answer, a stop string or
    max_new_tokens. Raises ValueError for a mode other than "edu"."""

    stop_at_anchor: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode != "edu":
            raise ValueError(f"ExpansionParams: mode must be 'edu' (the stop at an anchor follows EDU's forks), "
                             f"got {self.mode!r}")


# Settings that only change values, never shapes or code paths: traced, so changing them recompiles nothing.
DYNAMIC_FIELDS = ("seed", "tau", "temperature", "top_p", "prune_below")


def static_params(p: DecodeParams) -> DecodeParams:
    """`p` with its dynamic fields canonicalised: what the compiled loop depends on (idempotent)."""
    return dataclasses.replace(p, seed=0, tau=0.0, temperature=1.0, prune_below=0.0,
                               top_p=1.0 if p.top_p >= 1.0 else 0.5)  # only "is nucleus on" stays static


def knob_dtypes() -> dict[str, Any]:
    """{dynamic field: dtype} of the `knobs` the loop takes (scalars): seed uint32, the others float32."""
    return {k: jnp.uint32 if k == "seed" else jnp.float32 for k in DYNAMIC_FIELDS}


def split_params(p: DecodeParams) -> tuple[DecodeParams, dict[str, jax.Array]]:
    """(compile-time params with the dynamic fields canonicalised, the dynamic values as device scalars)."""
    knobs = {k: jnp.asarray(getattr(p, k), dtype) for k, dtype in knob_dtypes().items()}
    return static_params(p), knobs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Tables:
    """Per-vocabulary tables as device arrays (not static: changing them does not recompile)."""

    vocab_mask: jax.Array  # [V] bool, id is a real tokenizer token (the model's padded rows are masked out)
    symbol: jax.Array  # [V] bool, the anchor rule's symbol set (a symbol top-1 never makes an anchor)
    eos: jax.Array  # [V] bool, token ends the sequence
    has_boxed: jax.Array  # [V] bool, token text contains "boxed"
    opens: jax.Array  # [V] int32, "{" count (after the last "boxed")
    closes: jax.Array  # [V] int32, "}" count (after the last "boxed")
    stop_seqs: jax.Array  # [n, k] int32, stop strings as token sequences, right-aligned, -1 padded

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

    @classmethod
    def abstract(cls, model_vocab: int, stop_seqs_shape: tuple[int, int] = (1, 1), sharding: Any = None) -> Tables:
        """The tables as `jax.ShapeDtypeStruct`s (optionally with `sharding`), for compiling the loop without a
        tokenizer: [V] masks and counts, stop sequences [n, k] int32."""
        def like(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        v = (model_vocab,)
        return cls(like(v, jnp.bool_), like(v, jnp.bool_), like(v, jnp.bool_), like(v, jnp.bool_),
                   like(v, jnp.int32), like(v, jnp.int32), like(tuple(stop_seqs_shape), jnp.int32))


# ------------------------------------------------------------------------------------------------- loop state
# Shapes: Q questions, M = num_leaves slots each, B = Q * M rows (question q's slot m is row q*M + m),
# G = max_new_tokens, A = max_anchors, V = vocabulary, K = branch_k.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PathState:
    """Everything the loop keeps per row (per path): a forked child starts as a copy of its parent's row."""

    tokens: jax.Array  # [B, G] int32, generated tokens (0 past gen_len)
    logprobs: jax.Array  # [B, G] float32, temperature-1 log-probability of each generated token
    entropies: jax.Array  # [B, G] float32, entropy (nats) of the distribution each token was chosen from
    high_entropy: jax.Array  # [B, G] bool, the position qualified as an anchor (forked or not)
    gen_len: jax.Array  # [B] int32, tokens generated so far
    cache_len: jax.Array  # [B] int32, filled KV-cache positions (prompt + generated): the next write index
    active: jax.Array  # [B] bool, the path is still generating
    used: jax.Array  # [B] bool, the slot holds a path (running or finished); a free slot can take a child
    stop: jax.Array  # [B] int32, STOP_* reason (RUNNING while active)
    parent: jax.Array  # [B] int32, slot (within the question) this path forked from; -1 for a root
    fork_pos: jax.Array  # [B] int32, generated-token index where it left its parent (0 for a root)
    anchors: jax.Array  # [B, A] int32, generated-token indices where this path or an ancestor forked; -1 after
    n_anchors: jax.Array  # [B] int32, valid entries of `anchors`
    box_open: jax.Array  # [B] bool, a \boxed{ has started and not yet closed
    box_depth: jax.Array  # [B] int32, brace depth inside the open \boxed{
    last_score: jax.Array  # [B] float32, P-EDU: PRM score at the newest token (1 before the first)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The `lax.while_loop` carry."""

    step: jax.Array  # [] int32, the generated-token index being chosen
    logits: jax.Array  # [B, V] float32, each row's next-token logits
    cache: KVCache  # the policy's KV cache, per layer [B, prompt + G, kv_heads, head_dim]
    prm_cache: KVCache | None  # P-EDU: the PRM's own KV cache, same layout; None (an empty subtree) without a PRM
    paths: PathState
    pruned_tokens: jax.Array  # [Q] int32, tokens generated by paths P-EDU pruned (they cost, but are no leaf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutput:
    """What the loop returns (the record of each slot), rows q*M + m; `decode` hands it back as host arrays."""

    tokens: jax.Array  # [B, G] int32, generated tokens (valid up to gen_len)
    logprobs: jax.Array  # [B, G] float32, temperature-1 log-probability of each token
    entropies: jax.Array  # [B, G] float32, entropy (nats) at each token
    high_entropy: jax.Array  # [B, G] bool, positions that qualified as anchors (Best-of-N splits HT steps here)
    gen_len: jax.Array  # [B] int32
    used: jax.Array  # [B] bool, the slot holds a leaf
    stop: jax.Array  # [B] int32, STOP_* reason
    parent: jax.Array  # [B] int32, parent slot within the question, -1 for a root
    fork_pos: jax.Array  # [B] int32, where the path left its parent
    anchors: jax.Array  # [B, A] int32, step boundaries (-1 padded)
    n_anchors: jax.Array  # [B] int32
    pruned_tokens: jax.Array  # [Q] int32, P-EDU's pruned tokens per question

    @classmethod
    def of(cls, state: DecodeState) -> DecodeOutput:
        paths = state.paths
        return cls(**{f.name: getattr(paths, f.name) for f in dataclasses.fields(cls) if f.name != "pruned_tokens"},
                   pruned_tokens=state.pruned_tokens)

    def to_host(self) -> dict[str, np.ndarray]:
        """{field name: numpy array}, the form `engine.slots_to_leaves` reads."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NextToken:
    """This step's view of each row's next-token distribution; a new child takes its parent's."""

    logits: jax.Array  # [B, V] float32, masked to the tokenizer's vocabulary
    entropy: jax.Array  # [B] float32, nats, at temperature 1
    log_z: jax.Array  # [B] float32, logsumexp(logits), for the chosen token's logprob
    qualifies: jax.Array  # [B] bool, `anchor_qualifies` at this position


# ------------------------------------------------------------------------------------------------ the phases


def _row_keys(seed: jax.Array, question_ids: jax.Array, num_leaves: int, step: jax.Array) -> jax.Array:
    """One PRNG key per row from (seed, question id, slot, step): the same draws however questions are batched."""
    base = jax.random.key(seed)
    slots = jnp.arange(num_leaves)

    def one(q, s):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, q), s), step)

    return jax.vmap(lambda q: jax.vmap(lambda s: one(q, s))(slots))(question_ids).reshape(-1)


def _prefill(p: DecodeParams, model: nnx.Module, prm: nnx.Module | None, prompts: jax.Array,
             prompt_lens: jax.Array, question_ids: jax.Array) -> DecodeState:
    """Run each prompt once, then give every slot of its question a copy of the prompt's cache and logits.

    HT starts all M slots, EDU and greedy only slot 0 (the others wait for forks); padding questions (id < 0)
    start none."""
    q_n, plen = prompts.shape
    m_n, g_n, a_n = p.num_leaves, p.max_new_tokens, p.max_anchors
    b_n = q_n * m_n
    cache = KVCache.zeros(model.cfg, q_n, plen + g_n)
    hidden, cache = model.backbone(prompts, cache=cache)  # a fresh prefill: written from slot 0
    last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)
    logits = model.logits(last)[:, 0]  # [Q, V]
    expand = jnp.repeat(jnp.arange(q_n), m_n)
    prm_cache = None
    if prm is not None:
        prm_cache = KVCache.zeros(prm.backbone.cfg, q_n, plen + g_n)
        prm_cache = prm.prefill(prompts, cache=prm_cache)
        prm_cache = prm_cache.gather_rows(expand)  # the prompt scores nothing: last_score starts at 1
    slot = jnp.tile(jnp.arange(m_n), q_n)
    start = (slot == 0) if p.mode != "ht" else jnp.ones((b_n,), bool)
    start = start & (question_ids >= 0)[expand]  # padding rows of a short batch never run
    paths = PathState(
        tokens=jnp.zeros((b_n, g_n), jnp.int32), logprobs=jnp.zeros((b_n, g_n), jnp.float32),
        entropies=jnp.zeros((b_n, g_n), jnp.float32), high_entropy=jnp.zeros((b_n, g_n), bool),
        gen_len=jnp.zeros((b_n,), jnp.int32), cache_len=prompt_lens[expand].astype(jnp.int32),
        active=start, used=start, stop=jnp.zeros((b_n,), jnp.int32),
        parent=jnp.full((b_n,), -1, jnp.int32), fork_pos=jnp.zeros((b_n,), jnp.int32),
        anchors=jnp.full((b_n, a_n), -1, jnp.int32), n_anchors=jnp.zeros((b_n,), jnp.int32),
        box_open=jnp.zeros((b_n,), bool), box_depth=jnp.zeros((b_n,), jnp.int32),
        last_score=jnp.ones((b_n,), jnp.float32))
    return DecodeState(step=jnp.int32(0), logits=logits[expand], cache=cache.gather_rows(expand),
                       prm_cache=prm_cache, paths=paths, pruned_tokens=jnp.zeros((q_n,), jnp.int32))


def _read_next_token(p: DecodeParams, knobs: dict[str, jax.Array], tables: Tables, question_ids: jax.Array,
                     state: DecodeState) -> tuple[NextToken, jax.Array, jax.Array]:
    """Phase 1: (each row's NextToken, its top-K tokens [B, K] int32, the proposed token [B] int32).

    The proposal is the argmax (greedy, EDU with edu_greedy) or a sample (HT); a fork may replace it. Only EDU
    needs the runners-up, so the others compute the top-1 alone."""
    logits = mask_logits(state.logits, tables.vocab_mask)
    entropy, log_z = entropy_and_logz(logits)
    topk = top_k_small(logits, max(p.branch_k, 1) if p.mode == "edu" else 1)
    if p.mode == "greedy" or (p.mode == "edu" and p.edu_greedy):
        proposal = topk[:, 0]
    else:
        keys = _row_keys(knobs["seed"], question_ids, p.num_leaves, state.step)
        proposal = sample_tokens(logits, keys, knobs["temperature"], p.top_k, knobs["top_p"], nucleus=p.top_p < 1.0)
    qualifies = anchor_qualifies(entropy, topk[:, 0], knobs["tau"], tables.symbol)
    return NextToken(logits, entropy, log_z, qualifies), topk, proposal


def _prune_weak_paths(state: DecodeState, qualifies: jax.Array, prune_below: jax.Array,
                      num_leaves: int) -> DecodeState:
    """Phase 2, P-EDU: at a step boundary (a qualifying position), drop a path whose just-finished step scored
    below `prune_below` and free its slot, before this step's forks so they can take it.

    If every running path of a question is weak, the best-scoring one (lowest slot on ties) is spared, so a
    question always keeps a path. The pruned path's own tokens go to `pruned_tokens`: they were paid for."""
    paths = state.paths
    q_n, m_n = state.pruned_tokens.shape[0], num_leaves
    at_boundary = paths.active & qualifies & (state.step > 0)
    weak = (at_boundary & (paths.last_score < prune_below)).reshape(q_n, m_n)
    survivors = jnp.sum(paths.active.reshape(q_n, m_n) & ~weak, axis=-1, keepdims=True)
    best = jnp.argmax(jnp.where(weak, paths.last_score.reshape(q_n, m_n), -jnp.inf), axis=-1)
    spare = (survivors == 0) & (jnp.arange(m_n)[None, :] == best[:, None])
    prune = (weak & ~spare).reshape(-1)
    own_tokens = (paths.gen_len - paths.fork_pos) * prune
    paths = dataclasses.replace(paths, stop=jnp.where(prune, STOP_PRUNED, paths.stop),
                                active=paths.active & ~prune, used=paths.used & ~prune)
    return dataclasses.replace(state, paths=paths,
                               pruned_tokens=state.pruned_tokens + own_tokens.reshape(q_n, m_n).sum(-1))


def _stop_at_spent_anchor(state: DecodeState, qualifies: jax.Array, max_anchors: int) -> DecodeState:
    """Phase 2, MCTS-EDU expansions (`ExpansionParams`): a running path at a qualifying position that may fork no
    more (`spent_anchor`) stops before emitting this position's token, reason STOP_ANCHOR, so its tokens end
    exactly where its next step would begin. Its slot stays used: it is a leaf. Runs before the fork phase, so
    a path still below max_anchors forks here instead (its children, copied from it, run on)."""
    paths = state.paths
    spent = spent_anchor(paths.active, qualifies, paths.n_anchors, max_anchors)
    paths = dataclasses.replace(paths, stop=jnp.where(spent, STOP_ANCHOR, paths.stop), active=paths.active & ~spent)
    return dataclasses.replace(state, paths=paths)


def _copy_parent_rows(is_child: jax.Array, source_row: jax.Array, state: DecodeState,
                      next_token: NextToken) -> tuple[DecodeState, NextToken]:
    """A new child's row becomes a copy of its parent's: path record, next-token view and KV cache(s).

    is_child [B] bool, source_row [B] int32 (a row's own index unless it is a child). Skipped (`lax.cond`) on
    the steps without a fork, which are most of them: copying the cache costs a full pass over it."""
    forked = jnp.any(is_child)

    def adopt(rows):
        return jax.tree.map(
            lambda a: jnp.where(is_child.reshape((-1,) + (1,) * (a.ndim - 1)), a[source_row], a), rows)

    paths, next_token = jax.lax.cond(forked, adopt, lambda r: r, (state.paths, next_token))

    def copy_cache(cache: KVCache | None) -> KVCache | None:
        if cache is None:
            return None
        return jax.lax.cond(forked, lambda c: c.gather_rows(source_row), lambda c: c, cache)

    state = dataclasses.replace(state, paths=paths, cache=copy_cache(state.cache),
                                prm_cache=copy_cache(state.prm_cache))
    return state, next_token


def _fork(p: DecodeParams, state: DecodeState, next_token: NextToken, topk: jax.Array,
          token: jax.Array) -> tuple[DecodeState, NextToken, jax.Array]:
    """Phase 3, EDU: plan this step's forks and apply them; returns the state, next-token view and tokens
    [B] int32 after the children took their slots.

    An anchor keeps its top-1 token; each child emits one runner-up. The anchor is recorded before the copy, so
    children inherit it as a step boundary."""
    paths = state.paths
    b_n, m_n = token.shape[0], p.num_leaves
    q_n = b_n // m_n
    slot = jnp.tile(jnp.arange(m_n), q_n)
    candidates = branch_candidates(paths.active, next_token.qualifies, paths.n_anchors, p.max_anchors)
    priority = fork_priority(next_token.entropy, slot, p.threshold_mode)
    plan = fork_plan(candidates.reshape(q_n, m_n), priority.reshape(q_n, m_n), paths.used.reshape(q_n, m_n),
                     topk.reshape(q_n, m_n, -1), p.branch_k)
    is_anchor = plan.is_anchor.reshape(-1)
    record_at = jnp.where(is_anchor, paths.n_anchors, p.max_anchors)  # out of range: dropped
    paths = dataclasses.replace(
        paths, anchors=paths.anchors.at[jnp.arange(b_n), record_at].set(state.step, mode="drop"),
        n_anchors=paths.n_anchors + is_anchor)
    token = jnp.where(is_anchor, topk[:, 0], token)
    source_row = (jnp.arange(q_n)[:, None] * m_n + plan.source).reshape(-1)
    is_child = plan.is_child.reshape(-1)
    state, next_token = _copy_parent_rows(is_child, source_row, dataclasses.replace(state, paths=paths),
                                          next_token)
    paths = state.paths
    paths = dataclasses.replace(
        paths, parent=jnp.where(is_child, plan.source.reshape(-1), paths.parent),  # a slot within the question
        fork_pos=jnp.where(is_child, state.step, paths.fork_pos))
    token = jnp.where(is_child, plan.child_token.reshape(-1), token)
    return dataclasses.replace(state, paths=paths), next_token, token


def _record_token(paths: PathState, step: jax.Array, token: jax.Array, next_token: NextToken,
                  running: jax.Array) -> PathState:
    """Phase 4: write each running row's token with its temperature-1 logprob, entropy and anchor flag."""
    b_n, g_n = paths.tokens.shape
    rows = jnp.arange(b_n)
    logprob = jnp.take_along_axis(next_token.logits, token[:, None], -1)[:, 0] - next_token.log_z
    write = jnp.where(running, step, g_n)  # out of range: dropped
    return dataclasses.replace(
        paths, tokens=paths.tokens.at[rows, write].set(token, mode="drop"),
        logprobs=paths.logprobs.at[rows, write].set(logprob, mode="drop"),
        entropies=paths.entropies.at[rows, write].set(next_token.entropy, mode="drop"),
        high_entropy=paths.high_entropy.at[rows, write].set(next_token.qualifies, mode="drop"),
        gen_len=paths.gen_len + running)


def _track_boxed_answer(paths: PathState, token: jax.Array, tables: Tables,
                        stop_at_answer: bool) -> tuple[PathState, jax.Array]:
    """(paths with the \\boxed{ brace depth advanced by `token`, [B] bool: this token closed the answer).

    A token containing "boxed" (re)starts tracking; only braces after it count (stopping.py)."""
    starts = tables.has_boxed[token]
    box_open = paths.box_open | starts
    depth = jnp.where(starts, 0, paths.box_depth) + tables.opens[token] - tables.closes[token]
    if stop_at_answer:
        closed = box_open & (tables.closes[token] > 0) & (depth <= 0) & \
            ((paths.box_depth > 0) | (tables.opens[token] > 0))
    else:
        closed = jnp.zeros_like(starts)
    return dataclasses.replace(paths, box_open=box_open & ~closed, box_depth=jnp.where(closed, 0, depth)), closed


def _ends_with_stop_string(paths: PathState, stop_seqs: jax.Array) -> jax.Array:
    """[B] bool: a row's newest tokens equal one of the stop sequences ([n, k], right-aligned, -1 padded)."""
    width = stop_seqs.shape[1]
    last = paths.gen_len[:, None] - width + jnp.arange(width)[None]  # the newest `width` positions, -1 before 0
    tail = jnp.where(last >= 0, jnp.take_along_axis(paths.tokens, jnp.maximum(last, 0), axis=1), -1)
    return jnp.any(jnp.all((stop_seqs[None] == -1) | (stop_seqs[None] == tail[:, None]), -1), -1)


def _detect_stops(p: DecodeParams, paths: PathState, token: jax.Array, running: jax.Array,
                  tables: Tables) -> PathState:
    """Phase 5: end the running rows whose new token is EOS, closes the \\boxed{...} answer, completes a stop
    string, or fills max_new_tokens (the first reason in that order is recorded)."""
    eos = tables.eos[token]
    paths, closed = _track_boxed_answer(paths, token, tables, p.stop_at_answer)
    matched = _ends_with_stop_string(paths, tables.stop_seqs)
    reason = jnp.select([eos, closed, matched, paths.gen_len >= p.max_new_tokens],
                        [STOP_EOS, STOP_ANSWER, STOP_STRING, STOP_LENGTH], RUNNING)
    stopping = running & (reason != RUNNING)
    return dataclasses.replace(paths, stop=jnp.where(stopping, reason, paths.stop), active=running & ~stopping)


def _advance_models(state: DecodeState, token: jax.Array, running: jax.Array, model: nnx.Module,
                    prm: nnx.Module | None) -> DecodeState:
    """Phase 6: feed the chosen tokens to the policy (next step's logits) and, for P-EDU, to the PRM (the score
    of a step that ends at this token, checked at the next boundary). Rows that did not run keep their cache
    length, so their writes are overwritten if they ever run (a free slot is overwritten by a fork's copy)."""
    paths = state.paths
    logits, cache = model(token[:, None], cache=state.cache, write_index=paths.cache_len)
    prm_cache, last_score = state.prm_cache, paths.last_score
    if prm is not None:
        score_logit, prm_cache = prm.step(token, cache=prm_cache, write_index=paths.cache_len)
        last_score = jnp.where(running, jax.nn.sigmoid(score_logit), last_score)
    paths = dataclasses.replace(paths, cache_len=paths.cache_len + running, last_score=last_score)
    return dataclasses.replace(state, step=state.step + 1, logits=logits[:, 0], cache=cache, prm_cache=prm_cache,
                               paths=paths)


def _decode_loop(p: DecodeParams, knobs: dict[str, jax.Array], model: nnx.Module, tables: Tables,
                 prompts: jax.Array, prompt_lens: jax.Array, question_ids: jax.Array,
                 prm: nnx.Module | None = None) -> DecodeOutput:
    """The rollout loop. With `prm` (a scalar-head PRM) this is P-EDU: the PRM reads every generated token in
    lockstep with the policy (its own KV cache, forked alongside), and at each step boundary (a position that
    qualifies as an anchor) a path whose just-finished step scores below `prune_below` is dropped and its slot
    freed; if every running path of a question is weak, the best-scoring one is spared."""

    def body(state: DecodeState) -> DecodeState:
        next_token, topk, token = _read_next_token(p, knobs, tables, question_ids, state)
        if prm is not None:
            state = _prune_weak_paths(state, next_token.qualifies, knobs["prune_below"], p.num_leaves)
        if p.stop_at_anchor:
            state = _stop_at_spent_anchor(state, next_token.qualifies, p.max_anchors)
        if p.mode == "edu":
            state, next_token, token = _fork(p, state, next_token, topk, token)
        running = state.paths.active  # the rows that emit a token this step
        paths = _record_token(state.paths, state.step, token, next_token, running)
        paths = _detect_stops(p, paths, token, running, tables)
        return _advance_models(dataclasses.replace(state, paths=paths), token, running, model, prm)

    def cond(state: DecodeState) -> jax.Array:
        return (state.step < p.max_new_tokens) & jnp.any(state.paths.active)

    state = _prefill(p, model, prm, prompts, prompt_lens, question_ids)
    return DecodeOutput.of(jax.lax.while_loop(cond, body, state))


def decode_fn(p: DecodeParams, graphdef: Any, prm_graphdef: Any = None, mesh: Mesh | None = None,
              rules: parallel.RulesLike = None):
    """The rollout program (prefill + the `lax.while_loop`; P-EDU when `prm_graphdef` is given) as a pure
    function, not jitted: `(knobs, state, prm_state, tables, prompts, prompt_lens, question_ids) -> DecodeOutput`.

    `graphdef`/`state`: `nnx.split(policy)`; `prm_graphdef`/`prm_state`: `nnx.split(prm)` or None/None;
    `knobs`: {`DYNAMIC_FIELDS`: scalar} (`split_params`); `tables`: `Tables`; prompts [Q, P] int32 right-padded,
    prompt_lens [Q] int32, question_ids [Q] int32 (-1: a padding question). Any of them may be
    `jax.ShapeDtypeStruct`s: `jax.jit(decode_fn(...), in_shardings=decode_in_shardings(...)).lower(...)` compiles
    the loop for a target without memory (`edu-prm plan`). `p` is canonicalised (`static_params`); its dynamic
    fields come from `knobs`.

    On a mesh of several devices the KV cache and activations are pinned to `rules`; when the `rollout` rule
    splits on the mesh, the loop runs under a `jax.shard_map` manual over those axes only (each device decodes
    its own questions, Q a multiple of the split), so parameters keep their sharding on the other axes."""
    p = static_params(p)
    layout = mesh if mesh is not None and mesh.devices.size > 1 else None
    rules = parallel.as_rules(rules)

    def local(knobs, state, prm_state, tables, prompts, prompt_lens, question_ids):
        prm = nnx.merge(prm_graphdef, prm_state) if prm_graphdef is not None else None
        with parallel.sharding_context(layout, rules):
            return _decode_loop(p, knobs, nnx.merge(graphdef, state), tables, prompts, prompt_lens, question_ids,
                                prm)

    rollout = rules.split_axes("rollout", layout) if layout is not None else ()
    if not rollout:
        return local
    rows, rep = _rows_spec(rollout), PartitionSpec()
    return jax.shard_map(local, mesh=layout, in_specs=(rep, rep, rep, rep, rows, rows, rows), out_specs=rows,
                         axis_names=set(rollout), check_vma=False)


def _rows_spec(rollout: tuple[str, ...]) -> PartitionSpec:
    return PartitionSpec(rollout[0] if len(rollout) == 1 else rollout)


def decode_in_shardings(mesh: Mesh, state: Any, prm_state: Any = None, rules: parallel.RulesLike = None) -> tuple:
    """NamedShardings on `mesh` of `decode_fn`'s seven arguments: knobs and tables replicated, parameters by
    their logical axes (`parallel.state_shardings`), prompts / prompt_lens / question_ids split over the
    `rollout` mesh axes (replicated when rollouts are not split). `state`/`prm_state` may be abstract."""
    rules = parallel.as_rules(rules)
    rep = NamedSharding(mesh, PartitionSpec())
    rollout = rules.split_axes("rollout", mesh)
    rows = NamedSharding(mesh, _rows_spec(rollout)) if rollout else rep
    prm_shardings = parallel.state_shardings(prm_state, mesh, rules) if prm_state is not None else None
    return (rep, parallel.state_shardings(state, mesh, rules), prm_shardings, rep, rows, rows, rows)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _decode_jit(p: DecodeParams, graphdef: Any, prm_graphdef: Any, layout: tuple[Mesh, parallel.ShardingRules] | None,
                knobs: dict, state: Any, prm_state: Any, tables: Tables, prompts, prompt_lens,
                question_ids) -> DecodeOutput:
    """`decode_fn` on one device, or on a mesh without rollout sharding; `layout` (mesh, rules) pins the KV cache
    and activations (and keys the compile cache)."""
    mesh, rules = layout if layout is not None else (None, None)
    return decode_fn(p, graphdef, prm_graphdef, mesh, rules)(knobs, state, prm_state, tables, prompts, prompt_lens,
                                                             question_ids)


def decode(p: DecodeParams, model: nnx.Module, tables: Tables, prompts: np.ndarray, prompt_lens: np.ndarray,
           question_ids: np.ndarray, mesh: Mesh | None = None, prm: nnx.Module | None = None,
           rules: parallel.RulesLike = None) -> dict[str, np.ndarray]:
    """Run the rollout loop for a bucket of questions; returns `DecodeOutput`'s fields as host arrays, rows q*M + m.

    prompts [Q, P] int32 (right-padded), prompt_lens [Q], question_ids [Q] (-1: a padding question). With a
    mesh, parameters are placed by `rules` (default table; the sampler's layout may differ from training's).
    When the `rollout` rule splits on the mesh, questions are sharded over those axes with `jax.shard_map`
    (manual over them only, so parameters keep their other axes' sharding) and each device forks within its own
    questions; Q must be a multiple of the rollout split.
    """
    graphdef, state = nnx.split(model)
    p, knobs = split_params(p)
    if prm is not None and prm.head_spec.inserts_separator:
        raise ValueError("P-EDU needs a scalar-head PRM (scores at a step's last token); this PRM reads an "
                         "inserted separator token")
    prm_graphdef, prm_state = nnx.split(prm) if prm is not None else (None, None)
    args = (jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32),
            jnp.asarray(question_ids, jnp.int32))
    if mesh is None or mesh.devices.size == 1:  # one device: no placement to do, the constraints are no-ops
        out = _decode_jit(p, graphdef, prm_graphdef, None, knobs, state, prm_state, tables, *args)
        return out.to_host()
    rules = parallel.as_rules(rules)
    state = jax.device_put(state, parallel.state_shardings(state, mesh, rules))  # no-op when already placed
    if prm_state is not None:
        prm_state = jax.device_put(prm_state, parallel.state_shardings(prm_state, mesh, rules))
    tables = jax.device_put(tables, NamedSharding(mesh, PartitionSpec()))
    split = rules.axis_size("rollout", mesh)
    if split == 1:
        out = _decode_jit(p, graphdef, prm_graphdef, (mesh, rules), knobs, state, prm_state, tables, *args)
    else:
        if args[0].shape[0] % split:
            raise ValueError(f"{args[0].shape[0]} questions do not divide over the rollout mesh axes "
                             f"{rules.split_axes('rollout', mesh)} ({split} ways)")
        out = _sharded_decode(p, graphdef, prm_graphdef, mesh, rules)(knobs, state, prm_state, tables, *args)
    return out.to_host()


@functools.lru_cache(maxsize=32)
def _sharded_decode(p: DecodeParams, graphdef: Any, prm_graphdef: Any, mesh: Mesh, rules: parallel.ShardingRules):
    """`decode_fn` under its `shard_map` (manual over the rollout mesh axes), jitted once per layout; the returned
    runner places the per-question arrays over those axes and the knobs replicated."""
    jitted = jax.jit(decode_fn(p, graphdef, prm_graphdef, mesh, rules))
    rows = NamedSharding(mesh, _rows_spec(rules.split_axes("rollout", mesh)))
    rep = NamedSharding(mesh, PartitionSpec())

    def run(knobs, state, prm_state, tables, prompts, prompt_lens, question_ids):
        put = lambda x: jax.device_put(x, rows)  # noqa: E731
        rep_put = lambda x: jax.device_put(x, rep)  # noqa: E731
        return jitted(jax.tree.map(rep_put, knobs), state, prm_state, tables, put(prompts), put(prompt_lens),
                      put(question_ids))

    return run
