"""`sample` (EDU and HT), `label` with extra rollouts, `score`, `eval-bon` and `eval-processbench` as a two-process
jax.distributed job on localhost (2 processes x 4 simulated CPU devices, the real CLI in each) write exactly the
files of a single-process run on 4 devices (one host's devices), byte for byte; each file is put in place by
one process only (shard i by process i % 2, the rest by process 0); and a process that dies or fails makes the
other exit non-zero within a bounded time, naming it."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from determinism import comparable

from edu_prm_jax.io.shards import read_shards

WORKER = pathlib.Path(__file__).with_name("multihost_commands_worker.py")
SHARD = "-of-"  # shard files are <prefix>-0000i-of-0000n.jsonl


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    env["PYTHONPATH"] = str(WORKER.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _spec(tmp, commands, **options):
    path = tmp / f"spec-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"commands": commands, **options}))
    return path


def _launch(spec, processes, **env):
    port = str(portpicker.pick_unused_port())
    return [subprocess.Popen([sys.executable, str(WORKER), str(spec), str(i), str(processes), port],
                             env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]


def _finish(procs, timeout=240):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def _processbench_items(rng, n):
    items = []
    for i in range(n):
        steps = [f"Step {k}: {int(rng.integers(1, 50))} + {int(rng.integers(1, 50))}"
                 for k in range(rng.integers(2, 5))]
        label = -1 if i % 2 else int(rng.integers(0, len(steps)))
        items.append({"id": f"pb-{i}", "generator": "test", "problem": f"What is {i} + {i}?", "steps": steps,
                      "final_answer_correct": label == -1, "label": label})
    return items


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The commands, a single-process reference run (its workdir moved to `single`) and the same commands as a
    two-process job in the same workdir path (`w`), with every process's file placements logged."""
    from edu_prm_jax.models.checkpoints import load_hf_model
    from edu_prm_jax.models.prm import PRM, save_prm
    from edu_prm_jax.toy.defaults import resolve_policy

    root = tmp_path_factory.mktemp("multihost")
    policy = resolve_policy("toy")
    prm = root / "prm"
    save_prm(PRM.from_policy(load_hf_model(policy), head="scalar", seed=1), prm)
    rng = np.random.default_rng(0)
    solutions = root / "solutions.jsonl"
    solutions.write_text("".join(json.dumps({"id": f"s{i}", "problem": f"{i} + {2 * i} = ?",
                                             "steps": [f"{i} + {2 * i}"] * int(rng.integers(1, 4)) + [f"= {3 * i}"]})
                                 + "\n" for i in range(9)))
    bench = root / "processbench"
    bench.mkdir()
    for subset in ("gsm8k", "math"):
        (bench / f"{subset}.json").write_text(json.dumps(_processbench_items(rng, 7)))
    w = root / "w"
    # one decode program per mode serves every command (static settings equal: 4 slots, 12 new tokens, one prompt
    # bucket), and the compilation cache the reference run fills serves process 0 of the job (test time)
    shape = ["--config.sampling.max_new_tokens=12", "--config.batch_questions=2", "--config.prompt_bucket=64"]
    sample = ["sample", f"--workdir={w}", "--config.questions=toy:test:6", "--config.num_shards=3",
              "--config.sampling.num_leaves=4", "--config.sampling.tau=0.5", *shape]
    commands = [
        sample,
        [*sample, "--config.sampling.mode=ht"],
        ["label", f"--workdir={w}", "--config.extra_rollouts_min_leaves=3", "--config.extra_rollouts_k=4",
         "--config.tfds=False", *shape],
        ["score", f"--workdir={w}", f"--config.prm={prm}", f"--config.tokenizer={policy}",
         f"--config.input={solutions}", "--config.batch_size=2"],
        ["eval-bon", f"--workdir={w}", f"--config.prm={prm}", "--config.questions=toy:test:4", "--config.n_grid=4",
         "--config.seeds=0", "--config.num_shards=2", "--config.sampling.tau=0.5", "--config.p_edu=False", *shape],
        ["eval-processbench", f"--workdir={w}", f"--config.prm={prm}", f"--config.tokenizer={policy}",
         f"--config.data={bench}", "--config.subsets=gsm8k,math", "--config.batch_size=2"],
    ]
    cache = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    codes, outs = _finish(_launch(_spec(root, commands), 1, **cache))
    assert codes == [0], outs[0][-4000:]
    w.rename(root / "single")
    writes = root / "writes.txt"
    codes, outs = _finish(_launch(_spec(root, commands, writes=str(writes)), 2, **cache))
    assert codes == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    return {"root": root, "single": root / "single", "multi": w, "writes": writes, "outs": outs, "cache": cache,
            "sample": sample}


