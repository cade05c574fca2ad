"""HF safetensors import/export and Orbax save/restore, checked against transformers, the `safetensors`
package, ml_dtypes rounding and a hand-written HF name table (not the module's own mapping)."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_logits, make_hf_qwen2
from jax.sharding import PartitionSpec as P

from edu_prm_jax import parallel
from edu_prm_jax.models.checkpoints import (
    HFCheckpoint,
    flat_params,
    load_hf_model,
    load_orbax_model,
    restore_orbax_into,
    save_hf_model,
    save_orbax,
)
from edu_prm_jax.models.config import ConfigError, Qwen2Config
from edu_prm_jax.models.qwen2 import Qwen2
from edu_prm_jax.models.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors

LAYERS = 2


def expected_hf_names(layers: int, tied: bool) -> dict[str, tuple[str, bool]]:
    """NNX path -> (HF tensor name, stored transposed), written out by hand from transformers' Qwen2 names."""
    table = {"embed": ("model.embed_tokens.weight", False), "final_norm.scale": ("model.norm.weight", False)}
    if not tied:
        table["lm_head"] = ("lm_head.weight", True)
    for i in range(layers):
        hf = f"model.layers.{i}."
        table[f"layers.{i}.input_norm.scale"] = (hf + "input_layernorm.weight", False)
        table[f"layers.{i}.post_attn_norm.scale"] = (hf + "post_attention_layernorm.weight", False)
        for p in "qkvo":
            table[f"layers.{i}.attn.{p}_proj.kernel"] = (hf + f"self_attn.{p}_proj.weight", True)
        for p in "qkv":
            table[f"layers.{i}.attn.{p}_proj.bias"] = (hf + f"self_attn.{p}_proj.bias", False)
        for p in ("gate", "up", "down"):
            table[f"layers.{i}.mlp.{p}_proj.kernel"] = (hf + f"mlp.{p}_proj.weight", True)
    return table


def params_np(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v[...])) for k, v in flat_params(nnx.state(model)).items()}


