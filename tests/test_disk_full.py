"""A real full disk (a small tmpfs mounted in a private user + mount namespace) under `train` checkpoints and
`export`: one line naming the path and the bytes, nothing partial left where a rerun looks, and a rerun with
space resumes. Skipped where unprivileged namespaces are not allowed (`unshare -rm` fails)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from tiny_policy import make_tiny_policy, sample_and_label


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="needs `unshare -rm` and tmpfs mounts")

CLI = f"{sys.executable} -m edu_prm_jax.cli"


def _in_namespace(script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a fresh user + mount namespace, where it may mount tmpfs file systems."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() and not line.startswith("I")]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("diskfull")
    policy = make_tiny_policy(root / "policy")
    common = [f"--workdir={root / 'w'}", f"--config.policy={policy}"]
    sample_and_label(common, questions=6, max_new_tokens=8, num_leaves=2)
    return root, policy


def test_a_checkpoint_on_a_full_disk_is_one_line_and_a_rerun_with_space_resumes(labelled):
    root, policy = labelled
    prm = root / "w" / "prm"
    prm.mkdir()
    train = (f"{CLI} train --workdir={root / 'w'} --config.policy={policy} --config.steps=6 --config.rows=8 "
             "--config.seq_len=64 --config.checkpoint_every=3")
    # The train state is ~237 KB; 480 KB holds the step-3 checkpoint but not step 6 beside it. Both runs share
    # the one namespace (the tmpfs lives as long as it), the second after the file system grew.
    first_err, second_err, rc_file = root / "first.err", root / "second.err", root / "rc"
    done = _in_namespace(f"""
        mount -t tmpfs -o size=480k tmpfs {prm} || exit 90
        {train} 2>{first_err}; echo "first=$?" > {rc_file}
        ls -a {prm / 'checkpoints'} > {root / 'after_first'}
        mount -o remount,size=20m {prm} || exit 91
        {train} 2>{second_err}; echo "second=$?" >> {rc_file}
        cat {prm / 'train_summary.json'} > {root / 'summary.json'}
    """)
    assert done.returncode == 0, done.stderr
    rc = dict(line.split("=") for line in rc_file.read_text().split())
    first = first_err.read_text()
    assert rc["first"] == "1", first[-3000:]
    assert "Traceback" not in first and "Event loop is closed" not in first
    errors = _errors(first)
    assert len(errors) == 1, errors
    assert errors[0].startswith("edu-prm train: error: disk full: no space left on device saving checkpoint step")
    assert str(prm / "checkpoints") in errors[0] and "bytes are free there now" in errors[0]
    assert "its arrays alone take 237," in errors[0]
    left = (root / "after_first").read_text().split()
    assert not [name for name in left if "orbax-checkpoint-tmp" in name]  # the incomplete save is gone
    intact = sorted(int(name) for name in left if name.isdigit())
    assert f"checkpoint steps {intact} are intact" in errors[0] if intact else "no earlier checkpoint" in errors[0]
    assert rc["second"] == "0", second_err.read_text()[-3000:]
    assert json.loads((root / "summary.json").read_text())["step"] == 6
    if intact:
        assert f"restored checkpoint step {intact[-1]} from" in second_err.read_text()  # resumed, not restarted


def test_an_export_to_a_full_disk_is_one_line_and_leaves_no_partial(labelled):
    root, policy = labelled
    w = root / "w2"
    shutil.copytree(root / "w", w, ignore=shutil.ignore_patterns("prm"))
    subprocess.run([*CLI.split(), "train", f"--workdir={w}", f"--config.policy={policy}", "--config.steps=2",
                    "--config.rows=8", "--config.seq_len=64"], check=True, capture_output=True)
    out = root / "exp"
    out.mkdir()
    done = _in_namespace(f"mount -t tmpfs -o size=40k tmpfs {out} || exit 90\n"
                         f"{CLI} export --workdir={w} --config.output={out / 'hf'}; echo \"rc=$?\"\n ls -a {out}")
    assert "rc=1" in done.stdout, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = _errors(done.stderr)
    assert len(errors) == 1 and "disk full: no space left on device writing" in errors[0], errors
    assert "hf.partial" in errors[0] and "nothing partial was left" in errors[0]
    assert done.stdout.split()[1:] == [".", ".."]  # neither hf nor hf.partial remains on the full disk
