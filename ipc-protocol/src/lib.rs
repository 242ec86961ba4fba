//! The trellis-rs wire format between a client and the resident `trellisd` daemon.
//!
//! A message is one **frame**: a fixed 20-byte little-endian header, a UTF-8 JSON section, and a
//! binary section holding raw arrays (images in, meshes / Gaussians / latents out) that the JSON
//! describes with [`ArrayDesc`] (dtype, shape, byte offset into the binary section).
//!
//! ```text
//! offset  size  field
//! 0       4     magic  b"TRLS"
//! 4       2     protocol version (u16, = PROTOCOL_VERSION)
//! 6       2     flags (u16, reserved, 0)
//! 8       4     JSON length in bytes (u32)
//! 12      8     binary length in bytes (u64)
//! 20      ..    JSON, then binary
//! ```
//!
//! The JSON of a request is a [`Request`] (`id` chosen by the client, unique among its requests in
//! flight), the JSON of a reply is a [`Reply`] carrying the same `id`: zero or more `progress`
//! replies, then exactly one `ok` or `error` reply. Both sides enforce [`Limits`] before
//! allocating anything.

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

mod messages;
pub use messages::*;

/// Version of this protocol; a peer with another version is refused with
/// [`ErrorCode::VersionMismatch`].
pub const PROTOCOL_VERSION: u16 = 1;
/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TRLS";
/// Size of the frame header.
pub const HEADER_LEN: usize = 20;

/// Everything that can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("not a trellis-rs frame (magic {0:02x?}, expected \"TRLS\")")]
    BadMagic([u8; 4]),
    #[error("protocol version {got} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { got: u16 },
    #[error("frame flags {0:#06x} are not supported (expected 0)")]
    UnsupportedFlags(u16),
    #[error("JSON section of {len} bytes exceeds the limit of {max} bytes")]
    JsonTooLarge { len: u64, max: u64 },
    #[error("binary section of {len} bytes exceeds the limit of {max} bytes")]
    BinaryTooLarge { len: u64, max: u64 },
    #[error("truncated frame: needed {need} bytes, got {got}")]
    Truncated { need: u64, got: u64 },
    #[error("bad JSON section: {0}")]
    Json(#[from] serde_json::Error),
    #[error("array {name:?}: {reason}")]
    BadArray { name: String, reason: String },
    #[error("reply id {got} does not match request id {expected}")]
    IdMismatch { expected: u64, got: u64 },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, ProtocolError>;

/// Size limits enforced before a section is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_json: u64,
    pub max_binary: u64,
}

impl Limits {
    /// What the daemon accepts from a client: 16 MiB of JSON, 1 GiB of binary (uploads).
    pub fn requests() -> Self {
        Self {
            max_json: 16 << 20,
            max_binary: 1 << 30,
        }
    }
}

impl Default for Limits {
    /// 16 MiB of JSON, 8 GiB of binary (a dense mesh with attributes stays far below).
    fn default() -> Self {
        Self {
            max_json: 16 << 20,
            max_binary: 8 << 30,
        }
    }
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub flags: u16,
    pub json_len: u32,
    pub binary_len: u64,
}

impl FrameHeader {
    /// A header of this protocol version for sections of the given lengths.
    pub fn new(json_len: usize, binary_len: usize, limits: &Limits) -> Result<Self> {
        let json_len_u64 = json_len as u64;
        if json_len_u64 > limits.max_json || json_len_u64 > u32::MAX as u64 {
            return Err(ProtocolError::JsonTooLarge {
                len: json_len_u64,
                max: limits.max_json.min(u32::MAX as u64),
            });
        }
        if binary_len as u64 > limits.max_binary {
            return Err(ProtocolError::BinaryTooLarge {
                len: binary_len as u64,
                max: limits.max_binary,
            });
        }
        Ok(Self {
            version: PROTOCOL_VERSION,
            flags: 0,
            json_len: json_len as u32,
            binary_len: binary_len as u64,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.json_len.to_le_bytes());
        b[12..20].copy_from_slice(&self.binary_len.to_le_bytes());
        b
    }

    /// Decodes and checks magic, version, flags and limits.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(ProtocolError::Truncated {
                need: HEADER_LEN as u64,
                got: bytes.len() as u64,
            });
        }
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion { got: version });
        }
        let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
        if flags != 0 {
            return Err(ProtocolError::UnsupportedFlags(flags));
        }
        let json_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let mut bin = [0u8; 8];
        bin.copy_from_slice(&bytes[12..20]);
        let binary_len = u64::from_le_bytes(bin);
        if json_len as u64 > limits.max_json {
            return Err(ProtocolError::JsonTooLarge {
                len: json_len as u64,
                max: limits.max_json,
            });
        }
        if binary_len > limits.max_binary {
            return Err(ProtocolError::BinaryTooLarge {
                len: binary_len,
                max: limits.max_binary,
            });
        }
        Ok(Self {
            version,
            flags,
            json_len,
            binary_len,
        })
    }
}

