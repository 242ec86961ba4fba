//! Pipelines and samplers (twin of `trellis/pipelines`).

pub mod base;
pub mod edit;
pub mod image_to_3d;
pub mod loader;
pub mod mesh_input;
pub mod noise;
pub mod samplers;
pub mod text_to_3d;
pub mod variant;
pub mod voxelize;
