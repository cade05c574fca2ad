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

Cache-length buckets: a step attends over the whole cache it is given, so the loop runs as a sequence of
`lax.while_loop`s, one per static cache length (`cache_lengths`: powers of two from 128 slots, then prompt +
max_new_tokens), padding the cache at each transition; a step's cost follows the filled length, not the maximum.
Buckets are the default on a CPU only (`default_cache_buckets`: a transition holds two caches at once, which
a memory-bound accelerator run cannot spare).
The records are those of the single-length loop (`cache_buckets=False`): the same tokens, forks and stops; a
float can differ in its last bits where the compiler picks another kernel for another cache length (XLA:CPU
picks its attention kernels by shape: bit-identical for the tiny test models, tests/test_decode_speed.py; up to
2e-6 in a logprob over 1024 tokens of `benchmarks/sample_refill.py`'s model, same tokens), so a token can
differ only at a near-tie that close.

Slot refill (`decode_refill`): the host drives the loop in segments over a fixed pool of question blocks; a
segment ends when a block's question has finished while others wait, the finished block's record is read and a
waiting question (prefilled in the batches the plain run uses) takes its slots. Each question keeps its own step
counter (`DecodeState.step`), so its keys, anchors and records are those of the plain run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edu_prm_jax import parallel
from edu_prm_jax.models import attention
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
# G = max_new_tokens, A = max_anchors, V = vocabulary, K = branch_k, S = the cache length of the current bucket.

MIN_CACHE_LENGTH = 128  # the shortest cache bucket (`cache_lengths`)


def cache_lengths(prompt_len: int, max_new_tokens: int, buckets: bool = True) -> tuple[int, ...]:
    """The static KV-cache lengths the loop runs through, shortest first: the powers of two n >= 128
    (`MIN_CACHE_LENGTH`) with prompt_len < n <= 0.8 (prompt_len + max_new_tokens), then prompt_len +
    max_new_tokens (the length that fits every path; a last bucket over 80% of it would save little and cost a
    compile). Doubling keeps the attended length within 2x of the filled one. `buckets=False` gives the one
    length prompt_len + max_new_tokens (the loop before buckets).
    Example: (32, 1024) -> (128, 256, 512, 1056); (32, 96) -> (128,)."""
    final = prompt_len + max_new_tokens
    if not buckets:
        return (final,)
    n, out = MIN_CACHE_LENGTH, []
    while 5 * n <= 4 * final:
        if n > prompt_len:
            out.append(n)
        n *= 2
    return (*out, final)


def default_cache_buckets(platform: str) -> bool:
    """Whether the loop runs through `cache_lengths` buckets when a caller leaves `cache_buckets` None: on a CPU
    (a step's time follows the attended length: 1.09-1.26x at 256-1024 new tokens, benchmarks/README.md), not on
    TPU or GPU, where memory binds first and a transition between buckets holds the old and the new cache at
    once (a 7B Best-of-N decode at N = 64 compiled for a v4-8: 18.5 GiB of temporaries through the buckets,
    8.7 GiB with one length; README, "Planning for a slice")."""
    return platform.lower() == "cpu"


def _buckets(cache_buckets: bool | None) -> bool:
    """`cache_buckets`, or when None the default of the platform being compiled for."""
    return default_cache_buckets(attention.current_platform()) if cache_buckets is None else cache_buckets


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

    # [Q] int32, per question: the generated-token index its running rows choose next (they run in lockstep:
    # a running row's gen_len equals it). It advances only while the question has a running row, so a question
    # that takes a refilled block mid-run starts at 0, as it would have in its own batch.
    step: jax.Array
    question_ids: jax.Array  # [Q] int32, each block's question id (keys the randomness; -1: an idle block)
    logits: jax.Array  # [B, V] float32, each row's next-token logits
    cache: KVCache  # the policy's KV cache (`qwen2.KVCache`), S positions per row
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
    steps: jax.Array  # [Q] int32, loop steps in which the question had a running path

    @classmethod
    def of(cls, state: DecodeState) -> DecodeOutput:
        paths = state.paths
        per_question = ("pruned_tokens", "steps")
        return cls(**{f.name: getattr(paths, f.name) for f in dataclasses.fields(cls) if f.name not in per_question},
                   pruned_tokens=state.pruned_tokens, steps=state.step)

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefilled:
    """Prompts run once, per question, before their slots get copies: what a waiting question carries."""

    logits: jax.Array  # [Q, V] float32, the next-token logits after each prompt
    cache: KVCache  # [Q rows, S0 positions] (`qwen2.KVCache`), the prompt written at 0 .. P-1
    prm_cache: KVCache | None  # P-EDU: the PRM's cache of the prompt, same layout
    prompt_lens: jax.Array  # [Q] int32
    question_ids: jax.Array  # [Q] int32 (-1: a padding question)


# ------------------------------------------------------------------------------------------------ the phases


def _row_keys(seed: jax.Array, question_ids: jax.Array, num_leaves: int, step: jax.Array) -> jax.Array:
    """One PRNG key per row from (seed, question id, slot, step) (step [Q] int32, each question's own): the same
    draws however questions are batched."""
    base = jax.random.key(seed)
    slots = jnp.arange(num_leaves)

    def one(q, s, t):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, q), s), t)

    return jax.vmap(lambda q, t: jax.vmap(lambda s: one(q, s, t))(slots))(question_ids, step).reshape(-1)


