"""A generic, resumable optax training loop over any objective `loss_fn(model, batch) -> (loss, aux)`.

One jitted step: the (model, optimizer) pair is `nnx.split` once; the step is a pure function of
(state, batch) that merges, differentiates, updates and returns the new state, which is donated. Params
and optimizer moments are sharded by their logical axes (`parallel.state_shardings`), the batch over the
mesh's batch axes, so the same code runs on one CPU, 8 simulated devices or an accelerator mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import pathlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from edu_prm_jax import parallel
from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_text_atomic
from edu_prm_jax.models.qwen2 import Qwen2
from edu_prm_jax.training.checkpointing import Checkpointer
from edu_prm_jax.training.metrics import MetricsWriter, mfu, train_flops_per_token
from edu_prm_jax.training.optim import OptimConfig, make_optimizer, make_schedule

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
EvalFn = Callable[[nnx.Module, int], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop settings; `steps` counts micro-batches (= optimizer updates * optim.accum_steps)."""

    steps: int = 1000  # micro-batch steps to run in total (a resumed run continues to this)
    log_every: int = 10  # fetch and write train metrics every n steps (the only host sync)
    eval_every: int = 0  # run eval_fn every n steps (0 = only at the end, if eval_fn is given)
    checkpoint_every: int = 0  # save every n steps (0 = only at the end / on SIGTERM)
    keep_checkpoints: int = 3  # keep the last k checkpoints (plus the best one by best_metric)
    best_metric: str | None = None  # eval metric that picks the 'best' checkpoint
    best_mode: str = "min"  # 'min' or 'max' for best_metric
    async_checkpointing: bool = True  # Orbax async save (the host copy is still synchronous)
    peak_flops_per_device: float = 1e12  # for the MFU estimate (set per accelerator: bf16 peak FLOP/s)
    progress: bool = True  # tqdm progress bar on the console
    tensorboard: bool = True  # TensorBoard event files under workdir/tb


CHECKPOINT_SUBDIR = "checkpoints"  # a Trainer's checkpoints live in <workdir>/checkpoints


class _TrainState(nnx.Module):
    """What a checkpoint's `state` item holds: {'model': the model's state, 'optimizer': step + moments}."""

    def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer):
        self.model = model
        self.optimizer = optimizer


def restore_model(checkpointer: Checkpointer, step: int, abstract_model: nnx.Module, mesh: Mesh,
                  rules: parallel.RulesLike = None) -> nnx.Module:
    """The model alone from a Trainer checkpoint, placed on `mesh` by its logical axes. `abstract_model` is an
    `nnx.eval_shape`-built model of the trained architecture. The optimizer state (two more model-sized copies
    under AdamW) is never read, and no Trainer is built: what an export needs (benchmarks/export_memory.py)."""
    graphdef, state = nnx.split(abstract_model)
    shardings = parallel.state_shardings(state, mesh, rules)
    target = jax.tree.map(lambda var, sharding: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype,
                                                                                 sharding=sharding)),
                          state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    restored = checkpointer.restore_part(step, {"model": target})
    return nnx.merge(graphdef, restored["model"])


class PreemptedError(BaseException):
    """Training stopped on SIGTERM (after saving a checkpoint when a step had run); rerunning with the same
    workdir resumes. The CLI exits with `EXIT_PREEMPTED` so a scheduler does not read the run as finished. A
    BaseException, like KeyboardInterrupt: raised from a signal handler at any point, it must not be taken for
    an ordinary failure by an `except Exception` (e.g. a checkpoint restore would call the step damaged)."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again


@contextlib.contextmanager
def preemptible(what: str) -> Iterator[None]:
    """A SIGTERM while the body runs outside `Trainer.train` (loading the model, building the optimizer state,
    restoring a checkpoint) raises PreemptedError at once: there is no step to finish and nothing new to save.
    `Trainer.train` takes the signal over while it runs (finish the step in flight, save, return). So a
    scheduler sees `EXIT_PREEMPTED` whenever the signal arrives, never a bare kill (-15)."""

    def stop(*_: Any) -> None:
        raise PreemptedError(f"stopped by SIGTERM while {what} was starting or finishing, before or after its "
                             "training steps; nothing new to save, rerun with the same --workdir to resume")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient; the message names the step."""


