"""The anchor rule and the fork plan of EDU sampling: which positions qualify, which paths may fork, who gets
the free slots first, and into which slots the children go. Pure functions of small arrays; the rollout loop
(`decode.py`) applies them, `tests/test_anchor.py` checks them on hand-built inputs.

Shapes: Q questions, M slots each, B = Q * M rows (question q's slot m is row q*M + m), K = branch_k, V = vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def anchor_qualifies(entropy: jax.Array, top1_token: jax.Array, tau: float | jax.Array,
                     symbol_mask: jax.Array) -> jax.Array:
    """METHOD.md's anchor rule: a position qualifies when H > tau (strictly) and its top-1 token is not a symbol.

    entropy [...] float32 (nats), top1_token [...] int32 (the argmax token), tau a scalar, symbol_mask [V] bool
    -> [...] bool. One rule for all three uses, so they always agree: where EDU forks, where P-EDU's steps end
    (and a path's PRM score is checked), and the `high_entropy` flags Best-of-N splits HT samples at."""
    return (entropy > tau) & ~symbol_mask[top1_token]


def branch_candidates(active: jax.Array, qualifies: jax.Array, n_anchors: jax.Array,
                      max_anchors: int) -> jax.Array:
    """Paths that may fork now: running, at a qualifying position, and below `max_anchors` forks on their path.

    All [B]: bool, bool, int32 -> bool. Whether a candidate really forks depends on free slots (`fork_plan`)."""
    return active & qualifies & (n_anchors < max_anchors)


def spent_anchor(active: jax.Array, qualifies: jax.Array, n_anchors: jax.Array, max_anchors: int) -> jax.Array:
    """Paths at a qualifying position that may fork no more (running, `max_anchors` anchors already on the path):
    where an MCTS-EDU expansion stops a path (`decode.ExpansionParams`), the complement of `branch_candidates`
    among running qualifying paths. All [B]: bool, bool, int32 -> bool."""
    return active & qualifies & (n_anchors >= max_anchors)


def fork_priority(entropy: jax.Array, slot: jax.Array, threshold_mode: str) -> jax.Array:
    """Who gets the free slots first when candidates outnumber them (higher priority first, ties: lower slot).

    "fixed": the lowest slot (the threshold stays tau); "budget": the highest entropy, so the effective threshold
    rises as the leaf budget runs out (METHOD.md "Dynamic threshold"). entropy [B] float32, slot [B] int32 (the
    slot index within its question) -> [B] float32."""
    if threshold_mode == "budget":
        return entropy
    return -slot.astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ForkPlan:
    """One step's forks within each question (all [Q, M])."""

    source: jax.Array  # int32, slot each slot copies its row from this step (itself unless it is a new child)
    child_token: jax.Array  # int32, token a new child emits: its parent's j-th runner-up (0 where not a child)
    is_child: jax.Array  # bool, a new child takes this (previously free) slot
    is_anchor: jax.Array  # bool, this path forks here (at least one child got a slot)


def fork_plan(candidates: jax.Array, priority: jax.Array, used: jax.Array, topk_tokens: jax.Array,
              branch_k: int) -> ForkPlan:
    """Which candidates branch, and into which free slots.

    candidates [Q, M] bool, priority [Q, M] float32 (`fork_priority`), used [Q, M] bool, topk_tokens [Q, M, K]
    int32 (K >= branch_k). Candidates are ranked by priority; the r-th gets free slots r*(K-1) .. r*(K-1)+K-2
    (free slots in slot order) for its runner-up tokens 1 .. K-1, as far as free slots last. So with fewer free
    slots than children, the higher-priority candidates fork and the rest keep going as they are."""
    q_n, m_n = candidates.shape
    children = branch_k - 1
    idx = jnp.arange(m_n)
    # rank among candidates: higher priority first, ties by slot index
    better = (priority[:, None, :] > priority[:, :, None]) | ((priority[:, None, :] == priority[:, :, None]) &
                                                              (idx[None, None, :] < idx[None, :, None]))
    rank = jnp.sum(better & candidates[:, None, :], axis=-1)
    free = ~used
    n_free = jnp.sum(free, axis=-1, keepdims=True)
    order_key = jnp.where(free, jnp.cumsum(free, axis=-1) - 1, m_n + idx)
    free_slots = jnp.argsort(order_key, axis=-1)  # free_slots[q, r] = r-th free slot
    source = jnp.broadcast_to(idx, (q_n, m_n))
    child_token = jnp.zeros((q_n, m_n), jnp.int32)
    is_child = jnp.zeros((q_n, m_n), bool)
    rows = jnp.arange(q_n)[:, None]
    for j in range(children):
        target = rank * children + j
        ok = candidates & (target < n_free)
        dest = jnp.where(ok, jnp.take_along_axis(free_slots, jnp.minimum(target, m_n - 1), -1), m_n)
        source = source.at[rows, dest].set(jnp.broadcast_to(idx, (q_n, m_n)), mode="drop")
        child_token = child_token.at[rows, dest].set(topk_tokens[:, :, j + 1], mode="drop")
        is_child = is_child.at[rows, dest].set(True, mode="drop")
    is_anchor = candidates & (rank * children < n_free)
    return ForkPlan(source, child_token, is_child, is_anchor)
