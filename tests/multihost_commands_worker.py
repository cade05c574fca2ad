"""One process of a multi-process `edu-prm` job on localhost CPU (4 simulated devices); see
test_multihost_commands.py.

Usage: python multihost_commands_worker.py SPEC.json PROCESS_ID NUM_PROCESSES PORT

SPEC.json: {"commands": [[argv of one edu-prm command], ...], "writes": file to append "<process> <path>" to for
every file this process puts in place (every atomic write ends in os.replace), "die_in_sampling": true to have
the last process SIGKILL itself when it starts decoding}. With NUM_PROCESSES 1 it is the single-process
reference (no jax.distributed). The commands run in this one process through `cli.main`, one after another,
as a scheduler would run them on every host; the first that fails ends the worker with its exit status.
"""

import json
import os
import signal
import sys
import time

spec = json.loads(open(sys.argv[1]).read())
process, processes, port = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
if processes > 1:
    os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    os.environ["JAX_NUM_PROCESSES"] = str(processes)
    os.environ["JAX_PROCESS_ID"] = str(process)

from edu_prm_jax import cli  # noqa: E402
from edu_prm_jax.sampling.engine import Sampler  # noqa: E402

if spec.get("writes"):
    _replace = os.replace

    def logged_replace(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        with open(spec["writes"], "a") as f:
            f.write(f"{process} {os.path.abspath(os.fspath(dst))}\n")

    os.replace = logged_replace

if spec.get("die_in_sampling") and process == processes - 1:
    _sample_trees = Sampler.sample_trees

    def dying_sample_trees(self, *args, **kwargs):
        print(f"process {process}: SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        yield from _sample_trees(self, *args, **kwargs)

    Sampler.sample_trees = dying_sample_trees

for argv in spec["commands"]:
    start = time.monotonic()
    rc = cli.main(argv)
    print(f"process {process}: {argv[0]} exited {rc} after {time.monotonic() - start:.1f} s", flush=True)
    if rc:
        sys.exit(rc)
