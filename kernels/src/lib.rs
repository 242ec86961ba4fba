//! Compute primitives the TRELLIS networks need and candle lacks. Each has a plain CPU reference
//! implementation on slices; the CUDA versions (feature `cuda`) are compiled at run time with NVRTC.

pub mod attention;
pub mod conv3d;
pub mod flexicubes;
pub mod raster;
pub mod sparse_conv;
pub mod vecmath;
