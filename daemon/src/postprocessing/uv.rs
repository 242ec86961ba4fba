//! UV unwrapping with xatlas (twin of `parametrize_mesh` in `postprocessing_utils.py`, which
//! calls the Python xatlas binding).
//!
//! The xatlas C++ library (MIT) is compiled by the `xatlas-rs` crate, which vendors it. That
//! crate's own Rust bindings carry MSVC symbol names and do not link elsewhere, so this module is
//! a thin FFI of its own to the same compiled library: the handful of entry points we call,
//! declared with their Itanium (GCC/Clang) names, and `#[repr(C)]` mirrors of the structs of the
//! vendored `xatlas.h`. Only Linux and macOS toolchains use those names; elsewhere unwrapping
//! reports an error instead of linking.

use anyhow::{bail, ensure, Result};

use super::topology::TriMesh;

/// A mesh cut along its UV seams: `vertices[i]` came from input vertex `xref[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UvMesh {
    pub vertices: Vec<[f32; 3]>,
    pub faces: Vec<[u32; 3]>,
    /// Texture coordinates in `[0, 1]`, glTF convention (v = 0 is the image's top row).
    pub uvs: Vec<[f32; 2]>,
    pub xref: Vec<u32>,
    /// Charts xatlas made.
    pub charts: usize,
}

#[cfg(all(unix, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod ffi {
    #![allow(dead_code)]
    use std::ffi::c_void;

    // Linking the crate brings in its compiled `libxatlas.a` (and the C++ runtime).
    use xatlas_rs as _;

    #[repr(C)]
    pub struct Chart {
        pub atlas_index: u32,
        pub index_array: *mut u32,
        pub index_count: u32,
    }

    #[repr(C)]
    pub struct Vertex {
        pub atlas_index: i32,
        pub uv: [f32; 2],
        pub xref: u32,
    }

    #[repr(C)]
    pub struct Mesh {
        pub chart_array: *mut Chart,
        pub chart_count: u32,
        pub index_array: *mut u32,
        pub index_count: u32,
        pub vertex_array: *mut Vertex,
        pub vertex_count: u32,
    }

    #[repr(C)]
    pub struct Atlas {
        pub width: u32,
        pub height: u32,
        pub atlas_count: u32,
        pub chart_count: u32,
        pub mesh_count: u32,
        pub meshes: *mut Mesh,
        pub utilization: *mut f32,
        pub texels_per_unit: f32,
    }

    pub const INDEX_FORMAT_U32: u32 = 1;

    #[repr(C)]
    pub struct MeshDecl {
        pub vertex_count: u32,
        pub vertex_position_data: *const c_void,
        pub vertex_position_stride: u32,
        pub vertex_normal_data: *const c_void,
        pub vertex_normal_stride: u32,
        pub vertex_uv_data: *const c_void,
        pub vertex_uv_stride: u32,
        pub index_count: u32,
        pub index_data: *const c_void,
        pub index_offset: i32,
        pub index_format: u32,
        pub face_ignore_data: *const bool,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct ChartOptions {
        pub max_chart_area: f32,
        pub max_boundary_length: f32,
        pub proxy_fit_metric_weight: f32,
        pub roundness_metric_weight: f32,
        pub straightness_metric_weight: f32,
        pub normal_seam_metric_weight: f32,
        pub texture_seam_metric_weight: f32,
        pub max_threshold: f32,
        pub grow_face_count: u32,
        pub max_iterations: u32,
    }

    impl Default for ChartOptions {
        /// The header's defaults.
        fn default() -> Self {
            Self {
                max_chart_area: 0.0,
                max_boundary_length: 0.0,
                proxy_fit_metric_weight: 2.0,
                roundness_metric_weight: 0.01,
                straightness_metric_weight: 6.0,
                normal_seam_metric_weight: 4.0,
                texture_seam_metric_weight: 0.5,
                max_threshold: 2.0,
                grow_face_count: 32,
                max_iterations: 1,
            }
        }
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct PackOptions {
        pub attempts: i32,
        pub texels_per_unit: f32,
        pub resolution: u32,
        pub max_chart_size: u32,
        pub block_align: bool,
        pub conservative: bool,
        pub padding: u32,
    }

    pub type ParameterizeFunc =
        Option<unsafe extern "C" fn(*const f32, *mut f32, u32, *const u32, u32, bool)>;
    pub type ProgressFunc = Option<unsafe extern "C" fn(u32, i32, *mut c_void)>;
    pub type PrintFunc = Option<unsafe extern "C" fn(*const std::ffi::c_char, ...) -> i32>;

    extern "C" {
        #[link_name = "_ZN6xatlas6CreateEv"]
        pub fn create() -> *mut Atlas;
        #[link_name = "_ZN6xatlas7DestroyEPNS_5AtlasE"]
        pub fn destroy(atlas: *mut Atlas);
        #[link_name = "_ZN6xatlas7AddMeshEPNS_5AtlasERKNS_8MeshDeclE"]
        pub fn add_mesh(atlas: *mut Atlas, decl: *const MeshDecl) -> u32;
        #[link_name = "_ZN6xatlas8GenerateEPNS_5AtlasENS_12ChartOptionsEPFvPKfPfjPKjjbENS_11PackOptionsEPFvNS_16ProgressCategory4EnumEiPvESD_"]
        pub fn generate(
            atlas: *mut Atlas,
            chart: ChartOptions,
            param: ParameterizeFunc,
            pack: PackOptions,
            progress: ProgressFunc,
            user: *mut c_void,
        );
        #[link_name = "_ZN6xatlas8SetPrintEPFiPKczEb"]
        pub fn set_print(print: PrintFunc, verbose: bool);
    }

    /// Owns an atlas; destroys it on drop.
    pub struct Handle(pub *mut Atlas);

    impl Drop for Handle {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: the pointer came from `create` and is destroyed once.
                unsafe { destroy(self.0) }
            }
        }
    }
}