/// A whole frame: JSON text and binary payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub json: Vec<u8>,
    pub binary: Vec<u8>,
}

impl Frame {
    /// A frame holding `message` as JSON and `binary` as payload.
    pub fn from_message<T: Serialize>(message: &T, binary: Vec<u8>) -> Result<Self> {
        Ok(Self {
            json: serde_json::to_vec(message)?,
            binary,
        })
    }

    /// The JSON section as a message.
    pub fn message<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.json)?)
    }

    /// Header + JSON + binary in one buffer.
    pub fn encode(&self, limits: &Limits) -> Result<Vec<u8>> {
        let h = FrameHeader::new(self.json.len(), self.binary.len(), limits)?;
        let mut out = Vec::with_capacity(HEADER_LEN + self.json.len() + self.binary.len());
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(&self.json);
        out.extend_from_slice(&self.binary);
        Ok(out)
    }

    /// Decodes one frame from the start of `bytes`; returns it and the number of bytes used.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<(Self, usize)> {
        let h = FrameHeader::decode(bytes, limits)?;
        let json_end = HEADER_LEN as u64 + h.json_len as u64;
        let end = json_end
            .checked_add(h.binary_len)
            .ok_or(ProtocolError::BinaryTooLarge {
                len: h.binary_len,
                max: limits.max_binary,
            })?;
        if (bytes.len() as u64) < end {
            return Err(ProtocolError::Truncated {
                need: end,
                got: bytes.len() as u64,
            });
        }
        let (json_end, end) = (json_end as usize, end as usize);
        Ok((
            Self {
                json: bytes[HEADER_LEN..json_end].to_vec(),
                binary: bytes[json_end..end].to_vec(),
            },
            end,
        ))
    }

    /// Writes the frame to a stream.
    pub fn write_to(&self, w: &mut impl Write, limits: &Limits) -> Result<()> {
        let h = FrameHeader::new(self.json.len(), self.binary.len(), limits)?;
        w.write_all(&h.encode())?;
        w.write_all(&self.json)?;
        w.write_all(&self.binary)?;
        w.flush()?;
        Ok(())
    }

    /// Reads one frame from a stream, checking the header before allocating the sections.
    pub fn read_from(r: &mut impl Read, limits: &Limits) -> Result<Self> {
        let mut head = [0u8; HEADER_LEN];
        read_exact_counted(r, &mut head, 0)?;
        let h = FrameHeader::decode(&head, limits)?;
        let mut json = vec![0u8; h.json_len as usize];
        read_exact_counted(r, &mut json, HEADER_LEN as u64)?;
        let binary_len =
            usize::try_from(h.binary_len).map_err(|_| ProtocolError::BinaryTooLarge {
                len: h.binary_len,
                max: usize::MAX as u64,
            })?;
        let mut binary = vec![0u8; binary_len];
        read_exact_counted(r, &mut binary, HEADER_LEN as u64 + h.json_len as u64)?;
        Ok(Self { json, binary })
    }
}

/// `read_exact` that reports how far the frame got on a premature end of stream.
fn read_exact_counted(r: &mut impl Read, buf: &mut [u8], before: u64) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    need: before + buf.len() as u64,
                    got: before + filled as u64,
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Element types an array of the binary section may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    U8,
    I32,
    I64,
    U32,
    F16,
    Bf16,
    F32,
    F64,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::Bf16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }
}

