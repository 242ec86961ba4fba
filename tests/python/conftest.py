"""Shared fixtures of the Python tests: the client module, the trellisd binary, the tiny model
repositories, and a real `trellisd serve` in a private folder.

Run with a Python that has numpy (and bpy for the add-on tests), from the repository root:
    python -m pytest tests/python
`.ci/run` does this in a venv with bpy 4.5.15 (and 5.0.1).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

# Blender (bpy) keeps its preferences and extensions here, not in the user's home.
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="trellis-blender-user-"))

REPO = Path(__file__).resolve().parents[2]
ADDON = REPO / "blender_addon"
sys.path.insert(0, str(ADDON))

import client as trellis  # noqa: E402  (the add-on's client, importable without bpy)


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def need(condition: bool, why: str) -> None:
    """Skips (printing why) on a developer's machine; fails in CI, where nothing may be skipped."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"required in CI: {why}")
    pytest.skip(why)


def trellisd_binary() -> Path | None:
    """`$TRELLISD_BIN`, else the debug or release build in `$CARGO_TARGET_DIR` or target/."""
    env = os.environ.get("TRELLISD_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    for profile in ("debug", "release"):
        p = target / profile / "trellisd"
        if p.is_file():
            return p
    return None


class TinyRepos(NamedTuple):
    image: Path  # TRELLIS-image-tiny
    text: Path  # TRELLIS-text-tiny
    dinov2: Path  # dinov2_reg_tiny
    clip: Path  # clip_text_tiny


@functools.lru_cache(maxsize=None)
def tiny_repos(binary: Path, scratch: Path) -> TinyRepos | None:
    """The tiny model repositories: written by `trellisd tiny-repos --out DIR` (seeded random
    weights, no ../shared needed) when the binary has that command, else the reference fixtures'
    copies ($TRELLIS_REFERENCE_DIR or ../shared/reference)."""
    out = scratch / "tiny"
    r = subprocess.run([str(binary), "tiny-repos", "--out", str(out)], capture_output=True)
    if r.returncode == 0 and (out / "TRELLIS-image-tiny").is_dir():
        return TinyRepos(out / "TRELLIS-image-tiny", out / "TRELLIS-text-tiny",
                         out / "dinov2_reg_tiny", out / "clip_text_tiny")
    ref = Path(os.environ.get("TRELLIS_REFERENCE_DIR") or REPO.parent / "shared" / "reference")
    if (ref / "pipelines" / "TRELLIS-image-tiny").is_dir():
        return TinyRepos(ref / "pipelines" / "TRELLIS-image-tiny",
                         ref / "pipelines" / "TRELLIS-text-tiny",
                         ref / "conditioners" / "dinov2_reg_tiny",
                         ref / "conditioners" / "clip_text_tiny")
    return None


class Daemon:
    """A `trellisd serve` on the tiny models, with its own socket, data and runtime folders."""

    def __init__(self, binary: Path, repos: TinyRepos, root: Path):
        self.root = root
        self.address = str(root / "run" / "daemon.sock")
        self.env = dict(os.environ)
        self.env.update({
            "TRELLIS_RS_SOCKET": self.address,
            "XDG_RUNTIME_DIR": str(root / "run"),
            "XDG_DATA_HOME": str(root / "data"),
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(root / "hf"),
        })
        (root / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
        self.image_model = str(repos.image)
        self.text_model = str(repos.text)
        self.args = ["--image-cond-model", str(repos.dinov2), "--text-cond-model", str(repos.clip)]
        self.binary = binary
        self.proc = None
        self.shm_dir = None

    def start(self) -> "Daemon":
        self.process = trellis.start_daemon(
            str(self.binary), [self.image_model, self.text_model], self.args,
            address=self.address, log_path=str(self.root / "daemon.log"), env=self.env)
        self.proc = self.process.proc
        self.process.wait_ready(120)
        with trellis.Client(self.address) as c:
            self.shm_dir = c.info.get("shm_dir")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            with trellis.Client(self.address, timeout=10) as c:
                c.shutdown()
            self.proc.wait(30)
        except Exception:
            self.process.stop()

    def log(self) -> str:
        return self.process.log_tail(60)


@pytest.fixture(scope="session")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="trellis-pytest-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(scratch):
    """A daemon for one test module (one daemon per user may run: modules take turns)."""
    binary = trellisd_binary()
    need(binary is not None, "no trellisd binary (build it with `cargo build --bin trellisd` "
         "or set TRELLISD_BIN)")
    repos = tiny_repos(binary, scratch)
    need(repos is not None, "no tiny model repositories (`trellisd tiny-repos` or ../shared/reference)")
    root = Path(tempfile.mkdtemp(prefix="daemon-", dir=scratch))
    d = Daemon(binary, repos, root).start()
    yield d
    d.stop()
    if d.shm_dir:
        left = list(Path(d.shm_dir).glob("*")) if Path(d.shm_dir).exists() else []
        assert not left, f"buffers left in {d.shm_dir}: {left}"


def blender_ext_script(bpy) -> Path:
    """The `blender_ext.py` that ships inside the bpy wheel (builds extension zips)."""
    scripts = Path(bpy.utils.system_resource("SCRIPTS"))
    p = scripts / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
    assert p.is_file(), f"blender_ext.py not found at {p}"
    return p


@pytest.fixture(scope="session")
def addon(scratch):
    """The add-on built into an extension zip with the wheel's blender_ext.py, installed and
    enabled from that zip in this bpy; returns its package module."""
    bpy = pytest.importorskip("bpy", reason="bpy is not installed in this Python")
    out = scratch / "ext"
    out.mkdir(exist_ok=True)
    r = subprocess.run(
        [sys.executable, str(blender_ext_script(bpy)), "build", "--source-dir", str(ADDON),
         "--output-dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    zips = list(out.glob("trellis_rs-*.zip"))
    assert len(zips) == 1, zips
    result = bpy.ops.extensions.package_install_files(
        filepath=str(zips[0]), repo="user_default", enable_on_install=True)
    assert result == {"FINISHED"}, result
    name = "bl_ext.user_default.trellis_rs"
    assert name in bpy.context.preferences.addons, list(bpy.context.preferences.addons.keys())
    import importlib

    mod = importlib.import_module(name)
    yield mod
    bpy.ops.preferences.addon_disable(module=name)
