"""A two-process jax.distributed training run on localhost CPU (gloo collectives) equals the single-process
run on two local devices: the multi-host code paths (initialisation, global batches, Orbax) are exercised."""

import os
import pathlib
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


def test_two_process_training_equals_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, str(WORKER), str(single)], check=True, env=_env(), timeout=300)
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(multi), str(i), "2", str(port)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-3000:] for o in outs)
    a, b = np.load(single / "params.npz"), np.load(multi / "params.npz")
    assert set(a.files) == set(b.files)
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
