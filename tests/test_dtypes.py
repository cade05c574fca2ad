"""Dtypes in every spelling a user has at hand (`jnp.bfloat16`, `np.float32`, `jnp.dtype("bfloat16")`, "bf16"),
through one normaliser, wherever a dtype is taken: `api.load_model`, the model config, and the config fields of
the commands (issue 15: `load_model(path, dtype=jnp.float32)` raised "unknown dtype <class ...float32>").

Expected names are written out by hand; model outputs are checked against transformers' float32 eager Qwen2."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_logits, make_hf_qwen2

from edu_prm_jax import api, config_utils
from edu_prm_jax.models import checkpoints
from edu_prm_jax.models.config import ConfigError, Qwen2Config, as_dtype, dtype_name
from edu_prm_jax.models.safetensors_io import SafetensorsFile

TOKENS = np.array([[1, 5, 9, 33, 2, 70, 101, 4], [7, 7, 0, 12, 99, 3, 8, 15]])

SPELLINGS = [  # (value as a user passes it, canonical name)
    (jnp.bfloat16, "bfloat16"),
    (jnp.float32, "float32"),
    (jnp.float16, "float16"),
    (np.float32, "float32"),
    (np.float16, "float16"),
    (ml_dtypes.bfloat16, "bfloat16"),
    (jnp.dtype("bfloat16"), "bfloat16"),
    (np.dtype("float32"), "float32"),
    ("bfloat16", "bfloat16"),
    ("float32", "float32"),
    ("float16", "float16"),
    ("bf16", "bfloat16"),
    ("BF16", "bfloat16"),
    ("fp32", "float32"),
    ("f32", "float32"),
    ("fp16", "float16"),
    ("half", "float16"),
    ("torch.bfloat16", "bfloat16"),  # how torch dtypes appear in config.json and repr
    (" float32 ", "float32"),
]


@pytest.mark.parametrize(("value", "name"), SPELLINGS, ids=[repr(v) for v, _ in SPELLINGS])
def test_every_spelling_names_its_dtype(value, name):
    assert dtype_name(value) == name
    assert as_dtype(value) == {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def test_torch_dtype_objects():
    torch = pytest.importorskip("torch")
    assert [dtype_name(t) for t in (torch.bfloat16, torch.float32, torch.float16)] == ["bfloat16", "float32",
                                                                                        "float16"]


@pytest.mark.parametrize("bad", ["bfloat17", "float", "float64", "int8", "", np.float64, jnp.int8, np.dtype("int32"),
                                 3, object()],
                         ids=lambda v: type(v).__name__ if type(v) is object else repr(v))  # stable across workers
def test_unknown_or_unsupported_dtype_is_an_error_naming_the_value(bad):
    with pytest.raises(ConfigError, match="unknown or unsupported dtype") as e:
        dtype_name(bad, "param_dtype")
    assert str(e.value).startswith(f"param_dtype={bad!r}:")


def test_model_config_stores_canonical_names():
    cfg = Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=4, param_dtype=jnp.bfloat16, dtype=np.float32)
    assert (cfg.param_dtype, cfg.dtype) == ("bfloat16", "float32")
    assert cfg.params_dtype == jnp.bfloat16 and cfg.compute_dtype == jnp.float32
    assert cfg == cfg.replace(param_dtype="bf16", dtype=jnp.dtype("float32"))  # one config, any spelling
    assert cfg.with_dtypes(dtype="bf16").dtype == "bfloat16" and cfg.with_dtypes().param_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"^dtype='bfloat17'"):
        cfg.replace(dtype="bfloat17")


# ------------------------------------------------------------------------------------------- api
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple[pathlib.Path, np.ndarray]:
    d = tmp_path_factory.mktemp("hf")
    model = make_hf_qwen2(d, vocab=103, hidden=32, heads=4, kv_heads=2, layers=2, inter=48)
    return d, hf_logits(model, TOKENS)


@pytest.fixture(scope="module")
def orbax_dir(hf_dir, tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("orbax") / "ck"
    checkpoints.save_orbax(api.load_model(hf_dir[0]), d)
    return d


API_FORMS = [(jnp.float32, "float32"), (np.float32, "float32"), (jnp.dtype("float32"), "float32"),
             ("float32", "float32"), ("fp32", "float32"), (jnp.bfloat16, "bfloat16"),
             (np.dtype(ml_dtypes.bfloat16), "bfloat16"), (jnp.dtype("bfloat16"), "bfloat16"),
             ("bfloat16", "bfloat16"), ("bf16", "bfloat16")]


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_load_model_takes_every_spelling(hf_dir, orbax_dir, kind):
    src, ref = hf_dir
    path = src if kind == "hf" else orbax_dir
    for form, name in API_FORMS:
        model = api.load_model(path, dtype=form, param_dtype=form)
        assert (model.cfg.dtype, model.cfg.param_dtype) == (name, name), form
        assert {v.dtype for v in checkpoints.flat_params(nnx.state(model)).values()} == {jnp.dtype(name)}, form
        logits = np.asarray(model(jnp.asarray(TOKENS)), np.float32)
        if name == "float32":  # the issue's own call, load_model(path, dtype=jnp.float32), and its siblings
            np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0, err_msg=repr(form))
        else:  # bf16 weights and matmuls: close to the float32 reference, but not equal to it
            assert 1e-4 < np.abs(logits - ref).max() < 0.1, form


def test_load_model_unknown_dtype_names_the_value_before_reading(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"^dtype='bfloat17': unknown"):
        api.load_model(hf_dir[0], dtype="bfloat17")
    with pytest.raises(ConfigError, match=r"^param_dtype=<class 'numpy.float64'>: unknown"):
        api.load_model(hf_dir[0], param_dtype=np.float64)
    with pytest.raises(ConfigError, match="dtype='fp8'"):  # checked before the path: no weight is read
        api.load_model(tmp_path / "missing", dtype="fp8")


# ------------------------------------------------------------------------------------------- config fields
def _dtype_fields() -> list[tuple[str, str, object]]:
    """(config file, dotted field, default) of every field named *dtype in the shipped command configs and in
    the shared `common.model_config`."""
    from edu_prm_jax.configs import common

    configs = [("common.py:model_config", common.model_config())]
    for path in sorted(config_utils.SHIPPED_CONFIGS.glob("*.py")):
        if "def get_config(" in path.read_text():  # a command config, not a helper (common.py, ranges.py)
            configs.append((path.name, config_utils.load_config_file(path)[0]))
    return [(name, k, v) for name, config in configs for k, v in config_utils.iter_leaves(config)
            if k.rsplit(".", 1)[-1].endswith("dtype")]


def test_every_shipped_dtype_field_holds_a_known_dtype():
    fields = _dtype_fields()
    assert {f"{n}:{k}" for n, k, _ in fields} >= {"train.py:dtype", "sample.py:dtype", "export.py:dtype",
                                                  "convert.py:dtype", "convert.py:param_dtype",
                                                  "common.py:model_config:param_dtype"}
    for name, key, value in fields:
        if value is not None:  # unset (None) means "the checkpoint's own"
            assert dtype_name(value, key) in ("float32", "bfloat16"), (name, key)


def test_sampling_fingerprint_is_one_for_every_spelling(tmp_path):
    """A resumed `sample`/`label`/`eval-bon` compares fingerprints: the same dtype in another spelling must
    not look like another run."""
    from edu_prm_jax.commands.common.builders import sampling_fingerprint
    from edu_prm_jax.configs import common

    s = common.sampling_config()
    prints = [sampling_fingerprint(tmp_path, form, s) for form in ("bfloat16", "bf16", jnp.bfloat16,
                                                                   jnp.dtype("bfloat16"), ml_dtypes.bfloat16)]
    assert all(p == prints[0] for p in prints) and prints[0]["dtype"] == "bfloat16"
    json.dumps(prints[0])  # it is written to the shards' fingerprint file


def _convert_config(direction: str, src: pathlib.Path, dst: pathlib.Path, **fields) -> ml_collections.ConfigDict:
    """The shipped convert config with `fields` set; rebuilt from a dict so that a field may hold a dtype object
    (ml_collections keeps a shipped str field's type), as in a user's own config file."""
    from edu_prm_jax.configs import convert

    raw = convert.get_config(direction).to_dict() | {"src": str(src), "dst": str(dst)} | fields
    raw["mesh"] |= {"data": 1}
    return ml_collections.ConfigDict(raw)


@pytest.mark.parametrize(("form", "name"), [(jnp.bfloat16, "bfloat16"), (jnp.dtype("bfloat16"), "bfloat16"),
                                            ("bf16", "bfloat16"), (np.float32, "float32")], ids=repr)
def test_convert_dtype_fields_take_every_spelling(hf_dir, tmp_path, form, name):
    """convert's param_dtype (the Orbax params) and dtype (the exported safetensors): config.json names the
    canonical dtype (what transformers reads) and every tensor is stored in it."""
    from edu_prm_jax.commands import convert

    src, ref = hf_dir
    orbax, back = tmp_path / "orbax", tmp_path / "back"
    convert.run(_convert_config("hf_to_orbax", src, orbax, param_dtype=form), tmp_path / "w")
    restored = checkpoints.load_orbax_model(orbax, param_dtype=form)
    assert {v.dtype for v in checkpoints.flat_params(nnx.state(restored)).values()} == {jnp.dtype(name)}
    convert.run(_convert_config("orbax_to_hf", orbax, back, dtype=form, param_dtype=form), tmp_path / "w")
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == name
    f = SafetensorsFile(back / "model.safetensors")
    assert {f.dtype(k) for k in f.keys()} == {jnp.dtype(name)}
    if name == "float32":
        np.testing.assert_allclose(np.asarray(api.load_model(back)(jnp.asarray(TOKENS))), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", ["bf16", jnp.bfloat16], ids=repr)
def test_prm_export_dtype_field_takes_every_spelling(tmp_path, form):
    """`edu-prm export`'s dtype reaches save_prm: config.json gets the canonical name, the tensors that dtype."""
    from edu_prm_jax.models.prm import PRM, load_prm, save_prm

    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, torch_dtype="float32")
    prm = PRM(cfg, "scalar", rngs=nnx.Rngs(0))
    save_prm(prm, tmp_path / "prm", dtype=form)
    assert json.loads((tmp_path / "prm" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    f = SafetensorsFile(tmp_path / "prm" / "model.safetensors")
    assert {f.dtype(k) for k in f.keys()} == {jnp.dtype("bfloat16")}
    back = load_prm(tmp_path / "prm", dtype=form)
    assert back.cfg.dtype == "bfloat16" and back.cfg.torch_dtype == "bfloat16"
    assert jax.tree.leaves(nnx.state(back, nnx.Param))[0].dtype == jnp.float32  # params load as float32