def _row_steps(step: jax.Array, num_leaves: int) -> jax.Array:
    """[B] int32: each row's question step."""
    return jnp.repeat(step, num_leaves)


def _fit_length(a: jax.Array, axis: int, length: int) -> jax.Array:
    """`a` cut or zero-padded along `axis` to `length` (static)."""
    n = a.shape[axis]
    if n >= length:
        return jax.lax.slice_in_dim(a, 0, length, axis=axis)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, length - n)
    return jnp.pad(a, pad)


def resize_cache(cache: KVCache | None, length: int) -> KVCache | None:
    """`cache` with `length` positions (zero-padded at the end, or cut: what lies past a row's `cache_len` is
    never read), in its layout (`qwen2.KVCache`: the positions axis of its keys and values) and sharding; None
    stays None."""
    if cache is None or cache.length == length:
        return cache
    k_axis, v_axis = cache.positions_axis(True), cache.positions_axis(False)
    if cache.stacked:
        return cache.replace(_fit_length(cache.k, k_axis, length), _fit_length(cache.v, v_axis, length))
    return cache.replace(tuple(_fit_length(k, k_axis, length) for k in cache.k),
                         tuple(_fit_length(v, v_axis, length) for v in cache.v))


def _prefill_prompts(model: nnx.Module, prm: nnx.Module | None, prompts: jax.Array, prompt_lens: jax.Array,
                     question_ids: jax.Array, length: int) -> Prefilled:
    """Run each prompt once into a cache of `length` positions (prompts [Q, P] right-padded, P <= length)."""
    q_n = prompts.shape[0]
    cache = KVCache.zeros(model.cfg, q_n, length)
    hidden, cache = model.backbone(prompts, cache=cache)  # a fresh prefill: written from slot 0
    last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)
    logits = model.logits(last)[:, 0]  # [Q, V]
    prm_cache = None
    if prm is not None:
        prm_cache = prm.prefill(prompts, cache=KVCache.zeros(prm.backbone.cfg, q_n, length))
    return Prefilled(logits, cache, prm_cache, prompt_lens.astype(jnp.int32), question_ids.astype(jnp.int32))


def _starting_slots(p: DecodeParams, question_ids: jax.Array) -> jax.Array:
    """[Q * M] bool, the rows that run from the prompt: HT all M slots, EDU and greedy only slot 0 (the others
    wait for forks); padding questions (id < 0) none."""
    q_n, m_n = question_ids.shape[0], p.num_leaves
    slot = jnp.tile(jnp.arange(m_n), q_n)
    start = (slot == 0) if p.mode != "ht" else jnp.ones((q_n * m_n,), bool)
    return start & jnp.repeat(question_ids >= 0, m_n)


def _fresh_paths(p: DecodeParams, start: jax.Array, cache_len: jax.Array) -> PathState:
    """The PathState of rows that have generated nothing: `start` [B] bool runs, cache_len [B] = prompt length."""
    b_n, g_n, a_n = start.shape[0], p.max_new_tokens, p.max_anchors
    return PathState(
        tokens=jnp.zeros((b_n, g_n), jnp.int32), logprobs=jnp.zeros((b_n, g_n), jnp.float32),
        entropies=jnp.zeros((b_n, g_n), jnp.float32), high_entropy=jnp.zeros((b_n, g_n), bool),
        gen_len=jnp.zeros((b_n,), jnp.int32), cache_len=cache_len.astype(jnp.int32),
        active=start, used=start, stop=jnp.zeros((b_n,), jnp.int32),
        parent=jnp.full((b_n,), -1, jnp.int32), fork_pos=jnp.zeros((b_n,), jnp.int32),
        anchors=jnp.full((b_n, a_n), -1, jnp.int32), n_anchors=jnp.zeros((b_n,), jnp.int32),
        box_open=jnp.zeros((b_n,), bool), box_depth=jnp.zeros((b_n,), jnp.int32),
        last_score=jnp.ones((b_n,), jnp.float32))


