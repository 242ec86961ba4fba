//! FlexiCubes surface extraction on a sparse grid: the twin of TRELLIS'
//! `trellis/representations/mesh/flexicubes/flexicubes.py` (`FlexiCubes.__call__` with
//! `training=False`) and of the grid helpers in `trellis/representations/mesh/utils_cube.py`
//! (`sparse_cube2verts`, `get_defomed_verts`) that `SparseFeatures2Mesh` feeds it with.
//!
//! The original works on a dense `(res+1)^3` vertex grid whose untouched vertices hold the
//! defaults (scalar 1, no deformation, colour logit 0) and whose untouched cubes hold zero raw
//! weights. Here only the vertices touched by active cubes are stored (a hash of vertex ids); a
//! missing vertex or cube reads those same defaults, so every cube the dense algorithm would
//! treat as a surface cube is found from the vertices with a negative scalar. Memory therefore
//! grows with the active cubes, never with the grid volume.
//!
//! Output order follows the original: dual vertices grouped by the number of dual vertices of
//! their cube (ascending), then by cube id (x-major), then by group; quads are emitted per surface
//! edge in lexicographic (v0, v1) order, first those whose first endpoint is outside (`s0 > 0`),
//! then the others, each split into two triangles by the gamma rule.

mod tables;
#[cfg(test)]
mod tests;

use rayon::prelude::*;
pub use tables::{CHECK_TABLE, DMC_TABLE, NUM_VD_TABLE, TET_TABLE};

/// Cube corners as `(dx, dy, dz)`; corner `i` is `dx + 2*dy + 4*dz`.
pub const CUBE_CORNERS: [[i32; 3]; 8] = [
    [0, 0, 0],
    [1, 0, 0],
    [0, 1, 0],
    [1, 1, 0],
    [0, 0, 1],
    [1, 0, 1],
    [0, 1, 1],
    [1, 1, 1],
];

/// The 12 cube edges as corner pairs, in the order (and orientation) of the DMC tables:
/// x edges run low to high, z edges low to high, y edges high to low.
pub const CUBE_EDGES: [[usize; 2]; 12] = [
    [0, 1],
    [1, 5],
    [4, 5],
    [0, 4],
    [2, 3],
    [3, 7],
    [6, 7],
    [2, 6],
    [2, 0],
    [3, 1],
    [7, 5],
    [6, 4],
];

/// Channels of the per-cube weights: beta (12, one per edge), alpha (8, one per corner), gamma (1).
pub const WEIGHT_CHANNELS: usize = 21;

