"""Training loop: packing, LM loss, optimizer wiring, bitwise resume after SIGTERM, 8-device equivalence."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.qwen2 import Qwen2
from edu_prm_jax.training.lm import lm_example, lm_loss
from edu_prm_jax.training.loop import TrainConfig, Trainer
from edu_prm_jax.training.metrics import matmul_params, train_flops_per_token
from edu_prm_jax.training.optim import OptimConfig, accumulate_by_count, make_schedule
from edu_prm_jax.training.packing import PackedRowLoader, pack_examples

CFG = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=True)
QUIET = dict(progress=False, async_checkpointing=False)


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, a = rng.integers(2, 10), rng.integers(2, 12)
        out.append(lm_example(rng.integers(1, 64, p).tolist(), rng.integers(1, 64, a).tolist()))
    return out


def _rows(n=24, seq_len=32, seed=0):
    return pack_examples(_examples(n, seed), seq_len)


def _single_mesh():
    return parallel.make_mesh(devices=jax.devices()[:1])


def test_pack_hand_worked():
    ex = [{"tokens": [1, 2, 3], "w": [0.0, 1.0, 1.0]}, {"tokens": [4, 5, 6, 7]}, {"tokens": [8, 9]}]
    ex[1]["w"] = [1.0] * 4
    ex[2]["w"] = [0.5, 0.5]
    out = pack_examples(ex, seq_len=6, pad_id=0)
    # first-fit: [1,2,3] then [4..7] does not fit (3 left) -> row 2; [8,9] fits row 1.
    np.testing.assert_array_equal(out["tokens"], [[1, 2, 3, 8, 9, 0], [4, 5, 6, 7, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(out["w"], [[0, 1, 1, 0.5, 0.5, 0], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="example 0: length 3"):
        pack_examples(ex, seq_len=2)
    with pytest.raises(ValueError, match="field 'w' has length 1"):
        pack_examples([{"tokens": [1, 2], "w": [1.0]}], seq_len=4)


def _np_nll(logits, targets):
    lg = np.asarray(logits, np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    return lse - np.take_along_axis(lg, np.asarray(targets)[..., None], -1)[..., 0]


def test_packed_loss_equals_unpacked_float64_reference():
    model = Qwen2(CFG, nnx.Rngs(1))
    examples = _examples(7, seed=3)
    packed = pack_examples(examples, seq_len=40)
    assert packed["tokens"].shape[0] < len(examples)  # several examples really share rows
    loss, aux = jax.jit(lm_loss)(model, packed)
    total, weight = 0.0, 0.0
    alone = jax.jit(lambda m, t: m(t))  # one example per row, right-padded to one shape (compiles once)
    for ex in examples:  # each example alone, no packing, reference loss in float64
        n = len(ex["tokens"])
        logits = alone(model, np.pad(np.asarray(ex["tokens"]), (0, 40 - n))[None])[0, :n]
        nll = _np_nll(logits, ex["targets"])
        total += float((nll * ex["weights"]).sum())
        weight += float(ex["weights"].sum())
    np.testing.assert_allclose(float(loss), total / weight, rtol=2e-5)
    assert float(aux["weighted_tokens"]) == weight


def test_schedule_warmup_and_cosine():
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=4, total_steps=12, end_lr_fraction=0.1)
    s = make_schedule(cfg)
    assert [float(s(i)) for i in range(5)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    mid = 4 + (12 - 4) / 2  # cosine half-way: 0.1 + 0.9 * 0.5
    assert float(s(mid)) == pytest.approx(0.55, abs=1e-6)
    assert float(s(12)) == pytest.approx(0.1, abs=1e-6)


def test_frozen_params_do_not_move(tmp_path):
    model = Qwen2(CFG, nnx.Rngs(0))
    before = {k: np.asarray(v[...]) for k, v in
              __import__("edu_prm_jax.models.checkpoints", fromlist=["x"]).flat_params(nnx.state(model)).items()}
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, trainable=r"^final_norm\.")
    tr = Trainer(model, lm_loss, optim, TrainConfig(steps=2, log_every=1, tensorboard=False, **QUIET), tmp_path,
                 mesh=_single_mesh())
    tr.train(PackedRowLoader(_rows(), 4))
    after = tr.params()
    moved = sorted(k for k in after if not np.array_equal(after[k], before[k]))
    assert moved == ["final_norm.scale"]


# ------------------------------------------------------------------------------------- gradient accumulation
def test_accumulate_by_count_hand_worked():
    """Summed-loss gradients (2, -1) over 1 position and (8, 16) over 8 positions: the update is SGD(lr=1) on
    their sum over 9 positions, -(10, 15) / 9, not on the mean of the two micro-batch means, -(6, 0.5)."""
    tx = accumulate_by_count(optax.sgd(1.0), every_k=2)
    state = tx.init(jnp.zeros(2))
    upd, state = tx.update(jnp.asarray([2.0, -1.0]), state, count=1.0)
    np.testing.assert_array_equal(upd, [0.0, 0.0])  # mid-accumulation: no update yet
    upd, state = tx.update(jnp.asarray([8.0, 16.0]), state, count=8.0)
    np.testing.assert_allclose(upd, [-10.0 / 9.0, -15.0 / 9.0], rtol=1e-6)
    assert int(state.mini_step) == 0 and float(state.count) == 0.0  # reset for the next update
    np.testing.assert_array_equal(state.grad_sum, [0.0, 0.0])
    upd, state = tx.update(jnp.asarray([4.5, 9.0]), state, count=0.5)  # fractional weights count as given
    upd, state = tx.update(jnp.asarray([0.0, 0.0]), state, count=0.0)  # a micro-batch with nothing supervised
    np.testing.assert_allclose(upd, [-9.0, -18.0], rtol=1e-6)
    upd, state = tx.update(jnp.zeros(2), state, count=0.0)
    upd, state = tx.update(jnp.zeros(2), state, count=0.0)  # nothing supervised in a whole update: no NaN
    np.testing.assert_array_equal(upd, [0.0, 0.0])


def test_accumulating_without_a_count_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="accum_steps=2 needs count_key"):
        Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, OptimConfig(accum_steps=2), TrainConfig(**QUIET), tmp_path,
                mesh=_single_mesh())


# Adam's first step with b2 = 0 and no clipping or decay is -lr * g / (|g| + eps) element-wise (m and v are
# bias-corrected to g and g^2): a known, nearly linear function of the gradient the optimizer received, so a
# parameter delta can be checked against a reference gradient.
LINEAR_ADAM = dict(learning_rate=10.0, warmup_steps=0, total_steps=10, b2=0.0, eps=1.0, weight_decay=0.0,
                   clip_norm=0.0)


def _flat(tree) -> dict[str, np.ndarray]:
    from edu_prm_jax.models.checkpoints import flat_params

    return {k: np.asarray(jax.device_get(v[...]), np.float64) for k, v in flat_params(tree).items()}


def _rel_l2(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert sorted(got) == sorted(want)
    diff = np.sqrt(sum(((got[k] - want[k]) ** 2).sum() for k in want))
    return float(diff / np.sqrt(sum((want[k] ** 2).sum() for k in want)))


def _adam_first_delta(grads: dict[str, np.ndarray], lr: float) -> dict[str, np.ndarray]:
    eps = LINEAR_ADAM["eps"]
    return {k: -lr * g / (np.abs(g) + eps) for k, g in grads.items()}


def _sparse_and_dense_prm_batches():
    """The issue's case: micro-batch A holds 1 supervised step end (target 0), B holds 8 (target 1)."""
    rng = np.random.default_rng(5)
    t = 16

    def row(ends, target):
        mask = np.zeros((1, t), bool)
        mask[0, ends] = True
        return {"tokens": rng.integers(1, 64, (1, t)).astype(np.int32),
                "positions": np.arange(t, dtype=np.int32)[None], "segment_ids": np.ones((1, t), np.int32),
                "step_end_mask": mask, "loss_mask": mask.copy(),
                "targets": np.where(mask, target, 0.0).astype(np.float32)}

    a, b = row([7], 0.0), row(list(range(1, t, 2)), 1.0)
    assert a["step_end_mask"].sum() == 1 and b["step_end_mask"].sum() == 8
    return a, b, {k: np.concatenate([a[k], b[k]]) for k in a}


