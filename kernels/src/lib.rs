//! Compute primitives the TRELLIS networks need and candle lacks. Each has a plain CPU reference
//! implementation on slices; the CUDA versions (feature `cuda`) are compiled at run time with NVRTC.

pub mod attention;
pub mod conv3d;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod flexicubes;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod raster;
pub mod sgemm;
pub mod sparse_conv;
pub mod vecmath;