/// Largest supported resolution: vertex ids of a `(res+1)^3` grid must fit in 32 bits so that an
/// edge packs into one `u64`.
pub const MAX_RESOLUTION: usize = 1600;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FlexiCubesError {
    #[error("flexicubes: resolution {0} is outside 1..={MAX_RESOLUTION}")]
    Resolution(usize),
    #[error("flexicubes: {what} has {got} values, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("flexicubes: {what} {coord:?} lies outside the grid 0..{limit} per axis")]
    OutOfRange {
        what: &'static str,
        coord: [i32; 3],
        limit: usize,
    },
    #[error("flexicubes: {what} {coord:?} appears more than once")]
    Duplicate { what: &'static str, coord: [i32; 3] },
}

/// Open-addressing hash from `u64` keys to `u32` row numbers (linear probing).
struct KeyIndex {
    slots: Vec<(u64, u32)>,
    mask: usize,
}

const EMPTY: u64 = u64::MAX;

fn mix(k: u64) -> u64 {
    // splitmix64 finaliser
    let mut z = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl KeyIndex {
    fn with_capacity(n: usize) -> Self {
        let cap = (n.max(4) * 2).next_power_of_two();
        Self {
            slots: vec![(EMPTY, 0); cap],
            mask: cap - 1,
        }
    }

    /// Inserts `key -> value`; returns false when the key was already present.
    fn insert(&mut self, key: u64, value: u32) -> bool {
        let mut i = (mix(key) as usize) & self.mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.0 == EMPTY {
                *slot = (key, value);
                return true;
            }
            if slot.0 == key {
                return false;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn get(&self, key: u64) -> Option<u32> {
        let mut i = (mix(key) as usize) & self.mask;
        loop {
            let slot = self.slots[i];
            if slot.0 == key {
                return Some(slot.1);
            }
            if slot.0 == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }
}

fn check_res(res: usize) -> Result<(), FlexiCubesError> {
    if res == 0 || res > MAX_RESOLUTION {
        return Err(FlexiCubesError::Resolution(res));
    }
    Ok(())
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<(), FlexiCubesError> {
    if got != expected {
        return Err(FlexiCubesError::Length {
            what,
            got,
            expected,
        });
    }
    Ok(())
}

fn in_range(c: [i32; 3], limit: usize) -> bool {
    c.iter().all(|&v| v >= 0 && (v as usize) < limit)
}

/// Dense id of a point of a grid with `side` points per axis (x-major, z fastest).
fn grid_id(c: [i32; 3], side: usize) -> u64 {
    let s = side as u64;
    (c[0] as u64 * s + c[1] as u64) * s + c[2] as u64
}

fn grid_coord(id: u64, side: usize) -> [i32; 3] {
    let s = side as u64;
    [
        (id / (s * s)) as i32,
        ((id / s) % s) as i32,
        (id % s) as i32,
    ]
}

fn add(a: [i32; 3], b: [i32; 3]) -> [i32; 3] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

fn sub(a: [i32; 3], b: [i32; 3]) -> [i32; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Grid vertices touched by active cubes, with the per-corner attributes of the cubes averaged
/// over the cubes sharing each vertex (`sparse_cube2verts` / `cubes_to_verts(reduce='mean')`).
#[derive(Debug, Clone, PartialEq)]
pub struct GridVertices {
    /// Vertex coordinates, unique and sorted lexicographically by (x, y, z).
    pub coords: Vec<[i32; 3]>,
    /// `[V, dim]` averaged attributes.
    pub attrs: Vec<f32>,
    pub dim: usize,
}

/// Where per-corner attributes sit in a cube's feature row: `stride` values per cube; each
/// segment `(base, width)` holds `width` values per corner, corner `k` at `base + k * width`.
/// The averaged vertex attributes are the segments' values concatenated (`dim` = sum of widths).
#[derive(Debug, Clone, Copy)]
pub struct CornerLayout<'a> {
    pub stride: usize,
    pub segments: &'a [(usize, usize)],
}

impl CornerLayout<'_> {
    pub fn dim(&self) -> usize {
        self.segments.iter().map(|s| s.1).sum()
    }
}

/// Averages per-corner cube attributes onto the grid vertices.
///
/// `cubes` are active cube coordinates in `0..res`; `feats` holds one row of `layout.stride`
/// values per cube (corners in [`CUBE_CORNERS`] order). Sums run in cube order, then corner order,
/// as the original scatter does; the feature rows are read in place (no per-corner copy).
pub fn cube_corners_to_vertices(
    res: usize,
    cubes: &[[i32; 3]],
    feats: &[f32],
    layout: CornerLayout<'_>,
) -> Result<GridVertices, FlexiCubesError> {
    check_res(res)?;
    check_len("cube features", feats.len(), cubes.len() * layout.stride)?;
    if let Some(&(base, width)) = layout
        .segments
        .iter()
        .find(|(b, w)| b + 8 * w > layout.stride)
    {
        return Err(FlexiCubesError::Length {
            what: "cube feature row (corner segment end)",
            got: layout.stride,
            expected: base + 8 * width,
        });
    }
    let dim = layout.dim();
    if let Some(c) = cubes.iter().find(|c| !in_range(**c, res)) {
        return Err(FlexiCubesError::OutOfRange {
            what: "cube",
            coord: *c,
            limit: res,
        });
    }
    let side = res + 1;
    let mut keys: Vec<u64> = cubes
        .par_iter()
        .flat_map_iter(|&c| CUBE_CORNERS.iter().map(move |&d| grid_id(add(c, d), side)))
        .collect();
    keys.par_sort_unstable();
    keys.dedup();
    let mut index = KeyIndex::with_capacity(keys.len());
    for (i, &k) in keys.iter().enumerate() {
        index.insert(k, i as u32);
    }
    let corner_rows: Vec<u32> = cubes
        .par_iter()
        .flat_map_iter(|&c| {
            let index = &index;
            CUBE_CORNERS
                .iter()
                .map(move |&d| index.get(grid_id(add(c, d), side)).unwrap_or(0))
        })
        .collect();
    let v = keys.len();
    let mut sums = vec![0f32; v * dim];
    let mut counts = vec![0u32; v];
    for (j, &row) in corner_rows.iter().enumerate() {
        let row = row as usize;
        counts[row] += 1;
        let (cube, corner) = (j / 8, j % 8);
        let src = &feats[cube * layout.stride..(cube + 1) * layout.stride];
        let mut dst = sums[row * dim..(row + 1) * dim].iter_mut();
        for &(base, width) in layout.segments {
            let o = base + corner * width;
            // the source first: zip stops on it without taking an extra destination slot
            for (s, d) in src[o..o + width].iter().zip(dst.by_ref()) {
                *d += *s;
            }
        }
    }
    drop(corner_rows);
    sums.par_chunks_mut(dim.max(1))
        .zip(counts.par_iter())
        .for_each(|(row, &n)| {
            let n = n as f32;
            row.iter_mut().for_each(|x| *x /= n);
        });
    let coords = keys.iter().map(|&k| grid_coord(k, side)).collect();
    Ok(GridVertices {
        coords,
        attrs: sums,
        dim,
    })
}

/// The deformation scale `(1 - 1e-8) / (2 res)` of `get_defomed_verts`, rounded to float32.
fn deform_scale(res: usize) -> f32 {
    ((1.0 - 1e-8) / (res as f64 * 2.0)) as f32
}

/// `v / res - 0.5 + (1 - 1e-8) / (2 res) * tanh(deform)` in float32 (`get_defomed_verts`).
pub fn deformed_position(v: [i32; 3], deform: [f32; 3], res: usize) -> [f32; 3] {
    let r = res as f32;
    let k = deform_scale(res);
    std::array::from_fn(|i| (v[i] as f32 / r - 0.5) + k * deform[i].tanh())
}

/// Deformed positions of vertices given `[V, stride]` attributes whose deformation occupies
/// columns `offset..offset+3`.
pub fn deform_vertices(
    res: usize,
    coords: &[[i32; 3]],
    attrs: &[f32],
    stride: usize,
    offset: usize,
) -> Result<Vec<[f32; 3]>, FlexiCubesError> {
    check_res(res)?;
    check_len("vertex attrs", attrs.len(), coords.len() * stride)?;
    if offset + 3 > stride {
        return Err(FlexiCubesError::Length {
            what: "vertex attr row (deformation columns)",
            got: stride,
            expected: offset + 3,
        });
    }
    Ok(coords
        .par_iter()
        .enumerate()
        .map(|(i, &c)| {
            let d = &attrs[i * stride + offset..i * stride + offset + 3];
            deformed_position(c, [d[0], d[1], d[2]], res)
        })
        .collect())
}

/// The scalar field, deformed positions and colours of a sparse grid, plus per-cube weights.
/// Vertices absent from `vertex_coords` hold scalar 1, no deformation and colour logit 0; cubes
/// absent from `cube_coords` hold raw weights 0 (the dense defaults of `SparseFeatures2Mesh`).
pub struct SparseGrid<'a> {
    /// Cubes per axis.
    pub res: usize,
    /// Vertex coordinates in `0..=res` (any order, no duplicates).
    pub vertex_coords: &'a [[i32; 3]],
    /// `[V]` scalar field (negative = inside).
    pub sdf: &'a [f32],
    /// `[V]` vertex positions (already deformed).
    pub positions: &'a [[f32; 3]],
    /// `[V, color_dim]` colour logits (a sigmoid is applied, as in the original), if any.
    pub colors: Option<&'a [f32]>,
    pub color_dim: usize,
    /// Coordinates of the cubes that carry weights (in `0..res`, no duplicates).
    pub cube_coords: &'a [[i32; 3]],
    /// Raw weights (beta 12 | alpha 8 | gamma 1) of `cube_coords`, one row each; `None` =
    /// FlexiCubes' "no weights" mode (all normalised weights 1).
    pub cube_weights: Option<RowView<'a>>,
}

/// `WEIGHT_CHANNELS` values per row at `offset` within rows of `stride` values.
#[derive(Debug, Clone, Copy)]
pub struct RowView<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub offset: usize,
}

impl<'a> RowView<'a> {
    /// Rows holding exactly the 21 weights.
    pub fn packed(data: &'a [f32]) -> Self {
        Self {
            data,
            stride: WEIGHT_CHANNELS,
            offset: 0,
        }
    }

    fn row(&self, r: usize) -> &'a [f32] {
        let o = r * self.stride + self.offset;
        &self.data[o..o + WEIGHT_CHANNELS]
    }
}

/// Options of `FlexiCubes.__call__` that matter at inference.
#[derive(Debug, Clone, Copy)]
pub struct FlexiCubesOptions {
    pub weight_scale: f32,
}

impl Default for FlexiCubesOptions {
    fn default() -> Self {
        Self { weight_scale: 0.99 }
    }
}

/// The extracted triangle mesh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtractedMesh {
    pub vertices: Vec<[f32; 3]>,
    /// Triangles as indices into `vertices`.
    pub faces: Vec<[i32; 3]>,
    /// `[V, color_dim]` interpolated colours (empty without colours).
    pub colors: Vec<f32>,
    pub color_dim: usize,
}

/// A surface cube: one whose corners are neither all inside nor all outside.
#[derive(Clone, Copy)]
struct SurfCube {
    key: u64,
    coord: [i32; 3],
    /// Vertex rows of the corners (`u32::MAX` = vertex absent, defaults apply).
    corners: [u32; 8],
    case: u8,
}

const ABSENT: u32 = u32::MAX;

/// Normalised weights of one cube (`_normalize_weights`).
struct CubeWeights {
    beta: [f32; 12],
    alpha: [f32; 8],
    gamma: f32,
}

/// For every case, the dual-vertex group of each cube edge (-1 when the edge is in none).
pub fn edge_group_table() -> [[i8; 12]; 256] {
    let mut t = [[-1i8; 12]; 256];
    for (case, groups) in DMC_TABLE.iter().enumerate() {
        for (g, edges) in groups.iter().enumerate() {
            for &e in edges.iter().filter(|&&e| e >= 0) {
                t[case][e as usize] = g as i8;
            }
        }
    }
    t
}

struct Grid<'a> {
    g: &'a SparseGrid<'a>,
    vertex_index: KeyIndex,
    cube_index: KeyIndex,
    opts: FlexiCubesOptions,
}

