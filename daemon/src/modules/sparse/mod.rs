//! Sparse tensors and layers (twin of `trellis/modules/sparse`).

pub mod attention;
pub mod conv;
pub mod linear;
pub mod norm;
pub mod spatial;
pub mod tensor;
pub mod transformer;
