//! Conditioners: DINOv2 with registers (image), CLIP text, and the image preprocessing they need.

pub mod clip;
pub mod common;
pub mod dinov2;
pub mod preprocess;
pub mod resample;

pub use clip::TextConditioner;
pub use dinov2::ImageConditioner;
