//! PyTorch checkpoints (`torch.save(state_dict)`), read without Python: both serialisations
//! `torch.load` accepts.
//!
//! * The zip format (PyTorch ≥ 1.6): `<name>/data.pkl` plus one entry per storage; read with
//!   candle's `pickle` module.
//! * The legacy format (PyTorch < 1.6, `_use_new_zipfile_serialization=False`), in which some
//!   public checkpoints (the U²-Net release among them, saved in 2020) may be stored: five items one
//!   after another: the magic-number pickle, the protocol-version pickle, a `sys_info` pickle, the
//!   state-dict pickle (storages as persistent ids `('storage', <Type>Storage, key, location,
//!   numel, view_metadata)`), the pickled list of storage keys, then for each key in that order the
//!   storage: its element count as a little-endian int64 followed by the raw little-endian data.
//!
//! The pickles are decoded with candle's unpickler (no Python code runs: only the opcodes that
//! build containers, numbers, strings and `_rebuild_tensor_v2` calls are understood).

use std::collections::HashMap;
use std::io::{BufRead, Cursor, Read};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

/// The legacy format's magic-number pickle: PROTO 2, LONG1 of 10 bytes
/// (0x1950a86a20f9469cfc6c), STOP.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// Largest checkpoint read into memory.
const MAX_BYTES: u64 = 8 << 30;

/// Every tensor of a `.pth` state dict, by its key. Errors name the file.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    ensure!(
        len <= MAX_BYTES,
        "{}: {len} bytes is larger than any checkpoint this reader takes",
        path.display()
    );
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .with_context(|| format!("{}: cannot read (empty or unreadable file)", path.display()))?;
    let result = if head == *b"PK\x03\x04" {
        read_zip(path)
    } else {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        read_legacy(&bytes)
    };
    result.with_context(|| {
        format!(
            "{}: not a readable PyTorch checkpoint (truncated or corrupt?)",
            path.display()
        )
    })
}

fn read_zip(path: &Path) -> Result<HashMap<String, Tensor>> {
    let all = candle_core::pickle::read_all(path).map_err(|e| anyhow!("{e}"))?;
    ensure!(!all.is_empty(), "no tensor found in the zip checkpoint");
    Ok(all.into_iter().collect())
}

fn unpickle(r: &mut Cursor<&[u8]>) -> Result<Object> {
    let mut stack = Stack::empty();
    stack.read_loop(r).map_err(|e| anyhow!("{e}"))?;
    stack.finalize().map_err(|e| anyhow!("{e}"))
}

/// The legacy (pre-zip) serialisation.
pub fn read_legacy(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    ensure!(
        bytes.starts_with(&LEGACY_MAGIC),
        "neither a zip checkpoint nor a legacy torch.save file (no magic number)"
    );
    let mut r = Cursor::new(bytes);
    r.consume(LEGACY_MAGIC.len());
    match unpickle(&mut r)? {
        Object::Int(1001) => {}
        other => bail!("unsupported legacy protocol version {other:?} (expected 1001)"),
    }
    let _sys_info = unpickle(&mut r)?;
    let state = unpickle(&mut r)?;
    let keys = match unpickle(&mut r)? {
        Object::List(k) => k
            .into_iter()
            .map(|k| k.unicode().map_err(|o| anyhow!("storage key {o:?}")))
            .collect::<Result<Vec<String>>>()?,
        other => bail!("expected the list of storage keys, found {other:?}"),
    };
    // Every tensor record, and from them each storage's element type.
    let entries = match state {
        Object::Dict(e) => e,
        Object::Build { callable, .. } => match *callable {
            Object::Dict(e) => e,
            other => bail!("the checkpoint is not a state dict ({other:?})"),
        },
        other => bail!("the checkpoint is not a state dict ({other:?})"),
    };
    let mut infos = Vec::new();
    for (name, value) in entries {
        let label = format!("{name:?}");
        match value.into_tensor_info(name, Path::new("")) {
            Ok(Some(info)) => infos.push(info),
            // `_metadata` and other non-tensor entries.
            Ok(None) => {}
            Err(e) => bail!("entry {label}: {e}"),
        }
    }
    ensure!(
        !infos.is_empty(),
        "no tensor found in the legacy checkpoint"
    );
    let key_of = |path: &str| path.trim_start_matches('/').to_string();
    let mut dtypes: HashMap<String, DType> = HashMap::new();
    for info in &infos {
        dtypes.insert(key_of(&info.path), info.dtype);
    }
    // The raw storages, in the order of the key list.
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut pos = r.position() as usize;
    for k in keys {
        let n = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| anyhow!("storage {k}: the file ends before its size"))?;
        let numel = u64::from_le_bytes([n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]]) as usize;
        pos += 8;
        let dtype = *dtypes
            .get(&k)
            .ok_or_else(|| anyhow!("storage {k} is used by no tensor (its size is unknown)"))?;
        let size = numel
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| anyhow!("storage {k}: size overflow"))?;
        let data = bytes
            .get(pos..pos + size)
            .ok_or_else(|| anyhow!("storage {k}: the file ends inside its data"))?;
        pos += size;
        let t = Tensor::from_raw_buffer(data, dtype, &[numel], &Device::Cpu)?;
        storages.insert(k, t);
    }
    let mut out = HashMap::new();
    for info in infos {
        let key = key_of(&info.path);
        let storage = storages
            .get(&key)
            .ok_or_else(|| anyhow!("tensor {}: storage {key} is not in the file", info.name))?;
        let layout = &info.layout;
        ensure!(
            layout.is_contiguous(),
            "tensor {}: non-contiguous tensors are not supported",
            info.name
        );
        let elem = info.dtype.size_in_bytes();
        let start = layout.start_offset() / elem;
        let count = layout.shape().elem_count();
        ensure!(
            start + count <= storage.elem_count(),
            "tensor {}: {count} values from {start} exceed its storage of {}",
            info.name,
            storage.elem_count()
        );
        let t = storage
            .narrow(0, start, count)?
            .reshape(layout.shape().dims())?;
        out.insert(info.name, t);
    }
    Ok(out)
}
