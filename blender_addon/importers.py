"""Blender data from the daemon's arrays, and arrays from Blender data (``bpy`` data only, no UI).

Meshes are built with ``foreach_set`` straight from numpy arrays (no per-vertex Python loop);
Gaussians become a point mesh with named attributes and a geometry-nodes preview. Nothing here
talks to the daemon: :mod:`.session` fetches the arrays and passes them in.

Axes: TRELLIS works z-up with the object in the unit cube ``[-0.5, 0.5]^3``, as Blender does
(z-up), so positions are used as they are.
"""

from __future__ import annotations

from typing import Optional, Tuple

import bpy
import numpy as np
from mathutils import Matrix

ASSET_KEY = "trellis_asset"
# The object's local space -> its asset's normalised space ([-0.5, 0.5]^3, what `edit` regions
# are given in): 16 floats, row-major.
TO_ASSET_KEY = "trellis_to_asset"
JOB_KEY = "trellis_job"
KIND_KEY = "trellis_kind"
PREVIEW_GROUP = "TRELLIS Gaussian preview"
PREVIEW_MATERIAL = "TRELLIS Gaussian"
# Named attributes of a Gaussian point mesh.
ATTR_OPACITY = "opacity"
ATTR_SCALE = "scale"
ATTR_ROTATION = "rotation"
ATTR_COLOUR = "colour"
MESH_COLOUR = "Color"


def _node_material(name: str) -> bpy.types.Material:
    mat = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True
    return mat


def _principled(mat: bpy.types.Material) -> bpy.types.Node:
    nodes = mat.node_tree.nodes
    for n in nodes:
        if n.bl_idname == "ShaderNodeBsdfPrincipled":
            return n
    bsdf = nodes.new("ShaderNodeBsdfPrincipled")
    out = next((n for n in nodes if n.bl_idname == "ShaderNodeOutputMaterial"), None)
    if out is None:
        out = nodes.new("ShaderNodeOutputMaterial")
    mat.node_tree.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    return bsdf


def ensure_collection(name: str, scene: Optional[bpy.types.Scene] = None) -> bpy.types.Collection:
    """A new collection named ``name`` (Blender adds ``.001`` when taken) under the scene's."""
    scene = scene or bpy.context.scene
    coll = bpy.data.collections.new(name)
    scene.collection.children.link(coll)
    return coll


def as_rgba_f32(colors: np.ndarray) -> np.ndarray:
    """``[N, 3|4]`` colours (float in [0, 1] or uint8) as float32 RGBA."""
    c = np.asarray(colors)
    if c.dtype == np.uint8:
        c = c.astype(np.float32) / 255.0
    c = c.astype(np.float32, copy=False)
    if c.ndim != 2 or c.shape[1] not in (3, 4):
        raise ValueError(f"colours must be [N, 3|4], got {c.shape}")
    if c.shape[1] == 3:
        c = np.concatenate([c, np.ones((c.shape[0], 1), np.float32)], axis=1)
    return np.clip(c, 0.0, 1.0)


def image_from_array(name: str, pixels: np.ndarray) -> bpy.types.Image:
    """A packed Blender image from a uint8 ``[H, W, 3|4]`` array whose first row is the top."""
    px = np.asarray(pixels)
    if px.ndim != 3 or px.shape[2] not in (3, 4):
        raise ValueError(f"a texture must be [H, W, 3|4], got {px.shape}")
    h, w = px.shape[:2]
    rgba = as_rgba_f32(px.reshape(-1, px.shape[2])).reshape(h, w, 4)
    img = bpy.data.images.new(name, width=w, height=h, alpha=px.shape[2] == 4)
    # Blender's first row is the bottom one.
    img.pixels.foreach_set(np.ascontiguousarray(rgba[::-1]).ravel())
    img.update()
    img.pack()
    return img