def jax_native_model(tied: bool, seed: int = 0) -> Qwen2:
    """A model that never came from HF, every parameter (biases and norms included) randomised."""
    cfg = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                      tie_word_embeddings=tied, max_position_embeddings=256, torch_dtype="float32")
    model = Qwen2(cfg, nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


def transformers_load(directory: pathlib.Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def tokens_for(vocab: int, shape=(2, 13), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


# ------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tied):
    model = jax_native_model(tied)
    save_hf_model(model, tmp_path / "out")
    hf = transformers_load(tmp_path / "out")
    assert bool(hf.config.tie_word_embeddings) == tied
    toks = tokens_for(101)
    np.testing.assert_allclose(hf_logits(hf, toks), np.asarray(model(jnp.asarray(toks))), atol=1e-5, rtol=0)
    names = set(SafetensorsFile(tmp_path / "out" / "model.safetensors").keys())
    assert names == {n for n, _ in expected_hf_names(LAYERS, tied).values()}


def test_sharded_export_has_index_and_loads_everywhere(tmp_path):
    model = jax_native_model(tied=False, seed=3)
    out = tmp_path / "sharded"
    save_hf_model(model, out, shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shard_files) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shard_files
    assert set(index["weight_map"]) == {n for n, _ in expected_hf_names(LAYERS, False).values()}
    for fname in shard_files:  # each shard really holds what the index says, read by the safetensors package
        from safetensors import safe_open

        with safe_open(str(out / fname), framework="np") as f:
            assert set(f.keys()) == {n for n, s in index["weight_map"].items() if s == fname}
    toks = tokens_for(101, seed=1)
    np.testing.assert_allclose(hf_logits(transformers_load(out), toks), np.asarray(model(jnp.asarray(toks))),
                               atol=1e-5, rtol=0)
    back, orig = params_np(load_hf_model(out)), params_np(model)
    assert back.keys() == orig.keys()
    for k in orig:
        np.testing.assert_array_equal(back[k], orig[k], err_msg=k)


def test_bfloat16_export_reads_back_rounded(tmp_path):
    import torch
    from safetensors import safe_open

    model = jax_native_model(tied=False, seed=5)
    save_hf_model(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    orig = params_np(model)
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in orig.items()}
    assert any(not np.array_equal(rounded[k], orig[k]) for k in orig)  # rounding is visible at all
    table = expected_hf_names(LAYERS, tied=False)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        for path, (name, transpose) in table.items():
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16, name
            want = rounded[path].T if transpose else rounded[path]
            np.testing.assert_array_equal(t.float().numpy(), want, err_msg=name)
    back = load_hf_model(tmp_path / "bf16")  # float32 params by default
    assert back.cfg.torch_dtype == "bfloat16"
    for k, v in params_np(back).items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, rounded[k], err_msg=k)
    as_bf16 = load_hf_model(tmp_path / "bf16", param_dtype="bfloat16")
    for k, v in params_np(as_bf16).items():
        assert v.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(v.astype(np.float32), rounded[k], err_msg=k)


# ------------------------------------------------------------------------------------------ config


BASE_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
               "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
               "num_attention_heads": 14,
               "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
               "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151643,
               "use_sliding_window": False, "sliding_window": 32768, "hidden_act": "silu"}


def test_config_spellings_agree(tmp_path):
    classic = BASE_CONFIG | {"rope_theta": 1000000.0, "torch_dtype": "bfloat16"}  # Qwen2.5-0.5B's own file
    new = BASE_CONFIG | {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                         "dtype": "bfloat16"}
    for name, d in (("classic", classic), ("new", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(d))
    a, b = Qwen2Config.from_file(tmp_path / "classic"), Qwen2Config.from_file(tmp_path / "new")
    assert a == b
    assert (a.rope_theta, a.torch_dtype, a.head_dim, a.num_key_value_heads) == (1e6, "bfloat16", 64, 2)
    assert a.tie_word_embeddings and a.vocab_size == 151936
    # what transformers 5 itself writes (rope_parameters + dtype) parses to the values it was built with
    make_hf_qwen2(tmp_path / "hf", rope_theta=500000.0, layers=1)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    c = Qwen2Config.from_file(tmp_path / "hf")
    assert (c.rope_theta, c.torch_dtype, c.hidden_size, c.head_dim) == (500000.0, "float32", 32, 8)
    assert "rope_theta" not in written or written["rope_theta"] == 500000.0


def test_embedding_rows_beyond_tokenizer_vocab(tmp_path, shared_data):
    """Qwen2.5 ships vocab_size 151936 > the tokenizer's 151665 ids; the model loads and uses all rows."""
    from edu_prm_jax.tokenization import load_tokenizer

    vocab = 151936
    hf = make_hf_qwen2(tmp_path, vocab=vocab, hidden=16, heads=2, kv_heads=1, layers=1, inter=16, tied=True)
    tok = load_tokenizer(shared_data / "qwen2_tokenizer")
    assert tok.vocab_size < vocab
    ids = tok.encode_chat("What is 2+3?")
    assert max(ids) >= 151643  # chat special tokens sit above the plain BPE vocab
    model = load_hf_model(tmp_path)
    assert model.embed.shape == (vocab, 16) and model.lm_head is None
    toks = np.asarray([ids])
    ours = np.asarray(model(jnp.asarray(toks)))
    assert ours.shape == (1, len(ids), vocab)
    np.testing.assert_allclose(ours, hf_logits(hf, toks), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("good")
    make_hf_qwen2(d, layers=LAYERS, tied=False)
    return d


@pytest.fixture
def ckpt(tmp_path, good_dir) -> pathlib.Path:
    d = tmp_path / "ckpt"
    shutil.copytree(good_dir, d)
    return d


def read_all(path: pathlib.Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    return {k: np.array(f.array(k)) for k in f.keys()}


def rewrite(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    write_safetensors(path, tensors.items(), {"format": "pt"})


def test_good_fixture_loads(ckpt):
    load_hf_model(ckpt)  # the broken variants below differ from this only in the one defect


def test_missing_tensor(ckpt):
    tensors = read_all(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    rewrite(ckpt / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight") as e:
        load_hf_model(ckpt)
    assert str(ckpt) in str(e.value)


def test_extra_tensor(ckpt):
    tensors = read_all(ckpt / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
    rewrite(ckpt / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight") as e:
        load_hf_model(ckpt)
    assert "model.safetensors" in str(e.value) and str(ckpt) in str(e.value)


def test_tensor_shape_differs_from_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 40}))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*48") as e:
        load_hf_model(ckpt)
    assert str(ckpt / "model.safetensors") in str(e.value)


def test_single_tensor_has_wrong_shape(ckpt):
    tensors = read_all(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.bias"] = np.zeros(15, np.float32)
    rewrite(ckpt / "model.safetensors", tensors)
    pattern = r"model\.layers\.0\.self_attn\.k_proj\.bias.*\(15,\).*\(16,\)"
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_hf_model(ckpt)
    assert str(ckpt / "model.safetensors") in str(e.value)


def _last_tensor(path: pathlib.Path) -> str:
    """The tensor whose bytes end the file, from the raw header (independent of the reader under test)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return max(header, key=lambda k: header[k]["data_offsets"][1])


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    last = _last_tensor(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_hf_model(ckpt)
    assert str(path) in str(e.value) and repr(last) in str(e.value)


def test_truncated_inside_header(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:64])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_hf_model(ckpt)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("where", ["length", "json"])
def test_corrupt_header(ckpt, where):
    path = ckpt / "model.safetensors"
    raw = bytearray(path.read_bytes())
    start = 0 if where == "length" else 8
    raw[start:start + 32] = np.random.default_rng(0).integers(0, 256, 32, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        load_hf_model(ckpt)
    assert str(path) in str(e.value)


def test_header_is_json_but_not_an_object(ckpt):
    path = ckpt / "model.safetensors"
    blob = b"[1, 2, 3]" + b" " * 7
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not an object") as e:
        load_hf_model(ckpt)
    assert str(path) in str(e.value)


def test_config_missing_required_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size") as e:
        load_hf_model(ckpt)
    assert str(ckpt / "config.json") in str(e.value)


def test_index_points_to_missing_shard(tmp_path):
    out = tmp_path / "sharded"
    save_hf_model(jax_native_model(tied=True), out, shard_bytes=20_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as e:
        load_hf_model(out)
    assert str(out / "model.safetensors.index.json") in str(e.value) and victim.name in str(e.value)


# ------------------------------------------------------------------------------------------ tied heads


def test_tied_checkpoint_without_lm_head(tmp_path):
    hf = make_hf_qwen2(tmp_path, tied=True, vocab=151)
    assert "lm_head.weight" not in SafetensorsFile(tmp_path / "model.safetensors").keys()
    model = load_hf_model(tmp_path)
    assert model.lm_head is None
    toks = tokens_for(151, seed=4)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks))), hf_logits(hf, toks), atol=1e-5, rtol=0)
    # some exporters also store the (identical) lm_head copy; it must be accepted and ignored
    tensors = read_all(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    rewrite(tmp_path / "model.safetensors", tensors)
    np.testing.assert_array_equal(np.asarray(load_hf_model(tmp_path)(jnp.asarray(toks))),
                                  np.asarray(model(jnp.asarray(toks))))


def test_untied_checkpoint_without_lm_head_fails(ckpt):
    tensors = read_all(ckpt / "model.safetensors")
    del tensors["lm_head.weight"]
    rewrite(ckpt / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        load_hf_model(ckpt)


def test_tied_checkpoint_saved_by_safetensors_save_model_stores_lm_head_only(tmp_path):
    """`safetensors.torch.save_model` keeps the alphabetically first name of a shared tensor, so a tied Qwen2
    saved that way holds `lm_head.weight` and no `model.embed_tokens.weight`. It loads, with the logits of the
    canonical spelling (save_pretrained's) and of transformers."""
    from safetensors.torch import save_model

    hf = make_hf_qwen2(tmp_path / "canonical", tied=True, vocab=151, seed=2)
    alt = tmp_path / "lm_head_only"
    shutil.copytree(tmp_path / "canonical", alt)
    (alt / "model.safetensors").unlink()
    save_model(hf, str(alt / "model.safetensors"), metadata={"format": "pt"})
    stored = set(SafetensorsFile(alt / "model.safetensors").keys())
    assert "lm_head.weight" in stored and "model.embed_tokens.weight" not in stored
    assert "model.embed_tokens.weight" in SafetensorsFile(tmp_path / "canonical" / "model.safetensors").keys()

    toks = tokens_for(151, seed=6)
    want = hf_logits(hf, toks)
    np.testing.assert_allclose(hf_logits(transformers_load(alt), toks), want, atol=1e-5, rtol=0)  # the reference
    canonical, aliased = load_hf_model(tmp_path / "canonical"), load_hf_model(alt)
    assert aliased.lm_head is None
    got = np.asarray(aliased(jnp.asarray(toks)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got, np.asarray(canonical(jnp.asarray(toks))))
    # exported again, it takes the canonical spelling
    save_hf_model(aliased, tmp_path / "again")
    names = set(SafetensorsFile(tmp_path / "again" / "model.safetensors").keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_tied_aliases_resolve_either_way(tmp_path):
    """In a tied checkpoint either name of the shared tensor reads it, whichever one is stored; an untied
    checkpoint has no aliases (a missing lm_head stays missing)."""
    make_hf_qwen2(tmp_path / "tied", tied=True, vocab=97)
    embed = read_all(tmp_path / "tied" / "model.safetensors")["model.embed_tokens.weight"]
    ckpt = HFCheckpoint(tmp_path / "tied")
    assert "lm_head.weight" in ckpt.names()
    np.testing.assert_array_equal(ckpt.array("lm_head.weight"), embed)
    assert ckpt.file_of("lm_head.weight") == tmp_path / "tied" / "model.safetensors"

    tensors = read_all(tmp_path / "tied" / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    rewrite(tmp_path / "tied" / "model.safetensors", tensors)
    ckpt = HFCheckpoint(tmp_path / "tied")
    np.testing.assert_array_equal(ckpt.array("model.embed_tokens.weight"), embed)
    assert "model.embed_tokens.weight" in ckpt.names()
    assert HFCheckpoint(tmp_path / "tied", tied_embeddings=False).names().count("model.embed_tokens.weight") == 0

    make_hf_qwen2(tmp_path / "untied", tied=False, vocab=97)
    untied = HFCheckpoint(tmp_path / "untied")
    assert sorted(untied.names()) == sorted(read_all(tmp_path / "untied" / "model.safetensors"))


# ------------------------------------------------------------------------------------------ directory view


def test_stale_model_old_beside_model_safetensors_is_ignored(tmp_path, good_dir):
    """model.safetensors + a stale model_old.safetensors (same names, other values, no index): the canonical
    file is the model, as in transformers; before, the stale file won by name order."""
    d = tmp_path / "m"
    shutil.copytree(good_dir, d)
    make_hf_qwen2(tmp_path / "older", layers=LAYERS, tied=False, seed=9)
    shutil.copyfile(tmp_path / "older" / "model.safetensors", d / "model_old.safetensors")
    toks = tokens_for(103, seed=2)
    want = hf_logits(transformers_load(d), toks)
    got = np.asarray(load_hf_model(d)(jnp.asarray(toks)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    stale = np.asarray(load_hf_model(tmp_path / "older")(jnp.asarray(toks)))
    assert np.abs(stale - want).max() > 0.1  # the stale weights would have been visible


def test_index_wins_over_stray_safetensors_files(tmp_path):
    """With an index, exactly its shards are read: a stray file redefining its tensors is ignored."""
    model = jax_native_model(tied=False, seed=3)
    out = tmp_path / "sharded"
    save_hf_model(model, out, shard_bytes=20_000)
    stray = {k: v + 1.0 for k, v in read_all(sorted(out.glob("model-*.safetensors"))[0]).items()}
    rewrite(out / "consolidated.safetensors", stray)
    toks = tokens_for(101, seed=1)
    np.testing.assert_array_equal(np.asarray(load_hf_model(out)(jnp.asarray(toks))),
                                  np.asarray(model(jnp.asarray(toks))))


def test_index_beside_an_unlisted_model_safetensors_is_ambiguous(tmp_path, good_dir):
    out = tmp_path / "sharded"
    save_hf_model(jax_native_model(tied=False, seed=3), out, shard_bytes=20_000)
    shutil.copyfile(good_dir / "model.safetensors", out / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json and a model.safetensors") as e:
        load_hf_model(out)
    assert str(out) in str(e.value)


def _split_files(d: pathlib.Path, names_a: set[str]) -> None:
    """Replace d/model.safetensors by part-a.safetensors (names_a) and part-b.safetensors (the rest)."""
    tensors = read_all(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    rewrite(d / "part-a.safetensors", {k: v for k, v in tensors.items() if k in names_a})
    rewrite(d / "part-b.safetensors", {k: v for k, v in tensors.items() if k not in names_a})


def test_unindexed_disjoint_files_load_as_one_set(ckpt, good_dir):
    """No index and no model.safetensors: several files load together when no tensor is defined twice."""
    names = set(read_all(ckpt / "model.safetensors"))
    _split_files(ckpt, {n for n in names if ".layers.0." in n})
    toks = tokens_for(103, seed=3)
    np.testing.assert_allclose(np.asarray(load_hf_model(ckpt)(jnp.asarray(toks))),
                               hf_logits(transformers_load(good_dir), toks), atol=1e-5, rtol=0)


def test_unindexed_files_defining_one_tensor_twice_are_refused(ckpt):
    tensors = read_all(ckpt / "model.safetensors")
    _split_files(ckpt, {n for n in tensors if ".layers.0." in n})
    part_b = read_all(ckpt / "part-b.safetensors")
    part_b["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"] * 2
    rewrite(ckpt / "part-b.safetensors", part_b)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' is defined in both "
                       r"part-a\.safetensors and part-b\.safetensors") as e:
        load_hf_model(ckpt)
    assert str(ckpt) in str(e.value)


def test_directory_without_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors, no model.safetensors.index.json") as e:
        load_hf_model(ckpt)
    assert str(ckpt) in str(e.value)


# ------------------------------------------------------------------------------------------ sharded load


def _axes(var) -> tuple:
    return var.get_metadata()["out_sharding"]


def test_orbax_restores_onto_other_meshes(tmp_path, good_dir):
    save_mesh = parallel.make_mesh(fsdp=4, tensor=2)
    model = load_hf_model(good_dir, mesh=save_mesh)
    assert model.layers[0].attn.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
    want = params_np(model)
    save_orbax(model, tmp_path / "orbax")

    targets = {"data8": parallel.make_mesh(data=8), "fsdp2_tensor4": parallel.make_mesh(fsdp=2, tensor=4),
               "one": None}
    for label, mesh in targets.items():
        restored = load_orbax_model(tmp_path / "orbax", mesh=mesh)
        got = params_np(restored)
        assert got.keys() == want.keys()
        for path, var in flat_params(nnx.state(restored)).items():
            np.testing.assert_array_equal(got[path], want[path], err_msg=f"{label} {path}")
            arr = var[...]
            if mesh is None:
                assert arr.sharding.device_set == {jax.devices()[0]}, path
            else:
                spec = parallel.logical_to_spec(_axes(var), arr.shape, mesh)
                assert arr.sharding.mesh.shape == mesh.shape
                assert arr.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), arr.ndim), path
        if label == "fsdp2_tensor4":  # hand-checked specs: heads split 4 ways, odd vocab replicated
            assert restored.layers[1].attn.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
            assert restored.embed[...].sharding.spec == P(None, "fsdp")  # vocab 103 is odd
            assert len(restored.layers[1].mlp.down_proj.kernel[...].addressable_shards[0].data.shape) == 2
        if label == "data8":
            assert all(v[...].sharding.is_fully_replicated for v in flat_params(nnx.state(restored)).values())

    # restore_orbax_into an explicitly built abstract model gives the same values
    abstract = nnx.eval_shape(lambda: Qwen2(model.cfg, nnx.Rngs(1)))
    other = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    again = params_np(restore_orbax_into(abstract, tmp_path / "orbax", other))
    for k in want:
        np.testing.assert_array_equal(again[k], want[k], err_msg=k)


def test_streaming_load_onto_mesh(tmp_path):
    from safetensors.numpy import load_file

    make_hf_qwen2(tmp_path, vocab=128, layers=LAYERS, tied=False)  # vocab divisible: embed shards both ways
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    model = load_hf_model(tmp_path, mesh=mesh)
    file = load_file(str(tmp_path / "model.safetensors"))
    table = expected_hf_names(LAYERS, tied=False)
    params = flat_params(nnx.state(model))
    assert set(params) == set(table)
    sharded = 0
    for path, var in params.items():
        arr = var[...]
        name, transpose = table[path]
        want = file[name].T if transpose else file[name]
        assert arr.sharding.spec == parallel.logical_to_spec(_axes(var), arr.shape, mesh), path
        np.testing.assert_array_equal(np.asarray(arr), want, err_msg=path)
        for shard in arr.addressable_shards:  # each device holds exactly its slice of the file
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=path)
        sharded += not arr.sharding.is_fully_replicated
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.layers[0].attn.k_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert sharded == 2 + 10 * LAYERS  # embed, lm_head, 7 kernels and 3 biases a layer; only norms replicated
