//! The `.trellis` asset bundle: everything needed to decode a generation again without
//! re-sampling (TRELLIS has no such file; its pipelines return the decoded outputs only).
//!
//! A safetensors file whose header metadata holds `"format": "trellis-asset/1"` and `"meta"`, a
//! JSON object (seed, every sampler parameter, model id, conditioning source, ...), with tensors:
//!
//! | name           | dtype | shape           | meaning                                              |
//! |----------------|-------|-----------------|------------------------------------------------------|
//! | `coords`       | i32   | `[N, 4]`        | (batch, x, y, z) of the structured latent            |
//! | `slat`         | f32   | `[N, C]`        | structured latent after de-normalisation (decoder input) |
//! | `ss_latent`    | f32   | `[B, C, R, R, R]` | sparse-structure latent z_s (absent for variants)  |
//! | `ss_noise`     | f32   | `[B, C, R, R, R]` | its initial noise (absent for variants)            |
//! | `slat_noise`   | f32   | `[N, C]`        | initial noise of the SLat sampler                    |
//! | `cond_summary` | f32   | `[n, D]`        | per conditioning input, the mean over its tokens     |
//!
//! Only `coords` and `slat` are required to decode.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::atomic::write_atomic;

pub const FORMAT: &str = "trellis-asset/1";

/// A generation, ready to be decoded again.
#[derive(Debug, Clone)]
pub struct Asset {
    pub coords: Tensor,
    pub slat: Tensor,
    pub ss_latent: Option<Tensor>,
    pub ss_noise: Option<Tensor>,
    pub slat_noise: Option<Tensor>,
    pub cond_summary: Option<Tensor>,
    pub meta: serde_json::Value,
}

/// dtype, shape and little-endian bytes of a tensor.
type RawTensor = (Dtype, Vec<usize>, Vec<u8>);