/// Unwraps the mesh into one atlas. `padding` is the gap between charts in texels of an atlas of
/// about `resolution²`.
#[cfg(all(unix, any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn parametrize(mesh: &TriMesh, resolution: u32, padding: u32) -> Result<UvMesh> {
    use std::sync::Mutex;
    // xatlas keeps global print settings; one unwrap at a time keeps them uncontended.
    static LOCK: Mutex<()> = Mutex::new(());
    ensure!(
        !mesh.faces.is_empty(),
        "UV unwrap: the mesh has no triangles"
    );
    let nv = mesh.vertices.len();
    ensure!(
        nv < u32::MAX as usize && mesh.faces.len() * 3 < u32::MAX as usize,
        "UV unwrap: mesh too large"
    );
    if let Some(f) = mesh
        .faces
        .iter()
        .find(|f| f.iter().any(|&i| i as usize >= nv))
    {
        bail!("UV unwrap: triangle {f:?} refers past the {nv} vertices");
    }
    ensure!(
        mesh.vertices.iter().flatten().all(|x| x.is_finite()),
        "UV unwrap: the mesh has non-finite vertices"
    );
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let indices: Vec<u32> = mesh.faces.iter().flatten().copied().collect();
    let decl = ffi::MeshDecl {
        vertex_count: nv as u32,
        vertex_position_data: mesh.vertices.as_ptr().cast(),
        vertex_position_stride: 12,
        vertex_normal_data: std::ptr::null(),
        vertex_normal_stride: 0,
        vertex_uv_data: std::ptr::null(),
        vertex_uv_stride: 0,
        index_count: indices.len() as u32,
        index_data: indices.as_ptr().cast(),
        index_offset: 0,
        index_format: ffi::INDEX_FORMAT_U32,
        face_ignore_data: std::ptr::null(),
    };
    // SAFETY: `create` returns a fresh atlas owned by `h`; `decl` points into `mesh` and
    // `indices`, which outlive the call (xatlas copies them); the output arrays are read while
    // the atlas is alive and bounded by the counts xatlas wrote.
    unsafe {
        ffi::set_print(None, false);
        let h = ffi::Handle(ffi::create());
        ensure!(
            !h.0.is_null(),
            "UV unwrap: xatlas could not allocate an atlas"
        );
        let err = ffi::add_mesh(h.0, &decl);
        ensure!(
            err == 0,
            "UV unwrap: xatlas rejected the mesh (error {err})"
        );
        // One atlas (resolution 0) whose texel density makes it about `resolution` wide when
        // the charts fill about 60% of it, so `padding` is close to texels of the texture.
        let area: f64 = (0..mesh.faces.len())
            .map(|f| mesh.face_area(f) as f64)
            .sum();
        ensure!(area > 0.0, "UV unwrap: the mesh has no area");
        let texels_per_unit = (resolution as f64 * (0.6 / area).sqrt()) as f32;
        let pack = ffi::PackOptions {
            attempts: 4096,
            texels_per_unit,
            resolution: 0,
            max_chart_size: resolution.saturating_mul(4),
            block_align: true,
            conservative: padding > 0,
            padding,
        };
        ffi::generate(
            h.0,
            ffi::ChartOptions::default(),
            None,
            pack,
            None,
            std::ptr::null_mut(),
        );
        let a = &*h.0;
        ensure!(
            a.mesh_count == 1 && !a.meshes.is_null(),
            "UV unwrap: xatlas produced no mesh"
        );
        ensure!(
            a.width > 0 && a.height > 0,
            "UV unwrap: xatlas produced an empty atlas"
        );
        ensure!(
            a.atlas_count <= 1,
            "UV unwrap: xatlas needed {} atlases for the mesh",
            a.atlas_count
        );
        let m = &*a.meshes;
        let verts = std::slice::from_raw_parts(m.vertex_array, m.vertex_count as usize);
        let idx = std::slice::from_raw_parts(m.index_array, m.index_count as usize);
        ensure!(
            idx.len() == indices.len(),
            "UV unwrap: xatlas returned {} indices for {}",
            idx.len(),
            indices.len()
        );
        let (w, h_) = (a.width as f32, a.height as f32);
        let mut out = UvMesh {
            vertices: Vec::with_capacity(verts.len()),
            faces: idx.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect(),
            uvs: Vec::with_capacity(verts.len()),
            xref: Vec::with_capacity(verts.len()),
            charts: a.chart_count as usize,
        };
        for v in verts {
            ensure!(
                (v.xref as usize) < nv,
                "UV unwrap: xatlas vertex refers past the input"
            );
            out.vertices.push(mesh.vertices[v.xref as usize]);
            out.xref.push(v.xref);
            out.uvs.push([v.uv[0] / w, v.uv[1] / h_]);
        }
        ensure!(
            out.faces
                .iter()
                .all(|f| f.iter().all(|&i| (i as usize) < out.vertices.len())),
            "UV unwrap: xatlas returned an index past its vertices"
        );
        Ok(out)
    }
}