impl Grid<'_> {
    fn sdf(&self, row: u32) -> f32 {
        if row == ABSENT {
            1.0
        } else {
            self.g.sdf[row as usize]
        }
    }

    fn position(&self, row: u32, coord: [i32; 3]) -> [f32; 3] {
        if row == ABSENT {
            deformed_position(coord, [0.0; 3], self.g.res)
        } else {
            self.g.positions[row as usize]
        }
    }

    fn color(&self, row: u32, ch: usize) -> f32 {
        let c = self.g.color_dim;
        let logit = match (row, self.g.colors) {
            (ABSENT, _) | (_, None) => 0.0,
            (r, Some(colors)) => colors[r as usize * c + ch],
        };
        sigmoid(logit)
    }

    fn weights(&self, cube_key: u64) -> CubeWeights {
        let ws = self.opts.weight_scale;
        let Some(all) = self.g.cube_weights else {
            return CubeWeights {
                beta: [1.0; 12],
                alpha: [1.0; 8],
                gamma: 1.0,
            };
        };
        let zero = [0f32; WEIGHT_CHANNELS];
        let raw = match self.cube_index.get(cube_key) {
            Some(r) => all.row(r as usize),
            None => &zero[..],
        };
        let gamma_shift = ((1.0 - ws as f64) / 2.0) as f32;
        CubeWeights {
            beta: std::array::from_fn(|i| raw[i].tanh() * ws + 1.0),
            alpha: std::array::from_fn(|i| raw[12 + i].tanh() * ws + 1.0),
            gamma: sigmoid(raw[20]) * ws + gamma_shift,
        }
    }
}