def test_accumulated_update_equals_one_batch_sparse_and_dense_micro_batches(tmp_path):
    """accum_steps=2 over A (1 step end) and B (8 step ends) gives the update of the one batch holding both:
    checked against a plain jax.grad of that batch's mean BCE (optax's formula, not the project's loss), to a
    relative L2 below 1e-5. The old normalisation (mean of the two micro-batch means) is ~100% off."""
    from edu_prm_jax.models.prm import PRM, prm_loss

    a, b, both = _sparse_and_dense_prm_batches()

    def mean_bce(prm, batch):  # the reference objective: mean over every step end of the batch
        z = prm(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
        m = jnp.asarray(batch["step_end_mask"], jnp.float32)
        return jnp.sum(optax.sigmoid_binary_cross_entropy(z, jnp.asarray(batch["targets"])) * m) / jnp.sum(m)

    grad = nnx.jit(nnx.grad(mean_bce))  # compiled: op-by-op (eager) gradients of the model take ~10x longer
    g_ref = _flat(grad(PRM(CFG, "scalar", rngs=nnx.Rngs(0)), both))
    g_a = _flat(grad(PRM(CFG, "scalar", rngs=nnx.Rngs(0)), a))
    g_b = _flat(grad(PRM(CFG, "scalar", rngs=nnx.Rngs(0)), b))
    assert _rel_l2({k: (g_a[k] + g_b[k]) / 2 for k in g_ref}, g_ref) > 0.5  # the case separates the two rules

    before = _flat(nnx.state(PRM(CFG, "scalar", rngs=nnx.Rngs(0))))
    tcfg = TrainConfig(steps=2, log_every=1, tensorboard=False, **QUIET)
    acc = Trainer(PRM(CFG, "scalar", rngs=nnx.Rngs(0)), prm_loss, OptimConfig(accum_steps=2, **LINEAR_ADAM),
                  tcfg, tmp_path / "acc", mesh=_single_mesh(), count_key="num_steps")
    lr = acc.learning_rate(0)
    assert lr == pytest.approx(LINEAR_ADAM["learning_rate"])
    m_a = jax.device_get(acc.train_step(a))
    mid = _flat(nnx.state(acc.model))
    assert all(np.array_equal(mid[k], before[k]) for k in before)  # no update mid-accumulation
    m_b = jax.device_get(acc.train_step(b))
    want = _adam_first_delta(g_ref, lr)
    got = {k: v - before[k] for k, v in _flat(nnx.state(acc.model)).items()}
    assert _rel_l2(got, want) < 1e-5

    # the same update as one step on the combined batch (no accumulation)
    one = Trainer(PRM(CFG, "scalar", rngs=nnx.Rngs(0)), prm_loss, OptimConfig(**LINEAR_ADAM), tcfg,
                  tmp_path / "one", mesh=_single_mesh())
    one.train_step(both)
    assert _rel_l2({k: v - before[k] for k, v in _flat(nnx.state(one.model)).items()}, want) < 1e-5

    # logged metrics stay per micro-batch means: A's loss is -log(1 - sigmoid(z)) at its one step end
    z_a = np.asarray(PRM(CFG, "scalar", rngs=nnx.Rngs(0))(a["tokens"], a["positions"], a["segment_ids"]),
                     np.float64)[a["step_end_mask"]]
    np.testing.assert_allclose(m_a["loss"], np.log1p(np.exp(z_a)).mean(), rtol=1e-5)
    assert (m_a["num_steps"], m_b["num_steps"]) == (1.0, 8.0)
    np.testing.assert_allclose(m_a["grad_norm"], np.sqrt(sum((g ** 2).sum() for g in g_a.values())), rtol=1e-4)


def test_accumulated_lm_update_equals_one_batch(tmp_path):
    """The same for the LM objective (weights as counts) over two micro-batches of packed rows with different
    numbers of weighted tokens: against jax.grad of the combined batch's weighted mean NLL (optax's cross
    entropy), and with the default optimizer (clipping, decay) against one step on the combined batch."""
    rows = _rows(16)
    a, b = ({k: v[:2] for k, v in rows.items()}, {k: v[2:4] for k, v in rows.items()})
    assert a["weights"].sum() != b["weights"].sum()
    both = {k: np.concatenate([a[k], b[k]]) for k in a}

    def mean_nll(model, batch):
        logits = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                       segment_ids=jnp.asarray(batch["segment_ids"]))
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch["targets"]))
        w = jnp.asarray(batch["weights"]) * (jnp.asarray(batch["segment_ids"]) > 0)
        return jnp.sum(nll * w) / jnp.sum(w)

    g_ref = _flat(nnx.jit(nnx.grad(mean_nll))(Qwen2(CFG, nnx.Rngs(0)), both))  # compiled: eager is ~10x slower
    before = _flat(nnx.state(Qwen2(CFG, nnx.Rngs(0))))
    tcfg = TrainConfig(steps=2, log_every=1, tensorboard=False, **QUIET)
    acc = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, OptimConfig(accum_steps=2, **LINEAR_ADAM), tcfg,
                  tmp_path / "lin", mesh=_single_mesh(), count_key="weighted_tokens")
    acc.train(iter([a, b]))
    got = {k: v - before[k] for k, v in _flat(nnx.state(acc.model)).items()}
    assert _rel_l2(got, _adam_first_delta(g_ref, acc.learning_rate(0))) < 1e-5

    optim = dict(learning_rate=1e-2, warmup_steps=0, total_steps=10)  # clip_norm 1.0, weight decay 0.01
    acc = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, OptimConfig(accum_steps=2, **optim), tcfg, tmp_path / "a",
                  mesh=_single_mesh(), count_key="weighted_tokens")
    acc.train(iter([a, b]))
    one = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, OptimConfig(**optim),
                  TrainConfig(steps=1, log_every=1, tensorboard=False, **QUIET), tmp_path / "b", mesh=_single_mesh())
    one.train(iter([both]))
    pa, pb = acc.params(), one.params()
    # AdamW's first update is lr * g / (|g| + eps): where |g| is near eps, float32 summation order (two
    # micro-batches vs one batch) moves it by up to ~1e-4 of lr = 1e-2. Another normalisation flips whole
    # updates of size ~lr where the two gradients differ in sign, far outside this bound.
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-4, err_msg=k)
    assert not np.allclose(pa["embed"], np.asarray(Qwen2(CFG, nnx.Rngs(0)).embed[...]))


