"""A two-process jax.distributed training run on localhost CPU (gloo collectives) equals the single-process
run on two local devices: the multi-host code paths (initialisation, global batches, Orbax) are exercised."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import portpicker

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(WORKER.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _two_processes(out_dir, *extra):
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out_dir), str(i), "2", str(port), *extra],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-3000:] for o in outs)
    return outs


def test_two_process_training_equals_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, str(WORKER), str(single)], check=True, env=_env(), timeout=300)
    _two_processes(multi)
    a, b = np.load(single / "params.npz"), np.load(multi / "params.npz")
    assert set(a.files) == set(b.files)
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_sigterm_on_one_host_stops_every_host_at_the_same_step(tmp_path):
    """Only the last process gets SIGTERM (at its 2nd batch); a host leaving alone would hang the other in the
    next collective, so both must leave at one step: the next agreement point (log_every=4), not the end (8)."""
    outs = _two_processes(tmp_path / "stop", "2")
    steps = [re.search(r"left the loop at step (\d+), preempted=1.0", o) for o in outs]
    assert all(steps), "\n\n".join(o[-3000:] for o in outs)
    assert [int(m.group(1)) for m in steps] == [4, 4]