/// The intermediates of one extraction, for comparing another implementation (the GPU one)
/// stage by stage: what [`extract_traced`] fills in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExtractTrace {
    /// Surface cube ids (`grid_id` on the `res` grid: x-major, z fastest), ascending.
    pub surf_cubes: Vec<u64>,
    /// Their case ids before the ambiguity check.
    pub raw_cases: Vec<u8>,
    /// Their case ids after it.
    pub cases: Vec<u8>,
    /// Gamma of every dual vertex (output order).
    pub gammas: Vec<f32>,
    /// Sign-changing grid edges as `v0 << 32 | v1` (vertex ids on the `res + 1` grid), sorted,
    /// unique.
    pub edges: Vec<u64>,
}

/// Runs FlexiCubes (inference mode) on a sparse grid.
pub fn extract(
    grid: &SparseGrid<'_>,
    opts: FlexiCubesOptions,
) -> Result<ExtractedMesh, FlexiCubesError> {
    extract_traced(grid, opts, None)
}

/// [`extract`], recording its intermediates in `trace` when given.
pub fn extract_traced(
    grid: &SparseGrid<'_>,
    opts: FlexiCubesOptions,
    mut trace: Option<&mut ExtractTrace>,
) -> Result<ExtractedMesh, FlexiCubesError> {
    let res = grid.res;
    check_res(res)?;
    let side = res + 1;
    let nv = grid.vertex_coords.len();
    check_len("sdf", grid.sdf.len(), nv)?;
    check_len("positions", grid.positions.len(), nv)?;
    let color_dim = if grid.colors.is_some() {
        grid.color_dim
    } else {
        0
    };
    if let Some(c) = grid.colors {
        check_len("colors", c.len(), nv * color_dim)?;
    }
    if let Some(w) = grid.cube_weights {
        if w.offset + WEIGHT_CHANNELS > w.stride {
            return Err(FlexiCubesError::Length {
                what: "cube weight row",
                got: w.stride,
                expected: w.offset + WEIGHT_CHANNELS,
            });
        }
        check_len(
            "cube_weights",
            w.data.len(),
            grid.cube_coords.len() * w.stride,
        )?;
    }

    let mut vertex_index = KeyIndex::with_capacity(nv);
    for (i, &c) in grid.vertex_coords.iter().enumerate() {
        if !in_range(c, side) {
            return Err(FlexiCubesError::OutOfRange {
                what: "vertex",
                coord: c,
                limit: side,
            });
        }
        if !vertex_index.insert(grid_id(c, side), i as u32) {
            return Err(FlexiCubesError::Duplicate {
                what: "vertex",
                coord: c,
            });
        }
    }
    let mut cube_index = KeyIndex::with_capacity(grid.cube_coords.len());
    for (i, &c) in grid.cube_coords.iter().enumerate() {
        if !in_range(c, res) {
            return Err(FlexiCubesError::OutOfRange {
                what: "cube",
                coord: c,
                limit: res,
            });
        }
        if !cube_index.insert(grid_id(c, res), i as u32) {
            return Err(FlexiCubesError::Duplicate {
                what: "cube",
                coord: c,
            });
        }
    }
    let ctx = Grid {
        g: grid,
        vertex_index,
        cube_index,
        opts,
    };

    let surf = surface_cubes(&ctx);
    if surf.is_empty() {
        return Ok(ExtractedMesh {
            color_dim,
            ..Default::default()
        });
    }
    let mut surf_index = KeyIndex::with_capacity(surf.len());
    for (i, s) in surf.iter().enumerate() {
        surf_index.insert(s.key, i as u32);
    }
    let cases = resolve_cases(&surf, &surf_index, res);
    if let Some(t) = trace.as_deref_mut() {
        t.surf_cubes = surf.iter().map(|s| s.key).collect();
        t.raw_cases = surf.iter().map(|s| s.case).collect();
        t.cases = cases.clone();
    }

    // Dual vertex numbering: by vd count, then cube order, then group.
    let mut per_num: [Vec<u32>; 5] = Default::default();
    for (i, &case) in cases.iter().enumerate() {
        per_num[NUM_VD_TABLE[case as usize] as usize].push(i as u32);
    }
    let mut base = vec![0u32; surf.len()];
    let mut total = 0usize;
    let mut segments = Vec::new();
    for (num, cubes) in per_num.iter().enumerate().skip(1) {
        segments.push((num, total, cubes));
        for (rank, &c) in cubes.iter().enumerate() {
            base[c as usize] = (total + rank * num) as u32;
        }
        total += cubes.len() * num;
    }

    // Colours use a stride of at least 1 so the chunked loop below needs no special case.
    let cstride = color_dim.max(1);
    let mut vertices = vec![[0f32; 3]; total];
    let mut colors = vec![0f32; total * cstride];
    let mut gammas = vec![0f32; total];
    for &(num, start, cubes) in &segments {
        let n = cubes.len() * num;
        vertices[start..start + n]
            .par_chunks_mut(num)
            .zip(gammas[start..start + n].par_chunks_mut(num))
            .zip(colors[start * cstride..(start + n) * cstride].par_chunks_mut(num * cstride))
            .zip(cubes.par_iter())
            .for_each(|(((v, g), c), &ci)| {
                let ci = ci as usize;
                dual_vertices(&ctx, &surf[ci], cases[ci], v, g, c, color_dim);
            });
    }
    if color_dim == 0 {
        colors.clear();
    }

    let (faces, edges) = triangulate(&ctx, &surf, &surf_index, &cases, &base, &gammas);
    if let Some(t) = trace {
        t.gammas = gammas;
        t.edges = edges;
    }
    Ok(ExtractedMesh {
        vertices,
        faces,
        colors,
        color_dim,
    })
}