def _start_slots(p: DecodeParams, pre: Prefilled) -> DecodeState:
    """Give every slot of each question a copy of its prompt's cache and logits (`_starting_slots` run)."""
    q_n = pre.question_ids.shape[0]
    expand = jnp.repeat(jnp.arange(q_n), p.num_leaves)
    paths = _fresh_paths(p, _starting_slots(p, pre.question_ids), pre.prompt_lens[expand])
    prm_cache = pre.prm_cache.gather_rows(expand) if pre.prm_cache is not None else None  # last_score starts at 1
    return DecodeState(step=jnp.zeros((q_n,), jnp.int32), question_ids=pre.question_ids, logits=pre.logits[expand],
                       cache=pre.cache.gather_rows(expand), prm_cache=prm_cache, paths=paths,
                       pruned_tokens=jnp.zeros((q_n,), jnp.int32))


def _prefill(p: DecodeParams, model: nnx.Module, prm: nnx.Module | None, prompts: jax.Array,
             prompt_lens: jax.Array, question_ids: jax.Array, length: int | None = None) -> DecodeState:
    """Run each prompt once, then give every slot of its question a copy of the prompt's cache and logits, in a
    cache of `length` positions (default prompt + max_new_tokens)."""
    length = length or prompts.shape[1] + p.max_new_tokens
    return _start_slots(p, _prefill_prompts(model, prm, prompts, prompt_lens, question_ids, length))


def _read_next_token(p: DecodeParams, knobs: dict[str, jax.Array], tables: Tables,
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
        keys = _row_keys(knobs["seed"], state.question_ids, p.num_leaves, state.step)
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
    at_boundary = paths.active & qualifies & (_row_steps(state.step, m_n) > 0)
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
    steps = _row_steps(state.step, m_n)
    paths = dataclasses.replace(
        paths, anchors=paths.anchors.at[jnp.arange(b_n), record_at].set(steps, mode="drop"),
        n_anchors=paths.n_anchors + is_anchor)
    token = jnp.where(is_anchor, topk[:, 0], token)
    source_row = (jnp.arange(q_n)[:, None] * m_n + plan.source).reshape(-1)
    is_child = plan.is_child.reshape(-1)
    state, next_token = _copy_parent_rows(is_child, source_row, dataclasses.replace(state, paths=paths),
                                          next_token)
    paths = state.paths
    paths = dataclasses.replace(
        paths, parent=jnp.where(is_child, plan.source.reshape(-1), paths.parent),  # a slot within the question
        fork_pos=jnp.where(is_child, steps, paths.fork_pos))
    token = jnp.where(is_child, plan.child_token.reshape(-1), token)
    return dataclasses.replace(state, paths=paths), next_token, token


def _record_token(paths: PathState, step: jax.Array, token: jax.Array, next_token: NextToken,
                  running: jax.Array) -> PathState:
    """Phase 4: write each running row's token (at its question's step, [B] int32) with its temperature-1
    logprob, entropy and anchor flag."""
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
    of a step that ends at this token, checked at the next boundary); a question with a running row moves to its
    next step. Rows that did not run keep their cache length, so their writes are overwritten if they ever run
    (a free slot is overwritten by a fork's copy, an idle block's by the question that takes it)."""
    paths = state.paths
    logits, cache = model(token[:, None], cache=state.cache, write_index=paths.cache_len)
    prm_cache, last_score = state.prm_cache, paths.last_score
    if prm is not None:
        score_logit, prm_cache = prm.step(token, cache=prm_cache, write_index=paths.cache_len)
        last_score = jnp.where(running, jax.nn.sigmoid(score_logit), last_score)
    paths = dataclasses.replace(paths, cache_len=paths.cache_len + running, last_score=last_score)
    q_n = state.step.shape[0]
    ran = jnp.any(running.reshape(q_n, -1), axis=-1)
    return dataclasses.replace(state, step=state.step + ran, logits=logits[:, 0], cache=cache, prm_cache=prm_cache,
                               paths=paths)


def _loop_body(p: DecodeParams, knobs: dict[str, jax.Array], model: nnx.Module, tables: Tables,
               prm: nnx.Module | None, state: DecodeState) -> DecodeState:
    """One loop step: the phases of the module docstring, in order."""
    next_token, topk, token = _read_next_token(p, knobs, tables, state)
    if prm is not None:
        state = _prune_weak_paths(state, next_token.qualifies, knobs["prune_below"], p.num_leaves)
    if p.stop_at_anchor:
        state = _stop_at_spent_anchor(state, next_token.qualifies, p.max_anchors)
    if p.mode == "edu":
        state, next_token, token = _fork(p, state, next_token, topk, token)
    running = state.paths.active  # the rows that emit a token this step
    paths = _record_token(state.paths, _row_steps(state.step, p.num_leaves), token, next_token, running)
    paths = _detect_stops(p, paths, token, running, tables)
    return _advance_models(dataclasses.replace(state, paths=paths), token, running, model, prm)


def _fits(state: DecodeState) -> jax.Array:
    """[] bool: some row is running and every running row's next write fits the cache (cache_len < S)."""
    paths = state.paths
    return jnp.any(paths.active) & jnp.all(~paths.active | (paths.cache_len < state.cache.length))


