"""The programs a run executes, on abstract inputs: the PRM train step, the EDU/HT decode loop and the PRM
scoring forward, each with its analytic FLOPs and the bytes a step must move.

Each builder takes a zero-argument model factory (called under `nnx.eval_shape`: parameters and optimizer
state are shapes and dtypes only, so a 72B plan needs no memory) and returns a `Program`: the library's own
pure function (`training.loop.make_train_step`, `sampling.decode.decode_fn`, `scoring.examples.score_fn`, so
whatever the model code is, that is what gets compiled), its abstract arguments with their shardings on the
target's mesh, and the figures the report needs.

FLOP formulas (matmul FLOPs, 2 per multiply-add; N = parameters in matmuls, `training.metrics.matmul_params`):
- train step: 6 N per token plus attention 12 L H D T per token (PaLM, appendix B: full, not causally halved,
  attention), `training.metrics.train_flops_per_token`, times rows x seq_len;
- scoring forward: one third of that, 2 N + 4 L H D T per token;
- decode, one loop step (every row of the slot pool emits a token): 2 N (LM head included) + 4 L H D S per row,
  S the whole preallocated cache (the loop attends over all of it, masked); P-EDU adds the PRM's own per row;
- prefill: 2 N_backbone + 4 L H D S per prompt token, plus the LM head at each prompt's last position.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from edu_prm_jax import parallel
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.qwen2 import cache_axes, cache_shapes
from edu_prm_jax.sampling.decode import DecodeParams, Tables, decode_fn, decode_in_shardings, knob_dtypes
from edu_prm_jax.scoring.examples import score_fn
from edu_prm_jax.training.loop import LossFn, make_train_step, new_train_state
from edu_prm_jax.training.metrics import matmul_params, train_flops_per_token

ModelFactory = Callable[[], nnx.Module]

# The packed PRM batch `training.prm_train.PackedStream` yields: field -> dtype, each [rows, seq_len].
PRM_BATCH_FIELDS: dict[str, Any] = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
                                    "step_end_mask": jnp.bool_, "loss_mask": jnp.bool_, "targets": jnp.float32}


@dataclasses.dataclass
class Program:
    """One program to compile for a target, with what the report derives from it.

    `fn(*args)` is the pure function; `args` are `jax.ShapeDtypeStruct` pytrees, `in_shardings` theirs.
    `model_flops` counts one step on the whole slice (the formulas in the module docstring); `min_bytes_per_device`
    is what one step must at least read or write per device (None: the compiled program's arguments + outputs).
    A decode step is one loop iteration (`loop_steps` of them per call after a prefill of `prefill_flops`)."""

    name: str
    description: str
    fn: Callable[..., Any]
    args: tuple
    in_shardings: tuple
    model_flops: float
    step: str
    tokens_per_step: int
    out_shardings: Any = None
    donate_argnums: tuple[int, ...] = ()
    min_bytes_per_device: float | None = None
    loop_steps: int = 0
    prefill_flops: float = 0.0
    scanned_layers: bool = False  # the compiler counts a `lax.scan` body once: its FLOP count covers one layer
    notes: list[str] = dataclasses.field(default_factory=list)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _abstract(tree: Any, shardings: Any) -> Any:
    """`tree` (an nnx.State of Variables, or a pytree of arrays) with each array replaced by a ShapeDtypeStruct
    carrying its sharding from `shardings` (NamedShardings at the Variables' / arrays' places)."""
    def one(x: Any, s: Any) -> Any:
        if _is_var(x):
            return x.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, tree, shardings, is_leaf=_is_var)


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (Variables, arrays or ShapeDtypeStructs) laid out by `shardings`."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize, tree,
                         shardings, is_leaf=_is_var)
    return int(sum(jax.tree.leaves(sizes)))


def _split_abstract(factory: ModelFactory, wrap: Callable[[nnx.Module], nnx.Module] = lambda m: m,
                    cfg_of: Callable[[nnx.Module], Qwen2Config] = lambda m: m.cfg
                    ) -> tuple[Any, nnx.State, Qwen2Config]:
    """(graphdef, abstract state, config) of `wrap(factory())` built under `nnx.eval_shape` (no memory); the
    config is read from the model while it is built (`cfg_of`), since the abstract module's is not returned."""
    cfgs: list[Qwen2Config] = []

    def build() -> nnx.Module:
        model = factory()
        cfgs.append(cfg_of(model))
        return wrap(model)

    graphdef, state = nnx.split(nnx.eval_shape(build))
    return graphdef, state, cfgs[0]


def layout_note(cfg: Qwen2Config) -> str:
    """How the compiled model runs its layers and attention, e.g. "scanned layers, splash attention"."""
    layers = {True: "scanned", False: "unrolled", None: "platform-default"}[cfg.scan_layers]
    return f"{layers} layers, {cfg.attention} attention"


def _attention_flops(cfg: Qwen2Config, keys: int) -> float:
    """Score and value matmuls of one query token against `keys` positions, all layers: 4 L H D S."""
    return 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * keys


def prm_batch(rows: int, seq_len: int, mesh: Mesh, rules: parallel.RulesLike = None) -> dict[str, Any]:
    """The abstract packed batch of `rows` x `seq_len` (`PRM_BATCH_FIELDS`), rows split over the `batch` rule.
    Raises ValueError when the rows do not divide over the batch mesh axes (as the Trainer does)."""
    div = parallel.batch_divisor(mesh, rules)
    if rows % div:
        raise ValueError(f"rows={rows} do not divide over the mesh's batch axes ({div} ways)")
    sharding = parallel.batch_sharding(mesh, 2, rules)
    return {k: jax.ShapeDtypeStruct((rows, seq_len), dtype, sharding=sharding) for k, dtype in PRM_BATCH_FIELDS.items()}


def train_program(factory: ModelFactory, tx: optax.GradientTransformation, loss_fn: LossFn, mesh: Mesh,
                  rules: parallel.RulesLike, rows: int, seq_len: int, count_key: str | None = None,
                  description: str = "") -> Program:
    """The Trainer's step (`make_train_step`) on the abstract (model, optimizer) state of `factory()` and `tx`
    (accumulation included when `tx` accumulates), state donated as the Trainer donates it, on a packed
    [rows, seq_len] batch. The model must have a `cfg` (Qwen2Config; a PRM's includes expanded blocks)."""
    rules = parallel.as_rules(rules)
    graphdef, state, cfg = _split_abstract(factory, wrap=lambda model: new_train_state(model, tx))
    shardings = parallel.state_shardings(state, mesh, rules)
    batch = prm_batch(rows, seq_len, mesh, rules)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    flops = train_flops_per_token(cfg, seq_len, lm_head=False) * rows * seq_len
    return Program("train", description or f"train step, {rows} rows x {seq_len} tokens",
                   make_train_step(graphdef, loss_fn, mesh, rules, count_key), (_abstract(state, shardings), batch),
                   (shardings, batch_shardings), flops, "micro-batch", rows * seq_len,
                   out_shardings=(shardings, None), donate_argnums=(0,), notes=[layout_note(cfg)],
                   scanned_layers=bool(cfg.scan_layers))


def score_program(factory: ModelFactory, mesh: Mesh, rules: parallel.RulesLike, rows: int, seq_len: int,
                  description: str = "") -> Program:
    """The PRM forward (`score_fn`) of `factory()` on [rows, seq_len] tokens, rows over the `batch` rule."""
    rules = parallel.as_rules(rules)
    graphdef, state, cfg = _split_abstract(factory)
    shardings = parallel.state_shardings(state, mesh, rules)
    batch = prm_batch(rows, seq_len, mesh, rules)
    flops = rows * seq_len * (2.0 * matmul_params(cfg, lm_head=False) + _attention_flops(cfg, seq_len))
    rows_sh = batch["tokens"].sharding
    return Program("score", description or f"PRM forward, {rows} rows x {seq_len} tokens",
                   score_fn(graphdef, mesh, rules), (_abstract(state, shardings), batch["tokens"],
                                                     batch["segment_ids"]),
                   (shardings, rows_sh, rows_sh), flops, "forward", rows * seq_len, notes=[layout_note(cfg)],
                   scanned_layers=bool(cfg.scan_layers))


def decode_program(p: DecodeParams, policy_factory: ModelFactory, mesh: Mesh, rules: parallel.RulesLike,
                   questions: int, prompt_len: int, prm_factory: ModelFactory | None = None,
                   stop_seqs_shape: tuple[int, int] = (1, 1), name: str = "decode", description: str = "",
                   cache_buckets: bool | None = None) -> Program:
    """The rollout loop (`decode_fn`: prefill + `lax.while_loop`; P-EDU with `prm_factory`) for `questions`
    prompts of `prompt_len` tokens and `p.num_leaves` slots each, questions over the `rollout` rule.

    A step is one loop iteration: every one of the Q x M rows emits a token (an upper bound: finished rows still
    compute). `min_bytes_per_device` = the parameters one device holds plus its share of the KV cache(s), which
    every step reads whole. `cache_buckets` as `decode_fn` takes it (None: the target platform's default). Raises
    ValueError when the questions do not divide over the rollout axes."""
    rules = parallel.as_rules(rules)
    split = rules.axis_size("rollout", mesh)
    if questions % split:
        raise ValueError(f"{questions} questions do not divide over the rollout mesh axes "
                         f"{rules.split_axes('rollout', mesh)} ({split} ways)")
    graphdef, state, cfg = _split_abstract(policy_factory)
    prm_graphdef = prm_state = None
    prm_cfgs: list[Qwen2Config] = []
    if prm_factory is not None:
        prm_graphdef, prm_state, prm_cfg = _split_abstract(prm_factory, cfg_of=lambda prm: prm.backbone.cfg)
        prm_cfgs.append(prm_cfg)
    shardings = decode_in_shardings(mesh, state, prm_state, rules)
    rep = shardings[0]
    knobs = {k: jax.ShapeDtypeStruct((), dtype, sharding=rep) for k, dtype in knob_dtypes().items()}
    tables = Tables.abstract(cfg.vocab_size, stop_seqs_shape, rep)
    prompts = jax.ShapeDtypeStruct((questions, prompt_len), jnp.int32, sharding=shardings[4])
    per_q = jax.ShapeDtypeStruct((questions,), jnp.int32, sharding=shardings[5])
    args = (knobs, _abstract(state, shardings[1]),
            _abstract(prm_state, shardings[2]) if prm_state is not None else None, tables, prompts, per_q, per_q)
    rows, cache_len = questions * p.num_leaves, prompt_len + p.max_new_tokens
    models = [(cfg, True), *[(c, False) for c in prm_cfgs]]
    step_flops = sum(rows * (2.0 * matmul_params(c, lm_head=head) + _attention_flops(c, cache_len))
                     for c, head in models)
    prefill = sum(questions * prompt_len * (2.0 * matmul_params(c, lm_head=False) + _attention_flops(c, cache_len))
                  for c, _ in models) + questions * 2.0 * cfg.hidden_size * cfg.vocab_size
    held = bytes_per_device(state, shardings[1])
    if prm_state is not None:
        held += bytes_per_device(prm_state, shardings[2])
    for c, _ in models:  # every step reads each layer's K and V cache whole
        shapes = cache_shapes(c.cache_layout, rows, c.num_key_value_heads, c.head_dim, cache_len)
        for axes, shape in zip(cache_axes(c.cache_layout), shapes):
            local = math.prod(NamedSharding(mesh, rules.spec(axes, shape, mesh)).shard_shape(shape))
            held += c.num_hidden_layers * local * jnp.dtype(c.compute_dtype).itemsize
    mode = "P-EDU" if prm_factory is not None else p.mode.upper()
    text = description or (f"{mode} decode, {questions} questions x {p.num_leaves} slots, prompt {prompt_len} + "
                           f"{p.max_new_tokens} new tokens")
    return Program(name, text, decode_fn(p, graphdef, prm_graphdef, mesh, rules, cache_buckets), args, shardings,
                   step_flops, "token step", rows, min_bytes_per_device=held, loop_steps=p.max_new_tokens,
                   prefill_flops=prefill, notes=[layout_note(cfg)], scanned_layers=bool(cfg.scan_layers))
