"""Renders docs/blender-result.png: the add-on, installed from its zip into bpy, imports a variant
of a monkey head from a real `trellisd serve`, and Cycles renders it headless.

    python tools/blender/render_result.py --trellisd target/debug/trellisd \
        --models DIR [--out docs/blender-result.png]

`--models` holds the tiny test models: a `trellisd tiny-repos --out DIR` folder, or the reference
fixtures (pipelines/TRELLIS-*-tiny, conditioners/*_tiny). Runs with a Python that has bpy.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trellisd", required=True)
    ap.add_argument("--models", required=True, type=Path)
    ap.add_argument("--out", default=str(REPO / "docs" / "blender-result.png"))
    ap.add_argument("--prompt", default="a bronze statue")
    ap.add_argument("--samples", type=int, default=24)
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="trellis-render-"))
    os.environ["BLENDER_USER_RESOURCES"] = str(tmp / "blender")
    os.environ.update(XDG_RUNTIME_DIR=str(tmp / "run"), XDG_DATA_HOME=str(tmp / "data"),
                      HF_HUB_OFFLINE="1")
    (tmp / "run").mkdir(mode=0o700)
    import bpy

    scripts = Path(bpy.utils.system_resource("SCRIPTS"))
    ext = scripts / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
    subprocess.run([sys.executable, str(ext), "build", "--source-dir", str(REPO / "blender_addon"),
                    "--output-dir", str(tmp)], check=True, capture_output=True)
    (zip_path,) = tmp.glob("trellis_rs-*.zip")
    bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default",
                                             enable_on_install=True)
    import importlib

    addon = importlib.import_module("bl_ext.user_default.trellis_rs")
    prefs = bpy.context.preferences.addons[addon.__name__].preferences
    prefs.daemon_path = os.path.abspath(a.trellisd)
    prefs.socket = str(tmp / "run" / "daemon.sock")
    # `trellisd tiny-repos --out DIR` lays the four out flat; the reference fixtures in
    # pipelines/ and conditioners/.
    flat = (a.models / "TRELLIS-image-tiny").is_dir()
    pipes = a.models if flat else a.models / "pipelines"
    conds = a.models if flat else a.models / "conditioners"
    prefs.image_model = str(pipes / "TRELLIS-image-tiny")
    prefs.text_model = str(pipes / "TRELLIS-text-tiny")
    prefs.image_cond_model = str(conds / "dinov2_reg_tiny")
    prefs.text_cond_model = str(conds / "clip_text_tiny")

    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    bpy.ops.mesh.primitive_monkey_add(size=1.6, location=(0, 0, 0.8))
    monkey = bpy.context.active_object
    monkey.modifiers.new("smooth", "SUBSURF").levels = 1
    s = bpy.context.scene.trellis
    s.mode, s.prompt, s.outputs, s.keep_original = "TEXT", a.prompt, "BOTH", "HIDE"
    s.seed, s.slat_steps = 7, 12
    bpy.ops.trellis.variant()
    session = addon.session
    job = list(session.SESSION.jobs.values())[-1]
    deadline = time.monotonic() + 600
    while job.active and time.monotonic() < deadline:
        session.poll()
        time.sleep(0.05)
    if job.state != "done":
        sys.exit(f"job ended {job.state}: {job.message}")
    objs = {o.name: o for o in bpy.data.collections[job.collection].objects}
    mesh = next(o for n, o in objs.items() if n.endswith(" mesh"))
    gs = next(o for n, o in objs.items() if n.endswith(" gaussians"))
    mesh.location.x -= 1.0
    gs.location.x += 1.0
    print(f"mesh {len(mesh.data.vertices)} vertices / {len(mesh.data.polygons)} triangles, "
          f"{len(gs.data.vertices)} Gaussians")

    scene = bpy.context.scene
    cam = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    scene.collection.objects.link(cam)
    cam.location = (0.0, -7.0, 2.4)
    cam.rotation_euler = (1.32, 0.0, 0.0)
    scene.camera = cam
    sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
    sun.data.energy = 3.0
    sun.rotation_euler = (0.7, 0.2, 0.5)
    scene.collection.objects.link(sun)
    world = scene.world or bpy.data.worlds.new("world")
    scene.world = world
    world.color = (0.35, 0.37, 0.4)
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = a.samples
    scene.cycles.use_denoising = False
    scene.render.resolution_x, scene.render.resolution_y = 800, 400
    scene.render.filepath = a.out
    bpy.ops.render.render(write_still=True)
    print("wrote", a.out)
    bpy.ops.trellis.shutdown()


if __name__ == "__main__":
    main()