def _decode_loop(p: DecodeParams, knobs: dict[str, jax.Array], model: nnx.Module, tables: Tables,
                 prompts: jax.Array, prompt_lens: jax.Array, question_ids: jax.Array,
                 prm: nnx.Module | None = None, cache_buckets: bool | None = None) -> DecodeOutput:
    """The rollout loop: a prefill, then one `lax.while_loop` per cache length of `cache_lengths` (one length
    unless `cache_buckets`), the cache (and the PRM's) padded to the next length between them. A loop ends when no row
    runs or a running row's next write would not fit; the last length fits max_new_tokens, where every row
    stops. With `prm` (a scalar-head PRM) this is P-EDU: the PRM reads every generated token in lockstep with
    the policy (its own KV cache, forked alongside), and at each step boundary (a position that qualifies as an
    anchor) a path whose just-finished step scores below `prune_below` is dropped and its slot freed; if every
    running path of a question is weak, the best-scoring one is spared."""
    lengths = cache_lengths(prompts.shape[1], p.max_new_tokens, _buckets(cache_buckets))
    body = functools.partial(_loop_body, p, knobs, model, tables, prm)
    state = _prefill(p, model, prm, prompts, prompt_lens, question_ids, lengths[0])
    for i, length in enumerate(lengths):
        if i:
            state = dataclasses.replace(state, cache=resize_cache(state.cache, length),
                                        prm_cache=resize_cache(state.prm_cache, length))
        state = jax.lax.while_loop(_fits, body, state)
    return DecodeOutput.of(state)


def decode_fn(p: DecodeParams, graphdef: Any, prm_graphdef: Any = None, mesh: Mesh | None = None,
              rules: parallel.RulesLike = None, cache_buckets: bool | None = None):
    """The rollout program (prefill + the `lax.while_loop`s; P-EDU when `prm_graphdef` is given) as a pure
    function, not jitted: `(knobs, state, prm_state, tables, prompts, prompt_lens, question_ids) -> DecodeOutput`.

    `graphdef`/`state`: `nnx.split(policy)`; `prm_graphdef`/`prm_state`: `nnx.split(prm)` or None/None;
    `knobs`: {`DYNAMIC_FIELDS`: scalar} (`split_params`); `tables`: `Tables`; prompts [Q, P] int32 right-padded,
    prompt_lens [Q] int32 (each <= P), question_ids [Q] int32 (-1: a padding question). Any of them may be
    `jax.ShapeDtypeStruct`s: `jax.jit(decode_fn(...), in_shardings=decode_in_shardings(...)).lower(...)` compiles
    the loop for a target without memory (`edu-prm plan`). `p` is canonicalised (`static_params`); its dynamic
    fields come from `knobs`. `cache_buckets`: run through the `cache_lengths` buckets (False: one cache of
    P + max_new_tokens, the same records; None: `default_cache_buckets` of the platform compiled for).

    On a mesh of several devices the KV cache and activations are pinned to `rules`; when the `rollout` rule
    splits on the mesh, the loop runs under a `jax.shard_map` manual over those axes only (each device decodes
    its own questions, Q a multiple of the split), so parameters keep their sharding on the other axes."""
    p = static_params(p)
    layout = mesh if mesh is not None and mesh.devices.size > 1 else None
    rules = parallel.as_rules(rules)

    def local(knobs, state, prm_state, tables, prompts, prompt_lens, question_ids):
        prm = nnx.merge(prm_graphdef, prm_state) if prm_graphdef is not None else None
        # the mesh even of one device (where nothing is constrained): it says which chip the loop is compiled
        # for (`parallel.active_platform`), hence the cache-length buckets and the attention kernel
        with parallel.sharding_context(mesh, rules):
            return _decode_loop(p, knobs, nnx.merge(graphdef, state), tables, prompts, prompt_lens, question_ids,
                                prm, cache_buckets)

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


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _decode_jit(p: DecodeParams, graphdef: Any, prm_graphdef: Any, layout: tuple[Mesh, parallel.ShardingRules] | None,
                cache_buckets: bool | None, knobs: dict, state: Any, prm_state: Any, tables: Tables, prompts,
                prompt_lens, question_ids) -> DecodeOutput:
    """`decode_fn` on one device, or on a mesh without rollout sharding; `layout` (mesh, rules) pins the KV cache
    and activations (and keys the compile cache)."""
    mesh, rules = layout if layout is not None else (None, None)
    return decode_fn(p, graphdef, prm_graphdef, mesh, rules, cache_buckets)(knobs, state, prm_state, tables, prompts,
                                                                           prompt_lens, question_ids)


