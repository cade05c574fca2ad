"""A checkpoint saved with one decoder-layer layout restores into the other (training.relayout).

A TPU run trains scanned (stacked) layers; its checkpoints must export on a CPU host (unrolled by default) and a
run may resume on another platform. The properties checked: after a cross-layout resume every parameter and
both AdamW moments equal the saved run's layer for layer (compared through `layer_view`, the per-layer naming
both layouts share), so the next update equals the one the saved run makes itself; and export's model-only
restore gives the trained weights. A conversion that mixed up layers or left the moments behind breaks them.
"""

import numpy as np
import pytest
from flax import nnx

from edu_prm_jax import parallel
from edu_prm_jax.models.checkpoints import layer_view
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.prm import PRM, prm_loss
from edu_prm_jax.scoring.examples import build_example
from edu_prm_jax.training import relayout
from edu_prm_jax.training.checkpointing import Checkpointer
from edu_prm_jax.training.loop import TrainConfig, Trainer, restore_model
from edu_prm_jax.training.optim import OptimConfig
from edu_prm_jax.training.prm_train import PackedStream

CFG = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def _stream():
    rng = np.random.default_rng(0)
    examples = [build_example({"prompt_ids": [1, 2], "step_ids": [rng.integers(3, 64, 4).tolist() for _ in range(3)],
                               "labels": [1.0, 0.0, 1.0]}, head="scalar", record_id=i) for i in range(16)]
    return PackedStream(examples, 32, 2, seed=0)


def _trainer(workdir, scan: bool, seed: int = 0) -> Trainer:
    return Trainer(PRM(CFG.replace(scan_layers=scan), "scalar", rngs=nnx.Rngs(seed)), prm_loss,
                   OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=8),
                   TrainConfig(steps=8, progress=False, tensorboard=False, async_checkpointing=False), workdir)


def _per_layer(state: nnx.State) -> dict[str, np.ndarray]:
    """Every leaf of a train state (parameters and moments) under its unrolled, per-layer name."""
    out = {}
    for part in ("model", "optimizer"):
        for name, (var, i) in layer_view(state[part]).items() if part == "model" else []:
            out[f"model.{name}"] = np.asarray(var[...] if i is None else var[...][i])
    for path, var in nnx.to_flat_state(state["optimizer"]):
        value = np.asarray(var[...])
        j = relayout._layers_at(path)
        if j is not None and not relayout._is_index(path[j + 1]):  # stacked moment: one entry per layer
            for i in range(value.shape[0]):
                out[".".join(map(str, relayout._layer_path(path, j, i)))] = value[i]
        else:
            out[".".join(map(str, path))] = value
    return out


@pytest.mark.parametrize("saved_scan", [True, False], ids=["scanned-to-unrolled", "unrolled-to-scanned"])
def test_resume_and_export_across_layer_layouts(tmp_path, saved_scan):
    data = _stream()
    batches = [next(data) for _ in range(3)]
    saved = _trainer(tmp_path, saved_scan)
    for batch in batches[:2]:
        saved.train_step(batch)
    saved.save(data=None)
    saved.checkpointer.wait()
    assert saved.checkpointer.saved_layout(2) is saved_scan
    expected = _per_layer(saved.state)

    resumed = _trainer(tmp_path, not saved_scan, seed=1)  # other layout, other initial weights
    assert relayout.state_layout(resumed.state) is (not saved_scan)
    assert resumed.maybe_restore(data=None) and resumed.step == 2
    assert relayout.state_layout(resumed.state) is (not saved_scan)  # the run keeps its own layout
    got = _per_layer(resumed.state)
    assert set(got) == set(expected) and any(".mu." in k for k in got)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)

    # the next update is the saved run's own next update (moments and step count carried over). Each update moves
    # a weight by about the learning rate (1e-2: Adam normalises), so reset or misplaced moments would differ by
    # ~1e-2; the two layouts' float32 sums differ by ~1e-7, which Adam's division can amplify to ~1e-6.
    saved.train_step(batches[2])
    resumed.train_step(batches[2])
    after_saved, after_resumed = _per_layer(saved.state), _per_layer(resumed.state)
    for name in after_saved:
        np.testing.assert_allclose(after_resumed[name], after_saved[name], rtol=0, atol=2e-5, err_msg=name)

    # export: the model alone, into an abstract model of the other layout
    abstract = nnx.eval_shape(lambda: PRM(CFG.replace(scan_layers=not saved_scan), "scalar", rngs=nnx.Rngs(0)))
    mesh = parallel.make_mesh(devices=resumed.mesh.devices.flatten().tolist()[:1])
    reader = Checkpointer(tmp_path / "checkpoints", read_only=True)  # as `export` opens a run's checkpoints
    model = restore_model(reader, 2, abstract, mesh)
    reader.close()
    exported = {f"model.{k}": np.asarray(v[...] if i is None else v[...][i])
                for k, (v, i) in layer_view(nnx.state(model)).items()}
    for name, value in exported.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    saved.close()
    resumed.close()
