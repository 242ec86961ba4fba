//! Re-run reference outputs: an overlay of tensors that replace a fixture's recorded outputs.
//!
//! Some recorded outputs of a fixture set cannot be reproduced even by the original code: the
//! reference runs used spconv 2.3.8's CPU `scatter_add`, whose OpenMP threads share their row
//! pointers, so every multi-threaded run gives a slightly different answer. Re-running the
//! original TRELLIS code single-threaded on the fixture's own weights and inputs
//! (`tools/reference/`) gives the deterministic values; `trellisd parity DIR --rerun OVERLAY`
//! compares against those instead.
//!
//! Layout: `OVERLAY/<fixture path relative to DIR>/rerun.safetensors`, whose metadata holds
//! `base_io_sha256`, the SHA-256 of the `io.safetensors` it was made for. An overlay never applies
//! to any other file: a mismatch is an error, not a silent fallback to the recorded values.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

/// The file name of one fixture's overlay.
pub const FILE: &str = "rerun.safetensors";

/// An overlay directory (see the module docs).
#[derive(Debug, Clone)]
pub struct Overlay {
    root: PathBuf,
}

/// The tensors that replace one fixture's recorded values.
pub struct Replacement {
    pub tensors: HashMap<String, Tensor>,
    /// How the values were produced (the overlay's `produced_by` metadata).
    pub produced_by: String,
}

impl Overlay {
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            bail!("re-run overlay {} is not a directory", root.display());
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The replacement for the fixture at `rel` (relative to the walked root) whose recorded
    /// tensors are in `io_path`; `None` when the overlay has nothing for it.
    pub fn for_fixture(
        &self,
        rel: &str,
        io_path: &Path,
        device: &Device,
    ) -> Result<Option<Replacement>> {
        let path = self.root.join(rel).join(FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow!("{}: not a safetensors file: {e}", path.display()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let want = meta
            .get("base_io_sha256")
            .ok_or_else(|| anyhow!("{}: no base_io_sha256 in its metadata", path.display()))?;
        let got = sha256_hex(io_path)?;
        if !want.eq_ignore_ascii_case(&got) {
            bail!(
                "{} was made for an io.safetensors with sha256 {want}, but {} has {got}: this overlay belongs to another fixture set",
                path.display(),
                io_path.display()
            );
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(Replacement {
            tensors,
            produced_by: meta.get("produced_by").cloned().unwrap_or_default(),
        }))
    }
}

/// Lower-case hex SHA-256 of a file, streamed.
pub fn sha256_hex(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_overlay(dir: &Path, rel: &str, base_sha: &str) {
        let d = dir.join(rel);
        std::fs::create_dir_all(&d).unwrap();
        let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let meta = HashMap::from([("base_io_sha256".to_string(), base_sha.to_string())]);
        let views = [("out", t)];
        safetensors::serialize_to_file(
            views.iter().map(|(k, v)| (k.to_string(), v)),
            Some(meta),
            &d.join(FILE),
        )
        .unwrap();
    }

    #[test]
    fn applies_only_to_the_file_it_was_made_for() {
        let tmp = tempfile::tempdir().unwrap();
        let io = tmp.path().join("io.safetensors");
        std::fs::write(&io, b"recorded").unwrap();
        let sha = sha256_hex(&io).unwrap();
        // sha256("recorded"), computed independently with coreutils' sha256sum.
        assert_eq!(
            sha,
            "3d96a458120e68868ccca6bad66be3fc8df4627a6b7372d69b98d3ba7688774d"
        );
        let ov = tmp.path().join("overlay");
        write_overlay(&ov, "models/x", &sha);
        let o = Overlay::open(&ov).unwrap();
        let r = o
            .for_fixture("models/x", &io, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            r.tensors["out"].to_vec1::<f32>().unwrap(),
            vec![1f32, 2., 3.]
        );
        assert!(o
            .for_fixture("models/y", &io, &Device::Cpu)
            .unwrap()
            .is_none());
        std::fs::write(&io, b"recorded, but another set").unwrap();
        let e = o.for_fixture("models/x", &io, &Device::Cpu).err().unwrap();
        assert!(format!("{e}").contains("another fixture set"), "{e}");
    }
}
