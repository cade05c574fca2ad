"""A real SIGTERM to `edu-prm pipeline` while its train stage compiles its first step: the step finishes, a
checkpoint is saved, the pipeline stops with exit 75 (EX_TEMPFAIL) before eval_bon, and a rerun resumes from
the checkpoint and finishes (issue "Nothing lost": SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tiny_policy import make_tiny_policy, sample_and_label

from edu_prm_jax.training.loop import EXIT_PREEMPTED


def _terminate_when(argv: list[str], ready) -> tuple[int, str, float]:
    """Start `argv`, send SIGTERM at the first stderr line for which `ready(line)` holds; (exit status, stderr,
    seconds from the signal to the exit)."""
    # the run-wide compilation cache off: the signal is meant to land while the first step really compiles
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    lines, start = [], time.monotonic()
    for line in proc.stderr:
        lines.append(line)
        if ready(line):
            break
        assert time.monotonic() - start < 300, "".join(lines)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    lines.append(proc.stderr.read())
    rc = proc.wait(timeout=300)
    return rc, "".join(lines), time.monotonic() - sent


def test_sigterm_during_the_first_compile_saves_stops_the_pipeline_and_the_rerun_resumes(tmp_path):
    policy = make_tiny_policy(tmp_path / "policy")
    w = tmp_path / "w"
    sample_and_label([f"--workdir={w}", f"--config.policy={policy}"], questions=6, max_new_tokens=8, num_leaves=2)
    argv = [sys.executable, "-m", "edu_prm_jax.cli", "pipeline", f"--workdir={w}", f"--config.policy={policy}",
            "--config.stages=train,eval_bon", "--config.train.steps=40", "--config.train.rows=8",
            "--config.train.seq_len=64"]
    # 1. SIGTERM while the train stage loads the PRM and builds the optimizer state: exit 75 at once (when the
    #    signal lands after the loop started, it saves first, like case 2)
    rc, err, _ = _terminate_when(argv, lambda line: "PRM data:" in line)
    assert rc == EXIT_PREEMPTED and "preempted: stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    assert not (w / "prm" / "hf").exists() and not (w / "eval_bon").exists()
    # 2. SIGTERM once the training loop runs (its progress bar is up): during the compile of its first step
    rc, err, waited = _terminate_when(argv, lambda line: "/40 [" in line)
    assert rc == EXIT_PREEMPTED, err[-3000:]
    assert "preempted: stopped by SIGTERM at step" in err and "Traceback" not in err
    steps = [int(p.name) for p in (w / "prm" / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and 1 <= max(steps) < 40  # saved right after the step that was compiling
    assert not (w / "prm" / "hf").exists() and not (w / "eval_bon").exists()  # eval_bon never started
    assert "pipeline stage eval_bon" not in err
    assert waited < 120, f"the SIGTERM took {waited:.0f} s to be honoured"

    rerun = subprocess.run([*argv[:6], "--config.stages=train", *argv[7:]], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"restored checkpoint step {max(steps)} from" in rerun.stderr
    assert json.loads((w / "prm" / "train_summary.json").read_text())["step"] == 40
