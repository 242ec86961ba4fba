//! Tests of the sparse FlexiCubes: table invariants, a literal dense re-statement of the original
//! algorithm (all cubes of the grid, `unique` over every cube edge, stable sort of quads) that the
//! sparse version must reproduce bit for bit and in the same order, and geometric checks on a sphere.

use super::*;

/// `[N, 8, dim]` rows: one segment of `dim` values per corner.
fn packed(dim: usize) -> CornerLayout<'static> {
    let segs: &'static [(usize, usize)] = Box::leak(Box::new([(0, dim)]));
    CornerLayout {
        stride: 8 * dim,
        segments: segs,
    }
}

/// xorshift64* — deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn sign_change_edges(case: usize) -> Vec<usize> {
    (0..12)
        .filter(|&e| {
            let [a, b] = CUBE_EDGES[e];
            ((case >> a) & 1) != ((case >> b) & 1)
        })
        .collect()
}

#[test]
fn dmc_groups_cover_exactly_the_sign_changing_edges() {
    for case in 0..256 {
        let groups: Vec<Vec<usize>> = DMC_TABLE[case]
            .iter()
            .map(|g| g.iter().filter(|&&e| e >= 0).map(|&e| e as usize).collect())
            .filter(|g: &Vec<usize>| !g.is_empty())
            .collect();
        assert_eq!(groups.len(), NUM_VD_TABLE[case] as usize, "case {case}");
        // groups are prefixes: no empty group before a non-empty one
        for (k, g) in DMC_TABLE[case].iter().enumerate() {
            assert_eq!(g[0] >= 0, k < groups.len(), "case {case} group {k}");
        }
        let mut all: Vec<usize> = groups.concat();
        all.sort_unstable();
        assert_eq!(all, sign_change_edges(case), "case {case}");
    }
}

#[test]
fn check_table_replaces_ambiguous_cases_by_their_complement() {
    let mut flagged = 0;
    for case in 0..256 {
        let c = CHECK_TABLE[case];
        if c[0] == 0 {
            assert_eq!(c, [0; 5]);
            continue;
        }
        flagged += 1;
        assert_eq!(c[0], 1);
        // exactly one axis step
        assert_eq!(c[1].abs() + c[2].abs() + c[3].abs(), 1, "case {case}");
        let r = c[4] as usize;
        assert_eq!(r, 255 - case, "case {case}");
        assert_eq!(sign_change_edges(r), sign_change_edges(case));
        assert!(NUM_VD_TABLE[r] > NUM_VD_TABLE[case]);
    }
    assert_eq!(flagged, 36);
}

#[test]
fn edge_orientation_matches_the_stated_convention() {
    for [a, b] in CUBE_EDGES {
        let (ca, cb) = (CUBE_CORNERS[a], CUBE_CORNERS[b]);
        let d = sub(cb, ca);
        assert_eq!(d.iter().map(|v| v.abs()).sum::<i32>(), 1);
        // y edges point down, x and z edges up
        if d[1] != 0 {
            assert_eq!(d[1], -1);
        } else {
            assert_eq!(d.iter().sum::<i32>(), 1);
        }
        assert_eq!(corner_index(ca), a);
    }
    assert!(TET_TABLE.iter().flatten().all(|&v| (-1..=12).contains(&v)));
}

#[test]
fn corner_attributes_are_averaged_per_vertex() {
    // two cubes sharing the face x = 1
    let cubes = [[0, 0, 0], [1, 0, 0]];
    let mut attrs = vec![0f32; 2 * 8];
    for (i, a) in attrs.iter_mut().enumerate() {
        *a = i as f32;
    }
    let g = cube_corners_to_vertices(2, &cubes, &attrs, packed(1)).unwrap();
    assert_eq!(g.coords.len(), 12);
    assert!(g.coords.windows(2).all(|w| w[0] < w[1]));
    for (v, &val) in g.coords.iter().zip(&g.attrs) {
        let mut sum = 0.0;
        let mut n = 0;
        for (ci, c) in cubes.iter().enumerate() {
            for (k, d) in CUBE_CORNERS.iter().enumerate() {
                if add(*c, *d) == *v {
                    sum += attrs[ci * 8 + k];
                    n += 1;
                }
            }
        }
        assert_eq!(val, sum / n as f32, "vertex {v:?}");
    }
}

