"""Operators: each one submits to the daemon (or asks it something quick) and returns at once;
:mod:`.session`'s timer follows the jobs. Daemon errors become reports."""


import os

import bpy
import numpy as np
from bpy.props import CollectionProperty, EnumProperty, IntProperty, StringProperty
from mathutils import Matrix

from . import client as trellis
from . import importers, preferences
from .session import SESSION, ensure_timer

LABEL_CHARS = 40


def _label(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _image_ref(item_path: str, image) -> tuple:
    """(input for the client, label) of a file path or a Blender image."""
    if image is not None:
        if image.filepath and not image.is_dirty and image.source == "FILE" and not image.packed_file:
            path = bpy.path.abspath(image.filepath)
            if os.path.isfile(path):
                return path, image.name
        return importers.image_to_array(image), image.name
    if not item_path:
        raise ValueError("no image given: choose a file or an image")
    path = bpy.path.abspath(item_path)
    if not os.path.isfile(path):
        raise ValueError(f"image file {path} does not exist")
    return path, os.path.basename(path)


def _images(settings) -> tuple:
    """The inputs and a label for the current mode."""
    if settings.mode == "IMAGE":
        ref, label = _image_ref(settings.image_path, settings.image)
        return [ref], label
    if settings.mode == "IMAGES":
        refs, names = [], []
        for item in settings.images:
            ref, name = _image_ref(item.filepath, item.image)
            refs.append(ref)
            names.append(name)
        if not refs:
            raise ValueError("add at least one image to the list")
        return refs, f"{names[0]} +{len(refs) - 1}" if len(refs) > 1 else names[0]
    return [], ""


def _model(kind: str) -> str | None:
    """The served model for ``image``/``text`` jobs: the preference's, when the daemon serves it."""
    prefs = preferences.get()
    want = prefs.image_model if kind == "image" else prefs.text_model
    served = [m.get("name") for m in SESSION.info.get("models") or []]
    if want and (want in served or bpy.path.abspath(want) in served):
        return want if want in served else bpy.path.abspath(want)
    return None  # the daemon's first model of that kind


def _report_error(op, e: Exception) -> set:
    msg = e.message if isinstance(e, trellis.TrellisError) else str(e)
    op.report({"ERROR"}, f"TRELLIS: {msg}")
    return {"CANCELLED"}


class TRELLIS_OT_generate(bpy.types.Operator):
    """Generate a 3D asset from the image(s) or the prompt of the TRELLIS panel"""

    bl_idname = "trellis.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    def execute(self, context):
        s = context.scene.trellis
        try:
            images, label = _images(s)
            text = None
            if s.mode == "TEXT":
                text = s.prompt.strip()
                if not text:
                    raise ValueError("type a prompt first")
                label = text
            kind = "text" if text else "image"
            fields = {"model": _model(kind), "text": text, "formats": s.formats()}
            fields.update(s.sampling())
            if s.mode == "IMAGES":
                fields["multi_image_mode"] = s.multi_image_mode
            refs, arrays = trellis.image_inputs(images, "image")
            fields["images"] = refs or None
            placement = {"matrix": [list(r) for r in Matrix.Translation(context.scene.cursor.location)]}
            job = SESSION.submit(preferences.get(context), "generate", _label(label), "generate",
                                 fields, arrays, s.formats(), placement)
        except (trellis.TrellisError, ValueError, OSError) as e:
            return _report_error(self, e)
        self.report({"INFO"}, f"TRELLIS: '{job.label}' {job.state}")
        return {"FINISHED"}


class TRELLIS_OT_variant(bpy.types.Operator):
    """Make a new appearance of the selected mesh (its shape kept) from the prompt or the image"""

    bl_idname = "trellis.variant"
    bl_label = "Variant of Selected"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        return obj is not None and obj.type == "MESH"

    def execute(self, context):
        s = context.scene.trellis
        obj = context.active_object
        try:
            if obj.mode != "OBJECT":
                obj.update_from_editmode()
            depsgraph = context.evaluated_depsgraph_get()
            verts, faces = importers.evaluated_world_mesh(obj, depsgraph)
            if len(faces) == 0:
                raise ValueError(f"'{obj.name}' has no faces")
            centre, scale = importers.unit_cube_frame(verts)
            text = image = None
            if s.mode == "TEXT":
                text = s.prompt.strip()
                if not text:
                    raise ValueError("type a prompt first")
                label = f"{obj.name}: {text}"
            else:
                images, img_label = _images(s)
                image = images[0]
                label = f"{obj.name}: {img_label}"
            kind = "text" if text else "image"
            fields = {"model": _model(kind), "mesh": {"arrays": {"vertices": "vertices",
                                                                  "faces": "faces"}},
                      "text": text, "formats": s.formats()}
            sampling = s.sampling()
            fields.update({k: sampling[k] for k in ("seed", "slat_steps", "slat_cfg")})
            arrays = {"vertices": verts, "faces": faces}
            if image is not None:
                refs, img_arrays = trellis.image_inputs([image], "image")
                fields["image"] = refs[0]
                arrays.update(img_arrays)
            offset = None
            if s.keep_original == "SIDE_BY_SIDE":
                width = float(verts[:, 0].max() - verts[:, 0].min())
                offset = [1.2 * max(width, 1e-3), 0.0, 0.0]
            placement = {
                "matrix": [list(r) for r in obj.matrix_world],
                "frame": {"centre": centre.tolist(), "scale": scale},
                "source": obj.name,
                "keep_original": s.keep_original,
                "offset": offset,
            }
            job = SESSION.submit(preferences.get(context), "variant", _label(label), "variant",
                                 fields, arrays, s.formats(), placement)
        except (trellis.TrellisError, ValueError, OSError) as e:
            return _report_error(self, e)
        self.report({"INFO"}, f"TRELLIS: variant '{job.label}' {job.state}")
        return {"FINISHED"}


def _region_box(context, obj) -> tuple:
    """The edit region as a world-space box (min, max): selected faces, or a box empty."""
    s = context.scene.trellis
    if s.region_source == "BOX":
        box = s.region_box
        if box is None:
            raise ValueError("choose the box empty of the region")
        size = box.empty_display_size
        local = np.array([[x, y, z] for x in (-size, size) for y in (-size, size)
                          for z in (-size, size)], dtype=np.float64)
        m = np.array(box.matrix_world, dtype=np.float64)
        corners = local @ m[:3, :3].T + m[:3, 3]
        return corners.min(axis=0), corners.max(axis=0)
    if obj.mode == "EDIT":
        obj.update_from_editmode()
    me = obj.data
    sel = np.zeros(len(me.polygons), dtype=bool)
    me.polygons.foreach_get("select", sel)
    if not sel.any():
        raise ValueError("select the faces of the region in Edit Mode")
    co = np.empty(len(me.vertices) * 3, dtype=np.float32)
    me.vertices.foreach_get("co", co)
    verts = co.reshape(-1, 3)
    idx = np.empty(len(me.loops), dtype=np.int32)
    me.loops.foreach_get("vertex_index", idx)
    starts = np.empty(len(me.polygons), dtype=np.int32)
    totals = np.empty(len(me.polygons), dtype=np.int32)
    me.polygons.foreach_get("loop_start", starts)
    me.polygons.foreach_get("loop_total", totals)
    used = np.concatenate([idx[a:a + n] for a, n in zip(starts[sel], totals[sel])])
    m = np.array(obj.matrix_world, dtype=np.float64)
    world = verts[used].astype(np.float64) @ m[:3, :3].T + m[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def _to_asset(obj) -> np.ndarray:
    """The 4x4 matrix from the object's local space to its asset's normalised space (recorded
    at import; identity for an object without the record, as a generated object's)."""
    rec = obj.get(importers.TO_ASSET_KEY)
    if rec is None or len(rec) != 16:
        return np.eye(4)
    return np.array(list(rec), dtype=np.float64).reshape(4, 4)


def region_in_asset_space(obj, lo, hi) -> tuple:
    """The world-space box (lo, hi) as a box in the asset's normalised space (the bounds of its
    eight corners: a rotated object's box grows to stay axis-aligned there)."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])], dtype=np.float64)
    inv = np.linalg.inv(np.array(obj.matrix_world, dtype=np.float64))
    t = _to_asset(obj) @ inv
    u = corners @ t[:3, :3].T + t[:3, 3]
    return u.min(axis=0), u.max(axis=0)


class TRELLIS_OT_edit_region(bpy.types.Operator):
    """Re-generate a region of an object TRELLIS made (from its stored latent) under the prompt
    or the image, keeping the rest; the region is the faces selected in Edit Mode or a box
    empty. Available when the daemon offers `edit`"""

    bl_idname = "trellis.edit_region"
    bl_label = "Edit Region"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        return (SESSION.capable("edit") and obj is not None and obj.type == "MESH"
                and importers.ASSET_KEY in obj)

    def execute(self, context):
        s = context.scene.trellis
        obj = context.active_object
        try:
            lo, hi = region_in_asset_space(obj, *_region_box(context, obj))
            fields = {"asset": obj[importers.ASSET_KEY],
                      "region": {"box": {"min": lo.tolist(), "max": hi.tolist()}},
                      "formats": s.formats()}
            fields.update(s.sampling())
            arrays = None
            if s.mode == "TEXT":
                text = s.prompt.strip()
                if not text:
                    raise ValueError("type a prompt first")
                fields["text"] = text
                label = f"{obj.name}: {text}"
            else:
                images, img_label = _images(s)
                refs, arrays = trellis.image_inputs(images[:1], "image")
                fields["image"] = refs[0]
                label = f"{obj.name}: {img_label}"
            offset = None
            if s.keep_original == "SIDE_BY_SIDE":
                m = np.array(obj.matrix_world, dtype=np.float64)
                bb = np.array([list(c) for c in obj.bound_box], dtype=np.float64)
                world = bb @ m[:3, :3].T + m[:3, 3]
                offset = [1.2 * max(float(np.ptp(world[:, 0])), 1e-3), 0.0, 0.0]
            placement = {"matrix": [list(r) for r in obj.matrix_world],
                         "to_asset": _to_asset(obj).tolist(), "source": obj.name,
                         "keep_original": s.keep_original, "offset": offset}
            job = SESSION.submit(preferences.get(context), "edit", _label(label), "edit",
                                 fields, arrays, s.formats(), placement)
        except (trellis.TrellisError, ValueError, OSError) as e:
            return _report_error(self, e)
        self.report({"INFO"}, f"TRELLIS: edit '{job.label}' {job.state}")
        return {"FINISHED"}


class TRELLIS_OT_cancel(bpy.types.Operator):
    """Cancel this job (a running job stops within one sampler step)"""

    bl_idname = "trellis.cancel"
    bl_label = "Cancel Job"
    bl_options = {"REGISTER", "INTERNAL"}

    key: IntProperty(name="Job", description="The job's number in the list")

    def execute(self, context):
        try:
            SESSION.cancel(self.key)
        except trellis.TrellisError as e:
            return _report_error(self, e)
        return {"FINISHED"}


class TRELLIS_OT_clear_jobs(bpy.types.Operator):
    """Remove finished, failed and cancelled jobs from the list"""

    bl_idname = "trellis.clear_jobs"
    bl_label = "Clear Finished Jobs"
    bl_options = {"REGISTER", "INTERNAL"}

    def execute(self, context):
        SESSION.clear_finished()
        return {"FINISHED"}


class TRELLIS_OT_connect(bpy.types.Operator):
    """Connect to the daemon (starting it if the preferences say so) and refresh its status"""

    bl_idname = "trellis.connect"
    bl_label = "Connect"
    bl_options = {"REGISTER", "INTERNAL"}

    def execute(self, context):
        prefs = preferences.get(context)
        SESSION.disconnect()
        try:
            SESSION.connect(prefs)
        except trellis.DaemonUnavailable as e:
            if not prefs.auto_start:
                SESSION.last_error = e.message
                return _report_error(self, e)
            try:
                SESSION.start_daemon(prefs)
            except trellis.TrellisError as e2:
                SESSION.last_error = e2.message
                return _report_error(self, e2)
            SESSION.connecting = True
            ensure_timer()
            self.report({"INFO"}, "TRELLIS: starting the daemon")
            return {"FINISHED"}
        except trellis.TrellisError as e:
            SESSION.last_error = e.message
            return _report_error(self, e)
        self.report({"INFO"}, f"TRELLIS: {SESSION.status_line()}")
        return {"FINISHED"}


class TRELLIS_OT_shutdown(bpy.types.Operator):
    """Stop the daemon (its running job is cancelled; stored assets are kept)"""

    bl_idname = "trellis.shutdown"
    bl_label = "Stop Daemon"
    bl_options = {"REGISTER", "INTERNAL"}

    def execute(self, context):
        if SESSION.client is None:
            self.report({"WARNING"}, "TRELLIS: not connected")
            return {"CANCELLED"}
        try:
            SESSION.client.shutdown()
        except trellis.TrellisError as e:
            SESSION.disconnect()
            return _report_error(self, e)
        SESSION.disconnect()
        SESSION.info = {}
        SESSION.last_error = "Daemon stopped"
        return {"FINISHED"}


class TRELLIS_OT_image_add(bpy.types.Operator):
    """Add image files to the list of views (Images mode)"""

    bl_idname = "trellis.image_add"
    bl_label = "Add Images"
    bl_options = {"REGISTER", "INTERNAL"}

    directory: StringProperty(subtype="DIR_PATH")
    files: CollectionProperty(type=bpy.types.OperatorFileListElement)
    filter_image: bpy.props.BoolProperty(default=True, options={"HIDDEN"})

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        s = context.scene.trellis
        for f in self.files:
            if f.name:
                s.images.add().filepath = os.path.join(self.directory, f.name)
        s.images_index = len(s.images) - 1
        return {"FINISHED"}


class TRELLIS_OT_image_remove(bpy.types.Operator):
    """Remove the active image from the list of views"""

    bl_idname = "trellis.image_remove"
    bl_label = "Remove Image"
    bl_options = {"REGISTER", "INTERNAL"}

    def execute(self, context):
        s = context.scene.trellis
        if 0 <= s.images_index < len(s.images):
            s.images.remove(s.images_index)
            s.images_index = max(0, s.images_index - 1)
        return {"FINISHED"}


class TRELLIS_OT_report(bpy.types.Operator):
    """Show a message of the TRELLIS timer in the status bar"""

    bl_idname = "trellis.report"
    bl_label = "TRELLIS Report"
    bl_options = {"INTERNAL"}

    level: EnumProperty(items=(("INFO", "Info", ""), ("WARNING", "Warning", ""),
                               ("ERROR", "Error", "")), default="INFO")
    message: StringProperty()

    def execute(self, context):
        self.report({self.level}, self.message)
        return {"FINISHED"}


classes = (
    TRELLIS_OT_generate,
    TRELLIS_OT_variant,
    TRELLIS_OT_edit_region,
    TRELLIS_OT_cancel,
    TRELLIS_OT_clear_jobs,
    TRELLIS_OT_connect,
    TRELLIS_OT_shutdown,
    TRELLIS_OT_image_add,
    TRELLIS_OT_image_remove,
    TRELLIS_OT_report,
)
