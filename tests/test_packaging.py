"""The package works installed, not only from a checkout: a wheel built from the sources holds the shipped configs
and the toy policy, and `python -m edu_prm_jax.cli pipeline` runs a stage from it in another directory.

The wheel is installed with `pip install --no-deps --target` and put first on PYTHONPATH; its dependencies come
from the current environment (the editable install of the checkout is shadowed, which the test checks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_wheel_runs_a_pipeline_stage_from_another_directory(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "edu_prm_jax", src / "edu_prm_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src),
          "-w", str(tmp_path / "wheel")], cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("edu_prm_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for d in ("configs", "assets/toy_policy")
               for p in (REPO / "edu_prm_jax" / d).iterdir() if p.is_file() and p.suffix != ".pyc"}
    assert shipped and shipped <= names, sorted(shipped - names)

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
         cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)  # one CPU device: quick
    where = _run([sys.executable, "-c", "import edu_prm_jax.configs as c; print(c.__file__)"], cwd=elsewhere,
                 env=env).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout

    work = tmp_path / "run"
    _run([sys.executable, "-m", "edu_prm_jax.cli", "pipeline", f"--workdir={work}", "--config.stages=sample",
          "--config.sample.questions=toy:train:4", "--config.sample.sampling.num_leaves=2",
          "--config.sample.sampling.max_new_tokens=12", "--config.sample.batch_questions=4",
          "--config.sample.num_shards=1", "--log_level=warning"], cwd=elsewhere, env=env)
    trees = [json.loads(line) for p in sorted((work / "samples_edu").glob("trees-*.jsonl"))
             for line in p.read_text().splitlines()]
    assert len(trees) == 4 and all(t["leaves"] for t in trees)
    ran = json.loads((work / "sample_config.json").read_text())
    assert ran["policy"] == "toy" and ran["sampling"]["tau"] == 0.5  # the shipped pipeline config, resolved
    assert (work / "report.md").is_file()
