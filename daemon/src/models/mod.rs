//! The TRELLIS networks, one file per network (twins of `trellis/models/*`).

pub mod conditioners;
pub mod config;
pub mod slat_flow;
pub mod slat_vae;
pub mod ss_flow;
pub mod ss_vae;
