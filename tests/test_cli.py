"""`edu-prm` CLI, config files and `api.load_model`.

The conversion test is checked against transformers itself: HF -> Orbax -> HF through the CLI, then the final
directory is loaded by `AutoModelForCausalLM.from_pretrained` and must give the original model's logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hf_reference import hf_logits, make_hf_qwen2

from edu_prm_jax import api, cli, config_utils, tokenization
from edu_prm_jax.configs import common
from edu_prm_jax.models.safetensors_io import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TOKENS = np.array([[1, 5, 9, 33, 2, 70, 101, 4], [7, 7, 0, 12, 99, 3, 8, 15]])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A tiny random transformers Qwen2 with a fake tokenizer file, and its logits on TOKENS."""
    d = tmp_path_factory.mktemp("hf")
    model = make_hf_qwen2(d, vocab=103, hidden=32, heads=4, kv_heads=2, layers=2, inter=48)
    (d / "tokenizer.json").write_text('{"sentinel": "tokenizer bytes"}')
    (d / "merges.txt").write_text("#version: 0.2\na b\n")
    return d, hf_logits(model, TOKENS)


@pytest.fixture
def probe_command(tmp_path, monkeypatch) -> Path:
    """A cheap command registered in the CLI table that records the config it was run with."""
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "probe_cmd.py").write_text(textwrap.dedent('''
        import json
        DESCRIPTION = "Record the config (test probe)."
        def run(config, workdir):
            (workdir / "seen.json").write_text(config.to_json())
    '''))
    cfg = tmp_path / "my_configs" / "probe.py"
    cfg.parent.mkdir()
    cfg.write_text(textwrap.dedent('''
        import ml_collections
        from edu_prm_jax.configs import common

        def get_config(arg=None):
            config = ml_collections.ConfigDict()
            config.name = arg or "default"  # Run name.
            config.steps = 10  # Number of steps.
            config.lr = 1e-3  # Learning rate.
            config.mesh = common.mesh_config()  # Device mesh.
            config.model = common.model_config()  # Which model.
            return config
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "probe", "probe_pkg.probe_cmd")
    return cfg


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------------- help
def test_help_lists_every_command(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()}
    for name in ("pipeline", "build-toy", "sample", "label", "train", "score", "export", "convert",
                 "eval-bon", "eval-processbench", "prepare-data"):
        assert name in lines, name
        assert len(lines[name].split(None, 1)) == 2, f"{name} has no description"
    assert "Hugging Face safetensors and Orbax" in lines["convert"]


def test_console_script_help_in_subprocess(tmp_path):
    exe = shutil.which("edu-prm")
    cmd = [exe] if exe else [sys.executable, "-m", "edu_prm_jax.cli"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([*cmd, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "convert" in res.stdout and "eval-processbench" in res.stdout and "prepare-data" in res.stdout


def test_unknown_command_and_no_command(capsys):
    rc, _, err = run_cli(capsys, "convret")
    assert rc == 2 and "unknown command 'convret'" in err and "did you mean convert" in err
    rc, _, err = run_cli(capsys)
    assert rc == 2 and "commands:" in err


def test_missing_command_module_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "train", "edu_prm_jax.commands.no_such_module_xyz")
    rc, out, _ = run_cli(capsys, "--help")
    assert any(ln.split()[:1] == ["train"] and cli.NOT_AVAILABLE in ln for ln in out.splitlines())
    rc, _, err = run_cli(capsys, "train", "--workdir=/nonexistent")
    assert rc == 2 and "not available in this build" in err and "no_such_module_xyz" in err


def test_command_help_shows_fields_with_their_comments(capsys):
    rc, out, _ = run_cli(capsys, "convert", "--help")
    assert rc == 0
    # Comments exactly as written in edu_prm_jax/configs/convert.py and common.py.
    assert '--config.direction="hf_to_orbax"' in out and "hf_to_orbax or orbax_to_hf." in out
    assert "--config.mesh.tensor=1" in out and "Tensor-parallel axis size" in out
    assert "--config.shard_bytes=4294967296" in out
    assert "(undocumented)" not in out


def test_comment_parser_on_hand_written_config(probe_command):
    config, _, module = config_utils.load_config(str(probe_command))
    comments = config_utils.field_comments(module)
    assert comments["steps"] == "Number of steps."
    assert comments["mesh"] == "Device mesh."
    assert comments["mesh.fsdp"] == "Fully-sharded (parameter-sharding) axis size."
    assert comments["model.path"] == "HF dir or Orbax checkpoint dir."
    assert config_utils.undocumented_fields(config, comments) == []


COMMAND_CONFIGS = sorted(p for p in (REPO / "edu_prm_jax" / "configs").glob("*.py")
                         if p.name not in ("common.py", "ranges.py", "__init__.py"))  # helpers, not configs


@pytest.mark.parametrize("path", COMMAND_CONFIGS, ids=lambda p: p.name)
def test_every_config_field_is_documented(path):
    """DESIGN: every field of every command config carries a `# comment` (the --help text)."""
    config, _, module = config_utils.load_config(str(path))
    assert config_utils.undocumented_fields(config, config_utils.field_comments(module)) == []


# ------------------------------------------------------------------------------------------- overrides
def test_unknown_override_names_the_nearest_key(capsys, probe_command, tmp_path):
    rc, _, err = run_cli(capsys, "convert", "--config.mesh.fsdb=2", f"--workdir={tmp_path / 'w'}")
    assert rc == 2
    assert "--config.mesh.fsdb" in err and "did you mean --config.mesh.fsdp" in err
    rc, _, err = run_cli(capsys, "convert", "--config.fsdp=2")  # right leaf name, missing its group
    assert rc == 2 and "--config.mesh.fsdp" in err
    rc, _, err = run_cli(capsys, "probe", f"--config={probe_command}", "--config.setps", "3")
    assert rc == 2 and "--config.steps" in err
    assert not (tmp_path / "w").exists()  # nothing ran


def test_bad_override_value_is_a_usage_error(capsys, probe_command, tmp_path):
    rc, _, err = run_cli(capsys, "probe", f"--config={probe_command}", "--config.steps=many",
                         f"--workdir={tmp_path}")
    assert rc == 2 and "config.steps" in err and "many" in err


def test_valid_overrides_and_config_arg_take_effect(capsys, probe_command, tmp_path):
    work = tmp_path / "run"
    rc, _, err = run_cli(capsys, "probe", f"--config={probe_command}:exp7", "--config.steps=25",
                         "--config.lr", "0.5", "--config.mesh.fsdp=4", "--config.mesh.rules.rollout=data,fsdp",
                         "--config.model.path=/m", f"--workdir={work}", "--log_level=warning")
    assert rc == 0, err
    seen = json.loads((work / "seen.json").read_text())
    rules = {**common.mesh_config().rules.to_dict(), "rollout": "data,fsdp"}  # the override, the rest defaults
    mesh = {"data": -1, "fsdp": 4, "tensor": 1, "rules": rules}
    assert seen == {"name": "exp7", "steps": 25, "lr": 0.5, "mesh": mesh,
                    "model": {"path": "/m", "param_dtype": "float32", "dtype": "float32"}}
    assert json.loads((work / "probe_config.json").read_text()) == seen  # provenance copy
    assert sorted(p.name for p in work.iterdir()) == ["probe_config.json", "seen.json"]  # no temp files left


def test_config_file_not_found(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "convert", f"--config={tmp_path / 'nope.py'}")
    assert rc == 2 and "nope.py" in err and "not found" in err


# ------------------------------------------------------------------------------------------- convert
def test_convert_hf_orbax_hf_round_trip_matches_transformers(capsys, hf_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src, ref = hf_dir
    orbax, back, work = tmp_path / "orbax", tmp_path / "hf_back", tmp_path / "work"
    rc, _, err = run_cli(capsys, "convert", f"--config.src={src}", f"--config.dst={orbax}",
                         "--config.mesh.fsdp=2", "--config.mesh.tensor=2", f"--workdir={work}")
    assert rc == 0, err
    assert (orbax / "edu_prm_config.json").is_file() and (orbax / "tokenizer.json").is_file()
    rc, _, err = run_cli(capsys, "convert", "--config=configs/convert.py:orbax_to_hf",
                         f"--config.src={orbax}", f"--config.dst={back}", "--config.dtype=float32",
                         "--config.shard_bytes=20000", f"--workdir={work}")
    assert rc == 0, err
    assert (back / "model.safetensors.index.json").is_file()  # shard_bytes took effect: several shards
    for name in ("tokenizer.json", "merges.txt", "generation_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(back, torch_dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(model, TOKENS), ref, atol=1e-5, rtol=0)
    recorded = json.loads((work / "convert_config.json").read_text())
    assert recorded["direction"] == "orbax_to_hf" and recorded["src"] == str(orbax)
    assert recorded["shard_bytes"] == 20000


def test_convert_rejects_bad_inputs(capsys, hf_dir, tmp_path):
    src, _ = hf_dir
    rc, _, err = run_cli(capsys, "convert", f"--config.src={src}", f"--workdir={tmp_path}")
    assert rc == 1 and "config.dst is not set" in err
    rc, _, err = run_cli(capsys, "convert", "--config.direction=hf_to_hf", f"--config.src={src}",
                         f"--config.dst={tmp_path / 'x'}", f"--workdir={tmp_path}")
    assert rc == 1 and "config.direction='hf_to_hf'" in err
    rc, _, err = run_cli(capsys, "convert", "--config.direction=orbax_to_hf", f"--config.src={src}",
                         f"--config.dst={tmp_path / 'x'}", f"--workdir={tmp_path}")
    assert rc == 1 and "not an Orbax checkpoint" in err
    assert src.joinpath("config.json").is_file()  # the source is never touched


# ------------------------------------------------------------------------------------------- api
def test_load_model_from_hf_and_orbax_dirs(hf_dir, tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from edu_prm_jax import parallel
    from edu_prm_jax.models import checkpoints

    src, ref = hf_dir
    model = api.load_model(src, mesh=parallel.make_mesh(fsdp=2))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), ref, atol=1e-4, rtol=0)
    checkpoints.save_orbax(model, tmp_path / "ck")
    restored = api.load_model(tmp_path / "ck", param_dtype="bfloat16")
    assert {v.dtype for v in checkpoints.flat_params(nnx.state(restored)).values()} == {jnp.dtype("bfloat16")}
    restored32 = api.load_model(tmp_path / "ck")
    np.testing.assert_allclose(np.asarray(restored32(jnp.asarray(TOKENS))), ref, atol=1e-4, rtol=0)
    for path in (src, tmp_path / "ck"):  # either layout from either format, against transformers' logits
        scanned = api.load_model(path, scan_layers=True)
        assert scanned.stacked and not api.load_model(path, scan_layers=False).stacked
        np.testing.assert_allclose(np.asarray(scanned(jnp.asarray(TOKENS))), ref, atol=1e-4, rtol=0)
    assert api.load_tokenizer is tokenization.load_tokenizer


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        api.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither an HF model directory"):
        api.load_model(tmp_path / "empty")
