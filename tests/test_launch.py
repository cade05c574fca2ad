"""launch/tpu_vm.sh and launch/gpu.sh: planned commands (--dry-run) and real runs against fake gcloud/ssh.

The dry runs use a PATH holding nothing but bash, which also proves they need no gcloud. Quoting is checked
the way a shell would see it: `shlex.split` of the printed line, then of the remote command, must give back
the exact edu-prm argv, and the real-run tests execute the remote command through bash and record the argv
a fake `edu-prm` actually received.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_vm.sh"
GPU = REPO / "launch" / "gpu.sh"
BASH = shutil.which("bash")
PYTHON = shutil.which("python3") or shutil.which("python")

# An override with spaces, a `$`, a single quote and a glob: every one breaks a naive quoting.
EDU_ARGS = [
    "train",
    "--config=configs/train.py",
    "--config.labels=my run $HOME 'x' *",
    "--config.learning_rate=3e-5",
    "--workdir=gs://bucket/runs/a b",
]
CREATE_FLAGS = ["--name", "prm-vm", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-8",
                "--version", "v2-alpha-tpuv5-lite"]

pytestmark = pytest.mark.skipif(BASH is None, reason="bash not installed")


@pytest.fixture
def bash_only_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has only bash: no gcloud, ssh, rsync or coreutils."""
    bindir = tmp_path / "onlybash"
    bindir.mkdir()
    (bindir / "bash").symlink_to(BASH)
    return {"PATH": str(bindir), "HOME": str(tmp_path)}


