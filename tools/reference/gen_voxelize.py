"""Voxelisation fixtures recorded through the ORIGINAL `TrellisTextTo3DPipeline.voxelize` (see README.md here).

    TRELLIS_ORIG=/path/to/TRELLIS python gen_voxelize.py OUT_DIR [--base BASE_PIPELINES_DIR] [--seed S]

Writes one fixture directory OUT_DIR (kind `pipelines`, holding only `voxelize_<mesh>_*` triples, the
layout of the reference set's section F): for every shape below, `voxelize_<mesh>_mesh_vertices` (float32
[V,3], the vertices handed to the original), `voxelize_<mesh>_mesh_faces` (int32 [F,3]) and
`voxelize_<mesh>_coords` (int32 [N,3], the original's output, sorted lexicographically; open3d returns
hash-map order, which carries no meaning). The original normalises the mesh into the unit cube and calls
open3d 0.20's `VoxelGrid.create_from_triangle_mesh_within_bounds` at voxel size 1/64; the vertices are
rounded to float32 BEFORE they are given to it, so the recorded vertices are exactly its input.

Shapes: icospheres of subdivisions 0..3 (trimesh), one rotated; axis-aligned boxes whose faces land exactly
on voxel planes after normalisation; rotated and scaled boxes; thin, needle and zero-area triangles; quads
lying exactly on voxel planes and on voxel edges; triangles snapped to the half-voxel grid (ties
everywhere); a diagonal plane through voxel edges; a seeded random triangle soup; and, with --base, the
torus and box of the reference pipelines fixture.
"""
import one_thread  # noqa: F401  (first: one thread for spconv/torch, see one_thread.py)
import argparse
import json
import os
import shutil
import sys

import numpy as np
import open3d  # noqa: F401  the real package: import it before common.py, which stubs absent packages
import trimesh

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *  # noqa: E402,F401  (sets up the original TRELLIS on CPU)
from safetensors.numpy import load_file, save_file  # noqa: E402

from trellis.pipelines.trellis_text_to_3d import TrellisTextTo3DPipeline  # noqa: E402

G = 1.0 / 64  # the original's voxel size


def rotation(axis, deg):
    return trimesh.transformations.rotation_matrix(np.radians(deg), axis)[:3, :3]


def box(extents, rot=None):
    m = trimesh.creation.box(extents=extents)
    v = m.vertices if rot is None else m.vertices @ rot.T
    return v, m.faces


def frame():
    """Two small triangles at opposite corners: the bounding box is exactly [-0.5, 0.5]^3, so that added
    geometry keeps its coordinates through the original's normalisation (centre 0, scale 1)."""
    e = G / 4
    v = np.array([[-0.5, -0.5, -0.5], [-0.5 + e, -0.5, -0.5], [-0.5, -0.5 + e, -0.5],
                  [0.5, 0.5, 0.5], [0.5 - e, 0.5, 0.5], [0.5, 0.5 - e, 0.5]])
    return v, np.array([[0, 1, 2], [3, 4, 5]])


def join(*parts):
    vs, fs, n = [], [], 0
    for v, f in parts:
        vs.append(np.asarray(v, dtype=np.float64))
        fs.append(np.asarray(f, dtype=np.int64) + n)
        n += len(v)
    return np.concatenate(vs), np.concatenate(fs)


def on_planes():
    """Axis-aligned quads lying exactly on voxel planes (x, y and z = k/64 - 1/2) and triangles whose
    edges run along voxel edges, inside the frame."""
    parts = [frame()]
    for axis, k, (a0, a1, b0, b1) in [(0, 20, (10, 30, 12, 40)), (1, 33, (5, 17, 40, 60)), (2, 48, (0, 64, 0, 64)),
                                      (2, 7, (3, 4, 3, 4))]:
        c = k * G - 0.5
        q = []
        for a, b in [(a0, b0), (a1, b0), (a1, b1), (a0, b1)]:
            p = [0.0, 0.0, 0.0]
            p[axis] = c
            p[(axis + 1) % 3] = a * G - 0.5
            p[(axis + 2) % 3] = b * G - 0.5
            q.append(p)
        parts.append((q, [[0, 1, 2], [0, 2, 3]]))
    # a triangle whose three edges lie on voxel edges / diagonals of a voxel plane
    parts.append(([[10 * G - .5, 10 * G - .5, 30 * G - .5], [20 * G - .5, 10 * G - .5, 30 * G - .5],
                   [10 * G - .5, 20 * G - .5, 30 * G - .5]], [[0, 1, 2]]))
    # a segment-like triangle lying on a voxel edge line (x = y = grid)
    parts.append(([[40 * G - .5, 40 * G - .5, 5 * G - .5], [40 * G - .5, 40 * G - .5, 25 * G - .5],
                   [40 * G - .5, 40 * G - .5, 15 * G - .5]], [[0, 1, 2]]))
    return join(*parts)


def diagonal():
    """The plane x = y through voxel edges, and the plane x + y + z = 3/64 through voxel corners."""
    a, b = -0.5, 0.5
    p1 = ([[a, a, a], [b, b, a], [b, b, b], [a, a, b]], [[0, 1, 2], [0, 2, 3]])
    c = 3 * G
    p2 = ([[c, 0, 0], [0, c, 0], [0, 0, c]], [[0, 1, 2]])
    return join(frame(), p1, p2)


