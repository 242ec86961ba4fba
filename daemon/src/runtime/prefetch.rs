//! Weight copies made ahead of the stage that needs them: a network's pinned host tensors are
//! copied to the GPU on a second stream (the copy stream) while the current stage computes on
//! candle's stream, so the next stage finds its weights there (`runtime::residency` starts them
//! and consumes them). No TRELLIS twin: the original keeps every network on the GPU.
//!
//! Ordering, all on the device (the host never waits except in [`Prefetch::finish`] and on drop):
//! 1. every destination is allocated in candle's stream order (the memory pool's async
//!    allocation), so candle's stream owns and later frees it;
//! 2. the copy stream waits for an event recorded on candle's stream after those allocations,
//!    then queues one `cuMemcpyHtoDAsync` per tensor from page-locked memory and records `done`;
//! 3. before anything uses the tensors, [`Prefetch::finish`] makes candle's stream wait for
//!    `done` (and the host too, which measures how much of the copy was not hidden); a prefetch
//!    dropped unused waits for `done` before its tensors and pinned sources are released.
//!
//! cudarc's per-slice event tracking is switched off when the device opens
//! (`runtime::device`): this module's events are the only cross-stream ordering there is.
//! Tensors that are not pinned (`TRELLIS_PINNED=0`, a failed pinned allocation, integer
//! dtypes) make the whole network fall back to the synchronous upload at placement. On the CPU a
//! prefetch holds the host tensors themselves (nothing to copy): the bookkeeping is the same,
//! which is what the CPU tests check. `TRELLIS_PREFETCH=0` turns prefetching off (to compare).

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::weights::{HostTensor, HostWeights};

/// Whether prefetches run (`TRELLIS_PREFETCH` unset or not `0`; read once per process).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TRELLIS_PREFETCH").map_or(true, |v| v.trim() != "0"))
}

/// How long a prefetched network's copy took and how much of it ran behind compute.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CopyTime {
    /// Seconds the copies took on the copy stream.
    pub copy_s: f64,
    /// Seconds of that the host waited for when the network was needed (not hidden).
    pub waited_s: f64,
}

impl CopyTime {
    /// Seconds of the copy that ran while something else computed.
    pub fn hidden_s(&self) -> f64 {
        (self.copy_s - self.waited_s).max(0.0)
    }
}

/// One network's weights on their way to (or already on) the device.
pub struct Prefetch {
    tensors: HashMap<String, Tensor>,
    bytes: u64,
    #[cfg(feature = "cuda")]
    cuda: Option<cuda::InFlight>,
}

impl Prefetch {
    /// Starts copying `host`'s tensors to `dev` on `copies` (a CUDA device's copy stream; `None`
    /// on the CPU). `Ok(None)`: some tensor is not pinned, so nothing was started.
    pub fn start(
        host: &HostWeights,
        dev: &Device,
        copies: Option<&CopyStream>,
    ) -> Result<Option<Self>> {
        let tensors = host.tensors_for(dev);
        match (dev, copies) {
            (Device::Cpu, _) => {
                let mut out = HashMap::with_capacity(tensors.len());
                for (name, t) in tensors {
                    #[allow(irrefutable_let_patterns)]
                    let HostTensor::Pageable(t) = t
                    else {
                        return Ok(None);
                    };
                    out.insert(name, t);
                }
                Ok(Some(Self {
                    tensors: out,
                    bytes: host.bytes(),
                    #[cfg(feature = "cuda")]
                    cuda: None,
                }))
            }
            #[cfg(feature = "cuda")]
            (Device::Cuda(_), Some(c)) => {
                let Some((tensors, inflight)) = cuda::start(tensors, dev, c)? else {
                    return Ok(None);
                };
                Ok(Some(Self {
                    tensors,
                    bytes: host.bytes(),
                    cuda: Some(inflight),
                }))
            }
            _ => Ok(None),
        }
    }

    /// Bytes of the weights being copied.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The device tensors, once candle's stream is ordered after the copies; with the copy's
    /// time and how long the host waited for it.
    pub fn finish(mut self) -> Result<(HashMap<String, Tensor>, CopyTime)> {
        let time = self.wait()?;
        Ok((std::mem::take(&mut self.tensors), time))
    }

    fn wait(&mut self) -> Result<CopyTime> {
        #[cfg(feature = "cuda")]
        if let Some(c) = self.cuda.take() {
            return c.finish();
        }
        Ok(CopyTime::default())
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Unused (an error, a cancelled job, an eviction): the copy must be done before the
        // destination is freed and the pinned sources may go.
        let _ = self.wait();
    }
}

