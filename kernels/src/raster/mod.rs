//! Rasterisers for texture baking and previews: triangles (depth, triangle id, barycentrics,
//! interpolated attributes) and forward 3-D Gaussian splatting, with the original's camera
//! conventions. CPU implementations on slices; [`Rasterizer`] is the seam where a GPU backend
//! (feature `cuda`) slots in: callers take `&dyn Rasterizer` and never name the backend.

pub mod camera;
pub mod splat;
pub mod texels;
pub mod triangles;

pub use camera::Camera;
pub use splat::{SplatImage, SplatSettings, Splats};
pub use texels::TexelPoint;
pub use triangles::{Fragment, RasterBuffers, NO_FACE};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RasterError {
    #[error("{what}: {got} values, expected {want}")]
    Size {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("triangle {face} refers past the {vertices} vertices")]
    FaceIndex { face: usize, vertices: usize },
    #[error("the image has no pixels")]
    EmptyImage,
    /// A GPU backend failed (kernel compile or load, launch, copy, out of memory).
    #[error("GPU rasteriser: {0}")]
    Backend(String),
}

/// The rasterisers a bake or preview needs. Every backend must give the CPU one's results (the
/// reference) up to float rounding.
pub trait Rasterizer: Sync {
    /// A world-space mesh through a camera.
    fn triangles(
        &self,
        camera: &Camera,
        vertices: &[[f32; 3]],
        faces: &[[u32; 3]],
    ) -> Result<RasterBuffers, RasterError>;

    /// Triangles already in screen space (pixel x, pixel y, depth), e.g. a mesh's UV layout.
    fn screen_triangles(
        &self,
        width: usize,
        height: usize,
        points: &[[f32; 3]],
        faces: &[[u32; 3]],
    ) -> Result<RasterBuffers, RasterError>;

    /// 3-D Gaussians through a camera.
    fn splat(
        &self,
        camera: &Camera,
        splats: &Splats<'_>,
        settings: &SplatSettings,
    ) -> Result<SplatImage, RasterError>;

    /// The bake's views: for each camera, the Gaussians splatted over black and the mesh's depth
    /// buffer, then [`texels::accumulate_view`] into one `[r, g, b, weight]` sum per texel, views
    /// in order. A backend may keep everything on its device between views.
    fn bake_views(
        &self,
        cams: &[Camera],
        vertices: &[[f32; 3]],
        faces: &[[u32; 3]],
        splats: &Splats<'_>,
        settings: &SplatSettings,
        texels: &[TexelPoint],
    ) -> Result<Vec<[f32; 4]>, RasterError> {
        let mut acc = vec![[0f32; 4]; texels.len()];
        for cam in cams {
            let img = self.splat(cam, splats, settings)?;
            let depth = self.triangles(cam, vertices, faces)?;
            texels::accumulate_view(cam, &depth, &img, texels, &mut acc)?;
        }
        Ok(acc)
    }
}

/// The CPU rasterisers (rayon over row bands and tiles).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuRasterizer;

impl Rasterizer for CpuRasterizer {
    fn triangles(
        &self,
        camera: &Camera,
        vertices: &[[f32; 3]],
        faces: &[[u32; 3]],
    ) -> Result<RasterBuffers, RasterError> {
        triangles::rasterize(camera, vertices, faces)
    }

    fn screen_triangles(
        &self,
        width: usize,
        height: usize,
        points: &[[f32; 3]],
        faces: &[[u32; 3]],
    ) -> Result<RasterBuffers, RasterError> {
        triangles::rasterize_screen(width, height, points, faces)
    }

    fn splat(
        &self,
        camera: &Camera,
        splats: &Splats<'_>,
        settings: &SplatSettings,
    ) -> Result<SplatImage, RasterError> {
        splat::render(camera, splats, settings)
    }
}