/// An array in the binary section: row-major, little-endian, starting at `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrayDesc {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub offset: u64,
}

impl ArrayDesc {
    /// Bytes the array occupies, or an error when the shape overflows.
    pub fn byte_len(&self) -> Result<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size_in_bytes() as u64, |acc, d| {
                acc.checked_mul(*d)
            })
            .ok_or_else(|| self.bad("shape overflows 64-bit byte counts"))
    }

    fn bad(&self, reason: impl Into<String>) -> ProtocolError {
        ProtocolError::BadArray {
            name: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// The array's bytes within `binary`: checks bounds and element alignment of the offset.
    pub fn slice<'a>(&self, binary: &'a [u8]) -> Result<&'a [u8]> {
        let len = self.byte_len()?;
        let size = self.dtype.size_in_bytes() as u64;
        if !self.offset.is_multiple_of(size) {
            return Err(self.bad(format!(
                "offset {} is not a multiple of the element size {size}",
                self.offset
            )));
        }
        let end = self
            .offset
            .checked_add(len)
            .filter(|e| *e <= binary.len() as u64)
            .ok_or_else(|| {
                self.bad(format!(
                    "bytes {}..{}+{len} lie outside the binary section of {} bytes",
                    self.offset,
                    self.offset,
                    binary.len()
                ))
            })?;
        Ok(&binary[self.offset as usize..end as usize])
    }
}

/// Appends arrays to a binary section, each aligned to 16 bytes, and describes them.
#[derive(Debug, Default)]
pub struct BinaryBuilder {
    pub binary: Vec<u8>,
    pub arrays: Vec<ArrayDesc>,
}