#[test]
fn corner_segments_are_read_in_place() {
    // one cube, rows [a 8 | b 2*8]: vertex k gets [a_k, b_2k, b_2k+1]
    let row: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let layout = CornerLayout {
        stride: 24,
        segments: &[(0, 1), (8, 2)],
    };
    let g = cube_corners_to_vertices(1, &[[0, 0, 0]], &row, layout).unwrap();
    assert_eq!(g.dim, 3);
    for (v, attrs) in g.coords.iter().zip(g.attrs.chunks(3)) {
        let k = corner_index(*v) as f32;
        assert_eq!(attrs, &[k, 8.0 + 2.0 * k, 9.0 + 2.0 * k], "vertex {v:?}");
    }
    let too_short = CornerLayout {
        stride: 20,
        segments: &[(0, 1), (8, 2)],
    };
    assert!(cube_corners_to_vertices(1, &[[0, 0, 0]], &row[..20], too_short).is_err());
}

#[test]
fn bad_input_is_an_error() {
    assert_eq!(
        cube_corners_to_vertices(4, &[[0, 0, 4]], &[0.0; 8], packed(1)),
        Err(FlexiCubesError::OutOfRange {
            what: "cube",
            coord: [0, 0, 4],
            limit: 4
        })
    );
    assert!(matches!(
        cube_corners_to_vertices(4, &[[0, 0, 0]], &[0.0; 7], packed(1)),
        Err(FlexiCubesError::Length { .. })
    ));
    assert_eq!(
        cube_corners_to_vertices(0, &[], &[], packed(1)),
        Err(FlexiCubesError::Resolution(0))
    );
    let coords = [[0, 0, 0], [0, 0, 0]];
    let grid = SparseGrid {
        res: 2,
        vertex_coords: &coords,
        sdf: &[-1.0, -1.0],
        positions: &[[0.0; 3]; 2],
        colors: None,
        color_dim: 0,
        cube_coords: &[],
        cube_weights: Some(RowView::packed(&[])),
    };
    assert!(matches!(
        extract(&grid, FlexiCubesOptions::default()),
        Err(FlexiCubesError::Duplicate { .. })
    ));
}

/// Everything the dense statement needs, laid out on the full grid.
struct Dense {
    res: usize,
    sdf: Vec<f32>,
    pos: Vec<[f32; 3]>,
    col: Vec<f32>,
    cd: usize,
    weights: Vec<f32>,
}

impl Dense {
    fn from_sparse(g: &SparseGrid<'_>) -> Self {
        let res = g.res;
        let side = res + 1;
        let nv = side * side * side;
        let cd = g.color_dim;
        let mut sdf = vec![1f32; nv];
        let mut pos: Vec<[f32; 3]> = (0..nv as u64)
            .map(|id| deformed_position(grid_coord(id, side), [0.0; 3], res))
            .collect();
        let mut col = vec![0f32; nv * cd];
        for (i, &c) in g.vertex_coords.iter().enumerate() {
            let id = grid_id(c, side) as usize;
            sdf[id] = g.sdf[i];
            pos[id] = g.positions[i];
            if let Some(cs) = g.colors {
                col[id * cd..(id + 1) * cd].copy_from_slice(&cs[i * cd..(i + 1) * cd]);
            }
        }
        let mut weights = vec![0f32; res * res * res * WEIGHT_CHANNELS];
        let w = g.cube_weights.unwrap();
        let w = w.data;
        for (i, &c) in g.cube_coords.iter().enumerate() {
            let id = grid_id(c, res) as usize;
            weights[id * WEIGHT_CHANNELS..(id + 1) * WEIGHT_CHANNELS]
                .copy_from_slice(&w[i * WEIGHT_CHANNELS..(i + 1) * WEIGHT_CHANNELS]);
        }
        Self {
            res,
            sdf,
            pos,
            col: col.iter().map(|&x| sigmoid(x)).collect(),
            cd,
            weights,
        }
    }