@jax.jit
def _track_nonfinite(first: jax.Array, step: int, loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """`first` (int32 scalar, -1 = none yet), set to `step` at the first step whose loss or gradient norm is
    not finite."""
    bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return jnp.where((first < 0) & bad, jnp.asarray(step, jnp.int32), first)


def _seq_len(batch: Mapping[str, Any]) -> int:
    return int(np.shape(batch["tokens"])[1])


class Trainer:
    """Owns the sharded train state, the jitted step, metrics and checkpoints of one run in `workdir`.

    A run that finds a checkpoint in workdir/checkpoints resumes from it (params, optimizer state, data
    iterator state, step). SIGTERM makes the loop save after the current step and return.
    """

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: LossFn,
        optim: OptimConfig | optax.GradientTransformation,
        train_cfg: TrainConfig,
        workdir: str | pathlib.Path,
        *,
        mesh: Mesh | None = None,
        eval_fn: EvalFn | None = None,
        config: Mapping[str, Any] | None = None,
        rules: parallel.RulesLike = None,
        count_key: str | None = None,
    ):
        """`count_key`: the field of `loss_fn`'s aux holding the number (or total weight) of supervised positions
        its loss is the mean over ('num_steps' for `prm_loss`, 'weighted_tokens' for `lm_loss`). Required when
        `optim` accumulates (accum_steps > 1): each micro-batch then contributes the gradient of loss * count,
        and the update divides the sum by the summed count, so it equals the update of the combined batch
        (`optim.accumulate_by_count`). Raises ValueError when it is missing."""
        accum = optim.accum_steps if isinstance(optim, OptimConfig) else 1
        if accum > 1 and count_key is None:
            raise ValueError(f"accum_steps={accum} needs count_key: the loss aux field counting the supervised "
                             "positions the loss averages over (e.g. 'num_steps' for prm_loss, 'weighted_tokens' "
                             "for lm_loss), so that the accumulated update is normalised by the whole batch")
        self.count_key = count_key if accum > 1 else None
        self.cfg = train_cfg
        self.workdir = storage.as_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = mesh or parallel.make_mesh(devices=jax.local_devices()[:1])
        self.rules = parallel.as_rules(rules)  # params, batch rows and activations at block boundaries
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.config = dict(config or {})
        self.schedule = make_schedule(optim) if isinstance(optim, OptimConfig) else None
        self.accum = accum
        tx = make_optimizer(optim) if isinstance(optim, OptimConfig) else optim
        parallel.shard_model(model, self.mesh, self.rules)
        holder = _TrainState(model, nnx.Optimizer(model, tx, wrt=nnx.Param))
        self.model_cfg = getattr(model, "cfg", None)
        self.has_lm_head = isinstance(model, Qwen2)  # a PRM (backbone + reward head) computes no vocab logits
        self.graphdef, state = nnx.split(holder)
        self.state_shardings = parallel.state_shardings(state, self.mesh, self.rules)
        self.state = jax.device_put(state, self.state_shardings)
        self.step = 0
        self._stop_requested = False
        self.checkpointer = Checkpointer(self.workdir / CHECKPOINT_SUBDIR, train_cfg.keep_checkpoints,
                                         train_cfg.best_metric, train_cfg.best_mode, train_cfg.async_checkpointing)
        self._first_nonfinite = jnp.asarray(-1, jnp.int32)  # first step with a non-finite loss/gradient; -1 none
        self._step_fn = jax.jit(self._train_step, donate_argnums=0,
                                out_shardings=(self.state_shardings, None))

    # ------------------------------------------------------------------------------------------ step
    def _train_step(self, state: nnx.State, batch: Mapping[str, jax.Array]):
        holder = nnx.merge(self.graphdef, state)
        if self.count_key is not None:  # accumulating: the gradient of the summed loss, normalised at the update
            return self._accumulating_step(holder, batch)
        with parallel.sharding_context(self.mesh, self.rules):  # traced once per Trainer: mesh and rules are fixed
            (loss, aux), grads = nnx.value_and_grad(lambda m: self.loss_fn(m, batch), has_aux=True)(holder.model)
        holder.optimizer.update(holder.model, grads)
        return nnx.state(holder), {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    def _accumulating_step(self, holder: _TrainState, batch: Mapping[str, jax.Array]):
        """One micro-batch of an accumulated update: differentiate loss * count (the summed loss; the count is
        data, not a function of the params) and hand the optimizer the count. Logged metrics stay per
        micro-batch: `loss` its mean loss, `grad_norm` the norm of its mean-loss gradient."""
        key = self.count_key

        def summed_loss(model: nnx.Module):
            loss, aux = self.loss_fn(model, batch)
            if key not in aux:
                raise KeyError(f"count_key {key!r} is not in the loss aux (fields: {sorted(aux)})")
            return loss * jax.lax.stop_gradient(aux[key]).astype(loss.dtype), (loss, aux)

        with parallel.sharding_context(self.mesh, self.rules):
            (_, (loss, aux)), grads = nnx.value_and_grad(summed_loss, has_aux=True)(holder.model)
        count = jnp.asarray(aux[key], jnp.float32)
        holder.optimizer.update(holder.model, grads, count=count)
        grad_norm = optax.tree.norm(grads) / jnp.where(count > 0, count, 1.0)
        return nnx.state(holder), {"loss": loss, "grad_norm": grad_norm, **aux}

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        div = parallel.batch_divisor(self.mesh, self.rules)
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if v.shape[0] % div:
                raise ValueError(f"batch field {k!r}: {v.shape[0]} rows do not divide over the mesh's batch "
                                 f"axes ({div} ways)")
            out[k] = jax.device_put(v, parallel.batch_sharding(self.mesh, v.ndim, self.rules))
        return out

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """One micro-batch step on the sharded state (metrics stay on device)."""
        self.state, metrics = self._step_fn(self.state, self.shard_batch(batch))
        self.step += 1
        self._first_nonfinite = _track_nonfinite(self._first_nonfinite, self.step, metrics["loss"],
                                                 metrics["grad_norm"])
        return metrics

    def check_finite(self) -> None:
        """Raise NonFiniteError if any step so far had a non-finite loss or gradient norm. Called before every
        save and log, so a checkpoint or export never holds what such a step produced (the flag stays on device
        between checks: no host sync per step)."""
        first = int(self._first_nonfinite)
        if first >= 0:
            last = self.checkpointer.latest_step()
            kept = f"the last checkpoint (step {last}) is intact" if last is not None else "no checkpoint was saved"
            raise NonFiniteError(f"step {first}: non-finite loss or gradient norm; training stopped and nothing "
                                 f"after it was saved ({kept}). Lower the learning rate or check the data.")

    @property
    def model(self) -> nnx.Module:
        """The current model (a view of the train state; do not keep it across steps, state is donated)."""
        return nnx.merge(self.graphdef, self.state).model

    def params(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter, keyed by path (for comparisons and export)."""
        from edu_prm_jax.models.checkpoints import flat_params

        return {k: np.asarray(jax.device_get(v[...])) for k, v in flat_params(nnx.state(self.model)).items()}

    def learning_rate(self, step: int) -> float:
        if self.schedule is None:
            return float("nan")
        return float(self.schedule(step // self.accum))

    # ---------------------------------------------------------------------------------- checkpoints
    def save(self, data: Any, metrics: Mapping[str, float] | None = None) -> None:
        self.check_finite()
        data_state = data.get_state() if hasattr(data, "get_state") else {}
        self.checkpointer.save(self.step, self.state, data_state, {"config": self.config, "step": self.step},
                               metrics)

    def maybe_restore(self, data: Any) -> bool:
        """Resume from the latest checkpoint in workdir, if any; returns whether it did."""
        steps = sorted(self.checkpointer.all_steps(), reverse=True)
        if not steps:
            return False
        like = self.state
        step, (self.state, data_state, _) = self.checkpointer.first_intact(
            steps, lambda s: self.checkpointer.restore(s, like), set_aside=jax.process_index() == 0)
        if hasattr(data, "set_state"):
            data.set_state(data_state)
        self.step = step
        return True

    def _stop_everywhere(self, check: bool) -> bool:
        """Whether any process got SIGTERM. Multi-host: every process must leave the loop at the same step
        (a host that stops alone would deadlock the others in the next collective), so the flags are
        all-gathered, but only on steps where `check` is true: the all-gather waits for the step in flight, and
        doing it every step would stop host-side batch preparation from overlapping device work. Single-process
        runs read the flag every step for free."""
        if jax.process_count() == 1:
            return self._stop_requested
        if not check:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._stop_requested, np.int32))
        self._stop_requested = bool(np.any(flags))
        return self._stop_requested

    def request_stop(self, *_: Any) -> None:
        """SIGTERM handler: finish the current step, save, return from `train`."""
        self._stop_requested = True

    # ---------------------------------------------------------------------------------------- loop
    def train(self, data: Iterator[Mapping[str, Any]]) -> dict[str, float]:
        """Run until `cfg.steps` (resuming if possible); returns the last logged metrics (plus eval)."""
        cfg = self.cfg
        self.maybe_restore(data)
        previous = signal.signal(signal.SIGTERM, self.request_stop)
        lead = jax.process_index() == 0  # in a multi-host job only process 0 writes logs and metric files
        writer = MetricsWriter(self.workdir / "tb", cfg.steps, self.step, progress=cfg.progress and lead,
                               tensorboard=cfg.tensorboard and lead, log_lines=lead)
        last: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        n_dev = self.mesh.devices.size
        try:
            t0, tokens, since = time.perf_counter(), 0, 0
            pending = None
            while self.step < cfg.steps and not self._stop_everywhere(self.step % cfg.log_every == 0):
                batch = next(data)
                tokens += int(np.prod(np.shape(batch["tokens"])))
                pending = self.train_step(batch)
                since += 1
                writer.advance()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.check_finite()
                    fetched = {k: float(v) for k, v in jax.device_get(pending).items()}
                    dt = time.perf_counter() - t0
                    tps = tokens / dt
                    seq = _seq_len(batch)
                    flops = (train_flops_per_token(self.model_cfg, seq, self.has_lm_head)
                             if self.model_cfg is not None else 0.0)
                    last = {**fetched, "lr": self.learning_rate(self.step - 1), "step_time_s": dt / since,
                            "tokens_per_s": tps,
                            "mfu": mfu(tps, flops, cfg.peak_flops_per_device * n_dev)}
                    writer.write(self.step, last)
                    t0, tokens, since = time.perf_counter(), 0, 0
                evaluated = False
                if self.eval_fn is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    eval_metrics = {k: float(v) for k, v in self.eval_fn(self.model, self.step).items()}
                    writer.write(self.step, eval_metrics, prefix="eval")
                    evaluated = True
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save(data, eval_metrics if evaluated and cfg.best_metric in eval_metrics else None)
                    evaluated = True
                if evaluated:  # keep eval and checkpoint time out of the step-time / throughput numbers
                    jax.block_until_ready(self.state)
                    t0, tokens, since = time.perf_counter(), 0, 0
            if self.eval_fn is not None and not self._stop_requested and (
                    not cfg.eval_every or self.step % cfg.eval_every):
                eval_metrics = {k: float(v) for k, v in self.eval_fn(self.model, self.step).items()}
                writer.write(self.step, eval_metrics, prefix="eval")
            if self.checkpointer.latest_step() != self.step:
                self.save(data, eval_metrics if cfg.best_metric in eval_metrics else None)
            self.checkpointer.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
            # an error already on its way out (e.g. a checkpoint on a full disk) is the one reported; the event
            # file failing on that same disk after it only gets a warning
            writer.close(raise_errors=sys.exc_info()[0] is None)
        if lead:
            write_text_atomic(self.workdir / "last_metrics.json",
                              json.dumps({"step": self.step, **last, **eval_metrics}, indent=2))
        return {**last, **{f"eval_{k}": v for k, v in eval_metrics.items()}, "step": self.step,
                "preempted": float(self._stop_requested)}

    def close(self) -> None:
        self.checkpointer.close()


# ------------------------------------------------------------------------------- the step as a public program
def new_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> nnx.Module:
    """The (model, optimizer) pair a Trainer steps and checkpoints: a module whose state is {'model': the model's
    variables, 'optimizer': step + `tx`'s state over the model's `nnx.Param`s (with accumulation, the gradient
    accumulator too)}. Built under `nnx.eval_shape` it is abstract (shapes and dtypes, no memory): what
    `edu-prm plan` compiles a 72B step from."""
    return _TrainState(model, nnx.Optimizer(model, tx, wrt=nnx.Param))


@dataclasses.dataclass(frozen=True)
class _StepView:
    """The fields the Trainer's step methods read, without a Trainer (no state placed, no checkpointer)."""

    graphdef: Any
    loss_fn: LossFn
    mesh: Mesh | None
    rules: parallel.ShardingRules
    count_key: str | None

    _accumulating_step = Trainer._accumulating_step


def make_train_step(graphdef: Any, loss_fn: LossFn, mesh: Mesh | None = None, rules: parallel.RulesLike = None,
                    count_key: str | None = None
                    ) -> Callable[[nnx.State, Mapping[str, jax.Array]], tuple[nnx.State, dict[str, jax.Array]]]:
    """The Trainer's train step of one micro-batch as a pure function `(state, batch) -> (new state, metrics)`,
    not jitted: the same code `Trainer.train_step` runs (its step methods, which read only these arguments).

    `graphdef`/`state`: `nnx.split(new_train_state(model, tx))`; the state may be concrete or
    `jax.ShapeDtypeStruct`s (then `jax.jit(step, ...).lower(state, batch)` compiles it without memory). `batch`:
    {name: [rows, seq_len] array} as `loss_fn(model, batch) -> (loss, aux)` reads it. `count_key`: as the
    Trainer's (the aux field a loss averages over; needed when `tx` accumulates). Metrics: `loss`, `grad_norm`
    and `loss_fn`'s aux. With `mesh`, activations are pinned to `rules` inside the step."""
    view = _StepView(graphdef, loss_fn, mesh, parallel.as_rules(rules), count_key)
    return functools.partial(Trainer._train_step, view)