def _check_prm(prm: nnx.Module | None) -> None:
    if prm is not None and prm.head_spec.inserts_separator:
        raise ValueError("P-EDU needs a scalar-head PRM (scores at a step's last token); this PRM reads an "
                         "inserted separator token")


def _check_prompts(prompts: np.ndarray, prompt_lens: np.ndarray, question_ids: np.ndarray) -> None:
    """Raise ValueError unless prompts [Q, P], prompt_lens [Q] in 1..P and question_ids [Q] agree."""
    prompts, prompt_lens, question_ids = np.asarray(prompts), np.asarray(prompt_lens), np.asarray(question_ids)
    if prompts.ndim != 2 or prompt_lens.shape != (prompts.shape[0],) or question_ids.shape != prompt_lens.shape:
        raise ValueError(f"prompts {prompts.shape}, prompt_lens {prompt_lens.shape}, question_ids "
                         f"{question_ids.shape}: expected [Q, P], [Q], [Q]")
    real = question_ids >= 0
    if np.any(real & ((prompt_lens < 1) | (prompt_lens > prompts.shape[1]))):
        raise ValueError(f"prompt_lens: each must be in 1..{prompts.shape[1]} (the prompts' padded width), got "
                         f"{prompt_lens[real].tolist()}")


def decode(p: DecodeParams, model: nnx.Module, tables: Tables, prompts: np.ndarray, prompt_lens: np.ndarray,
           question_ids: np.ndarray, mesh: Mesh | None = None, prm: nnx.Module | None = None,
           rules: parallel.RulesLike = None, cache_buckets: bool | None = None) -> dict[str, np.ndarray]:
    """Run the rollout loop for a bucket of questions; returns `DecodeOutput`'s fields as host arrays, rows q*M + m.

    prompts [Q, P] int32 (right-padded), prompt_lens [Q] (1..P), question_ids [Q] (-1: a padding question).
    With a mesh, parameters are placed by `rules` (default table; the sampler's layout may differ from
    training's). When the `rollout` rule splits on the mesh, questions are sharded over those axes with
    `jax.shard_map` (manual over them only, so parameters keep their other axes' sharding) and each device forks
    within its own questions; Q must be a multiple of the rollout split. `cache_buckets`: run through the
    `cache_lengths` buckets (False: one cache length; the same records, module docstring; None: the platform's
    `default_cache_buckets`). Raises ValueError for
    inconsistent prompt arrays, a PRM with a separator head, or questions that do not divide over the rollout
    axes.
    """
    _check_prompts(prompts, prompt_lens, question_ids)
    _check_prm(prm)
    graphdef, state = nnx.split(model)
    p, knobs = split_params(p)
    prm_graphdef, prm_state = nnx.split(prm) if prm is not None else (None, None)
    args = (jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lens, jnp.int32),
            jnp.asarray(question_ids, jnp.int32))
    if mesh is None or mesh.devices.size == 1:  # one device: no placement to do, the constraints are no-ops
        out = _decode_jit(p, graphdef, prm_graphdef, None, cache_buckets, knobs, state, prm_state, tables, *args)
        return out.to_host()
    rules = parallel.as_rules(rules)
    state = jax.device_put(state, parallel.state_shardings(state, mesh, rules))  # no-op when already placed
    if prm_state is not None:
        prm_state = jax.device_put(prm_state, parallel.state_shardings(prm_state, mesh, rules))
    tables = jax.device_put(tables, NamedSharding(mesh, PartitionSpec()))
    split = rules.axis_size("rollout", mesh)
    if split == 1:
        out = _decode_jit(p, graphdef, prm_graphdef, (mesh, rules), cache_buckets, knobs, state, prm_state, tables,
                          *args)
    else:
        if args[0].shape[0] % split:
            raise ValueError(f"{args[0].shape[0]} questions do not divide over the rollout mesh axes "
                             f"{rules.split_axes('rollout', mesh)} ({split} ways)")
        out = _sharded_decode(p, graphdef, prm_graphdef, mesh, rules, cache_buckets)(knobs, state, prm_state, tables,
                                                                                    *args)
    return out.to_host()


