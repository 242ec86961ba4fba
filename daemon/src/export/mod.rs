//! Writers for the outputs: GLB meshes, PLY Gaussians, `.trellis` asset bundles.

pub mod asset;
pub mod atomic;
pub mod glb;
pub mod ply;
pub mod textured;
