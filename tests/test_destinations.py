"""The tool deletes only what it created: export / convert / build-toy destinations (issue "Nothing lost").

Each case is a user's directory the tool must refuse before writing anything, checked by listing what is left.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from tiny_policy import make_tiny_policy

from edu_prm_jax import cli
from edu_prm_jax.io.destinations import (
    OWNER_MARKER,
    DestinationError,
    check_destination,
    staging_path,
)
from edu_prm_jax.models.checkpoints import write_hf_directory
from edu_prm_jax.models.config import Qwen2Config
from edu_prm_jax.models.prm import PRM, save_prm
from edu_prm_jax.models.qwen2 import Qwen2


def tree(root):
    """Every path under `root` with file contents, to prove nothing was touched."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def user_dir(tmp_path):
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes")
    (d / "sub" / "data.csv").write_text("1,2,3")
    return d


def tiny_prm():
    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    return PRM.from_policy(Qwen2(cfg, nnx.Rngs(0)), head="scalar")


# ------------------------------------------------------------------------------------ the rule itself
def test_check_destination_cases(tmp_path, user_dir):
    check_destination(tmp_path / "new", overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", overwrite=False)  # empty dir: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match=r"config.output=.*file.*not a directory"):
        check_destination(tmp_path / "file", overwrite=True)
    with pytest.raises(DestinationError, match="not written by edu_prm_jax"):
        check_destination(user_dir, overwrite=True)  # overwrite never extends to someone else's files
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / OWNER_MARKER).write_text("{}")
    (ours / "model.safetensors").write_bytes(b"")
    with pytest.raises(DestinationError, match="--config.overwrite=True"):
        check_destination(ours, overwrite=False)
    check_destination(ours, overwrite=True)
    src = tmp_path / "parent" / "src"
    src.mkdir(parents=True)
    for dst in (src, tmp_path / "parent", src / "inside"):  # equal, containing, inside
        with pytest.raises(DestinationError, match="overlaps the source"):
            check_destination(dst, overwrite=True, field="dst", sources=[src])


def test_a_staging_dir_we_did_not_make_is_refused(tmp_path):
    foreign = staging_path(tmp_path / "out")
    foreign.mkdir()
    (foreign / "keep.txt").write_text("k")
    with pytest.raises(DestinationError, match="not made by edu_prm_jax"):
        check_destination(tmp_path / "out", overwrite=False)
    assert (foreign / "keep.txt").read_text() == "k"


def test_failed_export_leaves_no_partial_and_keeps_the_old_export(tmp_path):
    out = tmp_path / "hf"
    save_prm(tiny_prm(), out)
    before = tree(out)

    def broken():
        yield "a", np.zeros(3, np.float32)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_hf_directory(out, {}, broken(), overwrite=True)
    assert not staging_path(out).exists()
    assert tree(out) == before


def test_save_prm_over_a_user_directory_is_refused(user_dir):
    before = tree(user_dir)
    with pytest.raises(DestinationError):
        save_prm(tiny_prm(), user_dir, overwrite=True)
    assert tree(user_dir) == before and not staging_path(user_dir).exists()


def test_legacy_export_without_marker_counts_as_ours(tmp_path):
    out = tmp_path / "hf"
    save_prm(tiny_prm(), out)
    (out / OWNER_MARKER).unlink()  # as written before the marker existed: only names this tool writes
    save_prm(tiny_prm(), out, overwrite=True)
    assert (out / OWNER_MARKER).is_file()


# ------------------------------------------------------------------------------------------ commands
def run(argv):
    return cli.main(argv)


def test_convert_refuses_user_dir_overlap_and_file(tmp_path, user_dir, capsys):
    policy = make_tiny_policy(tmp_path / "parent" / "src")
    src_before = tree(policy)
    user_before = tree(user_dir)
    argv = ["convert", f"--config.src={policy}", f"--workdir={tmp_path / 'w'}"]
    assert run([*argv, f"--config.dst={user_dir}", "--config.overwrite=True"]) == 1
    assert "not written by edu_prm_jax" in capsys.readouterr().err
    assert tree(user_dir) == user_before
    assert run([*argv, f"--config.dst={tmp_path / 'parent'}"]) == 1  # dst contains the source
    assert "overlaps the source" in capsys.readouterr().err
    assert tree(policy) == src_before
    (tmp_path / "afile").write_text("x")
    assert run([*argv, f"--config.dst={tmp_path / 'afile'}"]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x" and not staging_path(tmp_path / "afile").exists()
    # the rule still lets a new destination through, then asks before replacing its own output
    assert run([*argv, f"--config.dst={tmp_path / 'ck'}"]) == 0
    assert run([*argv, f"--config.dst={tmp_path / 'ck'}"]) == 1
    assert "--config.overwrite=True" in capsys.readouterr().err
    assert run([*argv, f"--config.dst={tmp_path / 'ck'}", "--config.overwrite=True"]) == 0
    assert tree(policy) == src_before


def test_export_refuses_before_building_anything(tmp_path, user_dir, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / "train_config.json").write_text(json.dumps({"unused": True}))  # refused before it is read further
    before = tree(user_dir)
    assert run(["export", f"--workdir={work}", f"--config.output={user_dir}", "--config.overwrite=True"]) == 1
    assert "not written by edu_prm_jax" in capsys.readouterr().err
    assert tree(user_dir) == before
    (tmp_path / "afile").write_text("x")
    assert run(["export", f"--workdir={work}", f"--config.output={tmp_path / 'afile'}"]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert not staging_path(tmp_path / "afile").exists()



def test_a_model_directory_written_by_another_tool_is_never_replaced(tmp_path):
    """A `save_pretrained`-style directory holds only standard HF names, but nothing only this tool writes."""
    other = tmp_path / "hf_model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    (other / "model.safetensors").write_bytes(b"weights")
    (other / "tokenizer.json").write_text("{}")
    before = tree(other)
    with pytest.raises(DestinationError, match="not written by edu_prm_jax"):
        save_prm(tiny_prm(), other, overwrite=True)
    assert tree(other) == before


def test_a_file_dropped_into_the_destination_during_the_write_is_never_deleted(tmp_path):
    """The destination held our earlier export when checked; while the new one is written a user file lands in
    it. The rename must then be refused: the user's file and the old export stay, no `.partial` is left."""
    out = tmp_path / "hf"
    save_prm(tiny_prm(), out)

    def tensors():
        (out / "notes.txt").write_text("mine")  # arrives mid-write
        yield "a", np.zeros(3, np.float32)

    with pytest.raises(DestinationError, match="changed while it was being written"):
        write_hf_directory(out, {}, tensors(), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert not staging_path(out).exists()