@functools.lru_cache(maxsize=32)
def _sharded_decode(p: DecodeParams, graphdef: Any, prm_graphdef: Any, mesh: Mesh, rules: parallel.ShardingRules,
                    cache_buckets: bool | None = None):
    """`decode_fn` under its `shard_map` (manual over the rollout mesh axes), jitted once per layout; the returned
    runner places the per-question arrays over those axes and the knobs replicated."""
    jitted = jax.jit(decode_fn(p, graphdef, prm_graphdef, mesh, rules, cache_buckets))
    rows = NamedSharding(mesh, _rows_spec(rules.split_axes("rollout", mesh)))
    rep = NamedSharding(mesh, PartitionSpec())

    def run(knobs, state, prm_state, tables, prompts, prompt_lens, question_ids):
        put = lambda x: jax.device_put(x, rows)  # noqa: E731
        rep_put = lambda x: jax.device_put(x, rep)  # noqa: E731
        return jitted(jax.tree.map(rep_put, knobs), state, prm_state, tables, put(prompts), put(prompt_lens),
                      put(question_ids))

    return run


# ------------------------------------------------------------------------------------------------ slot refill


def _admit(p: DecodeParams, state: DecodeState, pre: Prefilled, take: jax.Array) -> DecodeState:
    """Block q of the pool takes prefilled question take[q] of `pre` (take [Q] int32, -1: the block keeps what it
    has): its rows restart as `_start_slots` would start them, with the prompt's cache written into the slots
    that run (the other slots get theirs from a fork's copy). pre.cache may be shorter or longer than the pool's
    cache; it holds the prompt only (positions < P), so it is padded or cut to fit."""
    q_n, m_n = state.step.shape[0], p.num_leaves
    b_n, q_pre = q_n * m_n, pre.question_ids.shape[0]
    admitted = take >= 0
    src = jnp.maximum(take, 0)
    row_admitted, row_src = jnp.repeat(admitted, m_n), jnp.repeat(src, m_n)
    qids = jnp.where(admitted, pre.question_ids[src], state.question_ids)
    start = _starting_slots(p, jnp.where(admitted, pre.question_ids[src], -1))
    fresh = _fresh_paths(p, start, pre.prompt_lens[row_src])
    paths = jax.tree.map(lambda new, old: jnp.where(row_admitted.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
                         fresh, state.paths)
    block_of = jnp.full((q_pre,), q_n, jnp.int32).at[jnp.where(admitted, take, q_pre)].set(
        jnp.arange(q_n, dtype=jnp.int32), mode="drop")  # prefilled question -> the block taking it (q_n: none)
    n_slots = m_n if p.mode == "ht" else 1  # the slots that run from the prompt

    def write(cache: KVCache | None, prompt_cache: KVCache | None) -> KVCache | None:
        if cache is None:
            return None
        prompt_cache = resize_cache(prompt_cache, cache.length)

        def one_slot(m, c):
            rows = jnp.where(block_of < q_n, block_of * m_n + m, b_n)  # b_n: dropped
            if c.stacked:
                return c.replace(c.k.at[:, rows].set(prompt_cache.k, mode="drop"),
                                 c.v.at[:, rows].set(prompt_cache.v, mode="drop"))
            return c.replace(tuple(k.at[rows].set(pk, mode="drop") for k, pk in zip(c.k, prompt_cache.k)),
                             tuple(v.at[rows].set(pv, mode="drop") for v, pv in zip(c.v, prompt_cache.v)))

        return jax.lax.fori_loop(0, n_slots, one_slot, cache).constrained()

    return DecodeState(step=jnp.where(admitted, 0, state.step), question_ids=qids,
                       logits=jnp.where(row_admitted[:, None], pre.logits[row_src], state.logits),
                       cache=write(state.cache, pre.cache), prm_cache=write(state.prm_cache, pre.prm_cache),
                       paths=paths, pruned_tokens=jnp.where(admitted, 0, state.pruned_tokens))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _prefill_jit(p: DecodeParams, graphdef: Any, prm_graphdef: Any, length: int, state: Any, prm_state: Any,
                 prompts: jax.Array, prompt_lens: jax.Array, question_ids: jax.Array) -> Prefilled:
    prm = nnx.merge(prm_graphdef, prm_state) if prm_graphdef is not None else None
    return _prefill_prompts(nnx.merge(graphdef, state), prm, prompts, prompt_lens, question_ids, length)


@functools.partial(jax.jit, static_argnums=(0,))
def _start_jit(p: DecodeParams, pre: Prefilled) -> DecodeState:
    return _start_slots(p, pre)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _admit_jit(p: DecodeParams, state: DecodeState, pre: Prefilled, take: jax.Array) -> DecodeState:
    return _admit(p, state, pre, take)


@functools.partial(jax.jit, static_argnums=(0,))
def _resize_jit(length: int, state: DecodeState) -> DecodeState:
    return dataclasses.replace(state, cache=resize_cache(state.cache, length),
                               prm_cache=resize_cache(state.prm_cache, length))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(7,))
