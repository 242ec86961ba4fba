//! Plain 3-D representations the decoders produce (twin of `trellis/representations`).

pub mod gaussian;
pub mod mesh;
pub mod strivec;