    /// The original algorithm stated over every cube of the grid.
    fn extract(&self, ws: f32) -> ExtractedMesh {
        let res = self.res;
        let side = res + 1;
        let cube_idx: Vec<[usize; 8]> = (0..(res * res * res) as u64)
            .map(|id| {
                let c = grid_coord(id, res);
                std::array::from_fn(|k| grid_id(add(c, CUBE_CORNERS[k]), side) as usize)
            })
            .collect();
        let occ = |v: usize| self.sdf[v] < 0.0;
        let surf: Vec<usize> = (0..cube_idx.len())
            .filter(|&c| {
                let n = cube_idx[c].iter().filter(|&&v| occ(v)).count();
                n > 0 && n < 8
            })
            .collect();
        let case0: Vec<usize> = surf
            .iter()
            .map(|&c| (0..8).map(|k| (occ(cube_idx[c][k]) as usize) << k).sum())
            .collect();
        // _get_case_id with a dense problem-config volume
        let mut flagged = vec![false; cube_idx.len()];
        for (i, &c) in surf.iter().enumerate() {
            flagged[c] = CHECK_TABLE[case0[i]][0] == 1;
        }
        let mut case = case0.clone();
        for (i, &c) in surf.iter().enumerate() {
            let chk = CHECK_TABLE[case0[i]];
            if chk[0] != 1 {
                continue;
            }
            let adj = add(grid_coord(c as u64, res), [chk[1], chk[2], chk[3]]);
            if in_range(adj, res) && flagged[grid_id(adj, res) as usize] {
                case[i] = chk[4] as usize;
            }
        }
        // _identify_surf_edges: unique over all 12 edges of all surface cubes
        let all_edges: Vec<(usize, usize)> = surf
            .iter()
            .flat_map(|&c| CUBE_EDGES.iter().map(move |&[a, b]| (c, a, b)))
            .map(|(c, a, b)| (cube_idx[c][a], cube_idx[c][b]))
            .collect();
        let mut unique = all_edges.clone();
        unique.sort_unstable();
        unique.dedup();
        let inverse: Vec<usize> = all_edges
            .iter()
            .map(|e| unique.binary_search(e).unwrap())
            .collect();
        let mut counts = vec![0usize; unique.len()];
        inverse.iter().for_each(|&u| counts[u] += 1);
        let mask: Vec<bool> = unique.iter().map(|&(a, b)| occ(a) != occ(b)).collect();
        let mut mapping = vec![-1i64; unique.len()];
        let mut next = 0;
        for (u, m) in mask.iter().enumerate() {
            if *m {
                mapping[u] = next;
                next += 1;
            }
        }
        let surf_edges: Vec<(usize, usize)> = unique
            .iter()
            .zip(&mask)
            .filter(|p| *p.1)
            .map(|p| *p.0)
            .collect();
        let idx_map: Vec<i64> = inverse.iter().map(|&u| mapping[u]).collect();
        let edge_counts: Vec<usize> = inverse.iter().map(|&u| counts[u]).collect();
        let surf_edges_mask: Vec<bool> = inverse.iter().map(|&u| mask[u]).collect();
        // _normalize_weights
        let wt = |c: usize, i: usize| self.weights[c * WEIGHT_CHANNELS + i];
        let beta = |c: usize, e: usize| wt(c, e).tanh() * ws + 1.0;
        let alpha = |c: usize, k: usize| wt(c, 12 + k).tanh() * ws + 1.0;
        let gamma = |c: usize| sigmoid(wt(c, 20)) * ws + ((1.0 - ws as f64) / 2.0) as f32;
        // _compute_vd
        let mut nums: Vec<usize> = case.iter().map(|&c| NUM_VD_TABLE[c] as usize).collect();
        let mut distinct = nums.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let mut vd = Vec::new();
        let mut vd_col = Vec::new();
        let mut vd_gamma = Vec::new();
        let mut vd_idx_map = vec![0usize; surf.len() * 12];
        for &num in &distinct {
            for i in 0..surf.len() {
                if nums[i] != num {
                    continue;
                }
                let c = surf[i];
                for group in DMC_TABLE[case[i]].iter().take(num) {
                    let mut acc = [0f32; 3];
                    let mut accc = vec![0f32; self.cd];
                    let mut bsum = 0f32;
                    for &e in group.iter().take_while(|&&e| e >= 0) {
                        let e = e as usize;
                        let se = surf_edges[idx_map[i * 12 + e] as usize];
                        let [a, b] = CUBE_EDGES[e];
                        let w0 = self.sdf[se.0] * alpha(c, a);
                        let w1 = self.sdf[se.1] * alpha(c, b);
                        let (n0, n1) = (w1, -w0);
                        let den = n0 + n1;
                        let bt = beta(c, e);
                        for (d, acc_d) in acc.iter_mut().enumerate() {
                            *acc_d += (self.pos[se.0][d] * n0 + self.pos[se.1][d] * n1) / den * bt;
                        }
                        for (ch, acc_ch) in accc.iter_mut().enumerate() {
                            let (ca, cb) =
                                (self.col[se.0 * self.cd + ch], self.col[se.1 * self.cd + ch]);
                            *acc_ch += (ca * n0 + cb * n1) / den * bt;
                        }
                        bsum += bt;
                        vd_idx_map[i * 12 + e] = vd.len();
                    }
                    vd.push(acc.map(|x| x / bsum));
                    vd_col.extend(accc.iter().map(|x| x / bsum));
                    vd_gamma.push(gamma(c));
                }
            }
        }
        nums.clear();
        // _triangulate
        let mut group: Vec<(i64, usize)> = (0..surf.len() * 12)
            .filter(|&j| edge_counts[j] == 4 && surf_edges_mask[j])
            .map(|j| (idx_map[j], vd_idx_map[j]))
            .collect();
        group.sort_by_key(|g| g.0); // stable
        let mut flipped = Vec::new();
        let mut kept = Vec::new();
        for q in group.chunks(4) {
            let quad = [q[0].1, q[1].1, q[2].1, q[3].1];
            let se = surf_edges[q[0].0 as usize];
            if self.sdf[se.0] > 0.0 {
                flipped.push([quad[0], quad[1], quad[3], quad[2]]);
            } else {
                kept.push([quad[2], quad[3], quad[1], quad[0]]);
            }
        }
        let mut faces = Vec::new();
        for q in flipped.into_iter().chain(kept) {
            let g: [f32; 4] = q.map(|i| vd_gamma[i]);
            let q = q.map(|i| i as i32);
            if g[0] * g[2] > g[1] * g[3] {
                faces.push([q[0], q[1], q[2]]);
                faces.push([q[0], q[2], q[3]]);
            } else {
                faces.push([q[0], q[1], q[3]]);
                faces.push([q[3], q[1], q[2]]);
            }
        }
        ExtractedMesh {
            vertices: vd,
            faces,
            colors: vd_col,
            color_dim: self.cd,
        }
    }
}