/// A CUDA device's copy stream (none on the CPU); clones share the stream.
#[derive(Clone)]
pub struct CopyStream {
    #[cfg(feature = "cuda")]
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
}

impl CopyStream {
    /// A new copy stream on `dev`; `None` on the CPU.
    pub fn new(dev: &Device) -> Result<Option<Self>> {
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let ctx = d.cuda_stream().context().clone();
                // SAFETY: this process orders its streams itself (see the module comment); with
                // tracking on, the second stream would make every kernel argument record events.
                unsafe { ctx.disable_event_tracking() };
                let stream = ctx
                    .new_stream()
                    .map_err(|e| anyhow::anyhow!("creating the copy stream: {e:?}"))?;
                Ok(Some(Self { stream }))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::runtime::pinned::PinnedTensor;
    use anyhow::anyhow;
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream};
    use std::sync::Arc;
    use std::time::Instant;

    /// Copies queued on the copy stream.
    pub(super) struct InFlight {
        main: Arc<CudaStream>,
        start: CudaEvent,
        done: CudaEvent,
        /// The pinned sources, held until the copies are done.
        _sources: Vec<Arc<PinnedTensor>>,
    }

    fn timed(s: &CudaStream) -> Result<CudaEvent> {
        s.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| anyhow!("recording an event: {e:?}"))
    }

    pub(super) fn start(
        tensors: HashMap<String, HostTensor>,
        dev: &Device,
        copies: &CopyStream,
    ) -> Result<Option<(HashMap<String, Tensor>, InFlight)>> {
        let Device::Cuda(d) = dev else {
            return Ok(None);
        };
        let mut sources = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            match t {
                HostTensor::Pinned(p) => sources.push((name, p)),
                HostTensor::Pageable(_) => return Ok(None),
            }
        }
        // 1. destinations in candle's stream order
        let mut out = HashMap::with_capacity(sources.len());
        for (name, p) in &sources {
            out.insert(name.clone(), p.alloc_on(dev)?);
        }
        let main = d.cuda_stream();
        let allocated = main
            .record_event(None)
            .map_err(|e| anyhow!("recording an event: {e:?}"))?;
        // 2. the copies after them, on the copy stream
        let s = &copies.stream;
        s.wait(&allocated)
            .map_err(|e| anyhow!("copy stream wait: {e:?}"))?;
        let start = timed(s)?;
        for (name, p) in &sources {
            let dst = out
                .get(name)
                .ok_or_else(|| anyhow!("prefetch: {name} has no destination"))?;
            // SAFETY: ordered after the allocation (the wait above); the tensors and sources are
            // held by the returned prefetch, which orders every use (and its own drop) after
            // `done`.
            unsafe { p.copy_into(dst, s)? };
        }
        let done = timed(s)?;
        Ok(Some((
            out,
            InFlight {
                main,
                start,
                done,
                _sources: sources.into_iter().map(|(_, p)| p).collect(),
            },
        )))
    }

    impl InFlight {
        pub(super) fn finish(self) -> Result<CopyTime> {
            let t = Instant::now();
            self.done
                .synchronize()
                .map_err(|e| anyhow!("waiting for a weight copy: {e:?}"))?;
            let waited_s = t.elapsed().as_secs_f64();
            self.main
                .wait(&self.done)
                .map_err(|e| anyhow!("ordering after a weight copy: {e:?}"))?;
            let copy_ms = self
                .start
                .elapsed_ms(&self.done)
                .map_err(|e| anyhow!("timing a weight copy: {e:?}"))?;
            Ok(CopyTime {
                copy_s: f64::from(copy_ms) / 1e3,
                waited_s,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn a_cpu_prefetch_hands_back_the_host_tensors() {
        let mut t = HashMap::new();
        t.insert(
            "w".to_string(),
            Tensor::ones(6, DType::F32, &Device::Cpu).unwrap(),
        );
        let host = HostWeights::new(t, "test");
        let p = Prefetch::start(&host, &Device::Cpu, None).unwrap().unwrap();
        assert_eq!(p.bytes(), 24);
        let (tensors, time) = p.finish().unwrap();
        assert_eq!(time, CopyTime::default());
        assert_eq!(tensors["w"].to_vec1::<f32>().unwrap(), vec![1.0f32; 6]);
        let hidden = CopyTime {
            copy_s: 0.5,
            waited_s: 0.2,
        };
        assert!((hidden.hidden_s() - 0.3).abs() < 1e-12);
        assert_eq!(
            CopyTime {
                copy_s: 0.1,
                waited_s: 0.3
            }
            .hidden_s(),
            0.0
        );
    }
}
