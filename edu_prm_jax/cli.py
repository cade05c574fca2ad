"""`edu-prm <command>`: one entry point for every pipeline stage.

Each command is a module `edu_prm_jax.commands.<name>` with `DESCRIPTION` and `run(config, workdir)`, imported
only when that command runs (so `--help` stays fast and a missing command does not break the others). Flags:
`--config=FILE[:ARG]` (ml_collections config-file semantics; default: the shipped `configs/<name>.py`, i.e.
edu_prm_jax/configs/<name>.py, which `configs/<file>.py` names from any directory), `--config.a.b=v` overrides
checked against the config's fields, `--workdir`, `--log_level`.
"""

from __future__ import annotations

import ast
import difflib
import errno
import importlib
import importlib.util
import logging as std_logging
import os
import pathlib
import sys
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from edu_prm_jax import config_utils
from edu_prm_jax.commands.registry import COMMANDS
from edu_prm_jax.io import storage

PROG = "edu-prm"
NOT_AVAILABLE = "(not available in this build)"
LOG_LEVELS = ("debug", "info", "warning", "error", "fatal")
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")
USAGE = (f"usage: {PROG} <command> [--config=FILE[:ARG]] [--config.FIELD=VALUE ...] [--workdir=DIR] "
         "[--log_level=LEVEL]")


class UsageError(Exception):
    """A command line that cannot run: unknown command, unknown field, bad flag value."""


def default_config_file(name: str) -> pathlib.Path:
    """The shipped config of command `name`: edu_prm_jax/configs/<name>.py, wherever the package is installed."""
    return config_utils.shipped_config(name)


def command_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(COMMANDS[name]) is not None
    except ModuleNotFoundError:
        return False


def command_description(name: str) -> str:
    """The module's DESCRIPTION, read from its source without importing it (imports pull in JAX)."""
    spec = importlib.util.find_spec(COMMANDS[name]) if command_available(name) else None
    if spec is None:
        return NOT_AVAILABLE
    if spec.origin and spec.origin.endswith(".py"):
        tree = ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
        for node in tree.body:
            if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DESCRIPTION"
                                                     for t in node.targets)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                return node.value.value
    return str(getattr(importlib.import_module(COMMANDS[name]), "DESCRIPTION", ""))