/// The surface cubes sorted by cube id (`_identify_surf_cubes`). A surface cube has a negative
/// corner, so the candidates are the cubes around the vertices with a negative scalar.
fn surface_cubes(ctx: &Grid<'_>) -> Vec<SurfCube> {
    let g = ctx.g;
    let res = g.res;
    let side = res + 1;
    let mut keys: Vec<u64> = g
        .vertex_coords
        .par_iter()
        .zip(g.sdf.par_iter())
        .filter(|(_, &s)| s < 0.0)
        .flat_map_iter(|(&v, _)| {
            CUBE_CORNERS.iter().filter_map(move |&d| {
                let c = sub(v, d);
                in_range(c, res).then(|| grid_id(c, res))
            })
        })
        .collect();
    keys.par_sort_unstable();
    keys.dedup();
    keys.par_iter()
        .filter_map(|&key| {
            let coord = grid_coord(key, res);
            let corners: [u32; 8] = std::array::from_fn(|i| {
                ctx.vertex_index
                    .get(grid_id(add(coord, CUBE_CORNERS[i]), side))
                    .unwrap_or(ABSENT)
            });
            let mut case = 0u8;
            for (i, &row) in corners.iter().enumerate() {
                if ctx.sdf(row) < 0.0 {
                    case |= 1 << i;
                }
            }
            (case != 0 && case != 255).then_some(SurfCube {
                key,
                coord,
                corners,
                case,
            })
        })
        .collect()
}

