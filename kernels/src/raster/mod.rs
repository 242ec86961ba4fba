//! Rasterisers for texture baking and previews: triangles (depth, triangle id, barycentrics,
//! interpolated attributes) and forward 3-D Gaussian splatting, with the original's camera
//! conventions. CPU implementations on slices; [`Rasterizer`] is the seam where a GPU backend
//! (feature `cuda`) slots in: callers take `&dyn Rasterizer` and never name the backend.

pub mod camera;
pub mod splat;
pub mod triangles;

pub use camera::Camera;
pub use splat::{SplatImage, SplatSettings, Splats};
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