def _files(directory):
    """Relative name -> bytes, wall times left out (`determinism.comparable`)."""
    return {str(p.relative_to(directory)): comparable(p.name, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_two_process_outputs_equal_single_process_byte_for_byte(job):
    single, multi = _files(job["single"]), _files(job["multi"])
    assert sorted(multi) == sorted(single)
    differ = [name for name in single if single[name] != multi[name]]
    assert not differ, differ
    # what was compared: every command's outputs, with the extra rollouts really sampled in `label`
    for expected in ("samples_edu/trees-00002-of-00003.jsonl", "samples_ht/fingerprint.json",
                     "labels/label_stats.json", "scores.jsonl", "eval_bon/report.md",
                     "eval_bon/runs/edu_n4_s0/trees-00001-of-00002.jsonl", "processbench/results.json"):
        assert expected in single, expected
    assert any(sum(r["provenance"]["node_rollouts"]) for r in read_shards(job["single"] / "labels", "steps"))


def test_each_file_is_put_in_place_by_one_process_its_owner(job):
    """Shard i of every output by process i % 2 (both processes did work), everything else by process 0."""
    writers = {}
    for line in job["writes"].read_text().splitlines():
        process, path = line.split(" ", 1)
        writers.setdefault(path, []).append(int(process))
    multi = job["multi"]
    for name in _files(multi):
        who = set(writers.get(str(multi / name), ()))  # sample_config.json: once per `sample` command
        if SHARD in name:
            index = int(name.rsplit("/", 1)[-1].split("-")[-3])
            assert who == {index % 2}, (name, who)
        else:
            assert who == {0}, (name, who)
    assert {w[0] for w in writers.values()} == {0, 1}


def test_a_killed_process_ends_the_job_naming_it(job, tmp_path):
    """The last process SIGKILLs itself when it starts decoding; the other must not hang at the barrier after its
    own shards: JAX's coordination service misses the dead one's heartbeats (timeout 5 s here) and ends it."""
    commands = [[f"--workdir={tmp_path / 'w'}" if a.startswith("--workdir=") else a for a in job["sample"]]]
    procs = _launch(_spec(tmp_path, commands, die_in_sampling=True), 2, EDU_PRM_HEARTBEAT_TIMEOUT="5", **job["cache"])
    start = time.monotonic()
    codes, outs = _finish(procs, timeout=120)
    elapsed = time.monotonic() - start
    assert codes[1] == -9, outs[1][-2000:]
    assert codes[0] != 0, outs[0][-3000:]
    assert "stopped sending heartbeats" in outs[0] and "heartbeats):\n1\n" in outs[0], outs[0][-3000:]
    assert elapsed < 90, elapsed


def test_a_failing_process_stops_the_other_naming_it(job, tmp_path):
    """`label` where only process 1's shard is malformed: process 1 fails with the file and line, process 0 labels
    its own shards and then stops at the barrier naming process 1 and its error, instead of waiting."""
    w = tmp_path / "w"
    shutil.copytree(job["single"] / "samples_edu", w / "samples_edu")
    bad = w / "samples_edu" / "trees-00001-of-00003.jsonl"
    lines = bad.read_text().splitlines()
    record = json.loads(lines[1])
    record["leaves"][0]["token_ids"] = "not a list"
    bad.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    procs = _launch(_spec(tmp_path, [["label", f"--workdir={w}", "--config.tfds=False"]]), 2)
    start = time.monotonic()
    codes, outs = _finish(procs, timeout=120)
    assert codes == [1, 1], "\n\n".join(o[-3000:] for o in outs)
    assert "trees-00001-of-00003.jsonl:2: field 'leaves[0].token_ids'" in outs[1], outs[1][-3000:]
    assert "process 1 of 2 failed" in outs[0] and "trees-00001-of-00003.jsonl" in outs[0], outs[0][-3000:]
    assert time.monotonic() - start < 90
    assert not (w / "labels" / "steps-00001-of-00003.jsonl").exists()


@pytest.mark.parametrize("processes", [2, 3])
def test_score_shares_cover_every_example_once_with_single_process_scores(processes):
    """The batch split of `score_examples_across_processes`, without processes: the shares of P simulated processes
    are disjoint, cover every example, and each score is the very float `score_examples` gives in one call."""
    from flax import nnx

    from edu_prm_jax.models.config import Qwen2Config
    from edu_prm_jax.models.prm import PRM
    from edu_prm_jax.scoring.examples import build_example, score_examples
    from edu_prm_jax.scoring.multihost import score_share

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    prm = PRM(cfg, "scalar", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    # short examples (5..38 tokens, still more than one 16-token bucket): each bucket and batch shape is a compile
    examples = [build_example({"prompt_ids": rng.integers(1, 64, rng.integers(2, 12)).tolist(),
                               "step_ids": [rng.integers(1, 64, rng.integers(1, 10)).tolist() for _ in range(3)],
                               "labels": [0.0] * 3}, head="scalar", record_id=i) for i in range(11)]
    reference = score_examples(prm, examples, batch_size=3, bucket=16)
    shares = [score_share(prm, examples, p, processes, batch_size=3, bucket=16) for p in range(processes)]
    assert all(shares) and sum(len(s) for s in shares) == len(examples)
    merged = {i: v for s in shares for i, v in s.items()}
    assert sorted(merged) == list(range(len(examples)))
    assert all(merged[i] == reference[i] for i in range(len(examples)))


def test_heartbeat_timeout_comes_from_the_environment(monkeypatch):
    from edu_prm_jax import parallel

    monkeypatch.delenv(parallel.HEARTBEAT_ENV, raising=False)
    assert parallel.heartbeat_timeout() == 100  # jax.distributed's own default
    monkeypatch.setenv(parallel.HEARTBEAT_ENV, "7")
    assert parallel.heartbeat_timeout() == 7
    for bad in ("0", "-3", "ten", "1.5"):
        monkeypatch.setenv(parallel.HEARTBEAT_ENV, bad)
        with pytest.raises(ValueError, match=f"{parallel.HEARTBEAT_ENV}='{bad}'"):
            parallel.heartbeat_timeout()
