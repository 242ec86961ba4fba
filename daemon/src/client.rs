//! A blocking client of the daemon (what `trellisd client` uses): connect, send a request,
//! follow its progress replies, read the final reply, and read fetched arrays (inline or from a
//! shared-memory file).

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericFilePath, Stream};
use trellis_ipc_protocol::{
    ArrayDesc, DType, ErrorInfo, FetchResult, Format, Frame, Limits, Op, Outcome, ProgressInfo,
    Reply, Request, Transport,
};

pub struct Client {
    stream: Stream,
    next_id: u64,
}

/// An `error` reply, kept whole so callers can look at the code.
#[derive(Debug, thiserror::Error)]
#[error("{} ({:?})", .0.message, .0.code)]
pub struct RemoteError(pub ErrorInfo);

/// A final `ok` reply: result, arrays and the binary section.
pub struct Answer {
    pub result: serde_json::Value,
    pub arrays: Vec<ArrayDesc>,
    pub binary: Vec<u8>,
}

impl Client {
    pub fn connect(address: &Path) -> Result<Self> {
        let name = address
            .to_fs_name::<GenericFilePath>()
            .with_context(|| format!("socket address {}", address.display()))?;
        let stream = Stream::connect(name).with_context(|| {
            format!(
                "no trellisd daemon at {} (start one with `trellisd serve --model ...`)",
                address.display()
            )
        })?;
        Ok(Self { stream, next_id: 1 })
    }

    /// Sends a request; returns its id.
    pub fn send(&mut self, op: Op, arrays: Vec<ArrayDesc>, binary: Vec<u8>) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = Frame::from_message(&Request { id, op, arrays }, binary)?;
        frame.write_to(&mut self.stream, &Limits::default())?;
        Ok(id)
    }

    /// Reads the next reply.
    pub fn recv(&mut self) -> Result<(Reply, Vec<u8>)> {
        let frame = Frame::read_from(&mut self.stream, &Limits::default())?;
        Ok((frame.message()?, frame.binary))
    }

    /// Sends `op` and waits for its final reply, passing progress replies to `progress`.
    pub fn call_with(
        &mut self,
        op: Op,
        arrays: Vec<ArrayDesc>,
        binary: Vec<u8>,
        mut progress: impl FnMut(&ProgressInfo),
    ) -> Result<Answer> {
        let id = self.send(op, arrays, binary)?;
        loop {
            let (reply, binary) = self.recv()?;
            if reply.id != id {
                continue;
            }
            match reply.outcome {
                Outcome::Progress(p) => progress(&p),
                Outcome::Ok { result, arrays } => {
                    return Ok(Answer {
                        result,
                        arrays,
                        binary,
                    })
                }
                Outcome::Error(e) => return Err(RemoteError(e).into()),
            }
        }
    }

    pub fn call(&mut self, op: Op) -> Result<serde_json::Value> {
        Ok(self.call_with(op, Vec::new(), Vec::new(), |_| {})?.result)
    }

    /// Fetches an asset's arrays and copies them out (releasing a shared-memory buffer).
    pub fn fetch(&mut self, asset: &str, what: Format, transport: Transport) -> Result<Arrays> {
        let a = self.call_with(
            Op::Fetch(trellis_ipc_protocol::FetchParams {
                asset: asset.to_string(),
                what,
                transport,
            }),
            Vec::new(),
            Vec::new(),
            |_| {},
        )?;
        let r: FetchResult = serde_json::from_value(a.result)?;
        let data = match &r.buffer {
            None => a.binary,
            Some(b) => {
                let f = std::fs::File::open(&b.path).with_context(|| b.path.clone())?;
                let data = if b.size == 0 {
                    Vec::new()
                } else {
                    // SAFETY: the daemon never changes a buffer file after its reply.
                    let map = unsafe { memmap2::Mmap::map(&f)? };
                    map.to_vec()
                };
                self.call(Op::Release(trellis_ipc_protocol::ReleaseParams {
                    buffer: b.buffer.clone(),
                }))?;
                data
            }
        };
        Ok(Arrays {
            arrays: a.arrays,
            data,
            transport: r.transport,
        })
    }
}

/// Fetched arrays and their bytes.
pub struct Arrays {
    pub arrays: Vec<ArrayDesc>,
    pub data: Vec<u8>,
    pub transport: Transport,
}

impl Arrays {
    fn get(&self, name: &str, dtype: DType) -> Result<(&ArrayDesc, &[u8])> {
        let d = self
            .arrays
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| anyhow!("no array {name:?} in the reply"))?;
        ensure!(d.dtype == dtype, "array {name:?} is {:?}", d.dtype);
        Ok((d, d.slice(&self.data)?))
    }

    pub fn has(&self, name: &str) -> bool {
        self.arrays.iter().any(|a| a.name == name)
    }

    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let (_, b) = self.get(name, DType::F32)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    pub fn u32(&self, name: &str) -> Result<Vec<u32>> {
        let (_, b) = self.get(name, DType::U32)?;
        Ok(b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Writes a mesh's arrays as a GLB.
    pub fn write_glb(&self, path: &Path) -> Result<()> {
        let pos = self.f32("positions")?;
        let tri = self.u32("triangles")?;
        if tri.is_empty() {
            bail!("the mesh is empty; nothing written to {}", path.display());
        }
        let vertices: Vec<[f32; 3]> = pos.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
        let faces: Vec<[u32; 3]> = tri.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
        let colors: Option<Vec<[f32; 3]>> = if self.has("colors") {
            Some(
                self.f32("colors")?
                    .chunks_exact(3)
                    .map(|c| [c[0], c[1], c[2]])
                    .collect(),
            )
        } else {
            None
        };
        crate::export::glb::write_glb(
            path,
            &crate::export::glb::GlbMesh {
                vertices: &vertices,
                faces: &faces,
                colors: colors.as_deref(),
            },
        )
    }
}
