"""`edu-prm sample` -> `label` -> `train` on a tiny random policy: the PRM trains, exports and reloads."""

import json

import numpy as np
from tiny_policy import make_tiny_policy, sample_and_label

from edu_prm_jax import cli
from edu_prm_jax.models.prm import load_prm
from edu_prm_jax.training.prm_train import is_eval_question, load_label_records, selection_metrics, split_records


def test_train_command_exports_a_loadable_prm(tmp_path):
    policy = make_tiny_policy(tmp_path / "policy")
    w = tmp_path / "w"
    common = [f"--workdir={w}", f"--config.policy={policy}"]
    # train before label: refused, and the failed run leaves nothing that would refuse the corrected one below
    assert cli.main(["train", *common, "--config.steps=6"]) == 1
    assert not (w / "prm" / "fingerprint.json").exists()
    sample_and_label(common, 12, 10, 4, "--config.num_shards=2")
    records = load_label_records(w / "labels")
    train, held = split_records(records, 0.3)
    assert {r["question_id"] for r in train}.isdisjoint({r["question_id"] for r in held})
    assert all(is_eval_question(r["question_id"], 0.3) for r in held)
    assert cli.main(["train", *common, "--config.steps=6", "--config.rows=8", "--config.seq_len=64",
                     "--config.eval_every=3", "--config.checkpoint_every=3", "--config.eval_fraction=0.3",
                     "--config.remat=full"]) == 0
    summary = json.loads((w / "prm" / "train_summary.json").read_text())
    assert summary["step"] == 6 and np.isfinite(summary["loss"])
    assert "eval_pair_accuracy" in summary and "eval_select_accuracy" in summary
    prm = load_prm(w / "prm" / "hf")
    assert prm.head_spec.name == "scalar"
    # a rerun finds the finished checkpoint and does not train again: no checkpoint is written or rewritten
    # (nor its summary or export: a finished run is left as it is, training metrics included)
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (w / "prm" / "checkpoints").iterdir()}
    kept = {p: p.read_bytes() for p in [w / "prm" / "train_summary.json", w / "prm" / "hf" / "model.safetensors"]}
    assert cli.main(["train", *common, "--config.steps=6", "--config.rows=8", "--config.seq_len=64",
                     "--config.eval_fraction=0.3"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (w / "prm" / "checkpoints").iterdir()} == checkpoints
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert "loss" in json.loads((w / "prm" / "train_summary.json").read_text())
    # export the latest checkpoint: identical to the PRM the training run exported
    assert cli.main(["export", f"--workdir={w}", "--config.which=latest"]) == 0
    again = load_prm(w / "prm" / "hf_latest")
    tokens = np.arange(12, dtype=np.int32)[None] % 40
    np.testing.assert_allclose(np.asarray(again(tokens)), np.asarray(prm(tokens)), atol=1e-6)
    assert cli.main(["export", f"--workdir={w}", "--config.which=best"]) == 0
    assert load_prm(w / "prm" / "hf_best").head_spec.name == "scalar"


def test_selection_metrics_hand_worked():
    # question a: correct solution min 0.6 vs wrong ones min 0.2 and 0.6 (tie) -> 1.5 of 2 pairs; top is a tie
    # between the correct (first) and a wrong one, the first wins -> selected correct.
    # question b: min 0.3 correct vs 0.9 wrong -> 0 of 1 pair, selected wrong. question c: no correct solution.
    scores = [[0.9, 0.6], [0.2, 0.8], [0.6], [0.3], [0.9, 0.95], [0.5]]
    finals = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    groups = ["a", "a", "a", "b", "b", "c"]
    got = selection_metrics(scores, finals, groups)
    assert got["pair_accuracy"] == 1.5 / 3 and got["select_accuracy"] == 0.5
    assert np.isnan(selection_metrics([[0.1]], [0.0], ["c"])["pair_accuracy"])


def test_a_preempted_train_exits_75_and_stops_the_pipeline(tmp_path, monkeypatch, capsys):
    """SIGTERM during training (simulated: the Trainer reports a preempted run) is not success: `train` exits
    with 75 (EX_TEMPFAIL) and a pipeline does not go on to a stage that would read a half-trained PRM."""
    from edu_prm_jax.commands import registry
    from edu_prm_jax.training.loop import EXIT_PREEMPTED, Trainer

    policy = make_tiny_policy(tmp_path / "policy")
    w = tmp_path / "w"
    common = [f"--workdir={w}", f"--config.policy={policy}"]
    sample_and_label(common, questions=6, max_new_tokens=8, num_leaves=2)
    monkeypatch.setattr(Trainer, "train", lambda self, data: {"preempted": 1.0, "step": 3})
    assert EXIT_PREEMPTED == 75
    assert cli.main(["train", *common, "--config.steps=6", "--config.rows=8", "--config.seq_len=64"]) == 75
    assert "preempted: stopped by SIGTERM at step" in capsys.readouterr().err
    assert not (w / "prm" / "hf").exists() and not (w / "prm" / "train_summary.json").exists()
    ran = []
    real_load = registry.load
    monkeypatch.setattr(registry, "load", lambda name: ran.append(name) or real_load(name))
    rc = cli.main(["pipeline", f"--workdir={w}", f"--config.policy={policy}", "--config.stages=train,eval_bon",
                   "--config.train.steps=6", "--config.train.rows=8", "--config.train.seq_len=64"])
    assert rc == 75 and ran == ["train"]  # eval_bon never started
