"""The Python client against a real `trellisd serve` on the tiny model repositories: hello, jobs
from text, an image array and a mesh, progress, cancel, fetch through shared memory and inline,
release and disconnect cleanup, stored assets, and error replies that leave the connection usable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

import client as trellis

FAST = {"seed": 1, "ss_steps": 2, "slat_steps": 2}


def disc_image(h=64, w=72) -> np.ndarray:
    """A coloured disc on a transparent background, uint8 RGBA."""
    y, x = np.mgrid[0:h, 0:w]
    inside = (x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 3) ** 2
    img = np.zeros((h, w, 4), np.uint8)
    img[..., 0] = x * 3
    img[..., 1] = 120
    img[..., 2] = y * 3
    img[..., 3] = np.where(inside, 255, 0)
    return img


def cube(size=1.0):
    v = np.array([[x, y, z] for x in (0, size) for y in (0, size) for z in (0, size)], np.float32)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    f = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))], np.uint32)
    return v, f


def shm_files(daemon) -> list:
    d = Path(daemon.shm_dir)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def c(daemon):
    with trellis.Client(daemon.address, timeout=60) as client:
        yield client


def check_mesh(f):
    v, t = f["positions"], f["triangles"]
    assert v.ndim == 2 and v.shape[1] == 3 and v.dtype == np.float32 and len(v) > 0
    assert t.ndim == 2 and t.shape[1] == 3 and len(t) > 0
    assert int(t.max()) < len(v)
    # Decoder meshes lie in the unit cube, give or take the FlexiCubes vertex offsets.
    assert np.all(np.abs(v) <= 0.55), float(np.abs(v).max())
    if "colors" in f:
        assert f["colors"].shape[0] == len(v)


def test_hello_lists_capabilities_models_and_buffers(c, daemon):
    info = c.info
    assert info["protocol"] == trellis.PROTOCOL_VERSION
    for op in ("generate", "variant", "edit", "status", "cancel", "fetch", "release", "jobs"):
        assert c.capable(op), op
    classes = {m["class"] for m in info["models"]}
    assert classes == {"image_to_3d", "text_to_3d"}
    assert info["shm_dir"] and Path(info["shm_dir"]).is_dir()
    assert c.ping() is not None


def test_text_job_progress_fetch_and_release(c, daemon):
    job = c.generate(text="a wooden crate", formats=["mesh", "gaussian"], **FAST)
    assert job["state"] in ("queued", "running") and job["kind"] == "generate"
    seen = []
    done = c.wait(job["job"], poll=0.05, timeout=600, on_status=seen.append)
    assert done["state"] == "done" and done["asset"]
    assert any(s["state"] == "running" for s in seen) or len(seen) == 1
    assert job["job"] in [j["job"] for j in c.jobs()]

    with c.fetch(done["asset"], "mesh", transport="shm") as f:
        assert f.transport == "shm" and f.buffer
        assert shm_files(daemon), "the buffer file exists while mapped"
        check_mesh(f)
        n_vertices = len(f["positions"])
    assert shm_files(daemon) == [], "release deletes the buffer"

    with c.fetch(done["asset"], "mesh", transport="inline") as f:
        assert f.transport == "inline" and f.buffer is None
        check_mesh(f)
        assert len(f["positions"]) == n_vertices

    with c.fetch(done["asset"], "gaussian") as g:
        n = len(g["positions"])
        assert n > 0 and g["positions"].shape == (n, 3)
        for name, cols in (("colors", 3), ("scales", 3), ("rotations", 4)):
            assert g[name].shape == (n, cols), name
        assert g["opacities"].reshape(n).shape == (n,)
        assert np.all(g["scales"] > 0)
    assert shm_files(daemon) == []

    assets = {a["asset"]: a for a in c.assets_list()}
    assert done["asset"] in assets
    got = c.assets_get(done["asset"])
    assert set(got["formats"]) >= {"mesh", "gaussian"}


def test_image_array_job(c):
    job = c.generate(images=[disc_image()], formats=["mesh"], **FAST)
    done = c.wait(job["job"], poll=0.05, timeout=600)
    with c.fetch(done["asset"], "mesh") as f:
        check_mesh(f)


def test_variant_of_uploaded_arrays(c):
    v, f = cube()
    job = c.variant(vertices=v * 3 + 5, faces=f, text="a stone block", seed=3, slat_steps=2,
                    formats=["mesh"])
    assert job["kind"] == "variant"
    done = c.wait(job["job"], poll=0.05, timeout=600)
    with c.fetch(done["asset"], "mesh") as m:
        check_mesh(m)


def test_edit_a_stored_asset_with_a_box_and_a_mask(c):
    made = c.generate(text="a stone lantern", formats=["mesh"], wait=True, **FAST)
    job = c.edit(made["asset"], box=([0.0, -0.5, -0.5], [0.5, 0.5, 0.5]), text="a glass top",
                 formats=["mesh"], wait=True, **FAST)
    assert job["kind"] == "edit" and job["state"] == "done"
    info = c.assets_get(job["asset"])
    assert info["task"] == "edit" and info["meta"]["source"]["asset_id"] == made["asset"]
    with c.fetch(job["asset"], "mesh") as m:
        check_mesh(m)
    # A voxel mask on the tiny models' 32^3 grid (the lower half), edited again.
    mask = np.zeros((32, 32, 32), bool)
    mask[:, :, :16] = True
    again = c.edit(job["asset"], mask=mask, text="a bronze base", formats=["mesh"], wait=True,
                   **FAST)
    assert c.assets_get(again["asset"])["meta"]["region"]["mask"]["voxels"] == 32 * 32 * 16
    with pytest.raises(trellis.TrellisError) as e:
        c.edit(job["asset"], mask=np.ones((16, 16, 16)), text="x", wait=True, **FAST)
    assert e.value.code == "bad_request" and "shape [16, 16, 16]" in e.value.message
    with pytest.raises(trellis.TrellisError) as e:
        c.edit("no-such-asset", box=([0, 0, 0], [0.5, 0.5, 0.5]), text="x")
    assert e.value.code == "not_found"


def test_wait_true_streams_progress(c):
    events = []
    res = c.generate(text="a lamp", formats=["mesh"], wait=True, on_progress=events.append,
                     **FAST)
    assert events, "progress replies precede the final reply"
    assert all(e["status"] == "progress" and e["total"] >= e["step"] for e in events)
    assert res.get("state") == "done" or res.get("asset")


def test_cancel_a_running_job(c):
    job = c.generate(text="a very slow chair", seed=2, ss_steps=400, slat_steps=400,
                     formats=["mesh"])
    deadline = time.monotonic() + 300
    while c.status(job["job"])["state"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    c.cancel(job["job"])
    with pytest.raises(trellis.JobFailed) as e:
        c.wait(job["job"], poll=0.05, timeout=120)
    assert e.value.code == "cancelled"
    assert c.status(job["job"])["state"] == "cancelled"
    print(f"cancel took {time.monotonic() - t0:.2f} s")


def test_errors_keep_the_connection_usable(c):
    with pytest.raises(trellis.TrellisError) as e:
        c.status(987654)
    assert e.value.code == "not_found"
    with pytest.raises(trellis.TrellisError) as e:
        c.generate(text="x", images=[disc_image()])
    assert e.value.code == "bad_request"
    with pytest.raises(trellis.TrellisError) as e:
        c.generate(text="x", model="no/such-model")
    assert e.value.code in ("bad_request", "not_found", "model_unavailable")
    with pytest.raises(trellis.TrellisError) as e:
        c.request("explode")
    assert e.value.code == "unknown_op"
    with pytest.raises(trellis.TrellisError) as e:
        c.release("no-such-buffer")
    assert e.value.code == "not_found"
    assert c.connected and c.ping() is not None


def test_disconnect_deletes_unreleased_buffers(daemon):
    with trellis.Client(daemon.address) as c:
        done = c.generate(text="a cup", formats=["mesh"], **FAST)
        done = c.wait(done["job"], poll=0.05, timeout=600)
        f = c.fetch(done["asset"], "mesh", transport="shm")
        assert shm_files(daemon)
        f.close(release=False)
    deadline = time.monotonic() + 10
    while shm_files(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shm_files(daemon) == []


def test_daemon_binary_errors_are_explained(tmp_path):
    with pytest.raises(trellis.DaemonUnavailable, match="does not exist"):
        trellis.start_daemon(str(tmp_path / "nope"))
    fake = tmp_path / "fails"
    fake.write_text("#!/bin/sh\necho 'boom: no models' >&2\nexit 3\n")
    os.chmod(fake, 0o755)
    d = trellis.start_daemon(str(fake), address=str(tmp_path / "s.sock"))
    with pytest.raises(trellis.DaemonUnavailable, match="status 3.*boom: no models"):
        d.wait_ready(10)