class _SigtermAt(PackedRowLoader):
    """A loader that sends this process SIGTERM when it hands out batch `at` (a preemption)."""

    def __init__(self, *a, at, **kw):
        super().__init__(*a, **kw)
        self.at = at

    def __next__(self):
        if self.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def test_sigterm_resume_is_bitwise_identical(tmp_path):
    rows, n = _rows(40), 6
    optim = OptimConfig(learning_rate=5e-3, warmup_steps=2, total_steps=n, accum_steps=2)
    tcfg = TrainConfig(steps=n, log_every=2, checkpoint_every=4, **QUIET)
    lm = dict(mesh=_single_mesh(), count_key="weighted_tokens")
    full = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, optim, tcfg, tmp_path / "full", **lm)
    full.train(PackedRowLoader(rows, 4, seed=7))
    want = full.params()

    # Interrupted at step 3: mid-accumulation (accum_steps=2), so the partial gradient sum and position count
    # of the accumulator must be restored too.
    first = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, optim, tcfg, tmp_path / "run", **lm)
    out = first.train(_SigtermAt(rows, 4, seed=7, at=2))
    assert out["preempted"] == 1.0 and first.step == 3
    first.close()
    assert signal.getsignal(signal.SIGTERM) is not first.request_stop
    resumed = Trainer(Qwen2(CFG, nnx.Rngs(42)), lm_loss, optim, tcfg, tmp_path / "run", **lm)
    loader = PackedRowLoader(rows, 4, seed=7)
    resumed.train(loader)
    assert loader.step == n and resumed.step == n
    got = resumed.params()
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert events
    last = json.loads((tmp_path / "run" / "last_metrics.json").read_text())
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"} <= set(last)


