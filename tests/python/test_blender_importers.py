"""The add-on's importers inside bpy, on synthetic arrays: meshes with vertex colours or with UVs and
a texture, Gaussians as a point mesh with attributes and a geometry-nodes preview, and the
evaluated world-space mesh a variant sends. The add-on is the one installed from its zip."""

from __future__ import annotations

import numpy as np
import pytest

bpy = pytest.importorskip("bpy", reason="bpy is not installed in this Python")


@pytest.fixture
def imp(addon):
    return addon.importers


def _tetra():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.uint32)
    return v, f


def test_mesh_with_vertex_colours(imp):
    v, f = _tetra()
    colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], np.float32)
    me = imp.mesh_from_arrays("tetra", v, f, colors=colours)
    assert (len(me.vertices), len(me.polygons), len(me.loops), len(me.edges)) == (4, 4, 12, 6)
    co = np.empty(12, np.float32)
    me.vertices.foreach_get("co", co)
    np.testing.assert_array_equal(co.reshape(4, 3), v)
    idx = np.empty(12, np.int32)
    me.loops.foreach_get("vertex_index", idx)
    np.testing.assert_array_equal(idx.reshape(4, 3), f)
    attr = me.color_attributes["Color"]
    assert (attr.domain, attr.data_type) == ("POINT", "FLOAT_COLOR")
    got = np.empty(16, np.float32)
    attr.data.foreach_get("color", got)
    np.testing.assert_allclose(got.reshape(4, 4)[:, :3], colours)
    mat = me.materials[0]
    nodes = [n for n in mat.node_tree.nodes if n.bl_idname == "ShaderNodeAttribute"]
    assert nodes and nodes[0].attribute_name == "Color"
    link = nodes[0].outputs["Color"].links[0]
    assert link.to_socket.name == "Base Color"


def test_mesh_with_uvs_and_texture(imp):
    v, f = _tetra()
    uvs = np.array([[0, 0], [1, 0], [0, 1], [0.25, 0.75]], np.float32)
    tex = np.zeros((8, 16, 3), np.uint8)
    tex[0] = (255, 0, 0)  # first row (top) red
    me = imp.mesh_from_arrays("textured", v, f, uvs=uvs, texture=tex)
    uv = np.empty(24, np.float32)
    me.uv_layers["UVMap"].uv.foreach_get("vector", uv)
    expect = uvs[f.ravel()].copy()
    expect[:, 1] = 1 - expect[:, 1]
    np.testing.assert_allclose(uv.reshape(12, 2), expect)
    mat = me.materials[0]
    tex_nodes = [n for n in mat.node_tree.nodes if n.bl_idname == "ShaderNodeTexImage"]
    assert len(tex_nodes) == 1
    img = tex_nodes[0].image
    assert tuple(img.size) == (16, 8) and img.packed_file is not None
    assert tex_nodes[0].outputs["Color"].links[0].to_socket.name == "Base Color"
    px = np.empty(16 * 8 * 4, np.float32)
    img.pixels.foreach_get(px)
    px = px.reshape(8, 16, 4)
    np.testing.assert_allclose(px[-1, :, :3], np.tile([1, 0, 0], (16, 1)))  # Blender: top = last
    np.testing.assert_allclose(px[0, :, :3], 0)


def test_bad_arrays_are_errors(imp):
    v, f = _tetra()
    with pytest.raises(ValueError, match="outside"):
        imp.mesh_from_arrays("bad", v, f + 10)
    with pytest.raises(ValueError, match="vertices must be"):
        imp.mesh_from_arrays("bad", v[:, :2], f)
    with pytest.raises(ValueError, match="colours for"):
        imp.mesh_from_arrays("bad", v, f, colors=np.zeros((3, 3), np.float32))


