"""The math-verify worker pool: an overrunning check is bounded and reported as before; start-up is not timed;
forked children and daemonic processes are handled."""

import concurrent.futures
import logging
import multiprocessing
import subprocess
import sys
import textwrap
import time

import pytest

from edu_prm_jax.grading.answers import answers_equal, verification_stats

PATHOLOGICAL = "9^{9^{9^{9}}}"  # sympy evaluates the power tower in C: only killing the worker stops it


def test_overrunning_check_is_false_counted_and_logged(caplog):
    assert answers_equal(r"\sqrt{9}", "3")  # a warm worker, so start-up is not part of what is timed
    before = verification_stats()
    timeout_s = 1.0
    with caplog.at_level(logging.WARNING, logger="edu_prm_jax.grading.answers"):
        start = time.monotonic()
        result = answers_equal(PATHOLOGICAL, "1", timeout_s=timeout_s)
        elapsed = time.monotonic() - start
    assert result is False
    assert timeout_s <= elapsed < timeout_s + 1.0  # killed at the bound, not after a grace period
    after = verification_stats()
    assert after["timeouts"] == before["timeouts"] + 1 and after["symbolic"] == before["symbolic"] + 1
    assert [r.getMessage() for r in caplog.records] == [
        f"answers_equal timed out after 1.0s: pred={PATHOLOGICAL!r} gold='1'"]
    assert answers_equal(r"\sqrt{16}", "4")  # a fresh worker takes over
    assert not answers_equal(r"\sqrt{16}", "5")


def _first_check_with_a_short_bound() -> tuple[bool, dict]:
    return answers_equal(r"\sqrt{8}", r"2\sqrt{2}", timeout_s=0.5), verification_stats()


def test_worker_start_up_is_not_part_of_the_bound():
    # a fresh process: its worker still has to import math-verify and sympy (longer than the bound) when the
    # first check is sent, and the check is still decided
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        result, stats = ex.submit(_first_check_with_a_short_bound).result(timeout=120)
    assert result is True and stats["timeouts"] == 0


FORK_SCRIPT = textwrap.dedent("""
    import os, sys
    import multiprocessing
    from edu_prm_jax.grading.answers import answers_equal

    assert answers_equal(r"\\sqrt{4}", "2")
    workers = {p.pid for p in multiprocessing.active_children()}
    pid = os.fork()
    if pid == 0:  # a plain fork whose child exits normally, running its exit handlers
        assert answers_equal(r"\\sqrt{9}", "3")
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    assert workers <= {p.pid for p in multiprocessing.active_children()}, "the child stopped the parent's worker"
    assert answers_equal(r"\\sqrt{16}", "4")
    print("ok")
""")


def test_forked_child_neither_uses_nor_stops_the_parents_worker():
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_daemonic_process_gets_a_clear_error():
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # multiprocessing.Pool workers are daemonic
        with pytest.raises(RuntimeError, match="daemonic process"):
            pool.apply(answers_equal, (r"\sqrt{4}", "2"))
        assert pool.apply(answers_equal, ("0.5", r"\frac12"))  # the fast path needs no worker