def test_best_checkpoint_kept_beside_last(tmp_path):
    scores = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5}  # step 4 is best (min)
    tcfg = TrainConfig(steps=8, log_every=2, eval_every=2, checkpoint_every=2, keep_checkpoints=1,
                       best_metric="loss", tensorboard=False, **QUIET)
    tr = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, OptimConfig(total_steps=8), tcfg, tmp_path,
                 mesh=_single_mesh(), eval_fn=lambda m, step: {"loss": scores[step]})
    tr.train(PackedRowLoader(_rows(), 2))
    assert sorted(tr.checkpointer.all_steps()) == [4, 8]
    assert tr.checkpointer.best_step() == 4


@pytest.mark.needs_devices(8)
@pytest.mark.parametrize("shape", [(2, 2, 2)])
def test_eight_devices_match_one(tmp_path, shape):
    rows = _rows(32)
    batch = {k: v[:8] for k, v in rows.items()}
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=4)
    tcfg = TrainConfig(steps=1, log_every=1, tensorboard=False, **QUIET)
    one = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, optim, tcfg, tmp_path / "1", mesh=_single_mesh())
    m1 = jax.device_get(one.train_step(batch))
    mesh = parallel.make_mesh(*shape)
    eight = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, optim, tcfg, tmp_path / "8", mesh=mesh)
    m8 = jax.device_get(eight.train_step(batch))
    sharded = [v for v in jax.tree.leaves(eight.state) if len(v.sharding.device_set) == 8
               and not v.sharding.is_fully_replicated]
    assert sharded  # parameters and moments really are split over the mesh
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    p1, p8 = one.params(), eight.params()
    # Adam's first update is ~lr * sign(g): float32 reduction-order noise on a near-zero gradient moves an
    # element by up to ~1e-5 here, while a sharding bug would move elements by ~lr = 1e-2.
    for k in p1:
        np.testing.assert_allclose(p8[k], p1[k], rtol=1e-4, atol=5e-5, err_msg=k)
    assert not np.array_equal(p1["embed"], np.asarray(Qwen2(CFG, nnx.Rngs(0)).embed[...]))