/// Random active cubes (a fraction `density` of the grid) with random per-corner attributes
/// `[sdf, deform 3, color cd]` and random weights, as `SparseFeatures2Mesh` would feed them.
fn random_case(
    seed: u64,
    res: usize,
    density: f32,
    cd: usize,
) -> (Vec<[i32; 3]>, GridVertices, Vec<f32>) {
    let mut rng = Rng(seed);
    let mut cubes = Vec::new();
    for id in 0..(res * res * res) as u64 {
        if (rng.uniform() + 1.0) / 2.0 < density {
            cubes.push(grid_coord(id, res));
        }
    }
    // shuffle: the sparse path must not depend on the input order
    for i in (1..cubes.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        cubes.swap(i, j);
    }
    let dim = 4 + cd;
    let corner: Vec<f32> = (0..cubes.len() * 8 * dim)
        .map(|j| {
            let x = rng.uniform();
            if j % (8 * dim) < 8 {
                x * 0.6 + 0.1
            } else {
                x * 2.0
            }
        })
        .collect();
    let weights: Vec<f32> = (0..cubes.len() * WEIGHT_CHANNELS)
        .map(|_| rng.uniform() * 3.0)
        .collect();
    // rows [sdf 8 | deform 24 | colour 8*cd], as the mesh decoder lays them out
    let segs = [(0, 1), (8, 3), (32, cd)];
    let layout = CornerLayout {
        stride: 8 * dim,
        segments: if cd > 0 { &segs[..] } else { &segs[..2] },
    };
    let verts = cube_corners_to_vertices(res, &cubes, &corner, layout).unwrap();
    (cubes, verts, weights)
}

#[test]
fn sparse_extraction_reproduces_the_dense_statement_exactly() {
    for (seed, res, density, cd) in [
        (1, 5, 0.5, 6),
        (2, 7, 0.25, 3),
        (3, 6, 0.9, 0),
        (4, 8, 0.1, 6),
    ] {
        let (cubes, verts, weights) = random_case(seed, res, density, cd);
        let dim = verts.dim;
        let sdf: Vec<f32> = verts.attrs.chunks(dim).map(|r| r[0]).collect();
        let pos = deform_vertices(res, &verts.coords, &verts.attrs, dim, 1).unwrap();
        let colors: Vec<f32> = verts
            .attrs
            .chunks(dim)
            .flat_map(|r| r[4..].to_vec())
            .collect();
        let grid = SparseGrid {
            res,
            vertex_coords: &verts.coords,
            sdf: &sdf,
            positions: &pos,
            colors: (cd > 0).then_some(&colors[..]),
            color_dim: cd,
            cube_coords: &cubes,
            cube_weights: Some(RowView::packed(&weights)),
        };
        let sparse = extract(&grid, FlexiCubesOptions::default()).unwrap();
        let dense = Dense::from_sparse(&grid).extract(0.99);
        assert!(!dense.faces.is_empty(), "seed {seed}: empty test mesh");
        assert_eq!(sparse.vertices.len(), dense.vertices.len(), "seed {seed}");
        assert_eq!(sparse.vertices, dense.vertices, "seed {seed}");
        assert_eq!(sparse.colors, dense.colors, "seed {seed}");
        assert_eq!(sparse.faces, dense.faces, "seed {seed}");
        assert_eq!(sparse.color_dim, cd);
    }
}