def _segment_jit(p: DecodeParams, graphdef: Any, prm_graphdef: Any, knobs: dict, state: Any, prm_state: Any,
                 tables: Tables, pool: DecodeState, pending: jax.Array):
    """Run the loop on `pool` until no row runs, a running row's next write would not fit the cache, or (when
    `pending`, a [] bool: questions wait) some block has no running row. Returns (pool, loop steps [] int32,
    block running [Q] bool, the cache length the running rows need next [] int32)."""
    model = nnx.merge(graphdef, state)
    prm = nnx.merge(prm_graphdef, prm_state) if prm_graphdef is not None else None
    q_n, m_n = pool.step.shape[0], p.num_leaves

    def cond(carry):
        s, _ = carry
        idle = ~jnp.any(s.paths.active.reshape(q_n, m_n), axis=-1)
        return _fits(s) & ~(pending & jnp.any(idle))

    def body(carry):
        s, n = carry
        return _loop_body(p, knobs, model, tables, prm, s), n + 1

    pool, n = jax.lax.while_loop(cond, body, (pool, jnp.int32(0)))
    paths = pool.paths
    running = jnp.any(paths.active.reshape(q_n, m_n), axis=-1)
    return pool, n, running, jnp.max(jnp.where(paths.active, paths.cache_len, 0)) + 1


@functools.partial(jax.jit, static_argnums=(0,))
def _block_output_jit(num_leaves: int, pool: DecodeState, q: jax.Array) -> DecodeOutput:
    """Block q's record: its M rows, and its pruned_tokens and steps as [1] arrays."""
    out = DecodeOutput.of(pool)
    per_question = ("pruned_tokens", "steps")
    return DecodeOutput(**{
        f.name: jax.lax.dynamic_slice_in_dim(getattr(out, f.name), q, 1) if f.name in per_question
        else jax.lax.dynamic_slice_in_dim(getattr(out, f.name), q * num_leaves, num_leaves)
        for f in dataclasses.fields(DecodeOutput)})


@dataclasses.dataclass
class _Waiting:
    """A prefilled batch whose questions wait for blocks: `rows` of `pre` not yet admitted."""

    batch: int
    pre: Prefilled
    prompt_len: int
    rows: list[int]