def test_flops_per_token_hand_worked():
    # h=8, 2 heads x 4 + 1 kv head x 4: attention 8*8*2 + 8*4*2 = 192, MLP 3*8*16 = 384, per layer 576,
    # x3 layers = 1728; LM head 8*10 = 80. Attention term 12 * 3 layers * 2 heads * 4 * seq 5 = 1440.
    cfg = Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    assert matmul_params(cfg) == 1808 and matmul_params(cfg, lm_head=False) == 1728
    assert train_flops_per_token(cfg, 5) == 6 * 1808 + 1440
    assert train_flops_per_token(cfg, 5, lm_head=False) == 6 * 1728 + 1440


def test_a_non_finite_step_stops_training_before_anything_is_saved(tmp_path):
    """A NaN loss at step 3 (of 6, checkpoints every 2): the error names step 3, the checkpoint of step 2 is the
    last one, and export refuses the NaN weights the step left in memory."""
    from edu_prm_jax.models.checkpoints import save_hf_model
    from edu_prm_jax.models.safetensors_io import CheckpointError
    from edu_prm_jax.training.loop import NonFiniteError

    rows = _rows(16)
    batches = [{k: v[2 * i:2 * i + 2] for k, v in rows.items()} for i in range(6)]

    def loss_nan_at_3(model, batch):  # NaN where the batch is marked (token -1 in its first position)
        loss, aux = lm_loss(model, {**batch, "tokens": jnp.maximum(batch["tokens"], 0)})
        return loss * jnp.where(batch["tokens"][0, 0] < 0, jnp.nan, 1.0), aux  # NaN loss and NaN gradients

    batches[2] = {**batches[2], "tokens": np.where(np.arange(batches[2]["tokens"].shape[1]) == 0, -1,
                                                   batches[2]["tokens"])}
    tcfg = TrainConfig(steps=6, log_every=1, checkpoint_every=2, tensorboard=False, **QUIET)
    trainer = Trainer(Qwen2(CFG, nnx.Rngs(0)), loss_nan_at_3, OptimConfig(learning_rate=1e-2, warmup_steps=0,
                      total_steps=6), tcfg, tmp_path / "run", mesh=_single_mesh())
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss or gradient norm.*step 2\) is intact"):
        trainer.train(iter(batches))
    assert trainer.checkpointer.latest_step() == 2
    with pytest.raises(CheckpointError, match="not finite; refusing to export"):
        save_hf_model(trainer.model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    """One data file of the newest checkpoint removed (a crash or full disk mid-copy): the run resumes from the
    previous intact checkpoint, warns naming the damaged step, keeps it aside (renamed, not deleted), and ends
    bitwise equal to an uninterrupted run."""
    rows = _rows(24)
    optim = OptimConfig(learning_rate=5e-3, warmup_steps=1, total_steps=6)

    def run(workdir, steps, loader_rows):
        tcfg = TrainConfig(steps=steps, log_every=2, checkpoint_every=2, **QUIET)
        trainer = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, optim, tcfg, workdir, mesh=_single_mesh())
        trainer.train(PackedRowLoader(loader_rows, 2, seed=0))
        return trainer

    full = run(tmp_path / "full", 6, rows).params()
    part = run(tmp_path / "part", 4, rows)
    part.close()
    ckpt = tmp_path / "part" / "checkpoints"
    data_files = [p for p in (ckpt / "4" / "state").rglob("*") if p.is_file() and "d" in p.parent.name]
    assert data_files
    for p in data_files:
        p.unlink()
    with caplog.at_level("WARNING"):
        resumed = run(tmp_path / "part", 6, rows)
    assert "checkpoint step 4" in caplog.text and "cannot be read" in caplog.text
    assert [p.name.split(".")[0] for p in ckpt.iterdir() if ".damaged-" in p.name] == ["4"]  # kept aside
    got = resumed.params()
    for k in full:
        np.testing.assert_array_equal(got[k], full[k], err_msg=k)