impl BinaryBuilder {
    /// Adds `bytes` (already little-endian) as array `name`; the length must match the shape.
    pub fn push(&mut self, name: &str, dtype: DType, shape: &[u64], bytes: &[u8]) -> Result<()> {
        let offset = self.binary.len().div_ceil(16) * 16;
        let desc = ArrayDesc {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            offset: offset as u64,
        };
        if desc.byte_len()? != bytes.len() as u64 {
            return Err(desc.bad(format!(
                "{} bytes given for shape {shape:?} of {dtype:?}",
                bytes.len()
            )));
        }
        self.binary.resize(offset, 0);
        self.binary.extend_from_slice(bytes);
        self.arrays.push(desc);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn header_round_trip_and_layout() {
        let h = FrameHeader::new(300, 70_000, &limits()).unwrap();
        let b = h.encode();
        assert_eq!(&b[0..4], b"TRLS");
        assert_eq!(u16::from_le_bytes([b[4], b[5]]), PROTOCOL_VERSION);
        assert_eq!(u32::from_le_bytes([b[8], b[9], b[10], b[11]]), 300);
        assert_eq!(b[12], (70_000u64 & 0xff) as u8);
        assert_eq!(FrameHeader::decode(&b, &limits()).unwrap(), h);
    }

    #[test]
    fn header_errors_are_specific() {
        let good = FrameHeader::new(10, 10, &limits()).unwrap().encode();
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&bad, &limits()),
            Err(ProtocolError::BadMagic(_))
        ));
        let mut bad = good;
        bad[4] = 9;
        assert!(matches!(
            FrameHeader::decode(&bad, &limits()),
            Err(ProtocolError::UnsupportedVersion { got: 9 })
        ));
        let mut bad = good;
        bad[6] = 1;
        assert!(matches!(
            FrameHeader::decode(&bad, &limits()),
            Err(ProtocolError::UnsupportedFlags(1))
        ));
        assert!(matches!(
            FrameHeader::decode(&good[..7], &limits()),
            Err(ProtocolError::Truncated { need: 20, got: 7 })
        ));
        let small = Limits {
            max_json: 5,
            max_binary: 5,
        };
        assert!(matches!(
            FrameHeader::decode(&good, &small),
            Err(ProtocolError::JsonTooLarge { len: 10, max: 5 })
        ));
        assert!(matches!(
            FrameHeader::new(1, 6, &small),
            Err(ProtocolError::BinaryTooLarge { len: 6, max: 5 })
        ));
        // A huge announced binary length is refused before any allocation.
        let mut huge = good;
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Frame::read_from(&mut &huge[..], &limits()),
            Err(ProtocolError::BinaryTooLarge { .. })
        ));
    }

    #[test]
    fn frames_round_trip_through_buffers_and_streams() {
        let req = Request {
            id: 7,
            op: Op::Generate(GenerateParams {
                model: Some("microsoft/TRELLIS-image-large".into()),
                images: vec![ImageInput::Array("image".into())],
                seed: Some(1),
                ..Default::default()
            }),
            arrays: Vec::new(),
        };
        let mut bb = BinaryBuilder::default();
        bb.push("image", DType::U8, &[2, 2, 4], &[1u8; 16]).unwrap();
        let req = Request {
            arrays: bb.arrays.clone(),
            ..req
        };
        let frame = Frame::from_message(&req, bb.binary.clone()).unwrap();
        let bytes = frame.encode(&limits()).unwrap();
        let (back, used) = Frame::decode(&bytes, &limits()).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, frame);
        assert_eq!(back.message::<Request>().unwrap(), req);

        let mut stream = Vec::new();
        frame.write_to(&mut stream, &limits()).unwrap();
        frame.write_to(&mut stream, &limits()).unwrap();
        let mut r = &stream[..];
        assert_eq!(Frame::read_from(&mut r, &limits()).unwrap(), frame);
        assert_eq!(Frame::read_from(&mut r, &limits()).unwrap(), frame);
        assert!(matches!(
            Frame::read_from(&mut r, &limits()),
            Err(ProtocolError::Truncated { need: 20, got: 0 })
        ));
        // Cut inside the binary section.
        let cut = &bytes[..bytes.len() - 3];
        assert!(matches!(
            Frame::decode(cut, &limits()),
            Err(ProtocolError::Truncated { .. })
        ));
        assert!(matches!(
            Frame::read_from(&mut &cut[..], &limits()),
            Err(ProtocolError::Truncated { .. })
        ));
    }

    #[test]
    fn json_shape_of_edit_requests() {
        let r: Request = serde_json::from_str(
            r#"{"id":6,"op":"edit","asset":"a-1","region":{"box":{"min":[-0.5,0,-0.5],"max":[0.5,0.5,0.5]}},"text":"a red roof","seed":3,"jumps":1,"jump_length":2}"#,
        )
        .unwrap();
        let Op::Edit(e) = &r.op else { panic!("{r:?}") };
        assert_eq!(e.asset, "a-1");
        let b = e.region.region_box.unwrap();
        assert_eq!((b.min, b.max), ([-0.5, 0.0, -0.5], [0.5, 0.5, 0.5]));
        assert_eq!(e.region.mask, None);
        assert_eq!((e.jumps, e.jump_length), (Some(1), Some(2)));
        assert_eq!(e.sampling().seed, Some(3));
        // Round trip, and unknown fields refused (inside the region too).
        let back: Request = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        for bad in [
            r#"{"id":6,"op":"edit","asset":"a","region":{"box":{"min":[0,0,0],"max":[1,1,1]},"sphere":1},"text":"x"}"#,
            r#"{"id":6,"op":"edit","asset":"a","region":{"box":{"min":[0,0],"max":[1,1,1]}},"text":"x"}"#,
            r#"{"id":6,"op":"edit","region":{"mask":"m"},"text":"x"}"#,
            r#"{"id":6,"op":"edit","asset":"a","text":"x"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_shape_of_requests_and_replies() {
        let r: Request = serde_json::from_str(r#"{"id":3,"op":"cancel","job":2}"#).unwrap();
        assert_eq!(r.op, Op::Cancel(JobRef { job: 2 }));
        let r: Request = serde_json::from_str(r#"{"id":4,"op":"ping"}"#).unwrap();
        assert_eq!(r.op, Op::Ping {});
        let r: Request = serde_json::from_str(
            r#"{"id":5,"op":"generate","text":"a crate","slat_steps":3,"formats":["mesh"],"wait":true}"#,
        )
        .unwrap();
        let Op::Generate(g) = &r.op else {
            panic!("{r:?}")
        };
        assert_eq!(g.text.as_deref(), Some("a crate"));
        assert_eq!(g.sampling().slat_steps, Some(3));
        assert_eq!(g.formats, vec![Format::Mesh]);
        assert!(g.wait);
        let r: Request = serde_json::from_str(
            r#"{"id":6,"op":"variant","mesh":{"arrays":{"vertices":"v","faces":"f"}},"text":"x"}"#,
        )
        .unwrap();
        assert!(
            matches!(&r.op, Op::Variant(v) if v.mesh == MeshInput::Arrays { vertices: "v".into(), faces: "f".into() })
        );
        assert!(serde_json::from_str::<Request>(r#"{"id":4,"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"ping"}"#).is_err());
        // Unknown fields are refused, not ignored.
        assert!(
            serde_json::from_str::<Request>(r#"{"id":4,"op":"generate","text":"a","sedd":1}"#)
                .is_err()
        );

        // parse_request answers the id it could read with a code.
        let e = parse_request(br#"{"id":9,"op":"explode"}"#).unwrap_err();
        assert_eq!((e.0, e.1), (9, ErrorCode::UnknownOp));
        let e = parse_request(b"{not json").unwrap_err();
        assert_eq!((e.0, e.1), (0, ErrorCode::BadRequest));
        let e = parse_request(br#"{"id":2,"op":"status","job":"x"}"#).unwrap_err();
        assert_eq!((e.0, e.1), (2, ErrorCode::BadRequest));
        let e = parse_request(br#"{"id":-1,"op":"ping"}"#).unwrap_err();
        assert_eq!(e.1, ErrorCode::BadRequest);
        for op in OPS {
            // every listed op is one the enum knows (a missing field is a bad request, not unknown)
            let text = format!(r#"{{"id":1,"op":"{op}"}}"#);
            if let Err(e) = parse_request(text.as_bytes()) {
                assert_eq!(e.1, ErrorCode::BadRequest, "{op}: {}", e.2);
            }
        }

        let reply = Reply::error(3, ErrorCode::ModelUnavailable, "no network");
        let text = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            text,
            r#"{"id":3,"status":"error","code":"model_unavailable","message":"no network"}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), reply);
        assert!(reply.is_final());
        let p: Reply = serde_json::from_str(
            r#"{"id":3,"status":"progress","job":1,"stage":"slat","step":2,"total":25}"#,
        )
        .unwrap();
        assert!(!p.is_final());
        let req = Request {
            id: 3,
            op: Op::Ping {},
            arrays: vec![],
        };
        assert!(p.check_answers(&req).is_ok());
        let other = Request { id: 4, ..req };
        assert!(matches!(
            p.check_answers(&other),
            Err(ProtocolError::IdMismatch {
                expected: 4,
                got: 3
            })
        ));
    }

    #[test]
    fn array_descriptors_are_bounds_and_alignment_checked() {
        let mut bb = BinaryBuilder::default();
        bb.push("a", DType::U8, &[3], &[1, 2, 3]).unwrap();
        let floats: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        bb.push("b", DType::F32, &[2], &floats).unwrap();
        assert_eq!(bb.arrays[1].offset, 16);
        let s = bb.arrays[1].slice(&bb.binary).unwrap();
        assert_eq!(f32::from_le_bytes([s[4], s[5], s[6], s[7]]), -2.0);
        assert!(bb.push("c", DType::F32, &[3], &floats).is_err());

        let d = ArrayDesc {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![4],
            offset: 16,
        };
        assert!(d.slice(&bb.binary).is_err(), "past the end");
        let d = ArrayDesc {
            offset: 2,
            shape: vec![1],
            ..d
        };
        assert!(d.slice(&bb.binary).is_err(), "misaligned");
        let d = ArrayDesc {
            offset: 0,
            shape: vec![u64::MAX, 2],
            ..d
        };
        assert!(
            d.byte_len().is_err() && d.slice(&bb.binary).is_err(),
            "overflow"
        );
        let d = ArrayDesc {
            offset: u64::MAX - 3,
            shape: vec![1],
            dtype: DType::U8,
            ..d
        };
        assert!(d.slice(&bb.binary).is_err(), "offset overflow");
    }
}
