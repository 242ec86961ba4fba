"""The add-on inside bpy, installed from its extension zip, driving a real `trellisd serve` on the
tiny models that the add-on starts itself (preference "Start the daemon when needed").

Timers do not fire in background mode, so the tests call the add-on's timer callback
(`session.poll`) themselves, as Blender would every quarter second. Tests run in file order and
share the daemon the first generate starts."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import need, tiny_repos, trellisd_binary

bpy = pytest.importorskip("bpy", reason="bpy is not installed in this Python")
import client as trellis  # noqa: E402
from mathutils import Euler  # noqa: E402

FAST = dict(seed=1, ss_steps=2, slat_steps=2)
TINY_U2NET = Path(__file__).resolve().parents[1] / "reference-u2net" / "u2net_tiny"


class Env:
    """What the tests share: the add-on's modules, its preferences, the daemon's folders."""

    def __init__(self, addon, root: Path, binary: Path, repos):
        self.addon = addon
        self.session = addon.session
        self.thumbnails = addon.thumbnails
        self.S = addon.session.SESSION
        self.prefs = bpy.context.preferences.addons[addon.__name__].preferences
        self.root = root
        self.address = str(root / "run" / "daemon.sock")
        self.binary = binary
        self.repos = repos

    def configure(self, auto_start=True, daemon_path=None):
        p = self.prefs
        p.daemon_path = str(self.binary) if daemon_path is None else daemon_path
        p.auto_start = auto_start
        p.socket = self.address
        p.image_model = str(self.repos.image)
        p.text_model = str(self.repos.text)
        p.image_cond_model = str(self.repos.dinov2)
        p.text_cond_model = str(self.repos.clip)
        # Photos without transparency are matted by the daemon with tiny random U²-Net weights.
        p.extra_args = f"--background-model {TINY_U2NET}"

    def settings(self, **kw):
        s = bpy.context.scene.trellis
        s.ss_steps, s.slat_steps, s.seed = FAST["ss_steps"], FAST["slat_steps"], FAST["seed"]
        s.ss_cfg = s.slat_cfg = -1.0
        for k, v in kw.items():
            setattr(s, k, v)
        return s

    def run(self, job, until=lambda j: not j.active, timeout=300.0):
        """Calls the timer callback until ``until(job)`` (as Blender's timer would)."""
        deadline = time.monotonic() + timeout
        while not until(job):
            assert time.monotonic() < deadline, f"job stuck: {job.state} {job.describe()}"
            self.session.poll()
            time.sleep(0.02)
        return job

    def newest_job(self):
        return list(self.S.jobs.values())[-1]

    def shm_files(self):
        d = self.S.info.get("shm_dir")
        return sorted(os.listdir(d)) if d and os.path.isdir(d) else []

    def client(self):
        return trellis.Client(self.address, timeout=30)


@pytest.fixture(scope="module")
def env(addon, scratch):
    binary = trellisd_binary()
    need(binary is not None, "no trellisd binary (cargo build --bin trellisd, or TRELLISD_BIN)")
    repos = tiny_repos(binary, scratch)
    need(repos is not None, "no tiny model repositories")
    root = scratch / "addon-daemon"
    (root / "run").mkdir(parents=True, mode=0o700)
    # The daemon the add-on starts inherits this environment: private data and runtime folders.
    saved = {k: os.environ.get(k) for k in ("XDG_DATA_HOME", "XDG_RUNTIME_DIR", "HF_HUB_OFFLINE")}
    os.environ.update(XDG_DATA_HOME=str(root / "data"), XDG_RUNTIME_DIR=str(root / "run"),
                      HF_HUB_OFFLINE="1")
    e = Env(addon, root, binary, repos)
    e.configure()
    yield e
    if e.S.client is not None:
        try:
            e.S.client.shutdown()
        except trellis.TrellisError:
            pass
    e.S.disconnect()
    if e.S.daemon is not None:
        e.S.daemon.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def collection_objects(job):
    coll = bpy.data.collections[job.collection]
    return {o.name: o for o in coll.objects}


def world_bounds(obj, evaluated=True):
    """World-space bounds of the object's (evaluated) mesh vertices."""
    if evaluated:
        ev = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
        me = ev.to_mesh()
    else:
        me = obj.data
    co = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    if evaluated:
        ev.to_mesh_clear()
    m = np.array(obj.matrix_world)
    w = co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
    return w.min(0), w.max(0)


def test_extension_registers_everything(env):
    for op in ("generate", "variant", "edit_region", "cancel", "clear_jobs", "connect",
               "shutdown", "image_add", "image_remove", "report"):
        assert hasattr(bpy.ops.trellis, op), op
    assert hasattr(bpy.types, "VIEW3D_PT_trellis")
    assert bpy.types.VIEW3D_PT_trellis.bl_category == "TRELLIS"
    props = {p.identifier for p in env.prefs.bl_rna.properties}
    assert {"daemon_path", "auto_start", "socket", "tier", "precision", "image_model",
            "text_model", "image_cond_model", "text_cond_model"} <= props
    assert bpy.context.scene.trellis.mode == "IMAGE"


def test_missing_daemon_is_explained(env):
    env.configure(auto_start=False)
    env.settings(mode="TEXT", prompt="a crate")
    n = len(env.S.jobs)
    with pytest.raises(RuntimeError, match="no trellis-rs daemon.*enable 'Start the daemon"):
        bpy.ops.trellis.generate()
    env.configure(auto_start=True, daemon_path=str(env.root / "missing-trellisd"))
    with pytest.raises(RuntimeError, match="missing-trellisd does not exist"):
        bpy.ops.trellis.generate()
    assert len(env.S.jobs) == n
    env.configure()


def test_generate_text_starts_the_daemon_and_imports_mesh_and_gaussians(env):
    env.settings(mode="TEXT", prompt="a wooden crate", outputs="BOTH")
    bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
    bpy.ops.ed.undo_push(message="before")  # Blender's stack starts with the loaded file
    env.prefs.tier = "high"
    t0 = time.monotonic()
    assert bpy.ops.trellis.generate() == {"FINISHED"}
    took = time.monotonic() - t0
    env.prefs.tier = "auto"
    job = env.newest_job()
    assert job.state == "starting" and env.S.daemon is not None, "submitted before the daemon ran"
    assert took < 1.0, f"the operator blocked for {took:.2f} s"
    # A tier the daemon cannot take is dropped with a warning, not a daemon that fails to start.
    has_tier = "--vram-tier" in (env.session.serve_options(str(env.binary)) or "")
    warned = [m for lvl, m in env.S.reports if lvl == "WARNING" and "--vram-tier" in m]
    assert bool(warned) != has_tier, (warned, has_tier)
    env.run(job)
    assert job.state == "done", job.describe()
    assert env.S.info["pid"] == env.S.daemon.proc.pid
    objs = collection_objects(job)
    assert job.collection == "TRELLIS a wooden crate"
    mesh_obj = objs["a wooden crate mesh"]
    gs_obj = objs["a wooden crate gaussians"]
    for o in (mesh_obj, gs_obj):
        assert o["trellis_asset"] == job.asset and o["trellis_job"] == job.job
        assert tuple(o.matrix_world.translation) == pytest.approx((1.0, 2.0, 3.0))

    with env.client() as c:
        with c.fetch(job.asset, "mesh") as f:
            pos, tri = f["positions"].copy(), f["triangles"].copy()
            colours = f["colors"].copy() if "colors" in f else None
        with c.fetch(job.asset, "gaussian") as g:
            n_gs = len(g["positions"])
            opac = g["opacities"].reshape(-1).copy()
    me = mesh_obj.data
    assert (len(me.vertices), len(me.polygons)) == (len(pos), len(tri))
    co = np.empty(len(pos) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    np.testing.assert_allclose(co.reshape(-1, 3), pos, atol=1e-6)
    if colours is not None:
        attr = me.color_attributes["Color"]
        got = np.empty(len(pos) * 4, np.float32)
        attr.data.foreach_get("color", got)
        np.testing.assert_allclose(got.reshape(-1, 4)[:, :3], np.clip(colours, 0, 1), atol=1e-6)
        assert any(n.bl_idname == "ShaderNodeAttribute" for n in me.materials[0].node_tree.nodes)
    gme = gs_obj.data
    assert len(gme.vertices) == n_gs and len(gme.polygons) == 0
    for name in ("opacity", "scale", "rotation", "colour"):
        assert name in gme.attributes, name
    got = np.empty(n_gs, np.float32)
    gme.attributes["opacity"].data.foreach_get("value", got)
    np.testing.assert_allclose(got, opac, atol=1e-6)
    assert gs_obj.modifiers[0].type == "NODES"
    # The job list's thumbnail: the asset's preview.png, four views of the mesh over four of the
    # Gaussians.
    assert job.preview and os.path.isfile(job.preview), job.preview
    thumb = bpy.data.images.load(job.preview)
    try:
        assert tuple(thumb.size) == (512, 256)
    finally:
        bpy.data.images.remove(thumb)
    assert env.shm_files() == [], "every buffer released"
    assert any(lvl == "INFO" and "imported" in msg for lvl, msg in env.S.reports)

    # Undo removes the import, redo brings it back.
    names = set(objs)
    bpy.ops.ed.undo()
    assert not names & set(bpy.data.objects.keys())
    bpy.ops.ed.redo()
    assert names <= set(bpy.data.objects.keys())


def _disc(name, w=48, h=40):
    img = bpy.data.images.new(name, w, h, alpha=True)
    y, x = np.mgrid[0:h, 0:w]
    px = np.zeros((h, w, 4), np.float32)
    px[..., 0] = x / w
    px[..., 1] = 0.5
    px[..., 2] = y / h
    px[..., 3] = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2)
    img.pixels.foreach_set(px.ravel())
    return img


def test_generate_from_an_image_of_the_blend_file(env):
    img = _disc("disc")
    env.settings(mode="IMAGE", image=img, image_path="", outputs="MESH")
    assert bpy.ops.trellis.generate() == {"FINISHED"}
    job = env.run(env.newest_job())
    assert job.state == "done", job.describe()
    objs = collection_objects(job)
    assert list(objs) == ["disc mesh"]
    assert len(objs["disc mesh"].data.polygons) > 0
    assert env.shm_files() == []


def _photo(name, w=120, h=90):
    """An opaque photo: a white disc on black, no alpha channel."""
    img = bpy.data.images.new(name, w, h, alpha=False)
    y, x = np.mgrid[0:h, 0:w]
    px = np.zeros((h, w, 4), np.float32)
    px[..., :3] = (((x - 64) ** 2 + (y - 44) ** 2) < 30 ** 2)[..., None]
    px[..., 3] = 1.0
    img.pixels.foreach_set(px.ravel())
    return img


def test_photos_without_transparency_go_through(env, tmp_path):
    # A JPEG file, read by the daemon, and an opaque image of the .blend, uploaded as pixels:
    # both have their background removed by the daemon, no complaint from the add-on.
    img = _photo("photo")
    path = tmp_path / "photo.jpg"
    img.filepath_raw = str(path)
    img.file_format = "JPEG"
    img.save()
    for settings in (dict(image=None, image_path=str(path)), dict(image=_photo("opaque"))):
        env.settings(mode="IMAGE", outputs="MESH", **settings)
        assert bpy.ops.trellis.generate() == {"FINISHED"}
        job = env.run(env.newest_job())
        assert job.state == "done", job.describe()
        info = env.S.client.assets_get(job.asset)
        assert info["meta"]["background_removed"]["images"] == [0], info["meta"]
        assert len(next(iter(collection_objects(job).values())).data.polygons) > 0


def test_generate_from_several_image_files(env, tmp_path):
    files = []
    for i in range(2):
        img = _disc(f"view{i}", 40 + 8 * i, 40)
        path = tmp_path / f"view{i}.png"
        img.filepath_raw = str(path)
        img.file_format = "PNG"
        img.save()
        files.append(path.name)
    s = env.settings(mode="IMAGES", outputs="GAUSSIANS", multi_image_mode="multidiffusion")
    s.images.clear()
    assert bpy.ops.trellis.image_add(directory=str(tmp_path),
                                     files=[{"name": f} for f in files]) == {"FINISHED"}
    assert [Path(i.filepath).name for i in s.images] == files
    assert bpy.ops.trellis.generate() == {"FINISHED"}
    job = env.run(env.newest_job())
    assert job.state == "done", job.describe()
    assert job.label == "view0.png +1"
    objs = collection_objects(job)
    assert list(objs) == ["view0.png +1 gaussians"]
    s.images_index = 1
    assert bpy.ops.trellis.image_remove() == {"FINISHED"}
    assert len(s.images) == 1


def _cube(name):
    me = bpy.data.meshes.new(name)
    v = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
    f = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    me.from_pydata(v, [], f)
    obj = bpy.data.objects.new(name, me)
    bpy.context.scene.collection.objects.link(obj)
    obj.location = (4.0, -2.0, 1.5)
    obj.rotation_euler = Euler((0.3, 0.0, 0.8))
    obj.scale = (1.5, 1.0, 0.5)
    obj.modifiers.new("bevel", "BEVEL").width = 0.1
    for o in bpy.context.view_layer.objects:
        o.select_set(False)
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    return obj


def test_variant_of_selected_appears_at_its_transform(env):
    src = _cube("box")
    lo, hi = world_bounds(src)
    env.settings(mode="TEXT", prompt="a mossy stone", outputs="BOTH", keep_original="HIDE")
    assert bpy.ops.trellis.variant() == {"FINISHED"}
    job = env.run(env.newest_job())
    assert job.state == "done", job.describe()
    objs = collection_objects(job)
    label = f"{src.name}: a mossy stone"
    assert job.label == label
    mesh_obj, gs_obj = objs[f"{label} mesh"], objs[f"{label} gaussians"]
    for o in (mesh_obj, gs_obj):
        assert np.allclose(np.array(o.matrix_world), np.array(src.matrix_world), atol=1e-6)
        assert o["trellis_kind"] == "variant"
    assert src.hide_get() and src.hide_render
    # The variant keeps the voxelised shape: it fills the original's world bounds (a voxel of
    # the tiny models' 32^3 grid is ~3% of the largest side).
    vlo, vhi = world_bounds(mesh_obj)
    tol = 0.1 * float((hi - lo).max())
    np.testing.assert_allclose(vlo, lo, atol=tol)
    np.testing.assert_allclose(vhi, hi, atol=tol)
    glo, ghi = world_bounds(gs_obj, evaluated=False)  # the points, not the preview
    assert np.all(glo >= lo - tol) and np.all(ghi <= hi + tol)

    src.hide_set(False)
    env.settings(keep_original="SIDE_BY_SIDE", outputs="MESH")
    assert bpy.ops.trellis.variant() == {"FINISHED"}
    job = env.run(env.newest_job())
    assert job.state == "done", job.describe()
    (side,) = collection_objects(job).values()
    shift = np.array(side.matrix_world.translation) - np.array(src.matrix_world.translation)
    assert shift[0] == pytest.approx(1.2 * (hi[0] - lo[0]), rel=1e-4)
    assert shift[1] == pytest.approx(0) and shift[2] == pytest.approx(0)
    assert not src.hide_get()
    assert env.shm_files() == []


def test_cancel_a_running_job(env):
    env.settings(mode="TEXT", prompt="a slow chair", outputs="MESH")
    s = bpy.context.scene.trellis
    s.ss_steps = s.slat_steps = 1000
    assert bpy.ops.trellis.generate() == {"FINISHED"}
    job = env.run(env.newest_job(), until=lambda j: j.state == "running")
    colls = set(bpy.data.collections.keys())
    assert bpy.ops.trellis.cancel(key=job.key) == {"FINISHED"}
    t0 = time.monotonic()
    env.run(job, timeout=120)
    assert job.state == "cancelled", job.describe()
    print(f"cancelled {time.monotonic() - t0:.2f} s after the request")
    assert set(bpy.data.collections.keys()) == colls, "nothing imported"
    assert env.S.reports[-1][0] == "WARNING" and "cancelled" in env.S.reports[-1][1]


def test_daemon_errors_become_reports(env, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text")
    env.settings(mode="IMAGE", image=None, image_path=str(bad), outputs="MESH")
    n = len(env.S.reports)
    try:
        bpy.ops.trellis.generate()
    except RuntimeError as e:  # refused when submitted
        assert "TRELLIS" in str(e)
        return
    job = env.run(env.newest_job())  # or the job fails
    assert job.state == "failed"
    level, msg = env.S.reports[-1]
    assert len(env.S.reports) > n and level == "ERROR" and "failed" in msg


def test_bad_input_is_refused_with_a_report(env):
    env.settings(mode="TEXT", prompt="   ")
    with pytest.raises(RuntimeError, match="type a prompt"):
        bpy.ops.trellis.generate()
    env.settings(mode="IMAGE", image=None, image_path="")
    with pytest.raises(RuntimeError, match="no image given"):
        bpy.ops.trellis.generate()
    bpy.context.view_layer.objects.active = None
    assert not bpy.ops.trellis.variant.poll()


def _make_active(obj):
    for o in bpy.context.view_layer.objects:
        o.select_set(False)
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj


def _assets_get(env, asset):
    with env.client() as c:
        return c.request("assets_get", {"asset": asset}).result


def test_edit_region_of_a_generated_object_end_to_end(env):
    assert "edit" in env.S.info["capabilities"]
    env.settings(mode="TEXT", prompt="a small house", outputs="MESH", keep_original="HIDE")
    bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
    assert bpy.ops.trellis.generate() == {"FINISHED"}
    gen = env.run(env.newest_job())
    assert gen.state == "done", gen.describe()
    (obj,) = collection_objects(gen).values()
    np.testing.assert_allclose(list(obj["trellis_to_asset"]), np.eye(4).ravel())
    _make_active(obj)
    # The region: a box empty over the object's upper part. The object sits at the cursor with
    # the asset's axes, so the world box [0.5, 1.5] x [1.5, 2.5] x [2.75, 3.75] is the asset
    # box [-0.5, 0.5] x [-0.5, 0.5] x [-0.25, 0.75].
    empty = bpy.data.objects.new("edit box", None)
    bpy.context.scene.collection.objects.link(empty)
    empty.empty_display_type = "CUBE"
    empty.empty_display_size = 0.5
    empty.location = (1.0, 2.0, 3.25)
    bpy.context.view_layer.update()
    s = env.settings(mode="TEXT", prompt="a red roof", outputs="BOTH", region_source="BOX")
    s.region_box = empty
    assert bpy.ops.trellis.edit_region.poll()
    assert bpy.ops.trellis.edit_region() == {"FINISHED"}
    job = env.run(env.newest_job())
    assert job.state == "done", job.describe()
    assert job.kind == "edit" and job.asset != gen.asset
    objs = collection_objects(job)
    label = f"{obj.name}: a red roof"
    assert set(objs) == {f"{label} mesh", f"{label} gaussians"}
    for o in objs.values():
        assert np.allclose(np.array(o.matrix_world), np.array(obj.matrix_world), atol=1e-6)
        assert o["trellis_kind"] == "edit" and o["trellis_asset"] == job.asset
        np.testing.assert_allclose(list(o["trellis_to_asset"]), np.eye(4).ravel())
    assert obj.hide_get(), "the original is hidden (keep_original HIDE)"
    info = _assets_get(env, job.asset)
    assert info["task"] == "edit" and info["meta"]["source"]["asset_id"] == gen.asset
    lo, hi = info["meta"]["region"]["box"]
    np.testing.assert_allclose(lo, [-0.5, -0.5, -0.25], atol=1e-6)
    np.testing.assert_allclose(hi, [0.5, 0.5, 0.75], atol=1e-6)
    mlo, mhi = world_bounds(objs[f"{label} mesh"])
    assert np.all(mlo >= np.array([0.5, 1.5, 2.5]) - 1e-4)
    assert np.all(mhi <= np.array([1.5, 2.5, 3.5]) + 1e-4)
    assert env.shm_files() == []

    # An edit of the edit, side by side: the region travels through the edit's own record.
    obj.hide_set(False)
    edited = objs[f"{label} mesh"]
    _make_active(edited)
    env.settings(mode="TEXT", prompt="a chimney", outputs="MESH", keep_original="SIDE_BY_SIDE")
    assert bpy.ops.trellis.edit_region() == {"FINISHED"}
    job2 = env.run(env.newest_job())
    assert job2.state == "done", job2.describe()
    (side,) = collection_objects(job2).values()
    shift = np.array(side.matrix_world.translation) - np.array(edited.matrix_world.translation)
    assert shift[0] > 0 and shift[1] == pytest.approx(0) and shift[2] == pytest.approx(0)
    assert _assets_get(env, job2.asset)["meta"]["source"]["asset_id"] == job.asset


def test_edit_region_of_a_variant_uses_the_variant_frame(env):
    # The variant of the rotated, scaled cube made above: its asset space is the unit cube of the
    # source's world bounds (centre, largest side).
    var = next(o for o in bpy.data.objects
               if o.get("trellis_kind") == "variant" and o.type == "MESH" and o.data.polygons)
    src = bpy.data.objects["box"]
    importers = importlib.import_module(env.addon.__name__ + ".importers")
    verts, _ = importers.evaluated_world_mesh(src, bpy.context.evaluated_depsgraph_get())
    centre, scale = importers.unit_cube_frame(verts)
    # Select the faces of the variant's upper world half.
    var.hide_set(False)
    _make_active(var)
    me = var.data
    m = np.array(var.matrix_world)
    co = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", co)
    world = co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
    centres = np.empty(len(me.polygons) * 3, np.float32)
    me.polygons.foreach_get("center", centres)
    wc = centres.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
    sel = wc[:, 2] > float(np.median(wc[:, 2]))
    me.polygons.foreach_set("select", sel)
    idx = np.empty(len(me.loops), np.int32)
    me.loops.foreach_get("vertex_index", idx)
    starts = np.empty(len(me.polygons), np.int32)
    totals = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("loop_start", starts)
    me.polygons.foreach_get("loop_total", totals)
    used = np.concatenate([idx[a:a + n] for a, n in zip(starts[sel], totals[sel])])
    want_lo = (world[used].min(0) - centre) / scale
    want_hi = (world[used].max(0) - centre) / scale
    env.settings(mode="TEXT", prompt="a mossy top", outputs="MESH", keep_original="HIDE",
                 region_source="FACES")
    assert bpy.ops.trellis.edit_region() == {"FINISHED"}
    job = env.run(env.newest_job())
    assert job.state == "done", job.describe()
    lo, hi = _assets_get(env, job.asset)["meta"]["region"]["box"]
    np.testing.assert_allclose(lo, want_lo, atol=1e-4)
    np.testing.assert_allclose(hi, want_hi, atol=1e-4)
    (out,) = collection_objects(job).values()
    assert np.allclose(np.array(out.matrix_world), m, atol=1e-6)
    np.testing.assert_allclose(list(out["trellis_to_asset"]), list(var["trellis_to_asset"]))
    # The kept part is where the variant was: the result fills the source's world bounds too.
    lo_w, hi_w = world_bounds(out)
    tol = 0.1 * scale
    assert np.all(lo_w >= verts.min(0) - tol) and np.all(hi_w <= verts.max(0) + tol)


def test_edit_region_bad_input_is_a_report(env):
    obj = next(o for o in bpy.data.objects if o.get("trellis_kind") == "edit" and o.type == "MESH")
    _make_active(obj)
    env.settings(mode="TEXT", prompt="a door", region_source="FACES")
    obj.data.polygons.foreach_set("select", np.zeros(len(obj.data.polygons), bool))
    with pytest.raises(RuntimeError, match="select the faces"):
        bpy.ops.trellis.edit_region()
    # A box far outside the object: the daemon refuses it (the region misses the grid).
    empty = bpy.data.objects.new("far box", None)
    bpy.context.scene.collection.objects.link(empty)
    empty.location = (100.0, 100.0, 100.0)
    bpy.context.view_layer.update()
    s = env.settings(region_source="BOX")
    s.region_box = empty
    n = len(env.S.jobs)
    with pytest.raises(RuntimeError, match="outside the grid"):
        bpy.ops.trellis.edit_region()
    assert len(env.S.jobs) == n


def test_crashed_daemon_is_explained_then_started_again(env):
    env.settings(mode="TEXT", prompt="a doomed vase", outputs="MESH")
    s = bpy.context.scene.trellis
    s.ss_steps = s.slat_steps = 1000
    assert bpy.ops.trellis.generate() == {"FINISHED"}
    job = env.run(env.newest_job(), until=lambda j: j.state == "running")
    old = env.S.daemon.proc
    old_shm = env.S.info["shm_dir"]
    old.kill()
    old.wait()
    env.run(job, timeout=60)
    assert job.state == "lost"
    level, msg = env.S.reports[-1]
    assert level == "ERROR" and "stopped" in msg and "started again" in msg
    assert "Daemon" in env.S.status_line() or "stopped" in env.S.status_line()

    env.settings(prompt="a second vase")
    assert bpy.ops.trellis.generate() == {"FINISHED"}
    job = env.run(env.newest_job())
    assert job.state == "done", job.describe()
    assert env.S.daemon.proc.pid != old.pid
    assert not os.path.exists(old_shm), "the new daemon swept the dead one's buffers"


def test_shutdown_stops_the_daemon_and_leaves_no_buffer(env):
    shm = env.S.info["shm_dir"]
    proc = env.S.daemon.proc
    assert bpy.ops.trellis.shutdown() == {"FINISHED"}
    assert proc.wait(30) == 0
    assert not os.path.exists(shm) or os.listdir(shm) == []
    assert env.S.client is None


def test_connect_explains_or_starts_the_daemon(env):
    env.configure(auto_start=False)
    with pytest.raises(RuntimeError, match="no trellis-rs daemon listens"):
        bpy.ops.trellis.connect()
    assert "no trellis-rs daemon" in env.S.status_line()
    env.configure(auto_start=True)
    assert bpy.ops.trellis.connect() == {"FINISHED"}
    assert env.S.connecting and env.session.SESSION.active()
    deadline = time.monotonic() + 120
    while env.S.client is None:
        assert time.monotonic() < deadline, env.S.daemon.log_tail()
        env.session.poll()
        time.sleep(0.02)
    assert not env.S.connecting and env.session.poll() is None, "the timer stops when idle"
    assert env.S.status_line().startswith("trellis-rs") and "cpu" in env.S.status_line()
    proc = env.S.daemon.proc
    assert bpy.ops.trellis.shutdown() == {"FINISHED"}
    assert proc.wait(30) == 0


class Layout:
    """Stands in for bpy's UILayout (background mode draws no UI): records what the panel draws
    and checks every property and operator it names exists."""

    def __init__(self, log):
        self.log = log

    def _child(self, *a, **k):
        return Layout(self.log)

    row = column = box = grid_flow = _child

    def prop(self, data, name, **kw):
        assert name in data.bl_rna.properties, f"{data} has no property {name}"
        self.log.append(("prop", name))

    def operator(self, idname, **kw):
        mod, name = idname.split(".")
        assert hasattr(getattr(bpy.ops, mod), name), idname
        self.log.append(("operator", idname))
        return type("OpProps", (), {})()

    def label(self, text="", **kw):
        self.log.append(("label", text))

    def progress(self, factor=0.0, type="BAR", text=""):
        assert 0.0 <= factor <= 1.0
        self.log.append(("progress", text))

    def template_ID(self, data, name, **kw):
        self.prop(data, name)

    def template_list(self, listtype, list_id, data, name, active_data, active_name, **kw):
        self.prop(data, name)
        self.prop(active_data, active_name)

    def separator(self, **kw):
        pass

    def template_icon(self, icon_value=0, scale=1.0):
        assert icon_value > 0
        self.log.append(("icon", icon_value))


def draw_panel(env):
    log = []
    panel = type("P", (), {"layout": Layout(log)})()
    bpy.types.VIEW3D_PT_trellis.draw(panel, bpy.context)
    return log


def test_panel_draws_every_mode_and_job_state(env):
    s = bpy.context.scene.trellis
    for mode in ("IMAGE", "IMAGES", "TEXT"):
        s.mode = mode
        log = draw_panel(env)
        ops = [x for k, x in log if k == "operator"]
        assert {"trellis.generate", "trellis.variant", "trellis.connect"} <= set(ops)
        assert ("trellis.edit_region" in ops) == env.S.capable("edit")
        names = [x for k, x in log if k == "prop"]
        assert "seed" in names and "outputs" in names
        assert ("image_path" in names) == (mode == "IMAGE")
        assert ("images" in names) == (mode == "IMAGES")
    s.show_sampling = True
    names = [x for k, x in draw_panel(env) if k == "prop"]
    assert {"ss_steps", "ss_cfg", "slat_steps", "slat_cfg"} <= set(names)
    # A running job shows a progress bar and a cancel button.
    job = env.session.Job(999, "generate", "probe", ["mesh"], {}, None)
    job.update({"state": "running", "stage": "sparse_structure", "step": 3, "total": 12,
                "eta_s": 4.2})
    env.S.jobs[job.key] = job
    try:
        log = draw_panel(env)
        assert ("progress", "sparse structure 3/12, ETA 4 s") in log
        assert ("operator", "trellis.cancel") in log
    finally:
        del env.S.jobs[job.key]
    # A done job with a thumbnail shows it (when this Blender makes preview icons at all).
    png = str(env.root / "thumb.png")
    img = bpy.data.images.new("thumb", 8, 4)
    img.filepath_raw = png
    img.file_format = "PNG"
    img.save()
    bpy.data.images.remove(img)
    job = env.session.Job(998, "generate", "done probe", ["mesh"], {}, None)
    job.update({"state": "done", "asset": "a-1", "preview": png})
    assert job.preview == png
    env.S.jobs[job.key] = job
    try:
        icon = env.thumbnails.icon_id(png)
        log = draw_panel(env)
        assert (("icon", icon) in log) == (icon > 0), (icon, log)
        assert env.thumbnails.icon_id(None) == 0
    finally:
        del env.S.jobs[job.key]
    # The region controls appear exactly when the daemon offers edit.
    saved = env.S.info
    try:
        for caps, shown in ((["generate", "edit"], True), (["generate"], False)):
            env.S.info = dict(saved, capabilities=caps)
            ops = [x for k, x in draw_panel(env) if k == "operator"]
            assert ("trellis.edit_region" in ops) == shown, caps
    finally:
        env.S.info = saved