def thin(rng):
    """Needles, slivers and zero-area triangles (repeated vertex, collinear vertices) inside the frame."""
    parts = [frame()]
    for _ in range(12):
        p = rng.uniform(-0.45, 0.45, 3)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        q = p + 0.4 * d
        r = p + 0.2 * d + rng.normal(size=3) * 1e-7  # almost on the segment pq
        parts.append(([p, np.clip(q, -0.49, 0.49), r], [[0, 1, 2]]))
    p = np.array([0.1, -0.2, 0.3])
    parts.append(([p, p, p + [0.2, 0.1, 0.0]], [[0, 1, 2]]))  # repeated vertex: a segment
    parts.append(([p, p + [0.1, 0.1, 0.1], p + [0.2, 0.2, 0.2]], [[0, 1, 2]]))  # collinear
    parts.append(([[0.2, 0.2, 0.2]] * 3, [[0, 1, 2]]))  # a point
    return join(*parts)


def half_grid(rng):
    """Random triangles with every coordinate a multiple of 1/128: vertices on voxel planes and centres."""
    p = rng.integers(-56, 57, size=(40, 1, 3))
    v = (p + rng.integers(-10, 11, size=(40, 3, 3))).reshape(-1, 3) / 128.0
    f = np.arange(len(v)).reshape(-1, 3)
    return join(frame(), (v, f))


def soup(rng):
    v = rng.uniform(-1.3, 2.1, size=(90, 3)) * np.array([1.0, 0.7, 1.9])
    f = rng.integers(0, len(v), size=(50, 3))
    return v, f


def shapes(base, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(4):
        m = trimesh.creation.icosphere(subdivisions=s)
        out[f'icosphere{s}'] = (m.vertices, m.faces)
    m = trimesh.creation.icosphere(subdivisions=2)
    out['icosphere2_rotated'] = (m.vertices @ rotation([1, 2, 3], 37).T * [1.0, 0.8, 0.6], m.faces)
    out['box_planes'] = box([1.0, 0.5, 0.25])
    out['box_planes_odd'] = box([1.0, 0.75, 0.375])
    out['box_rotated'] = box([1.0, 0.6, 0.3], rotation([0, 0, 1], 30))
    out['box_rotated_scaled'] = box([2.0, 0.31, 1.37], rotation([1, 1, 0], 45) @ rotation([0, 0, 1], 17))
    out['box_rotated_45'] = box([1.0, 1.0, 1.0], rotation([0, 0, 1], 45))
    out['on_planes'] = on_planes()
    out['diagonal'] = diagonal()
    out['thin'] = thin(rng)
    out['half_grid'] = half_grid(rng)
    out['soup'] = soup(rng)
    if base is not None:
        bio = load_file(os.path.join(base, 'io.safetensors'))
        for name in ('torus', 'box'):
            if f'voxelize_{name}_mesh_vertices' in bio:
                out[name] = (bio[f'voxelize_{name}_mesh_vertices'], bio[f'voxelize_{name}_mesh_faces'])
    return out


def original_voxelize(vertices, faces):
    """The original's voxelize on an open3d mesh made of exactly these (float32-valued) vertices."""
    mesh = open3d.geometry.TriangleMesh()
    mesh.vertices = open3d.utility.Vector3dVector(vertices.astype(np.float64))
    mesh.triangles = open3d.utility.Vector3iVector(faces.astype(np.int32))
    coords = TrellisTextTo3DPipeline.voxelize(None, mesh).cpu().numpy().astype(np.int32)
    return coords[np.lexsort(coords.T[::-1])] if len(coords) else coords.reshape(0, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('out')
    ap.add_argument('--base', default=None, help='a reference pipelines fixture: its torus and box are added')
    ap.add_argument('--seed', type=int, default=2024)
    a = ap.parse_args()
    io, tensors = {}, {}
    for name, (v, f) in shapes(a.base, a.seed).items():
        v = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
        f = np.ascontiguousarray(np.asarray(f, dtype=np.int32))
        c = original_voxelize(v, f)
        io[f'voxelize_{name}_mesh_vertices'] = v
        io[f'voxelize_{name}_mesh_faces'] = f
        io[f'voxelize_{name}_coords'] = c
        tensors[f'voxelize_{name}_mesh_vertices'] = {'shape': list(v.shape), 'dtype': 'float32',
                                                     'desc': f'{name}: vertices given to the original voxelize'}
        tensors[f'voxelize_{name}_mesh_faces'] = {'shape': list(f.shape), 'dtype': 'int32',
                                                  'desc': f'{name}: triangles (vertex indices)'}
        tensors[f'voxelize_{name}_coords'] = {'shape': list(c.shape), 'dtype': 'int32',
                                              'desc': f'{name}: occupied voxels (x, y, z) at 64^3, sorted', 'tolerance': 'exact (as a set)'}
        print(f'  {name}: {len(v)} vertices, {len(f)} triangles -> {len(c)} voxels')
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    save_file(io, os.path.join(a.out, 'io.safetensors'))
    meta = {'kind': 'pipelines',
            'desc': 'Voxelisation only (section F of the reference README): TrellisTextTo3DPipeline.voxelize of the '
                    'original (normalise into the unit cube, clip to +-(0.5 - 1e-6), open3d '
                    'VoxelGrid.create_from_triangle_mesh_within_bounds at voxel size 1/64 over [-0.5, 0.5]^3). '
                    'No pipeline run and no model repository.',
            'generated_by': f'tools/reference/gen_voxelize.py seed {a.seed}, original TRELLIS 6b0d647, open3d '
                            f'{open3d.__version__}, trimesh {trimesh.__version__}, numpy {np.__version__}',
            'voxelization_resolution': 64,
            'tensors': tensors}
    json.dump(meta, open(os.path.join(a.out, 'meta.json'), 'w'), indent=1)
    print(f'gen_voxelize: {len(io) // 3} shapes -> {a.out}')


if __name__ == '__main__':
    main()
