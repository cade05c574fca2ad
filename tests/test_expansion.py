"""Block expansion of a PRM backbone: identity at initialisation, exported and reloaded whole, and the
'expanded' training mode moves only the new blocks and the head."""

import json

import numpy as np
import pytest
from flax import nnx
from test_prm import jit_logits, tiny_cfg
from tiny_policy import make_tiny_policy, sample_and_label

from edu_prm_jax import cli
from edu_prm_jax.api import load_model
from edu_prm_jax.models import checkpoints
from edu_prm_jax.models.config import ConfigError
from edu_prm_jax.models.expansion import expanded_layers_pattern, expansion_source
from edu_prm_jax.models.prm import PRM, load_prm, save_prm
from edu_prm_jax.models.qwen2 import Qwen2


def test_expansion_source_names():
    assert expansion_source("layers.1.attn.q_proj.kernel", 2) == ("layers.1.attn.q_proj.kernel", False)
    assert expansion_source("layers.3.attn.q_proj.kernel", 2) == ("layers.1.attn.q_proj.kernel", False)
    assert expansion_source("layers.2.attn.o_proj.kernel", 2) == ("layers.1.attn.o_proj.kernel", True)
    assert expansion_source("layers.12.mlp.down_proj.kernel", 2) == ("layers.1.mlp.down_proj.kernel", True)
    assert expansion_source("embed", 2) == ("embed", False)
    assert expanded_layers_pattern(4, 2) == r"^head\.|^backbone\.layers\.(4|5)\."


def test_expanded_backbone_computes_what_the_policy_computes():
    policy = Qwen2(tiny_cfg(), nnx.Rngs(3))
    prm = PRM.from_policy(policy, head="scalar", expand_layers=2)
    assert prm.cfg.num_hidden_layers == 4 and len(prm.backbone.layers) == 4
    tokens = (np.arange(2 * 11, dtype=np.int32).reshape(2, 11) * 7) % 60
    want, _ = policy.backbone(tokens)
    got, _ = prm.backbone.backbone(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # the new blocks are real blocks (copied attention and MLP inputs), muted only at their two outputs
    params = checkpoints.flat_params(nnx.state(prm.backbone))
    assert not np.any(np.asarray(params["layers.3.attn.o_proj.kernel"][...]))
    assert not np.any(np.asarray(params["layers.2.mlp.down_proj.kernel"][...]))
    np.testing.assert_array_equal(params["layers.3.attn.q_proj.kernel"][...],
                                  params["layers.1.attn.q_proj.kernel"][...])
    assert np.any(np.asarray(params["layers.1.attn.o_proj.kernel"][...]))
    with pytest.raises(ValueError, match="expand_layers"):
        PRM.from_policy(policy, head="scalar", expand_layers=-1)


def test_expanded_prm_round_trips_through_hf(tmp_path):
    prm = PRM.from_policy(Qwen2(tiny_cfg(), nnx.Rngs(1)), head="scalar", expand_layers=1)
    save_prm(prm, tmp_path / "prm")
    config = json.loads((tmp_path / "prm" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["edu_prm_expanded_layers"] == 1
    assert load_prm(tmp_path / "prm").expanded_layers == 1
    save_prm(PRM.from_policy(Qwen2(tiny_cfg(), nnx.Rngs(1)), head="scalar"), tmp_path / "plain")
    assert "edu_prm_expanded_layers" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert load_prm(tmp_path / "plain").expanded_layers == 0
    config["edu_prm_expanded_layers"] = 3  # as deep as the whole backbone: not an expansion
    (tmp_path / "prm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="edu_prm_expanded_layers"):
        load_prm(tmp_path / "prm")
    config["edu_prm_expanded_layers"] = 1
    (tmp_path / "prm" / "config.json").write_text(json.dumps(config))
    tokens = np.arange(10, dtype=np.int32)[None] % 50
    np.testing.assert_allclose(jit_logits(load_prm(tmp_path / "prm"), tokens), jit_logits(prm, tokens), atol=1e-6)


def test_train_expanded_moves_only_new_blocks_and_head(tmp_path, capsys):
    policy_dir = make_tiny_policy(tmp_path / "policy")
    w = tmp_path / "w"
    common = [f"--workdir={w}", f"--config.policy={policy_dir}"]
    sample_and_label(common, questions=8, max_new_tokens=10, num_leaves=4)
    assert cli.main(["train", *common, "--config.steps=3", "--config.rows=8", "--config.seq_len=64",
                     "--config.expand_layers=1", "--config.trainable=expanded", "--config.learning_rate=1e-2"]) == 0
    before = checkpoints.flat_params(nnx.state(load_model(policy_dir)))
    prm = load_prm(w / "prm" / "hf")
    after = checkpoints.flat_params(nnx.state(prm.backbone))
    assert prm.cfg.num_hidden_layers == 3
    for name, value in before.items():
        if name in after:  # every original parameter (the LM head is dropped, the embedding is tied)
            np.testing.assert_array_equal(after[name][...], value[...], err_msg=name)
    assert np.any(np.asarray(after["layers.2.attn.o_proj.kernel"][...]))  # the new block trained
    assert np.any(np.asarray(after["layers.2.mlp.down_proj.kernel"][...]))
    fresh_head = PRM.from_policy(load_model(policy_dir), head="scalar", seed=0, expand_layers=1)
    assert not np.array_equal(np.asarray(prm.head.out.kernel[...]), np.asarray(fresh_head.head.out.kernel[...]))
    # a later run from the export trains the same block again, and only it (its config.json says which)
    w3 = tmp_path / "w3"
    assert cli.main(["train", f"--workdir={w3}", f"--config.init_prm={w / 'prm' / 'hf'}", "--config.steps=2",
                     f"--config.labels={w / 'labels'}", "--config.rows=8", "--config.seq_len=64",
                     "--config.trainable=expanded", "--config.learning_rate=1e-2"]) == 0
    again = checkpoints.flat_params(nnx.state(load_prm(w3 / "prm" / "hf").backbone))
    for name, value in after.items():
        if not name.startswith("layers.2."):
            np.testing.assert_array_equal(again[name][...], value[...], err_msg=name)
    assert not np.array_equal(again["layers.2.attn.o_proj.kernel"][...], after["layers.2.attn.o_proj.kernel"][...])
    plain = tmp_path / "plain_prm"
    save_prm(PRM.from_policy(load_model(policy_dir), head="scalar"), plain)
    # inconsistent settings are refused before the workdir records them, so the corrected rerun is not blocked
    bad = [(["--config.trainable=expanded"], "train.trainable='expanded' needs train.expand_layers > 0"),
           (["--config.trainable=expanded", f"--config.init_prm={plain}"], "has no expanded blocks"),
           (["--config.trainable=head", "--config.expand_layers=1"], "would leave the train.expand_layers"),
           (["--config.trainable=expandd"], "train.trainable must be one of")]
    w2 = tmp_path / "w2"
    for flags, message in bad:
        assert cli.main(["train", f"--workdir={w2}", f"--config.policy={policy_dir}",
                         f"--config.labels={w / 'labels'}", "--config.steps=1", *flags]) == 1
        assert message in capsys.readouterr().err
        assert not (w2 / "prm" / "fingerprint.json").exists()