/// A sphere of radius 0.3 sampled on every vertex of a 16^3 grid (all cubes active, no
/// deformation, zero weights).
fn sphere(res: usize) -> ExtractedMesh {
    let side = res + 1;
    let coords: Vec<[i32; 3]> = (0..(side * side * side) as u64)
        .map(|id| grid_coord(id, side))
        .collect();
    let pos: Vec<[f32; 3]> = coords
        .iter()
        .map(|&c| deformed_position(c, [0.0; 3], res))
        .collect();
    let sdf: Vec<f32> = pos
        .iter()
        .map(|p| (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt() - 0.3)
        .collect();
    let cubes: Vec<[i32; 3]> = (0..(res * res * res) as u64)
        .map(|id| grid_coord(id, res))
        .collect();
    let weights = vec![0f32; cubes.len() * WEIGHT_CHANNELS];
    let grid = SparseGrid {
        res,
        vertex_coords: &coords,
        sdf: &sdf,
        positions: &pos,
        colors: None,
        color_dim: 0,
        cube_coords: &cubes,
        cube_weights: Some(RowView::packed(&weights)),
    };
    extract(&grid, FlexiCubesOptions::default()).unwrap()
}

#[test]
fn sphere_is_closed_consistently_oriented_and_on_the_surface() {
    let m = sphere(16);
    assert!(m.faces.len() > 100);
    assert!(m.colors.is_empty());
    for v in &m.vertices {
        let r = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        assert!((r - 0.3).abs() < 0.02, "vertex {v:?} at radius {r}");
    }
    // every directed edge once, and its reverse once: closed and consistently wound
    let mut directed = std::collections::HashMap::new();
    for f in &m.faces {
        for k in 0..3 {
            *directed.entry((f[k], f[(k + 1) % 3])).or_insert(0) += 1;
        }
    }
    for (&(a, b), &n) in &directed {
        assert_eq!(n, 1, "edge {a}->{b} used {n} times");
        assert_eq!(directed.get(&(b, a)), Some(&1), "edge {a}->{b} has no twin");
    }
    // faces wind towards positive SDF: normals point outwards
    let mut outward = 0;
    for f in &m.faces {
        let [a, b, c] = f.map(|i| m.vertices[i as usize]);
        let u = sub3(b, a);
        let w = sub3(c, a);
        let n = [
            u[1] * w[2] - u[2] * w[1],
            u[2] * w[0] - u[0] * w[2],
            u[0] * w[1] - u[1] * w[0],
        ];
        let centre = [
            (a[0] + b[0] + c[0]) / 3.0,
            (a[1] + b[1] + c[1]) / 3.0,
            (a[2] + b[2] + c[2]) / 3.0,
        ];
        if n[0] * centre[0] + n[1] * centre[1] + n[2] * centre[2] > 0.0 {
            outward += 1;
        }
    }
    assert_eq!(outward, m.faces.len());
}

fn sub3(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

#[test]
fn no_surface_gives_an_empty_mesh() {
    let coords = [[0, 0, 0], [1, 1, 1]];
    let grid = SparseGrid {
        res: 2,
        vertex_coords: &coords,
        sdf: &[0.5, 0.25],
        positions: &[[0.0; 3]; 2],
        colors: Some(&[0.0; 4]),
        color_dim: 2,
        cube_coords: &[],
        cube_weights: Some(RowView::packed(&[])),
    };
    let m = extract(&grid, FlexiCubesOptions::default()).unwrap();
    assert!(m.vertices.is_empty() && m.faces.is_empty() && m.colors.is_empty());
    assert_eq!(m.color_dim, 2);
}
