"""`edu-prm sample` -> `label` -> `train` on a tiny random policy: the PRM trains, exports and reloads."""

import json

import numpy as np
from tiny_policy import make_tiny_policy

from edu_prm_jax import cli
from edu_prm_jax.models.prm import load_prm
from edu_prm_jax.training.prm_train import is_eval_question, load_label_records, split_records


def test_train_command_exports_a_loadable_prm(tmp_path):
    policy = make_tiny_policy(tmp_path / "policy")
    w = tmp_path / "w"
    common = [f"--workdir={w}", f"--config.policy={policy}"]
    assert cli.main(["sample", *common, "--config.questions=toy:train:12", "--config.sampling.max_new_tokens=10",
                     "--config.sampling.num_leaves=4", "--config.sampling.tau=0.5", "--config.num_shards=2"]) == 0
    assert cli.main(["label", *common]) == 0
    records = load_label_records(w / "labels")
    train, held = split_records(records, 0.3)
    assert {r["question_id"] for r in train}.isdisjoint({r["question_id"] for r in held})
    assert all(is_eval_question(r["question_id"], 0.3) for r in held)
    assert cli.main(["train", *common, "--config.steps=6", "--config.rows=8", "--config.seq_len=64",
                     "--config.eval_every=3", "--config.checkpoint_every=3", "--config.eval_fraction=0.3"]) == 0
    summary = json.loads((w / "prm" / "train_summary.json").read_text())
    assert summary["step"] == 6 and np.isfinite(summary["loss"])
    prm = load_prm(w / "prm" / "hf")
    assert prm.head_kind == "scalar"
    # a rerun finds the finished checkpoint and does not train again
    assert cli.main(["train", *common, "--config.steps=6", "--config.rows=8", "--config.seq_len=64",
                     "--config.eval_fraction=0.3"]) == 0
    # export the latest checkpoint: identical to the PRM the training run exported
    assert cli.main(["export", f"--workdir={w}", "--config.which=latest"]) == 0
    again = load_prm(w / "prm" / "hf_latest")
    tokens = np.arange(12, dtype=np.int32)[None] % 40
    np.testing.assert_allclose(np.asarray(again(tokens)), np.asarray(prm(tokens)), atol=1e-6)
    assert cli.main(["export", f"--workdir={w}", "--config.which=best"]) == 0