/// Case ids after the ambiguity check (`_get_case_id`): a flagged cube whose neighbour in the
/// table's direction is a flagged surface cube too takes the table's replacement case.
fn resolve_cases(surf: &[SurfCube], surf_index: &KeyIndex, res: usize) -> Vec<u8> {
    surf.par_iter()
        .map(|s| {
            let check = &CHECK_TABLE[s.case as usize];
            if check[0] != 1 {
                return s.case;
            }
            let adj = add(s.coord, [check[1], check[2], check[3]]);
            if !in_range(adj, res) {
                return s.case;
            }
            match surf_index.get(grid_id(adj, res)) {
                Some(j) if CHECK_TABLE[surf[j as usize].case as usize][0] == 1 => check[4] as u8,
                _ => s.case,
            }
        })
        .collect()
}

/// The dual vertices of one cube (`_compute_vd`): per group, the beta-weighted mean of the
/// alpha-weighted zero crossings of its edges; colours interpolated the same way. `out_c` holds
/// `color_dim` values per dual vertex (it is zeroed on entry).
fn dual_vertices(
    ctx: &Grid<'_>,
    cube: &SurfCube,
    case: u8,
    out_v: &mut [[f32; 3]],
    out_g: &mut [f32],
    out_c: &mut [f32],
    color_dim: usize,
) {
    let w = ctx.weights(cube.key);
    let corner_pos: [[f32; 3]; 8] =
        std::array::from_fn(|i| ctx.position(cube.corners[i], add(cube.coord, CUBE_CORNERS[i])));
    let corner_sdf: [f32; 8] = std::array::from_fn(|i| ctx.sdf(cube.corners[i]));
    for (k, edges) in DMC_TABLE[case as usize]
        .iter()
        .enumerate()
        .take(out_v.len())
    {
        let mut acc = [0f32; 3];
        let mut beta_sum = 0f32;
        let acc_col = &mut out_c[k * color_dim..(k + 1) * color_dim];
        for &e in edges.iter().take_while(|&&e| e >= 0) {
            let [a, b] = CUBE_EDGES[e as usize];
            let w0 = corner_sdf[a] * w.alpha[a];
            let w1 = corner_sdf[b] * w.alpha[b];
            // _linear_interp: the endpoint weights become [w1, -w0]
            let (n0, n1) = (w1, -w0);
            let den = n0 + n1;
            let beta = w.beta[e as usize];
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let ue = (corner_pos[a][i] * n0 + corner_pos[b][i] * n1) / den;
                *acc_i += ue * beta;
            }
            for (ch, acc_ch) in acc_col.iter_mut().enumerate() {
                let ca = ctx.color(cube.corners[a], ch);
                let cb = ctx.color(cube.corners[b], ch);
                *acc_ch += (ca * n0 + cb * n1) / den * beta;
            }
            beta_sum += beta;
        }
        out_v[k] = acc.map(|x| x / beta_sum);
        out_g[k] = w.gamma;
        acc_col.iter_mut().for_each(|x| *x /= beta_sum);
    }
}