def main_help() -> str:
    width = max(len(n) for n in COMMANDS) + 2
    lines = [USAGE, "", "commands:"]
    lines += [f"  {n:<{width}}{command_description(n)}" for n in COMMANDS]
    lines += ["", f"Run `{PROG} <command> --help` for the command's flags and config fields."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- argv
class _Scan:
    """What the CLI needs from argv before absl parses it: the config spec, override keys, --help."""

    def __init__(self, args: Sequence[str]):
        self.config_spec: str | None = None
        self.override_keys: list[str] = []
        self.help = False
        self.rest: list[str] = []  # argv without --config=FILE (the ConfigDict flag takes only overrides)
        i = 0
        while i < len(args):
            arg = args[i]
            bare = arg.lstrip("-")
            if arg in HELP_FLAGS:
                self.help = True
            elif arg.startswith("-") and bare.split("=", 1)[0] == "config":
                if "=" in arg:
                    self.config_spec = arg.split("=", 1)[1]
                elif i + 1 < len(args):
                    self.config_spec = args[i + 1]
                    i += 1
                else:
                    raise UsageError("--config needs a value: --config=FILE[:ARG]")
                i += 1
                continue
            elif arg.startswith("-") and (bare.startswith("config.") or bare.startswith("noconfig.")):
                key = bare.split("=", 1)[0].split(".", 1)[1]
                self.override_keys.append(key)
            self.rest.append(arg)
            i += 1


def _load(name: str, scan: _Scan):
    if scan.config_spec:
        return config_utils.load_config(scan.config_spec)
    default = default_config_file(name)
    try:
        return config_utils.load_config_file(default)
    except config_utils.ConfigFileError as e:
        raise UsageError(f"{e}; pass --config=FILE") from None


def command_help(name: str, scan: _Scan) -> str:
    lines = [f"usage: {PROG} {name} [--config=FILE[:ARG]] [--config.FIELD=VALUE ...] [--workdir=DIR] "
             "[--log_level=LEVEL]", "", command_description(name), "",
             "flags:",
             f"  --config=FILE[:ARG]  config file, built by get_config(ARG) "
             f"(default configs/{default_config_file(name).name}, shipped in edu_prm_jax/configs/)",
             "  --workdir=DIR        run directory, local or gs://bucket/path; the config used is saved there "
             "(default ./workdir)",
             f"  --log_level=LEVEL    {'|'.join(LOG_LEVELS)} (default info)"]
    config, path, module = _load(name, scan)
    lines += ["", f"config fields ({path}):"]
    if module.__doc__:
        lines += ["  " + ln for ln in module.__doc__.strip().splitlines()] + [""]
    lines.append(config_utils.describe_config(config, config_utils.field_comments(module)))
    return "\n".join(lines)


class _QuietLibraries(std_logging.Filter):
    """Drop INFO chatter of libraries that log through absl too (Orbax writes several lines per checkpoint)."""

    NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def _setup_logging(level: str) -> None:
    if not flags.FLAGS.is_parsed():  # absl logging warns until its own flags count as parsed
        flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(level)
    logging.set_stderrthreshold(level)
    if level != "debug":
        handler = logging.get_absl_handler()
        if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
            handler.addFilter(_QuietLibraries())


def run_command(name: str, args: Sequence[str]) -> int:
    """Parse one command's flags, record its config in the workdir and run it."""
    scan = _Scan(args)
    if not command_available(name):
        raise UsageError(f"command {name!r} is not available in this build (no module {COMMANDS[name]})")
    if scan.help:
        print(command_help(name, scan))
        return 0
    config, path, module = _load(name, scan)
    config_utils.check_override_keys(scan.override_keys, config, str(path))
    argv = [f"{PROG} {name}", *scan.rest]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_dict("config", config, "the command's config", flag_values=fv,
                                             sys_argv=argv)
    workdir_flag = flags.DEFINE_string("workdir", "./workdir", "run directory", flag_values=fv)
    level = flags.DEFINE_enum("log_level", "info", LOG_LEVELS, "log level", flag_values=fv)
    try:
        extra = fv(argv)[1:]
    except flags.Error as e:
        raise UsageError(str(e)) from None
    if extra:
        raise UsageError(f"unexpected positional argument(s) {extra}")
    _setup_logging(level.value)
    config = holder.value
    config_utils.check_ranges(config)  # before any model loads or anything is written

    from edu_prm_jax import parallel

    parallel.maybe_initialize_distributed()
    import jax

    workdir = storage.as_path(workdir_flag.value)  # gs://bucket/run stays on the object store
    if jax.process_index() == 0:
        config_utils.write_config_json(config, workdir / f"{name.replace('-', '_')}_config.json")
    logging.info("%s %s: config %s, workdir %s", PROG, name, path, workdir)
    module = importlib.import_module(COMMANDS[name])
    from edu_prm_jax import distributed

    with distributed.failures_reported():  # multi-host: the other processes stop naming this one, never hang
        module.run(config, workdir)
    return 0


def _preempted() -> type[BaseException]:
    from edu_prm_jax.training.loop import PreemptedError

    return PreemptedError


def _exit_preempted() -> int:
    from edu_prm_jax.training.loop import EXIT_PREEMPTED

    return EXIT_PREEMPTED


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (a message is enough); anything else keeps its traceback."""
    from edu_prm_jax.distributed import PeerFailedError
    from edu_prm_jax.models.config import ConfigError
    from edu_prm_jax.models.safetensors_io import CheckpointError
    from edu_prm_jax.planning.devices import PlannerUnavailableError
    from edu_prm_jax.training.checkpointing import DamagedCheckpointError

    # FloatingPointError: training stopped at a non-finite loss/gradient (training.loop.NonFiniteError)
    return (config_utils.ConfigFileError, ConfigError, CheckpointError, FileNotFoundError, ValueError,
            FloatingPointError, DamagedCheckpointError, PlannerUnavailableError, PeerFailedError)


def _fold_exit_time_write_errors() -> None:
    """After a disk-full error has been reported, libraries' own exit-time writes fail on the same disk once more:
    tensorboardX retries its event file's flush from an atexit hook, and its writer thread and unflushed file
    objects fail as the interpreter shuts down. Python prints each as a traceback under the one line already
    given; these hooks log such OSErrors at debug level instead (`--log_level=debug` shows them). Anything that
    is not an OSError still reaches the default hooks."""
    import threading

    default_unraisable, default_thread = sys.unraisablehook, threading.excepthook

    def unraisable(report: sys.UnraisableHookArgs) -> None:
        if isinstance(report.exc_value, OSError):
            logging.debug("after the disk-full error, ignored at exit: %s (%r)", report.exc_value, report.object)
        else:
            default_unraisable(report)

    def thread_failed(report: threading.ExceptHookArgs) -> None:
        if isinstance(report.exc_value, OSError):
            logging.debug("after the disk-full error, thread %s failed: %s", report.thread, report.exc_value)
        else:
            default_thread(report)

    sys.unraisablehook, threading.excepthook = unraisable, thread_failed


STACK_RAISED = "EDU_PRM_STACK_RAISED"  # set once `plan` has re-executed itself with the stack limit raised


def _raise_stack_limit_and_reexec(args: Sequence[str]) -> None:
    """For `plan` from the console: libtpu's compiler recurses deeply on large programs and overflows an 8 MiB
    stack, killing the process (measured with libtpu 0.0.42.1: a 2048-token attention at 384+ rows on a v5e,
    larger ones on a v4; `ulimit -s unlimited` compiles them). glibc fixes thread stack sizes from the limit at
    process start, so the limit is raised to the hard one and the command re-executed, once."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if os.environ.get(STACK_RAISED) or soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY
                                                                          and hard <= soft):
        return
    resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
    os.environ[STACK_RAISED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "edu_prm_jax.cli", *args])


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 failed run, 2 bad command line, 75 preempted:
    SIGTERM during training, checkpoint saved, rerun to resume)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None and args and args[0] == "plan" and not set(args) & set(HELP_FLAGS):
        _raise_stack_limit_and_reexec(args)
    if not args or args[0] in HELP_FLAGS or args[0] == "help":
        print(main_help(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name = args[0]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, list(COMMANDS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        print(f"{PROG}: error: unknown command {name!r}{hint}\n\n{main_help()}", file=sys.stderr)
        return 2
    try:
        return run_command(name, args[1:])
    except (UsageError, config_utils.ConfigFileError) as e:
        print(f"{PROG} {name}: error: {e}", file=sys.stderr)
        return 2
    except _preempted() as e:
        print(f"{PROG} {name}: preempted: {e}", file=sys.stderr)
        return _exit_preempted()
    except _user_errors() as e:
        logging.debug("traceback", exc_info=True)
        print(f"{PROG} {name}: error: {e} (--log_level=debug shows the traceback)", file=sys.stderr)
        return 1
    except OSError as e:  # the file system said no: one line naming the path, not a traceback
        logging.debug("traceback", exc_info=True)
        where = f" ({e.filename})" if e.filename and str(e.filename) not in str(e) else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"{PROG} {name}: error: disk full: {e}{where}; free space and rerun (finished work is kept)",
                  file=sys.stderr)
            _fold_exit_time_write_errors()
        else:
            print(f"{PROG} {name}: error: {e}{where} (--log_level=debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
