"""`edu-prm export` restores only a training checkpoint's parameters: bitwise the trained ones, latest or best."""

import json

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from tiny_policy import make_tiny_policy

from edu_prm_jax import cli, parallel
from edu_prm_jax.commands.common.builders import abstract_prm, build_prm
from edu_prm_jax.configs import train as train_configs
from edu_prm_jax.io.atomic import write_jsonl_atomic
from edu_prm_jax.models.checkpoints import flat_params, path_str
from edu_prm_jax.models.prm import load_prm


def _write_labels(directory, vocab=100, questions=12, seed=0):
    """Labelled-step records (the fields training reads), positive and negative steps in every split."""
    rng = np.random.default_rng(seed)
    records = []
    for q in range(questions):
        for slot in range(3):
            steps = [rng.integers(3, vocab, rng.integers(2, 6)).tolist() for _ in range(rng.integers(1, 4))]
            records.append({"id": f"q{q}/{slot}", "question_id": f"q{q}",
                            "prompt_ids": rng.integers(3, vocab, 5).tolist(), "step_ids": steps,
                            "labels": [float((q + slot + i) % 2) for i in range(len(steps))]})
    write_jsonl_atomic(directory / "steps-00000-of-00001.jsonl", records)


def _checkpoint_params(workdir, step):
    """The model's parameters as the checkpoint holds them, read whole by Orbax without any target."""
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(workdir / "prm" / "checkpoints" / str(step) / "state")
    leaves = ocp.tree.to_flat_dict(state["model"])
    return {".".join(map(str, path[:-1])): np.asarray(v) for path, v in leaves.items()}  # path ends in 'value'


def _exported_params(directory):
    return {k: np.asarray(v[...]) for k, v in flat_params(nnx.state(load_prm(directory))).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    policy = make_tiny_policy(tmp / "policy")
    workdir = tmp / "w"
    _write_labels(workdir / "labels")
    assert cli.main(["train", f"--workdir={workdir}", f"--config.policy={policy}", "--config.steps=2",
                     "--config.rows=8", "--config.seq_len=32", "--config.eval_every=1", "--config.checkpoint_every=1",
                     "--config.eval_fraction=0.3", "--config.warmup_steps=0"]) == 0
    return workdir, policy


def test_export_latest_is_bitwise_the_trained_model(trained):
    workdir, _ = trained
    assert cli.main(["export", f"--workdir={workdir}", "--config.which=latest"]) == 0
    got, want = _exported_params(workdir / "prm" / "hf_latest"), _checkpoint_params(workdir, 2)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    # the training run's own export (from the live model, not a checkpoint) agrees too
    at_end = _exported_params(workdir / "prm" / "hf")
    assert all(np.array_equal(at_end[name], want[name]) for name in want)


def test_export_best_picks_the_best_step(trained):
    workdir, _ = trained
    metrics_path = workdir / "prm" / "checkpoints" / "eval_metrics.json"
    table = json.loads(metrics_path.read_text())
    assert set(table) == {"1", "2"}
    table["1"]["step_auroc"], table["2"]["step_auroc"] = 0.9, 0.1  # make the earlier step the best one
    metrics_path.write_text(json.dumps(table))
    out = workdir / "best_export"
    assert cli.main(["export", f"--workdir={workdir}", "--config.which=best", f"--config.output={out}"]) == 0
    got, step1, step2 = _exported_params(out), _checkpoint_params(workdir, 1), _checkpoint_params(workdir, 2)
    assert all(np.array_equal(got[name], step1[name]) for name in step1)
    assert any(not np.array_equal(step1[name], step2[name]) for name in step1)  # the two steps really differ
    assert (out / "tokenizer.model").is_file()  # the tokenizer travels with the weights
    # an existing export is replaced only when asked to
    assert cli.main(["export", f"--workdir={workdir}", "--config.which=best", f"--config.output={out}"]) == 1
    assert cli.main(["export", f"--workdir={workdir}", "--config.which=best", f"--config.output={out}",
                     "--config.overwrite=True"]) == 0


@pytest.mark.parametrize("source", ["policy", "init_prm"])
def test_abstract_prm_matches_build_prm(trained, source):
    workdir, policy = trained
    config = train_configs.get_config()
    if source == "policy":
        config.policy, config.expand_layers = str(policy), 1
    else:
        config.init_prm = str(workdir / "prm" / "hf")
    config = ml_collections.ConfigDict(config.to_dict())
    built = build_prm(config, parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    shapes = abstract_prm(config)
    assert (shapes.cfg, shapes.head_spec.name, shapes.separator_id, shapes.expanded_layers) == (
        built.cfg, built.head_spec.name, built.separator_id, built.expanded_layers)

    def layout(module):
        leaves = jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]
        return {path_str(path): (tuple(v.shape), str(v.dtype)) for path, v in leaves}

    assert layout(shapes) == layout(built)


def test_export_skips_a_damaged_latest_checkpoint(trained, tmp_path, caplog):
    """The latest checkpoint with its data files removed: export warns naming step 2 and writes step 1, bitwise;
    the damaged checkpoint is left untouched (export only reads)."""
    import shutil

    workdir, _ = trained
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    step1 = _checkpoint_params(copy, 1)
    data = [p for p in (copy / "prm" / "checkpoints" / "2" / "state").rglob("*") if p.is_file() and
            "d" in p.parent.name]
    for p in data:
        p.unlink()
    with caplog.at_level("WARNING"):
        assert cli.main(["export", f"--workdir={copy}", "--config.which=latest",
                         f"--config.output={tmp_path / 'out'}"]) == 0  # other tests may export to hf_latest
    assert "checkpoint step 2" in caplog.text and "exported step 1 instead" in caplog.text
    got = _exported_params(tmp_path / "out")
    assert all(np.array_equal(got[name], step1[name]) for name in step1)
    assert (copy / "prm" / "checkpoints" / "2").is_dir()
