//! One reference fixture (a directory with `meta.json`, `io.safetensors`, optional `config.json`
//! and `model.safetensors`; format: `shared/reference/README.md`) and the comparison report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::runtime::weights::{self, WeightCheck};

pub struct Fixture {
    pub dir: PathBuf,
    pub kind: String,
    pub meta: serde_json::Value,
    pub config: Option<serde_json::Value>,
    pub device: Device,
    io: HashMap<String, Tensor>,
}

impl Fixture {
    /// Reads `meta.json` only (cheap); tensors load on [`Fixture::load_io`].
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path)
            .with_context(|| format!("reading {}", meta_path.display()))?;
        let meta: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", meta_path.display()))?;
        let kind = meta
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| anyhow!("{}: no \"kind\" string", meta_path.display()))?
            .to_string();
        let config_path = dir.join("config.json");
        let config = if config_path.is_file() {
            let t = std::fs::read_to_string(&config_path)?;
            Some(
                serde_json::from_str(&t)
                    .with_context(|| format!("{}: invalid JSON", config_path.display()))?,
            )
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            kind,
            meta,
            config,
            device: device.clone(),
            io: HashMap::new(),
        })
    }

    pub fn load_io(&mut self) -> Result<()> {
        let p = self.dir.join("io.safetensors");
        let host = candle_core::safetensors::load(&p, &Device::Cpu)
            .with_context(|| format!("reading {}", p.display()))?;
        // int32 tensors become int64 on the host first: candle's CUDA kernels cast no int32.
        self.io = host
            .into_iter()
            .map(|(k, t)| {
                let t = if t.dtype() == DType::I32 {
                    t.to_dtype(DType::I64)?
                } else {
                    t
                };
                Ok((k, t.to_device(&self.device)?))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// A tensor of `io.safetensors`; the error names the fixture and the tensor.
    pub fn io(&self, name: &str) -> Result<Tensor> {
        self.io.get(name).cloned().ok_or_else(|| {
            anyhow!(
                "{}: io.safetensors has no tensor {name:?}",
                self.dir.display()
            )
        })
    }

    pub fn has_io(&self, name: &str) -> bool {
        self.io.contains_key(name)
    }

    /// Every tensor name of `io.safetensors`, sorted.
    pub fn io_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.io.keys().cloned().collect();
        v.sort();
        v
    }

    /// `config.json`'s `args` (models) or the whole config (modules).
    pub fn config_args(&self) -> Result<&serde_json::Value> {
        let c = self
            .config
            .as_ref()
            .ok_or_else(|| anyhow!("{}: no config.json", self.dir.display()))?;
        Ok(c.get("args").unwrap_or(c))
    }

    /// `model.safetensors` behind a checked `VarBuilder` in `dtype`.
    pub fn weights(&self, dtype: DType) -> Result<(VarBuilder<'static>, WeightCheck)> {
        weights::from_safetensors(&self.dir.join("model.safetensors"), dtype, &self.device)
    }

    /// The tolerance meta.json states for a tensor (`"tolerance": "rel_l2 1e-5"`), if any.
    pub fn stated_tolerance(&self, tensor: &str) -> Option<f64> {
        let t = self.meta.get("tensors")?.get(tensor)?.get("tolerance")?;
        if let Some(x) = t.as_f64() {
            return Some(x);
        }
        t.as_str()?
            .split_whitespace()
            .find_map(|w| w.trim_end_matches([',', ';', ')']).parse::<f64>().ok())
    }

    /// A string field of meta.json.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta.get(key).and_then(|v| v.as_str())
    }
}

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub error: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance
    }
}

/// What a fixture's handler compared.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

/// `t` in host memory (a no-op for CPU tensors).
pub fn host(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?)
}

/// Relative L2 error `||a-b|| / ||b||` in float64 (absolute L2 when `b` is zero).
pub fn rel_l2(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    if actual.dims() != expected.dims() {
        bail!(
            "shape mismatch: got {:?}, expected {:?}",
            actual.dims(),
            expected.dims()
        );
    }
    // On the host, in float64 (the GPU lacks integer casts, and this is the reference side).
    let a = host(actual)?.to_dtype(DType::F64)?.flatten_all()?;
    let b = host(expected)?.to_dtype(DType::F64)?.flatten_all()?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if den > 0.0 { num / den } else { num })
}

/// The fraction of entries where `actual` and `expected` (same shape) differ, compared on the host
/// in float64.
pub fn differing(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    let a = host(actual)?.to_dtype(DType::F64)?.flatten_all()?;
    let b = host(expected)?.to_dtype(DType::F64)?.flatten_all()?;
    let n = b.elem_count().max(1) as f64;
    let diff = a
        .ne(&b)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(diff / n)
}

impl Report {
    /// Compares by relative L2 error; a shape mismatch is recorded as a failed check.
    pub fn close(
        &mut self,
        name: &str,
        actual: &Tensor,
        expected: &Tensor,
        tolerance: f64,
    ) -> Result<()> {
        let error = match rel_l2(actual, expected) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("  {name}: {e}");
                f64::INFINITY
            }
        };
        self.checks.push(Check {
            name: name.to_string(),
            error,
            tolerance,
        });
        Ok(())
    }

    /// Integer (or exactly reproducible) tensors: the error is the fraction of differing entries.
    pub fn exact(&mut self, name: &str, actual: &Tensor, expected: &Tensor) -> Result<()> {
        let error = if actual.dims() != expected.dims() {
            eprintln!(
                "  {name}: shape mismatch: got {:?}, expected {:?}",
                actual.dims(),
                expected.dims()
            );
            f64::INFINITY
        } else {
            differing(actual, expected)?
        };
        self.checks.push(Check {
            name: name.to_string(),
            error,
            tolerance: 0.0,
        });
        Ok(())
    }

    /// Records an already computed error (order-independent comparisons and the like).
    pub fn record(&mut self, name: &str, error: f64, tolerance: f64) {
        self.checks.push(Check {
            name: name.to_string(),
            error,
            tolerance,
        });
    }

    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(Check::passed)
    }

    /// The check with the largest error relative to its tolerance.
    pub fn worst(&self) -> Option<&Check> {
        self.checks.iter().max_by(|a, b| {
            let ra = if a.tolerance > 0.0 {
                a.error / a.tolerance
            } else if a.error > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            let rb = if b.tolerance > 0.0 {
                b.error / b.tolerance
            } else if b.error > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            ra.partial_cmp(&rb).unwrap_or(std::cmp::Ordering::Equal)
        })
    }
}

/// The README's suggested tolerances.
pub mod tol {
    /// Modules and single network forwards (float32).
    pub const FORWARD: f64 = 1e-5;
    /// Sampler trajectories (errors compound over steps).
    pub const TRAJECTORY: f64 = 1e-4;
    /// Outputs of float16 torsos.
    pub const FP16: f64 = 1e-1;
    /// FlexiCubes vertex positions (absolute).
    pub const MESH_ABS: f64 = 1e-4;
}