#[cfg(not(all(unix, any(target_arch = "x86_64", target_arch = "aarch64"))))]
pub fn parametrize(_mesh: &TriMesh, _resolution: u32, _padding: u32) -> Result<UvMesh> {
    bail!("UV unwrapping (xatlas) is only wired up for Linux and macOS builds; use --no-bake")
}

#[cfg(test)]
mod tests {
    use super::super::topology::tests::cube;
    use super::*;

    #[test]
    fn cube_unwraps_into_non_overlapping_charts_in_the_unit_square() {
        let m = cube([0.0; 3], 0.5);
        let u = parametrize(&m, 256, 2).unwrap();
        assert_eq!(u.faces.len(), 12);
        assert!(u.charts >= 1);
        // Positions follow xref; the faces are the same triangles.
        for (f_out, f_in) in u.faces.iter().zip(&m.faces) {
            let a: Vec<[f32; 3]> = f_out.iter().map(|&i| u.vertices[i as usize]).collect();
            let b: Vec<[f32; 3]> = f_in.iter().map(|&i| m.vertices[i as usize]).collect();
            assert_eq!(a, b);
        }
        assert!(u.uvs.iter().flatten().all(|&x| (0.0..=1.0).contains(&x)));
        // Charts do not overlap: rasterise the UV layout and count texels claimed twice.
        let res = 128usize;
        let mut owner = vec![u32::MAX; res * res];
        let mut overlap = 0;
        let mut covered = 0;
        for (fi, f) in u.faces.iter().enumerate() {
            let pts: Vec<[f32; 3]> = f
                .iter()
                .map(|&i| {
                    [
                        u.uvs[i as usize][0] * res as f32,
                        u.uvs[i as usize][1] * res as f32,
                        1.0,
                    ]
                })
                .collect();
            let r =
                trellis_kernels::raster::triangles::rasterize_screen(res, res, &pts, &[[0, 1, 2]])
                    .unwrap();
            for (i, fr) in r.frags.iter().enumerate() {
                if !fr.is_empty() {
                    covered += 1;
                    if owner[i] != u32::MAX {
                        overlap += 1;
                    }
                    owner[i] = fi as u32;
                }
            }
        }
        // Shared edges inside a chart may claim a texel centre twice; that is all.
        assert!(overlap * 20 < covered, "{overlap} of {covered}");
        assert!(covered > res * res / 4, "atlas poorly used: {covered}");
    }

    #[test]
    fn bad_meshes_are_errors() {
        assert!(parametrize(&TriMesh::default(), 256, 2).is_err());
        let m = TriMesh::new(vec![[0.0; 3]; 3], vec![[0, 1, 5]]);
        assert!(parametrize(&m, 256, 2).is_err());
    }
}
