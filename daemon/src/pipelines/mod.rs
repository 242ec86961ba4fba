//! Pipelines and samplers (twin of `trellis/pipelines`).

pub mod image_to_3d;
pub mod samplers;
pub mod text_to_3d;
pub mod variant;
pub mod voxelize;
