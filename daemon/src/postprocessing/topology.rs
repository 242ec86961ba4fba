//! Mesh topology helpers shared by the clean-up steps (the parts of utils3d the original's
//! `postprocessing_utils.py` uses: edges, connected components, unreferenced-vertex removal).

use std::collections::HashMap;

/// An indexed triangle mesh (TRELLIS axes, z-up).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TriMesh {
    pub vertices: Vec<[f32; 3]>,
    pub faces: Vec<[u32; 3]>,
}

pub(crate) fn sub(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

pub(crate) fn cross(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub(crate) fn dot(a: [f32; 3], b: [f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub(crate) fn norm(a: [f32; 3]) -> f32 {
    dot(a, a).sqrt()
}

impl TriMesh {
    pub fn new(vertices: Vec<[f32; 3]>, faces: Vec<[u32; 3]>) -> Self {
        Self { vertices, faces }
    }

    /// Area-weighted face normal (length = twice the area).
    pub fn face_cross(&self, f: usize) -> [f32; 3] {
        let [a, b, c] = self.faces[f].map(|i| self.vertices[i as usize]);
        cross(sub(b, a), sub(c, a))
    }

    pub fn face_area(&self, f: usize) -> f32 {
        0.5 * norm(self.face_cross(f))
    }

    /// Keeps the faces whose flag is true and drops the vertices no face uses.
    pub fn retain_faces(&self, keep: &[bool]) -> TriMesh {
        let faces: Vec<[u32; 3]> = self
            .faces
            .iter()
            .zip(keep)
            .filter(|(_, &k)| k)
            .map(|(f, _)| *f)
            .collect();
        TriMesh::new(self.vertices.clone(), faces).compact()
    }

    /// Drops unreferenced vertices and degenerate faces (a vertex used twice), renumbering.
    pub fn compact(mut self) -> TriMesh {
        self.faces
            .retain(|f| f[0] != f[1] && f[1] != f[2] && f[0] != f[2]);
        let mut map = vec![u32::MAX; self.vertices.len()];
        let mut vertices = Vec::new();
        for f in &mut self.faces {
            for v in f.iter_mut() {
                let m = &mut map[*v as usize];
                if *m == u32::MAX {
                    *m = vertices.len() as u32;
                    vertices.push(self.vertices[*v as usize]);
                }
                *v = *m;
            }
        }
        TriMesh {
            vertices,
            faces: self.faces,
        }
    }

    /// Undirected edges → the faces using them.
    pub fn edge_faces(&self) -> HashMap<(u32, u32), Vec<u32>> {
        let mut m: HashMap<(u32, u32), Vec<u32>> = HashMap::with_capacity(self.faces.len() * 2);
        for (fi, f) in self.faces.iter().enumerate() {
            for k in 0..3 {
                let (a, b) = (f[k], f[(k + 1) % 3]);
                m.entry((a.min(b), a.max(b))).or_default().push(fi as u32);
            }
        }
        m
    }

    /// Connected components of faces sharing an edge; `comp[f]` and the component count.
    pub fn face_components(&self) -> (Vec<u32>, usize) {
        let n = self.faces.len();
        let mut parent: Vec<u32> = (0..n as u32).collect();
        fn find(p: &mut [u32], mut x: u32) -> u32 {
            while p[x as usize] != x {
                p[x as usize] = p[p[x as usize] as usize];
                x = p[x as usize];
            }
            x
        }
        for fs in self.edge_faces().values() {
            for w in fs.windows(2) {
                let (a, b) = (find(&mut parent, w[0]), find(&mut parent, w[1]));
                if a != b {
                    parent[a.max(b) as usize] = a.min(b);
                }
            }
        }
        let mut label = vec![u32::MAX; n];
        let mut comp = vec![0u32; n];
        let mut count = 0usize;
        for (f, cf) in comp.iter_mut().enumerate() {
            let r = find(&mut parent, f as u32) as usize;
            if label[r] == u32::MAX {
                label[r] = count as u32;
                count += 1;
            }
            *cf = label[r];
        }
        (comp, count)
    }

    /// Closed loops of boundary edges (edges with one face), each as vertices in the order of
    /// the faces' winding (`a → b` as the edge appears in its face). Open chains through
    /// non-manifold vertices are left out.
    pub fn boundary_loops(&self) -> Vec<Vec<u32>> {
        let mut next: HashMap<u32, Vec<u32>> = HashMap::new();
        for (&(a, b), fs) in &self.edge_faces() {
            if fs.len() != 1 {
                continue;
            }
            let f = self.faces[fs[0] as usize];
            // Direction as it appears in the face.
            let fwd = (0..3).any(|k| f[k] == a && f[(k + 1) % 3] == b);
            let (s, t) = if fwd { (a, b) } else { (b, a) };
            next.entry(s).or_default().push(t);
        }
        let mut starts: Vec<u32> = next.keys().copied().collect();
        starts.sort_unstable();
        let mut used: HashMap<u32, usize> = HashMap::new();
        let mut loops = Vec::new();
        for s in starts {
            if next[&s].len() != 1 || used.contains_key(&s) {
                continue;
            }
            let mut lp = vec![s];
            let mut cur = s;
            let mut ok = false;
            while let Some(ns) = next.get(&cur) {
                if ns.len() != 1 {
                    break;
                }
                let n = ns[0];
                if n == s {
                    ok = true;
                    break;
                }
                if used.contains_key(&n) || lp.len() > next.len() {
                    break;
                }
                lp.push(n);
                used.insert(n, 0);
                cur = n;
            }
            used.insert(s, 0);
            if ok && lp.len() >= 3 {
                loops.push(lp);
            }
        }
        loops
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An axis-aligned unit cube centred at `c` with half-size `h`, outward winding.
    pub fn cube(c: [f32; 3], h: f32) -> TriMesh {
        let mut v = Vec::new();
        for i in 0..8 {
            v.push([
                c[0] + if i & 1 != 0 { h } else { -h },
                c[1] + if i & 2 != 0 { h } else { -h },
                c[2] + if i & 4 != 0 { h } else { -h },
            ]);
        }
        let quads = [
            [0, 2, 3, 1],
            [4, 5, 7, 6],
            [0, 1, 5, 4],
            [2, 6, 7, 3],
            [0, 4, 6, 2],
            [1, 3, 7, 5],
        ];
        let mut f = Vec::new();
        for q in quads {
            f.push([q[0], q[1], q[2]]);
            f.push([q[0], q[2], q[3]]);
        }
        TriMesh::new(v, f)
    }

    /// A UV sphere with `n` rings and `2n` segments.
    pub fn sphere(n: usize) -> TriMesh {
        let mut v = vec![[0.0, 0.0, 0.5]];
        for i in 1..n {
            let th = std::f32::consts::PI * i as f32 / n as f32;
            for j in 0..2 * n {
                let ph = std::f32::consts::PI * j as f32 / n as f32;
                v.push([
                    0.5 * th.sin() * ph.cos(),
                    0.5 * th.sin() * ph.sin(),
                    0.5 * th.cos(),
                ]);
            }
        }
        v.push([0.0, 0.0, -0.5]);
        let ring = |i: usize, j: usize| (1 + (i - 1) * 2 * n + j % (2 * n)) as u32;
        let mut f = Vec::new();
        for j in 0..2 * n {
            f.push([0, ring(1, j), ring(1, j + 1)]);
        }
        for i in 1..n - 1 {
            for j in 0..2 * n {
                f.push([ring(i, j), ring(i + 1, j), ring(i + 1, j + 1)]);
                f.push([ring(i, j), ring(i + 1, j + 1), ring(i, j + 1)]);
            }
        }
        let last = v.len() as u32 - 1;
        for j in 0..2 * n {
            f.push([ring(n - 1, j + 1), ring(n - 1, j), last]);
        }
        TriMesh::new(v, f)
    }

    #[test]
    fn cube_is_closed_outward_and_one_component() {
        let m = cube([0.0; 3], 0.5);
        assert!(m.edge_faces().values().all(|f| f.len() == 2));
        for f in 0..12 {
            let [a, b, c] = m.faces[f].map(|i| m.vertices[i as usize]);
            let centre = [
                (a[0] + b[0] + c[0]) / 3.0,
                (a[1] + b[1] + c[1]) / 3.0,
                (a[2] + b[2] + c[2]) / 3.0,
            ];
            assert!(dot(m.face_cross(f), centre) > 0.0, "face {f} points inward");
        }
        assert_eq!(m.face_components().1, 1);
        assert!(m.boundary_loops().is_empty());
    }

    #[test]
    fn components_loops_and_compaction() {
        let a = cube([0.0; 3], 0.5);
        let b = cube([3.0, 0.0, 0.0], 0.5);
        let mut m = a.clone();
        m.vertices.extend(&b.vertices);
        m.faces.extend(b.faces.iter().map(|f| f.map(|i| i + 8)));
        let (comp, n) = m.face_components();
        assert_eq!(n, 2);
        assert!(comp[..12].iter().all(|&c| c == 0) && comp[12..].iter().all(|&c| c == 1));
        // Drop one quad of the first cube: one boundary loop of 4 vertices, winding along the
        // remaining faces.
        let mut keep = vec![true; 24];
        keep[0] = false;
        keep[1] = false;
        let h = m.retain_faces(&keep);
        assert_eq!(h.faces.len(), 22);
        assert_eq!(h.vertices.len(), 16);
        let loops = h.boundary_loops();
        assert_eq!(loops.len(), 1);
        assert_eq!(loops[0].len(), 4);
        // Removing the second cube entirely drops its vertices.
        let mut keep = vec![true; 24];
        keep[12..].iter_mut().for_each(|k| *k = false);
        assert_eq!(m.retain_faces(&keep).vertices.len(), 8);
    }
}