def test_gaussians_as_points_with_attributes_and_preview(imp):
    n = 50
    rng = np.random.default_rng(3)
    pos = rng.uniform(-0.5, 0.5, (n, 3)).astype(np.float32)
    col = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    scl = rng.uniform(0.001, 0.02, (n, 3)).astype(np.float32)
    rot = rng.normal(size=(n, 4)).astype(np.float32)
    opa = rng.uniform(0, 1, (n, 1)).astype(np.float32)
    me = imp.gaussians_to_mesh("g", pos, col, scl, rot, opa)
    assert (len(me.vertices), len(me.polygons), len(me.edges)) == (n, 0, 0)
    types = {a.name: (a.data_type, a.domain) for a in me.attributes if not a.name.startswith(".")}
    assert types["opacity"] == ("FLOAT", "POINT")
    assert types["scale"] == ("FLOAT_VECTOR", "POINT")
    assert types["rotation"] == ("QUATERNION", "POINT")
    assert types["colour"] == ("FLOAT_COLOR", "POINT")
    got = np.empty(n * 4, np.float32)
    me.attributes["rotation"].data.foreach_get("value", got)
    np.testing.assert_allclose(got.reshape(n, 4),
                               rot / np.linalg.norm(rot, axis=1, keepdims=True), atol=1e-6)
    got = np.empty(n, np.float32)
    me.attributes["opacity"].data.foreach_get("value", got)
    np.testing.assert_allclose(got, opa[:, 0])
    got = np.empty(n * 4, np.float32)
    me.attributes["colour"].data.foreach_get("color", got)
    np.testing.assert_allclose(got.reshape(n, 4)[:, :3], col, atol=1e-6)
    np.testing.assert_allclose(got.reshape(n, 4)[:, 3], opa[:, 0], atol=1e-6)

    coll = imp.ensure_collection("gauss test")
    obj = imp.new_object("g", me, coll, asset="A1", job=7, kind="generate")
    imp.add_gaussian_preview(obj)
    assert obj["trellis_asset"] == "A1" and obj["trellis_job"] == 7
    dg = bpy.context.evaluated_depsgraph_get()
    dg.update()
    # Read each instance while iterating (the iterator's items are temporary).
    got = []
    for inst in dg.object_instances:
        if inst.is_instance and inst.parent and inst.parent.original == obj:
            m = inst.matrix_world.copy()
            got.append((np.array(m.to_translation()), np.array(m.to_scale()),
                        np.array(m.to_quaternion())))
    assert len(got) == n
    # Each instance sits on its Gaussian, scaled by scale * Size (2), rotated by rotation.
    unit = rot / np.linalg.norm(rot, axis=1, keepdims=True)
    for t, sc, q in got:
        i = int(np.argmin(np.linalg.norm(pos - t, axis=1)))
        np.testing.assert_allclose(t, pos[i], atol=1e-5)
        np.testing.assert_allclose(sc, 2 * scl[i], rtol=1e-4)
        assert abs(abs(float(np.dot(q, unit[i]))) - 1) < 1e-4


def test_evaluated_world_mesh_applies_modifiers_and_transform(imp):
    me = bpy.data.meshes.new("quad")
    me.from_pydata([(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)], [], [(0, 1, 2, 3)])
    obj = bpy.data.objects.new("quad", me)
    bpy.context.scene.collection.objects.link(obj)
    obj.location = (10, 0, 0)
    obj.scale = (2, 2, 2)
    obj.modifiers.new("sub", "SUBSURF").levels = 1
    dg = bpy.context.evaluated_depsgraph_get()
    verts, faces = imp.evaluated_world_mesh(obj, dg)
    assert faces.shape == (8, 3) and faces.dtype == np.uint32  # 4 quads -> 8 triangles
    assert verts.dtype == np.float32
    assert verts[:, 0].min() >= 10 - 1e-5 and verts[:, 0].max() <= 12 + 1e-5
    centre, scale = imp.unit_cube_frame(verts)
    assert scale == pytest.approx(verts[:, 0].max() - verts[:, 0].min())
    assert len(me.polygons) == 1  # the original is untouched


def test_edit_region_box_from_selected_faces_or_an_empty(addon):
    ops = addon.operators
    me = bpy.data.meshes.new("region")
    me.from_pydata([(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (5, 5, 5), (6, 5, 5), (6, 6, 5)],
                   [], [(0, 1, 2, 3), (4, 5, 6)])
    obj = bpy.data.objects.new("region", me)
    bpy.context.scene.collection.objects.link(obj)
    obj.location = (10, 0, 0)
    bpy.context.view_layer.update()
    s = bpy.context.scene.trellis
    s.region_source = "FACES"
    me.polygons[0].select = False
    me.polygons[1].select = False
    with pytest.raises(ValueError, match="select the faces"):
        ops._region_box(bpy.context, obj)
    me.polygons[1].select = True
    lo, hi = ops._region_box(bpy.context, obj)
    np.testing.assert_allclose(lo, [15, 5, 5])
    np.testing.assert_allclose(hi, [16, 6, 5])
    empty = bpy.data.objects.new("region empty", None)
    bpy.context.scene.collection.objects.link(empty)
    empty.empty_display_type = "CUBE"
    empty.empty_display_size = 0.5
    empty.location = (1, 2, 3)
    empty.scale = (2, 1, 1)
    s.region_source = "BOX"
    s.region_box = empty
    bpy.context.view_layer.update()
    lo, hi = ops._region_box(bpy.context, obj)
    np.testing.assert_allclose(lo, [0, 1.5, 2.5])
    np.testing.assert_allclose(hi, [2, 2.5, 3.5])
    s.region_source = "FACES"
