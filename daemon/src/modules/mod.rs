//! Building blocks (twin of `trellis/modules`): dense attention and transformer blocks, norms,
//! embedders, and the sparse counterparts under [`sparse`].

pub mod attention;
pub mod context;
pub mod conv3d;
pub mod cpu_fused;
pub mod dense;
pub mod embedders;
pub mod gpu_fused;
pub mod norm;
pub mod patchify;
pub mod sparse;
pub mod transformer;