def image_to_array(image: bpy.types.Image) -> np.ndarray:
    """A Blender image as uint8 ``[H, W, 4]`` RGBA, first row at the top (what the daemon reads)."""
    w, h = image.size
    if w == 0 or h == 0:
        raise ValueError(f"image {image.name!r} has no pixels (is its file missing?)")
    px = np.empty(w * h * 4, dtype=np.float32)
    image.pixels.foreach_get(px)
    px = px.reshape(h, w, 4)[::-1]
    return np.ascontiguousarray(np.round(np.clip(px, 0.0, 1.0) * 255.0).astype(np.uint8))


def vertex_colour_material(name: str, attribute: str = MESH_COLOUR) -> bpy.types.Material:
    """Principled BSDF whose base colour reads the mesh's colour attribute."""
    mat = _node_material(name)
    bsdf = _principled(mat)
    attr = mat.node_tree.nodes.new("ShaderNodeAttribute")
    attr.attribute_type = "GEOMETRY"
    attr.attribute_name = attribute
    attr.location = (bsdf.location.x - 300, bsdf.location.y)
    mat.node_tree.links.new(attr.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def texture_material(name: str, image: bpy.types.Image) -> bpy.types.Material:
    """Principled BSDF whose base colour (and alpha) read ``image`` through the UV map."""
    mat = _node_material(name)
    bsdf = _principled(mat)
    tex = mat.node_tree.nodes.new("ShaderNodeTexImage")
    tex.image = image
    tex.location = (bsdf.location.x - 350, bsdf.location.y)
    mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def mesh_from_arrays(
    name: str,
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: Optional[np.ndarray] = None,
    uvs: Optional[np.ndarray] = None,
    texture: Optional[np.ndarray] = None,
    smooth: bool = True,
) -> bpy.types.Mesh:
    """A triangle mesh from ``vertices`` ``[V, 3]`` and ``faces`` ``[F, 3]``.

    ``colors`` ``[V, 3|4]`` become a point colour attribute and a material reading it; ``uvs``
    ``[V, 2]`` (origin at the image's top-left, as glTF) a UV map, and with ``texture``
    (uint8 ``[H, W, 3|4]``, first row at the top) a packed image and a textured material.
    """
    v = np.ascontiguousarray(vertices, dtype=np.float32)
    f = np.ascontiguousarray(faces).astype(np.int32, copy=False)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must be [V, 3], got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must be [F, 3], got {f.shape}")
    nv, nf = len(v), len(f)
    if nf and (f.min() < 0 or f.max() >= nv):
        raise ValueError(f"a face names a vertex outside 0..{nv}")
    me = bpy.data.meshes.new(name)
    me.vertices.add(nv)
    me.vertices.foreach_set("co", v.ravel())
    me.loops.add(3 * nf)
    me.loops.foreach_set("vertex_index", f.ravel())
    me.polygons.add(nf)
    me.polygons.foreach_set("loop_start", np.arange(0, 3 * nf, 3, dtype=np.int32))
    me.update(calc_edges=True)
    if colors is not None:
        rgba = as_rgba_f32(colors)
        if len(rgba) != nv:
            raise ValueError(f"{len(rgba)} colours for {nv} vertices")
        attr = me.color_attributes.new(MESH_COLOUR, "FLOAT_COLOR", "POINT")
        attr.data.foreach_set("color", rgba.ravel())
        me.color_attributes.active_color = attr
        me.color_attributes.render_color_index = me.color_attributes.active_color_index
    if uvs is not None:
        uv = np.asarray(uvs, dtype=np.float32)
        if uv.shape != (nv, 2):
            raise ValueError(f"uvs must be [V, 2] = [{nv}, 2], got {uv.shape}")
        layer = me.uv_layers.new(name="UVMap")
        per_loop = uv[f.ravel()].copy()
        per_loop[:, 1] = 1.0 - per_loop[:, 1]  # top-left origin -> Blender's bottom-left
        layer.uv.foreach_set("vector", per_loop.ravel())
    if texture is not None and uvs is not None:
        img = image_from_array(f"{name} texture", texture)
        me.materials.append(texture_material(name, img))
    elif colors is not None:
        me.materials.append(vertex_colour_material(name))
    if smooth and nf:
        me.polygons.foreach_set("use_smooth", np.ones(nf, dtype=bool))
    me.validate(clean_customdata=False)
    return me


def gaussians_to_mesh(
    name: str,
    positions: np.ndarray,
    colors: Optional[np.ndarray] = None,
    scales: Optional[np.ndarray] = None,
    rotations: Optional[np.ndarray] = None,
    opacities: Optional[np.ndarray] = None,
) -> bpy.types.Mesh:
    """A point mesh (vertices only) carrying the Gaussians as named point attributes:
    ``colour`` (RGBA), ``scale`` (vector), ``rotation`` (quaternion w, x, y, z), ``opacity``."""
    p = np.ascontiguousarray(positions, dtype=np.float32)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"Gaussian positions must be [N, 3], got {p.shape}")
    n = len(p)
    me = bpy.data.meshes.new(name)
    me.vertices.add(n)
    me.vertices.foreach_set("co", p.ravel())

    def check(a, cols, what):
        a = np.ascontiguousarray(a, dtype=np.float32).reshape(n, -1) if a is not None else None
        if a is not None and a.shape[1] != cols:
            raise ValueError(f"Gaussian {what} must be [N, {cols}], got {a.shape}")
        return a

    if colors is not None:
        rgba = as_rgba_f32(colors)
        if len(rgba) != n:
            raise ValueError(f"{len(rgba)} colours for {n} Gaussians")
        if opacities is not None:
            rgba[:, 3] = np.clip(np.asarray(opacities, np.float32).reshape(n), 0.0, 1.0)
        attr = me.attributes.new(ATTR_COLOUR, "FLOAT_COLOR", "POINT")
        attr.data.foreach_set("color", rgba.ravel())
    s = check(scales, 3, "scales")
    if s is not None:
        me.attributes.new(ATTR_SCALE, "FLOAT_VECTOR", "POINT").data.foreach_set("vector", s.ravel())
    r = check(rotations, 4, "rotations")
    if r is not None:
        norm = np.linalg.norm(r, axis=1, keepdims=True)
        r = np.where(norm > 0, r / np.maximum(norm, 1e-12), np.array([1, 0, 0, 0], np.float32))
        me.attributes.new(ATTR_ROTATION, "QUATERNION", "POINT").data.foreach_set(
            "value", r.astype(np.float32).ravel()
        )
    o = check(opacities, 1, "opacities")
    if o is not None:
        me.attributes.new(ATTR_OPACITY, "FLOAT", "POINT").data.foreach_set("value", o.ravel())
    me.update()
    return me