/// Quads around surface edges shared by 4 surface cubes, split into triangles (`_triangulate`);
/// the sorted sign-changing edges come back too.
fn triangulate(
    ctx: &Grid<'_>,
    surf: &[SurfCube],
    surf_index: &KeyIndex,
    cases: &[u8],
    base: &[u32],
    gammas: &[f32],
) -> (Vec<[i32; 3]>, Vec<u64>) {
    let res = ctx.g.res;
    let side = res + 1;
    // Sign-changing edges as (v0 << 32 | v1) in cube-edge orientation, sorted and unique.
    let mut edges: Vec<u64> = surf
        .par_iter()
        .flat_map_iter(|s| {
            CUBE_EDGES.iter().filter_map(move |&[a, b]| {
                let (sa, sb) = (ctx.sdf(s.corners[a]), ctx.sdf(s.corners[b]));
                ((sa < 0.0) != (sb < 0.0)).then(|| {
                    let va = grid_id(add(s.coord, CUBE_CORNERS[a]), side);
                    let vb = grid_id(add(s.coord, CUBE_CORNERS[b]), side);
                    (va << 32) | vb
                })
            })
        })
        .collect();
    edges.par_sort_unstable();
    edges.dedup();
    let groups = edge_group_table();

    // Per edge: Some((flip, quad of dual vertex ids)) when 4 surface cubes share it.
    let quads: Vec<Option<(bool, [u32; 4])>> = edges
        .par_iter()
        .map(|&packed| {
            let p0 = grid_coord(packed >> 32, side);
            let p1 = grid_coord(packed & 0xFFFF_FFFF, side);
            let lo = [p0[0].min(p1[0]), p0[1].min(p1[1]), p0[2].min(p1[2])];
            let axis = (0..3).find(|&i| p0[i] != p1[i]).unwrap_or(0);
            let (u, w) = ((axis + 1) % 3, (axis + 2) % 3);
            let mut found: [(u64, u32); 4] = [(0, 0); 4];
            let mut n = 0;
            for j in 0..2 {
                for k in 0..2 {
                    let mut c = lo;
                    c[u] -= j;
                    c[w] -= k;
                    if !in_range(c, res) {
                        continue;
                    }
                    let key = grid_id(c, res);
                    if let Some(i) = surf_index.get(key) {
                        found[n] = (key, i);
                        n += 1;
                    }
                }
            }
            if n != 4 {
                return None;
            }
            found.sort_unstable_by_key(|f| f.0);
            let quad = found.map(|(_, i)| {
                let s = &surf[i as usize];
                let ia = corner_index(sub(p0, s.coord));
                let ib = corner_index(sub(p1, s.coord));
                let e = CUBE_EDGES
                    .iter()
                    .position(|&[a, b]| (a, b) == (ia, ib) || (a, b) == (ib, ia))
                    .unwrap_or(0);
                let g = groups[cases[i as usize] as usize][e];
                // The original's vd index map is zero-initialised: an edge in no group reads 0.
                if g < 0 {
                    0
                } else {
                    base[i as usize] + g as u32
                }
            });
            let s0 = ctx.sdf(ctx.vertex_index.get(packed >> 32).unwrap_or(ABSENT));
            Some((s0 > 0.0, quad))
        })
        .collect();

    let split = |q: [u32; 4]| -> [[i32; 3]; 2] {
        let g: [f32; 4] = q.map(|i| gammas[i as usize]);
        let q = q.map(|i| i as i32);
        if g[0] * g[2] > g[1] * g[3] {
            [[q[0], q[1], q[2]], [q[0], q[2], q[3]]]
        } else {
            [[q[0], q[1], q[3]], [q[3], q[1], q[2]]]
        }
    };
    let mut faces = Vec::with_capacity(quads.iter().flatten().count() * 2);
    for q in quads.iter().flatten().filter(|q| q.0) {
        let [a, b, c, d] = q.1;
        faces.extend(split([a, b, d, c]));
    }
    for q in quads.iter().flatten().filter(|q| !q.0) {
        let [a, b, c, d] = q.1;
        faces.extend(split([c, d, b, a]));
    }
    (faces, edges)
}

/// Corner number of an offset in `{0,1}^3`.
fn corner_index(d: [i32; 3]) -> usize {
    (d[0] + 2 * d[1] + 4 * d[2]) as usize
}
