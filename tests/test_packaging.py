"""An installed copy works: the wheel carries the bundled transcoders, cards and viewer
script, and ``circuitlab trace`` runs from any folder, offline."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(out)], check=True, cwd=out)
    (whl,) = out.glob("circuitlab-*.whl")
    return whl


def test_wheel_carries_the_bundle_and_the_viewer(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    manifests = [n for n in names if n.startswith("circuitlab/data/transcoders/") and n.endswith("manifest.json")]
    assert manifests, "the bundled transcoders are in the wheel"
    bundle = manifests[0].rsplit("/", 1)[0]
    import json

    listed = json.loads(zipfile.ZipFile(wheel).read(manifests[0]))["sha256"]
    assert {f"{bundle}/{f}" for f in listed} <= names, "every file of the bundle's manifest"
    assert any(n.endswith("-cards.safetensors") for n in names), "the feature cards"
    assert any(n.startswith("circuitlab/viz/") and n.endswith(".js") for n in names)


@pytest.mark.slow
def test_installed_wheel_traces_from_outside_the_repository(wheel, tmp_path):
    """A fresh environment (the project's dependencies reused, nothing downloaded) with the
    wheel installed runs ``circuitlab trace`` in an empty folder."""
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies come from this environment; circuitlab itself only from the wheel.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import circuitlab.presets as p; print(p.DATA_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where and "site-packages" in where, where
    run = subprocess.run([str(env_dir / "bin" / "circuitlab"), "trace", "The capital of France is",
                          "--out", "g", "--max-feature-nodes", "256"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "g" / "graph.html").is_file() and (work / "g" / "pruned" / "graph.json").is_file()
    again = subprocess.run([str(env_dir / "bin" / "circuitlab"), "trace", "The capital of France is",
                            "--out", "g"], cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr, "no silent overwrite"


@pytest.mark.slow
def test_make_demo_needs_no_browser_and_no_apt(tmp_path):
    """``make demo`` on a machine where neither Chromium nor apt-get is on the PATH (an empty
    PATH here): the Makefile's demo asks for neither, and the demo graph is written."""
    repo = Path(__file__).resolve().parent.parent
    make = ["/usr/bin/make", "-C", str(repo), f"OUT={tmp_path / 'demo'}"]
    env = {**os.environ, "PATH": str(tmp_path / "empty")}
    dry = subprocess.run(make + ["-n", "demo"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    db = subprocess.run(make + ["-n", "-p", "demo"], env=env, capture_output=True, text=True)
    rules = [line for line in db.stdout.splitlines() if line.startswith(("demo:", "setup:"))]
    assert len(rules) == 2 and "apt-get" not in dry.stdout
    assert "chromium" not in (dry.stdout + "".join(rules)).lower()
    run = subprocess.run(make + ["demo"], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "demo" / "graph.html").is_file()


def test_browser_finder_reports_none_without_one(tmp_path):
    """scripts/find_browser.sh prints nothing and exits 1 where no browser is on the PATH,
    and finds one named by CIRCUITLAB_BROWSER or on the PATH."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "find_browser.sh"
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    none = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True)
    assert (none.returncode, none.stdout) == (1, "")
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    found = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True)
    assert found.stdout.strip() == str(fake)
    named = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True,
                           env={**env, "PATH": "/nonexistent", "CIRCUITLAB_BROWSER": str(fake)})
    assert named.stdout.strip() == str(fake)