def gaussian_material() -> bpy.types.Material:
    """The shared material of the preview: colour and opacity from the instancing point."""
    mat = bpy.data.materials.get(PREVIEW_MATERIAL)
    if mat is not None:
        return mat
    mat = _node_material(PREVIEW_MATERIAL)
    nt = mat.node_tree
    bsdf = _principled(mat)
    col = nt.nodes.new("ShaderNodeAttribute")
    col.attribute_type = "INSTANCER"
    col.attribute_name = ATTR_COLOUR
    col.location = (bsdf.location.x - 300, bsdf.location.y)
    nt.links.new(col.outputs["Color"], bsdf.inputs["Base Color"])
    nt.links.new(col.outputs["Alpha"], bsdf.inputs["Alpha"])
    bsdf.inputs["Roughness"].default_value = 1.0
    return mat


def gaussian_preview_group() -> bpy.types.NodeTree:
    """Geometry nodes drawing each Gaussian as a small ellipsoid: an icosphere instanced on every
    point, rotated by ``rotation`` and scaled by ``scale`` times the modifier's Size."""
    ng = bpy.data.node_groups.get(PREVIEW_GROUP)
    if ng is not None:
        return ng
    ng = bpy.data.node_groups.new(PREVIEW_GROUP, "GeometryNodeTree")
    ng.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    size = ng.interface.new_socket("Size", in_out="INPUT", socket_type="NodeSocketFloat")
    size.default_value = 2.0
    size.min_value = 0.0
    ng.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    nodes, links = ng.nodes, ng.links
    gin = nodes.new("NodeGroupInput")
    gout = nodes.new("NodeGroupOutput")
    ico = nodes.new("GeometryNodeMeshIcoSphere")
    ico.inputs["Radius"].default_value = 1.0
    ico.inputs["Subdivisions"].default_value = 1
    setmat = nodes.new("GeometryNodeSetMaterial")
    setmat.inputs["Material"].default_value = gaussian_material()
    rot = nodes.new("GeometryNodeInputNamedAttribute")
    rot.data_type = "QUATERNION"
    rot.inputs["Name"].default_value = ATTR_ROTATION
    scl = nodes.new("GeometryNodeInputNamedAttribute")
    scl.data_type = "FLOAT_VECTOR"
    scl.inputs["Name"].default_value = ATTR_SCALE
    mul = nodes.new("ShaderNodeVectorMath")
    mul.operation = "SCALE"
    inst = nodes.new("GeometryNodeInstanceOnPoints")
    links.new(ico.outputs["Mesh"], setmat.inputs["Geometry"])
    links.new(setmat.outputs["Geometry"], inst.inputs["Instance"])
    links.new(gin.outputs[0], inst.inputs["Points"])
    links.new(rot.outputs["Attribute"], inst.inputs["Rotation"])
    links.new(scl.outputs["Attribute"], mul.inputs[0])
    links.new(gin.outputs[1], mul.inputs["Scale"])
    links.new(mul.outputs["Vector"], inst.inputs["Scale"])
    links.new(inst.outputs["Instances"], gout.inputs[0])
    for i, node in enumerate((gin, ico, setmat, rot, scl, mul, inst, gout)):
        node.location = (200 * i - 700, 0)
    return ng