fn raw(t: &Tensor) -> Result<RawTensor> {
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let shape = t.dims().to_vec();
    Ok(match t.dtype() {
        DType::F32 => {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            (
                Dtype::F32,
                shape,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        }
        DType::I32 => {
            let v: Vec<i32> = t.flatten_all()?.to_vec1()?;
            (
                Dtype::I32,
                shape,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        }
        DType::I64 | DType::U32 | DType::U8 | DType::I16 => {
            let v: Vec<i64> = t
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1()?;
            let mut b = Vec::with_capacity(v.len() * 4);
            for x in v {
                let x = i32::try_from(x).map_err(|_| anyhow!("coordinate {x} out of i32 range"))?;
                b.extend_from_slice(&x.to_le_bytes());
            }
            (Dtype::I32, shape, b)
        }
        DType::F16 | DType::BF16 | DType::F64 => {
            return raw(&t.to_dtype(DType::F32)?);
        }
        other => bail!("cannot store a {other:?} tensor in an asset"),
    })
}

impl Asset {
    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("coords", &self.coords), ("slat", &self.slat)];
        for (n, t) in [
            ("ss_latent", &self.ss_latent),
            ("ss_noise", &self.ss_noise),
            ("slat_noise", &self.slat_noise),
            ("cond_summary", &self.cond_summary),
        ] {
            if let Some(t) = t {
                v.push((n, t));
            }
        }
        v
    }

    fn check(&self) -> Result<()> {
        let (n, four) = self.coords.dims2().context("asset coords must be [N, 4]")?;
        ensure!(
            four == 4,
            "asset coords must be [N, 4], got {:?}",
            self.coords.dims()
        );
        let (ns, _) = self.slat.dims2().context("asset slat must be [N, C]")?;
        ensure!(ns == n, "asset slat has {ns} rows for {n} coords");
        ensure!(n > 0, "the asset has no voxels");
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.check()?;
        let raws: Vec<(&str, RawTensor)> = self
            .tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, raw(t)?)))
            .collect::<Result<_>>()?;
        let views: Vec<(&str, TensorView<'_>)> = raws
            .iter()
            .map(|(n, (d, s, b))| Ok((*n, TensorView::new(*d, s.clone(), b)?)))
            .collect::<Result<_>>()?;
        let mut info = HashMap::new();
        info.insert("format".to_string(), FORMAT.to_string());
        info.insert("meta".to_string(), serde_json::to_string(&self.meta)?);
        Ok(safetensors::tensor::serialize(views, Some(info))?)
    }

    /// Writes the bundle atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        write_atomic(path, |w: &mut dyn Write| Ok(w.write_all(&bytes)?))
    }

    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("not a .trellis asset (safetensors header: {e})"))?;
        let info = header.metadata().clone().unwrap_or_default();
        match info.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => bail!("unsupported asset format {f:?} (this build reads {FORMAT})"),
            None => bail!("not a .trellis asset (no \"format\" entry in its metadata)"),
        }
        let meta: serde_json::Value = match info.get("meta") {
            Some(m) => serde_json::from_str(m).context("asset metadata is not valid JSON")?,
            None => serde_json::Value::Null,
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("corrupt asset: {e}"))?;
        let get = |name: &str| -> Result<Option<Tensor>> {
            let Ok(v) = st.tensor(name) else {
                return Ok(None);
            };
            let shape = v.shape().to_vec();
            let data = v.data();
            let t = match v.dtype() {
                Dtype::F32 => {
                    let f: Vec<f32> = data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    Tensor::from_vec(f, shape, device)?
                }
                Dtype::I32 => {
                    let f: Vec<i32> = data
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    Tensor::from_vec(f, shape, device)?
                }
                other => bail!("asset tensor {name:?} has unsupported dtype {other:?}"),
            };
            Ok(Some(t))
        };
        let a = Self {
            coords: get("coords")?.ok_or_else(|| anyhow!("the asset has no \"coords\" tensor"))?,
            slat: get("slat")?.ok_or_else(|| anyhow!("the asset has no \"slat\" tensor"))?,
            ss_latent: get("ss_latent")?,
            ss_noise: get("ss_noise")?,
            slat_noise: get("slat_noise")?,
            cond_summary: get("cond_summary")?,
            meta,
        };
        a.check()?;
        Ok(a)
    }

    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes, device).with_context(|| format!("asset {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_tensor_and_the_metadata() {
        let dev = Device::Cpu;
        let coords = Tensor::new(&[[0i64, 1, 2, 3], [0, 4, 5, 6]], &dev).unwrap();
        let slat = Tensor::new(&[[0.5f32, -1.0], [2.0, 3.5]], &dev).unwrap();
        let ss = Tensor::randn(0f32, 1.0, (1, 2, 2, 2, 2), &dev).unwrap();
        let a = Asset {
            coords: coords.clone(),
            slat: slat.clone(),
            ss_latent: Some(ss.clone()),
            ss_noise: None,
            slat_noise: Some(slat.clone()),
            cond_summary: None,
            meta: serde_json::json!({"seed": 7, "model": "x/y"}),
        };
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.trellis");
        a.save(&p).unwrap();
        let b = Asset::load(&p, &dev).unwrap();
        assert_eq!(b.coords.dtype(), DType::I32);
        let back: Vec<Vec<i64>> = b.coords.to_dtype(DType::I64).unwrap().to_vec2().unwrap();
        assert_eq!(back, coords.to_vec2::<i64>().unwrap());
        assert_eq!(
            b.slat.to_vec2::<f32>().unwrap(),
            slat.to_vec2::<f32>().unwrap()
        );
        let diff = (b.ss_latent.unwrap() - ss)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert!(b.ss_noise.is_none());
        assert_eq!(b.meta["seed"], 7);
        // Not an asset / corrupt.
        assert!(Asset::from_bytes(b"garbage", &dev).is_err());
        let bad = Asset {
            slat: Tensor::zeros((3, 2), DType::F32, &dev).unwrap(),
            ..a
        };
        assert!(bad.save(&d.path().join("bad.trellis")).is_err());
        assert!(!d.path().join("bad.trellis").exists());
    }
}
