"""The answer-checking worker pool: a check is bounded by CPU time, not wall time; one that overruns is retried
once with a larger bound and then reported undecided (never False); start-up is not timed; forked children and
daemonic processes are handled."""

import concurrent.futures
import logging
import multiprocessing
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from edu_prm_jax.grading import answers
from edu_prm_jax.grading.answers import answers_equal, answers_verdict, run_cpu_bounded, verification_stats

PATHOLOGICAL = "9^{9^{9^{9}}}"  # sympy evaluates the power tower in C: only ending the worker stops it


def test_overrunning_check_is_retried_then_undecided_counted_and_logged(caplog):
    assert answers_equal(r"\sqrt{9}", "3")  # a warm worker, so start-up is not part of what is timed
    before = verification_stats()
    timeout_s = 0.5
    with caplog.at_level(logging.WARNING, logger="edu_prm_jax.grading.answers"):
        start = time.monotonic()
        result = answers_verdict(PATHOLOGICAL, "1", timeout_s=timeout_s)
        elapsed = time.monotonic() - start
    assert result is None
    # the worker burned its CPU bound, then the retry's: at least that much wall time passed
    assert elapsed >= timeout_s * (1 + answers._RETRY_FACTOR)
    after = verification_stats()
    assert after["symbolic"] == before["symbolic"] + 1 and after["retries"] == before["retries"] + 1
    assert after["cpu_timeouts"] == before["cpu_timeouts"] + 2 and after["wall_timeouts"] == before["wall_timeouts"]
    assert after["undecided"] == before["undecided"] + 1 and after["crashes"] == before["crashes"]
    assert [r.getMessage() for r in caplog.records] == [
        f"answer check undecided (cpu; CPU bound 0.5s, retried with 2s): '1' vs {PATHOLOGICAL!r}"]
    # the same pair again (either order) is answered from the cache: no second round of timeouts
    start = time.monotonic()
    assert answers_verdict("1", PATHOLOGICAL, timeout_s=timeout_s) is None
    assert time.monotonic() - start < 1.0
    again = verification_stats()
    assert again["cpu_timeouts"] == after["cpu_timeouts"] and again["cached"] == after["cached"] + 1
    assert again["undecided"] == after["undecided"] + 1
    assert answers_equal(r"\sqrt{16}", "4")  # a fresh worker takes over
    assert not answers_equal(r"\sqrt{16}", "5")


def _sleep_then_return(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def _bounded(cpu_s: float, fn, arg) -> None:
    print(run_cpu_bounded(cpu_s, fn, arg), flush=True)


@pytest.mark.skipif(not hasattr(signal, "ITIMER_PROF"), reason="needs ITIMER_PROF")
def test_the_bound_is_cpu_time_not_wall_time():
    ctx = multiprocessing.get_context("spawn")
    # 1.5 s of wall time that uses no CPU: a 0.3 s CPU bound does not end it (a wall-time bound would)
    waiting = ctx.Process(target=_bounded, args=(0.3, _sleep_then_return, 1.5))
    waiting.start()
    waiting.join(60)
    assert waiting.exitcode == 0
    # 5 s of CPU: the kernel ends the process at the 0.3 s bound, with SIGPROF
    start = time.monotonic()
    spinning = ctx.Process(target=_bounded, args=(0.3, _spin, 5.0))
    spinning.start()
    spinning.join(60)
    assert spinning.exitcode == -signal.SIGPROF
    assert time.monotonic() - start < 30
    assert answers._wall_bound(2.0) >= 10 * 2.0  # the wall-clock net is far above the CPU bound


def _first_check_with_a_short_bound() -> tuple[bool | None, dict]:
    return answers_verdict(r"\sqrt{8}", r"2\sqrt{2}", timeout_s=0.5), verification_stats()


def test_worker_start_up_is_not_part_of_the_bound():
    # a fresh process: its worker still has to import sympy and latex2sympy2_extended (longer than the bound) when
    # the first check is sent, and the check is still decided
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