def add_gaussian_preview(obj: bpy.types.Object) -> bpy.types.Modifier:
    mod = obj.modifiers.new("TRELLIS Gaussian preview", "NODES")
    mod.node_group = gaussian_preview_group()
    return mod


def new_object(
    name: str,
    data: bpy.types.ID,
    collection: bpy.types.Collection,
    matrix_world: Optional[Matrix] = None,
    asset: Optional[str] = None,
    job: Optional[int] = None,
    kind: Optional[str] = None,
) -> bpy.types.Object:
    """An object in ``collection`` that remembers the asset it came from."""
    obj = bpy.data.objects.new(name, data)
    collection.objects.link(obj)
    if matrix_world is not None:
        obj.matrix_world = matrix_world
    if asset:
        obj[ASSET_KEY] = asset
    if job is not None:
        obj[JOB_KEY] = int(job)
    if kind:
        obj[KIND_KEY] = kind
    return obj


def evaluated_world_mesh(
    obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph
) -> Tuple[np.ndarray, np.ndarray]:
    """The object's evaluated mesh (modifiers applied), triangulated, in world space:
    float32 ``[V, 3]`` vertices and uint32 ``[F, 3]`` triangles."""
    ev = obj.evaluated_get(depsgraph)
    me = ev.to_mesh()
    if me is None:
        raise ValueError(f"{obj.name!r} has no mesh geometry")
    try:
        me.calc_loop_triangles()
        nv, nt = len(me.vertices), len(me.loop_triangles)
        co = np.empty(nv * 3, dtype=np.float32)
        me.vertices.foreach_get("co", co)
        tris = np.empty(nt * 3, dtype=np.int32)
        me.loop_triangles.foreach_get("vertices", tris)
    finally:
        ev.to_mesh_clear()
    m = np.array(obj.matrix_world, dtype=np.float64)
    co64 = co.reshape(nv, 3).astype(np.float64)
    world = co64 @ m[:3, :3].T + m[:3, 3]
    return world.astype(np.float32), tris.reshape(nt, 3).astype(np.uint32)


def unit_cube_frame(vertices: np.ndarray) -> Tuple[np.ndarray, float]:
    """The centre and scale TRELLIS normalises a mesh with before voxelising it (centre of the
    bounding box, its largest side): unit-cube coordinates ``u`` map back as ``u * scale +
    centre``."""
    lo = vertices.min(axis=0).astype(np.float64)
    hi = vertices.max(axis=0).astype(np.float64)
    return (lo + hi) / 2.0, float((hi - lo).max())
