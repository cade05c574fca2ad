"""Training loop: packing, LM loss, optimizer wiring, bitwise resume after SIGTERM, 8-device equivalence."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.qwen2 import Qwen2
from edu_prm_jax.training.lm import lm_example, lm_loss
from edu_prm_jax.training.loop import TrainConfig, Trainer
from edu_prm_jax.training.metrics import matmul_params, train_flops_per_token
from edu_prm_jax.training.optim import OptimConfig, make_schedule
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


def test_grad_accumulation_equals_mean_loss_step(tmp_path):
    rows = _rows(16)
    a, b = ({k: v[:2] for k, v in rows.items()}, {k: v[2:4] for k, v in rows.items()})
    optim = dict(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    tcfg = TrainConfig(steps=2, log_every=1, tensorboard=False, **QUIET)
    acc = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, OptimConfig(accum_steps=2, **optim), tcfg, tmp_path / "a",
                  mesh=_single_mesh())
    acc.train(iter([a, b]))

    def mean_loss(model, batch):  # one step on (L_a + L_b) / 2: what accumulating two micro-batches means
        la, _ = lm_loss(model, {k: v[:2] for k, v in batch.items()})
        lb, _ = lm_loss(model, {k: v[2:] for k, v in batch.items()})
        return (la + lb) / 2, {}

    one = Trainer(Qwen2(CFG, nnx.Rngs(0)), mean_loss, OptimConfig(**optim),
                  TrainConfig(steps=1, log_every=1, tensorboard=False, **QUIET), tmp_path / "b", mesh=_single_mesh())
    one.train(iter([{k: np.concatenate([a[k], b[k]]) for k in a}]))
    pa, pb = acc.params(), one.params()
    # AdamW's first update is lr * g / (|g| + eps): where |g| is near eps, float32 summation order (two
    # micro-batches vs one batch) moves it by up to ~1e-4 of lr = 1e-2. A wrong accumulation (one micro-batch
    # only, or no averaging of the second) flips whole updates of size ~lr, far outside this bound.
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-4, err_msg=k)
    assert any(not np.allclose(pa[k], Qwen2(CFG, nnx.Rngs(0)).embed[...]) for k in ["embed"])


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
    full = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, optim, tcfg, tmp_path / "full", mesh=_single_mesh())
    full.train(PackedRowLoader(rows, 4, seed=7))
    want = full.params()

    # Interrupted at step 3: mid-accumulation (accum_steps=2), so the MultiSteps buffer must be restored too.
    first = Trainer(Qwen2(CFG, nnx.Rngs(0)), lm_loss, optim, tcfg, tmp_path / "run", mesh=_single_mesh())
    out = first.train(_SigtermAt(rows, 4, seed=7, at=2))
    assert out["preempted"] == 1.0 and first.step == 3
    first.close()
    assert signal.getsignal(signal.SIGTERM) is not first.request_stop
    resumed = Trainer(Qwen2(CFG, nnx.Rngs(42)), lm_loss, optim, tcfg, tmp_path / "run", mesh=_single_mesh())
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


@pytest.mark.parametrize("shape", [(2, 2, 2)])
def test_eight_devices_match_one(tmp_path, shape):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
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