def decode_refill(p: DecodeParams, model: nnx.Module, tables: Tables,
                  batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], prm: nnx.Module | None = None,
                  cache_buckets: bool | None = None,
                  stats: dict[str, int] | None = None) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """The rollout loop with slot refill, on one device: yields (batch index, row, record) for every real
    question (id >= 0) of `batches`, in the order they finish; the record is `DecodeOutput`'s fields as host
    arrays for that question alone (rows 0..M-1, pruned_tokens and steps of shape [1]).

    `batches` yields (prompts [Q, P_b], prompt_lens [Q], question_ids [Q]) as `decode` takes them, Q the same in
    every batch (the pool holds Q question blocks of M slots). Each batch is prefilled as `decode` would prefill
    it; the first fills the pool, and whenever a block's question has finished while others wait, the loop
    returns (a segment ends), the record is read and the next waiting question takes the block. Between
    segments the cache is padded or cut to the `cache_lengths` bucket (over the longest padded prompt in the
    pool) that the running rows need. Records equal `decode`'s for the same batches: keys and steps are per
    question, so the tokens, forks and stops are the same; floats as with cache buckets (module docstring).
    `stats`, if given, gains loop_steps (loop iterations over the whole pool), segments and prefills. One
    device only: a multi-device mesh uses `decode` per batch. Raises ValueError as `decode` does, or when the
    batches' Q differ."""
    _check_prm(prm)
    cache_buckets = _buckets(cache_buckets)  # this process's device
    graphdef, state = nnx.split(model)
    prm_graphdef, prm_state = nnx.split(prm) if prm is not None else (None, None)
    p, knobs = split_params(p)
    m_n, g_n = p.num_leaves, p.max_new_tokens
    stats = stats if stats is not None else {}
    for key in ("loop_steps", "segments", "prefills"):
        stats.setdefault(key, 0)
    items = enumerate(batches)
    first_item = next(items, None)
    if first_item is None:
        return

    def prefill(item: tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None) -> _Waiting | None:
        if item is None:
            return None
        b, (prompts, lens, ids) = item
        _check_prompts(prompts, lens, ids)
        prompts, lens, ids = np.asarray(prompts), np.asarray(lens), np.asarray(ids)
        plen = prompts.shape[1]
        pre = _prefill_jit(p, graphdef, prm_graphdef, cache_lengths(plen, g_n, cache_buckets)[0], state,
                           prm_state,
                           jnp.asarray(prompts, jnp.int32), jnp.asarray(lens, jnp.int32), jnp.asarray(ids, jnp.int32))
        stats["prefills"] += 1
        return _Waiting(b, pre, plen, [r for r in range(len(ids)) if ids[r] >= 0])

    first = prefill(first_item)
    pool = _start_jit(p, first.pre)
    q_n = int(first.pre.question_ids.shape[0])
    owner = {q: (first.batch, q) for q in first.rows}  # block -> (batch, row) of the question it runs
    block_plen = {q: first.prompt_len for q in first.rows}
    need = first.prompt_len + 1
    waiting: _Waiting | None = None
    upcoming = next(items, None)
    while True:
        admits = []
        idle = [q for q in range(q_n) if q not in owner]
        while idle and ((waiting is not None and waiting.rows) or upcoming is not None):
            if waiting is None or not waiting.rows:
                waiting, upcoming = prefill(upcoming), next(items, None)
                if int(waiting.pre.question_ids.shape[0]) != q_n:
                    raise ValueError(f"batch {waiting.batch}: {waiting.pre.question_ids.shape[0]} questions, the "
                                     f"pool holds {q_n}: every batch must have the same number")
                continue
            take = np.full((q_n,), -1, np.int32)
            while idle and waiting.rows:
                q, r = idle.pop(0), waiting.rows.pop(0)
                take[q], owner[q], block_plen[q] = r, (waiting.batch, r), waiting.prompt_len
                need = max(need, waiting.prompt_len + 1)
            admits.append((waiting.pre, take))
        if not owner:
            return
        base = max(block_plen[q] for q in owner)
        length = next(n for n in cache_lengths(base, g_n, cache_buckets) if n >= need)
        if pool.cache.length != length:
            pool = _resize_jit(length, pool)
        for pre, take in admits:
            pool = _admit_jit(p, pool, pre, jnp.asarray(take))
        pending = (waiting is not None and bool(waiting.rows)) or upcoming is not None
        pool, steps, running, need_next = _segment_jit(p, graphdef, prm_graphdef, knobs, state, prm_state, tables,
                                                       pool, jnp.asarray(pending))
        running, steps, need = np.asarray(running), int(steps), int(need_next)
        stats["loop_steps"] += steps
        stats["segments"] += 1
        finished = [q for q in sorted(owner) if not running[q]]
        if steps == 0:  # the cache fits every running row and no block is idle while questions wait
            raise RuntimeError("decode_refill: a segment made no progress")
        for q in finished:
            b, r = owner.pop(q)
            del block_plen[q]
            yield b, r, _block_output_jit(m_n, pool, jnp.int32(q)).to_host()
