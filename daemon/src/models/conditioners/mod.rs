//! Conditioners: DINOv2 with registers (image), CLIP text, and the image preprocessing they need.

pub mod clip;
pub mod dinov2;
pub mod preprocess;