def test_a_full_disk_surfacing_from_an_earlier_async_save_removes_only_this_runs_unfinished_saves(
        tmp_path, monkeypatch):
    """An async save (step 3) fails on a full disk and its error, naming no step, surfaces at the next save
    (step 6), as Orbax reports it: the one error names step 3 and its bytes, the unfinished saves this process
    started are removed, and a temporary directory this process never made (step 9's) is left alone."""
    import errno as errno_codes

    from edu_prm_jax.io.atomic import DiskFullError
    from edu_prm_jax.training.checkpointing import Checkpointer

    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, async_save=False)
    foreign = directory / "9.orbax-checkpoint-tmp-1700000000"
    foreign.mkdir(parents=True)
    state = {"w": np.zeros((4, 8), np.float32)}

    def start_and_leave_unfinished(step, args=None, **kw):  # what an async save in flight leaves on disk
        (directory / f"{step}.orbax-checkpoint-tmp-1700000001").mkdir()
        return True

    monkeypatch.setattr(ckpt._mgr, "save", start_and_leave_unfinished)
    ckpt.save(3, state, {"epoch": 0}, {})

    def earlier_failure_surfaces(step, args=None, **kw):
        start_and_leave_unfinished(step)
        raise ValueError("RESOURCE_EXHAUSTED: writing chunk: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ckpt._mgr, "save", earlier_failure_surfaces)
    with pytest.raises(DiskFullError) as raised:
        ckpt.save(6, state, {"epoch": 0}, {})
    message = str(raised.value)
    assert "saving checkpoint step 3 " in message and "its arrays alone take 128 bytes" in message
    assert "no earlier checkpoint exists" in message and raised.value.errno == errno_codes.ENOSPC
    assert sorted(p.name for p in directory.iterdir()) == [foreign.name]
