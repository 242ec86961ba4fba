//! Structured-latent VAE: the swin-transformer encoder and the three decoders
//! (twin of `trellis/models/structured_latent_vae`).

pub mod base;
pub mod decoder_gs;
pub mod decoder_mesh;
pub mod decoder_rf;
pub mod encoder;