def run_script(script: Path, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def planned(stdout: str) -> list[list[str]]:
    """Each `+ ...` line as the argv a shell would parse from it."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud_calls(cmds: list[list[str]], verb: str) -> list[list[str]]:
    return [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == verb]


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def edu_argv(shell_text: str) -> list[str]:
    """The edu-prm argv inside a remote shell command (edu-prm is its last command)."""
    words = shlex.split(shell_text)
    return words[words.index("edu-prm") + 1:]


# ---- syntax --------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TPU, GPU], ids=["tpu_vm", "gpu"])
def test_scripts_parse_and_show_help(script: Path, bash_only_env: dict[str, str], tmp_path: Path) -> None:
    assert subprocess.run([BASH, "-n", str(script)], capture_output=True).returncode == 0
    shutil.copy(shutil.which("cat"), Path(bash_only_env["PATH"]) / "cat")
    res = run_script(script, ["--help"], bash_only_env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--dry-run" in res.stdout and "Usage:" in res.stdout


# ---- tpu_vm.sh dry runs --------------------------------------------------------------------------

def test_tpu_launch_plan(bash_only_env: dict[str, str], tmp_path: Path) -> None:
    res = run_script(TPU, ["launch", *CREATE_FLAGS, "--project", "my-proj", "--spot", "--delete-after",
                           "--dry-run", "--", *EDU_ARGS], bash_only_env, tmp_path)
    assert res.returncode == 0, res.stderr
    cmds = planned(res.stdout)
    (describe,) = gcloud_calls(cmds, "describe")
    (create,) = gcloud_calls(cmds, "create")
    assert create[5] == "prm-vm" and describe[5] == "prm-vm"
    assert flag_value(create, "--accelerator-type") == "v5litepod-8"
    assert flag_value(create, "--zone") == "us-west4-a"
    assert flag_value(create, "--version") == "v2-alpha-tpuv5-lite"
    assert flag_value(create, "--project") == "my-proj" and "--spot" in create
    assert cmds.index(describe) < cmds.index(create)

    ssh = gcloud_calls(cmds, "ssh")
    scp = gcloud_calls(cmds, "scp")
    assert ssh and scp and all("--worker=all" in c for c in ssh + scp)
    assert all(flag_value(c, "--zone") == "us-west4-a" for c in ssh + scp)
    # The repo goes to every worker, then pip installs the [tpu] extra there.
    assert scp[0][5:8] == ["--recurse", str(REPO), "prm-vm:edu_prm_jax"]
    assert any(".[tpu]" in shlex.split(flag_value(c, "--command")) for c in ssh)

    run_cmd = ssh[-1]
    assert edu_argv(flag_value(run_cmd, "--command")) == EDU_ARGS
    run_line = [ln for ln in res.stdout.splitlines() if "edu-prm train" in ln][0]
    assert run_line.endswith(".log") and "| tee -a logs/launch/prm-vm-train-" in run_line

    (delete,) = gcloud_calls(cmds, "delete")
    assert cmds[-1] == delete and "--quiet" in delete


def test_tpu_pod_slice_runs_every_stage_on_all_workers_with_a_bucket_workdir(bash_only_env: dict[str, str],
                                                                            tmp_path: Path) -> None:
    """The launch/README walk-through on a multi-host slice (v5litepod-16: 4 workers): every edu-prm command goes
    to all workers (`--worker=all`), each with the same gs:// workdir, passed through untouched."""
    flags = ["--name", "edu", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-16", "--version",
             "v2-alpha-tpuv5-lite", "--dry-run"]
    stages = [["sample", "--config=configs/sample.py", "--config.mesh.data=1", "--config.mesh.tensor=4",
               "--workdir=gs://my-bucket/runs/math7b"],
              ["label", "--config=configs/label.py", "--workdir=gs://my-bucket/runs/math7b"]]
    for argv in stages:
        res = run_script(TPU, ["run", *flags, "--", *argv], bash_only_env, tmp_path)
        assert res.returncode == 0, res.stderr
        (ssh,) = gcloud_calls(planned(res.stdout), "ssh")
        assert "--worker=all" in ssh
        assert edu_argv(flag_value(ssh, "--command")) == argv


def test_tpu_reuse_skips_create(bash_only_env: dict[str, str], tmp_path: Path) -> None:
    res = run_script(TPU, ["create", *CREATE_FLAGS, "--dry-run", "--assume-exists"], bash_only_env, tmp_path)
    assert res.returncode == 0, res.stderr
    cmds = planned(res.stdout)
    assert len(gcloud_calls(cmds, "describe")) == 1
    assert gcloud_calls(cmds, "create") == []
    assert "skipping create" in res.stdout


def test_tpu_no_delete_unless_asked(bash_only_env: dict[str, str], tmp_path: Path) -> None:
    res = run_script(TPU, ["launch", *CREATE_FLAGS, "--dry-run", "--", "eval-bon"], bash_only_env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert gcloud_calls(planned(res.stdout), "delete") == []
    for delete_args in (["delete"], ["--delete"]):
        res = run_script(TPU, [*delete_args, "--name", "v", "--zone", "z", "--dry-run"], bash_only_env,
                         tmp_path)
        assert res.returncode == 0, res.stderr
        assert planned(res.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "v", "--zone", "z",
                                        "--quiet"]]


def test_tpu_git_install_and_data(bash_only_env: dict[str, str], tmp_path: Path) -> None:
    res = run_script(TPU, ["install", "--name", "v", "--zone", "z", "--git-url", "https://h/r.git",
                           "--git-ref", "v1.0", "--dry-run"], bash_only_env, tmp_path)
    assert res.returncode == 0, res.stderr
    cmds = planned(res.stdout)
    assert gcloud_calls(cmds, "scp") == []
    clone = shlex.split(flag_value(gcloud_calls(cmds, "ssh")[0], "--command"))
    assert clone[clone.index("clone"):clone.index("clone") + 3] == ["clone", "https://h/r.git", "edu_prm_jax"]
    assert "v1.0" in clone

    res = run_script(TPU, ["data", "--name", "v", "--zone", "z", "--data-src", "gs://bkt/pre fix",
                           "--dry-run"], bash_only_env, tmp_path)
    assert res.returncode == 0, res.stderr
    mount = flag_value(gcloud_calls(planned(res.stdout), "ssh")[0], "--command")
    words = shlex.split(mount)
    i = words.index("gcsfuse", words.index("||"))
    assert words[i:i + 6] == ["gcsfuse", "--implicit-dirs", "--only-dir", "pre fix", "bkt", "data;"]

    res = run_script(TPU, ["data", "--name", "v", "--zone", "z", "--data-src", "/d/x", "--dry-run"],
                     bash_only_env, tmp_path)
    (scp,) = gcloud_calls(planned(res.stdout), "scp")
    assert scp[5:8] == ["--recurse", "/d/x", "v:data/"] and "--worker=all" in scp


@pytest.mark.parametrize("drop, named", [("--zone", "--zone"), ("--accelerator-type", "--accelerator-type"),
                                         ("--name", "--name"), ("--version", "--version")])
def test_tpu_missing_flag(drop: str, named: str, bash_only_env: dict[str, str], tmp_path: Path) -> None:
    flags = list(CREATE_FLAGS)
    i = flags.index(drop)
    del flags[i:i + 2]
    res = run_script(TPU, ["create", *flags, "--dry-run"], bash_only_env, tmp_path)
    assert res.returncode != 0
    assert named in res.stderr and res.stdout == ""


def test_tpu_bad_usage(bash_only_env: dict[str, str], tmp_path: Path) -> None:
    cases = {
        ("run", "--name", "v", "--zone", "z", "--dry-run"): "no edu-prm command",
        ("create", *CREATE_FLAGS, "--assume-exists"): "--dry-run",
        ("create", *CREATE_FLAGS, "--bogus", "--dry-run"): "--bogus",
        ("--name", "v", "--zone", "z", "--dry-run"): "no subcommand",
    }
    for args, msg in cases.items():
        res = run_script(TPU, list(args), bash_only_env, tmp_path)
        assert res.returncode != 0 and msg in res.stderr, (args, res.stderr)


# ---- tpu_vm.sh for real, against a fake gcloud -----------------------------------------------------

FAKE_GCLOUD = """#!{py}
import json, os, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
verb = argv[3]
if verb == "describe":
    state = os.environ.get("FAKE_TPU_STATE", "")
    if not state:
        sys.exit("ERROR: NOT_FOUND")
    print(state)
elif verb == "ssh":
    cmd = argv[argv.index("--command") + 1]
    sys.exit(subprocess.run(["bash", "-c", cmd], cwd=os.environ["FAKE_HOME"]).returncode)
"""

FAKE_EDU_PRM = """#!{py}
import json, os, sys
keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "CUDA_VISIBLE_DEVICES",
        "XLA_PYTHON_CLIENT_MEM_FRACTION", "EXTRA")
out = os.path.join(os.environ["EDU_OUT"], "argv-" + os.environ.get("JAX_PROCESS_ID", "solo") + ".json")
with open(out, "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keys}}}}, f)
print("edu-prm ran")
sys.exit(int(os.environ.get("EDU_RC", "0")))
"""


def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_world(tmp_path: Path) -> dict[str, str]:
    """Fake gcloud + edu-prm on PATH, a fake worker home with the repo dir and a venv whose activate works."""
    if PYTHON is None:
        pytest.skip("python3 not on PATH")
    fakebin, home, out = tmp_path / "fakebin", tmp_path / "home", tmp_path / "out"
    for d in (fakebin, home / "edu_prm_jax", home / "edu-prm-venv" / "bin", out):
        d.mkdir(parents=True)
    _exe(fakebin / "gcloud", FAKE_GCLOUD.format(py=PYTHON))
    _exe(fakebin / "edu-prm", FAKE_EDU_PRM.format(py=PYTHON))
    (home / "edu-prm-venv" / "bin" / "activate").write_text("export ACTIVATED=1\n")
    (home / "edu_prm_jax" / "setup.py").write_text("")
    return {"PATH": f"{fakebin}:{os.environ['PATH']}", "HOME": str(tmp_path),
            "GCLOUD_LOG": str(out / "gcloud.jsonl"), "FAKE_HOME": str(home), "EDU_OUT": str(out)}


def _gcloud_log(env: dict[str, str]) -> list[list[str]]:
    return [json.loads(x) for x in Path(env["GCLOUD_LOG"]).read_text().splitlines()]


def test_tpu_real_run_passes_argv_and_logs(fake_world: dict[str, str], tmp_path: Path) -> None:
    res = run_script(TPU, ["run", "--name", "v", "--zone", "z", "--env", "EXTRA=a b", "--log-dir", "lg", "--",
                           *EDU_ARGS], fake_world, tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads((Path(fake_world["EDU_OUT"]) / "argv-solo.json").read_text())
    assert got["argv"] == EDU_ARGS
    assert got["cwd"] == str(Path(fake_world["FAKE_HOME"]) / "edu_prm_jax")
    assert got["env"]["EXTRA"] == "a b"
    (log,) = (tmp_path / "lg").glob("v-train-*.log")
    assert "edu-prm ran" in log.read_text()
    assert [c[3] for c in _gcloud_log(fake_world)] == ["ssh"]


def test_tpu_real_create_reuse_and_failures(fake_world: dict[str, str], tmp_path: Path) -> None:
    env = {**fake_world, "EDU_RC": "3", "FAKE_TPU_STATE": "READY"}
    res = run_script(TPU, ["create", *CREATE_FLAGS], env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert [c[3] for c in _gcloud_log(env)] == ["describe"]  # READY: reused, not created

    env["FAKE_TPU_STATE"] = ""
    res = run_script(TPU, ["create", *CREATE_FLAGS, "--preemptible"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    create = _gcloud_log(env)[-1]
    assert create[3] == "create" and flag_value(create, "--accelerator-type") == "v5litepod-8"
    assert "--preemptible" in create

    env["FAKE_TPU_STATE"] = "PREEMPTED"
    res = run_script(TPU, ["create", *CREATE_FLAGS], env, tmp_path)
    assert res.returncode != 0 and "PREEMPTED" in res.stderr

    res = run_script(TPU, ["run", "--name", "v", "--zone", "z", "--", "train"], env, tmp_path)
    assert res.returncode == 3

    (Path(env["EDU_OUT"]) / "argv-solo.json").unlink()
    # --delete-after also fires when a step before the run fails (here: the clone on the worker).
    env["FAKE_TPU_STATE"] = "READY"
    res = run_script(TPU, ["launch", *CREATE_FLAGS, "--git-url", str(tmp_path / "no-such-repo"),
                           "--delete-after", "--", "train"], env, tmp_path)
    assert res.returncode != 0
    calls = [c[3] for c in _gcloud_log(env)]
    assert calls[-3:] == ["describe", "ssh", "delete"]
    assert not (Path(env["EDU_OUT"]) / "argv-solo.json").exists()


# ---- gpu.sh -------------------------------------------------------------------------------------

def test_gpu_ssh_plan(bash_only_env: dict[str, str], tmp_path: Path) -> None:
    res = run_script(GPU, ["--host", "me@box", "--ssh-opt=-p2222", "--cuda", "13", "--mem-fraction", "0.8",
                           "--dry-run", "--", *EDU_ARGS], bash_only_env, tmp_path)
    assert res.returncode == 0, res.stderr
    cmds = planned(res.stdout)
    rsync = cmds[0]
    assert rsync[0] == "rsync" and rsync[-2:] == [f"{REPO}/", "me@box:edu_prm_jax/"]
    assert flag_value(rsync, "-e") == "ssh -p2222"
    ssh = [c for c in cmds if c[0] == "ssh"]
    assert all(c[:3] == ["ssh", "-p2222", "me@box"] for c in ssh) and len(ssh) == 2
    install = shlex.split(ssh[0][3])
    assert "venv" in install and ".[cuda13]" in install
    assert edu_argv(ssh[1][3]) == EDU_ARGS
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8" in shlex.split(ssh[1][3])


def test_gpu_multiprocess_plan(bash_only_env: dict[str, str], tmp_path: Path) -> None:
    res = run_script(GPU, ["--num-processes", "2", "--gpus-per-process", "2", "--num-hosts", "2",
                           "--host-index", "1", "--coordinator", "10.0.0.1:1234", "--skip-install",
                           "--dry-run", "--", *EDU_ARGS], bash_only_env, tmp_path)
    assert res.returncode == 0, res.stderr
    runs = [ln for ln in res.stdout.splitlines() if "edu-prm" in ln]
    assert len(runs) == 2 and "pip install" not in res.stdout
    for i, line in enumerate(runs):
        words = shlex.split(line[2:])
        assert f"CUDA_VISIBLE_DEVICES={2 * i},{2 * i + 1}" in words
        assert {"JAX_COORDINATOR_ADDRESS=10.0.0.1:1234", "JAX_NUM_PROCESSES=4", f"JAX_PROCESS_ID={2 + i}"} \
            <= set(words)
        assert words[words.index("edu-prm") + 1:words.index(")")] == EDU_ARGS
    assert res.stdout.rstrip().endswith("+ wait")


@pytest.mark.parametrize("args, named", [
    (["--num-hosts", "2"], "--coordinator"),
    (["--cuda", "11"], "--cuda"),
    (["--num-processes", "0"], "--num-processes"),
    (["--host-index", "1"], "--host-index"),
    (["--mem-fraction", "1.5"], "--mem-fraction"),
])
def test_gpu_bad_flags(args: list[str], named: str, bash_only_env: dict[str, str], tmp_path: Path) -> None:
    res = run_script(GPU, [*args, "--dry-run", "--", "train"], bash_only_env, tmp_path)
    assert res.returncode != 0 and named in res.stderr and res.stdout == ""
    res = run_script(GPU, ["--dry-run"], bash_only_env, tmp_path)
    assert res.returncode != 0 and "no edu-prm command" in res.stderr


def test_gpu_real_local_multiprocess(fake_world: dict[str, str], tmp_path: Path) -> None:
    """Runs for real (fake edu-prm): two processes with distinct ids/GPUs, one log each, argv intact."""
    repo = Path(fake_world["FAKE_HOME"]) / "edu_prm_jax"
    venv = Path(fake_world["FAKE_HOME"]) / "edu-prm-venv"
    res = run_script(GPU, ["--repo-dir", str(repo), "--venv", str(venv), "--skip-install",
                           "--num-processes", "2", "--log-dir", "lg", "--", *EDU_ARGS], fake_world, tmp_path)
    assert res.returncode == 0, res.stderr
    for pid in (0, 1):
        got = json.loads((Path(fake_world["EDU_OUT"]) / f"argv-{pid}.json").read_text())
        assert got["argv"] == EDU_ARGS and got["cwd"] == str(repo)
        assert got["env"] == {"JAX_COORDINATOR_ADDRESS": "localhost:12355", "JAX_NUM_PROCESSES": "2",
                              "JAX_PROCESS_ID": str(pid), "CUDA_VISIBLE_DEVICES": str(pid),
                              "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90", "EXTRA": None}
    logs = sorted((tmp_path / "lg").glob("train-*-p*.log"))
    assert [p.name[-7:] for p in logs] == ["-p0.log", "-p1.log"]
    assert all("edu-prm ran" in p.read_text() for p in logs)

    res = run_script(GPU, ["--repo-dir", str(repo), "--venv", str(venv), "--skip-install", "--", "train"],
                     {**fake_world, "EDU_RC": "4", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}, tmp_path)
    assert res.returncode == 4
    assert json.loads((Path(fake_world["EDU_OUT"]) / "argv-solo.json").read_text())["env"][
        "XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"


# ---- docs ----------------------------------------------------------------------------------------

DOC_CALL = re.compile(r"\b([a-z][a-z-]*) --config=(configs/[\w.]+\.py)((?:\s+--config\.[\w.]+=\S+)*)")


@pytest.mark.parametrize("doc", [REPO / "launch" / "README.md", TPU, GPU], ids=lambda p: p.name)
def test_docs_name_real_configs_and_fields(doc: Path) -> None:
    """Every `<command> --config=configs/X.py --config.field=...` in the launch docs names a shipped config and
    fields it has (the docs once named configs/eval.py and config.run_name, which never existed)."""
    from edu_prm_jax import config_utils
    from edu_prm_jax.commands.registry import COMMANDS

    calls = DOC_CALL.findall(doc.read_text())
    assert calls, f"{doc.name}: no edu-prm calls found"
    for command, spec, overrides in calls:
        assert command in COMMANDS, f"{doc.name}: unknown command {command!r}"
        config, _, _ = config_utils.load_config(spec)
        keys = [o.split("=", 1)[0].removeprefix("--config.") for o in overrides.split()]
        config_utils.check_override_keys(keys, config, spec)  # raises, naming the field, when one is missing
