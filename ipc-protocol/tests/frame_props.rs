//! Property tests of the frame decoder: any frame round-trips; arbitrary bytes, truncations and
//! header mutations give an error (never a panic, never an allocation past the limits); a stream
//! of frames decodes frame by frame; `parse_request` answers any JSON with a request or a code.

use proptest::prelude::*;
use trellis_ipc_protocol::{parse_request, Frame, FrameHeader, Limits, ProtocolError, HEADER_LEN};

const CASES: u32 = 2000;

fn small() -> Limits {
    Limits {
        max_json: 4096,
        max_binary: 1 << 16,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn frames_round_trip(json in proptest::collection::vec(any::<u8>(), 0..512),
                         binary in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let f = Frame { json, binary };
        let bytes = f.encode(&small()).unwrap();
        prop_assert_eq!(bytes.len(), HEADER_LEN + f.json.len() + f.binary.len());
        let (back, used) = Frame::decode(&bytes, &small()).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&back, &f);
        let streamed = Frame::read_from(&mut &bytes[..], &small()).unwrap();
        prop_assert_eq!(streamed, f);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let a = Frame::decode(&bytes, &small());
        let b = Frame::read_from(&mut &bytes[..], &small());
        // Both agree on success, and a success uses only announced bytes.
        prop_assert_eq!(a.is_ok(), b.is_ok());
        if let Ok((f, used)) = a {
            prop_assert!(used <= bytes.len());
            prop_assert_eq!(used, HEADER_LEN + f.json.len() + f.binary.len());
        }
    }

    #[test]
    fn every_truncation_is_reported(json in proptest::collection::vec(any::<u8>(), 0..64),
                                    binary in proptest::collection::vec(any::<u8>(), 0..128),
                                    cut_frac in 0.0f64..1.0) {
        let bytes = Frame { json, binary }.encode(&small()).unwrap();
        let cut = ((bytes.len() as f64) * cut_frac) as usize;
        prop_assume!(cut < bytes.len());
        let is_truncated = matches!(
            Frame::decode(&bytes[..cut], &small()),
            Err(ProtocolError::Truncated { .. })
        );
        prop_assert!(is_truncated);
        let streamed_truncated = matches!(
            Frame::read_from(&mut &bytes[..cut], &small()),
            Err(ProtocolError::Truncated { .. })
        );
        prop_assert!(streamed_truncated);
    }

    #[test]
    fn header_fields_are_checked(magic in any::<[u8; 4]>(), version in any::<u16>(),
                                 flags in any::<u16>(), json_len in any::<u32>(),
                                 binary_len in any::<u64>()) {
        let mut h = Vec::new();
        h.extend_from_slice(&magic);
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&json_len.to_le_bytes());
        h.extend_from_slice(&binary_len.to_le_bytes());
        let r = FrameHeader::decode(&h, &small());
        let valid = magic == *b"TRLS" && version == 1 && flags == 0
            && u64::from(json_len) <= small().max_json && binary_len <= small().max_binary;
        prop_assert_eq!(r.is_ok(), valid);
        // A stream announcing huge sections is refused before reading (and allocating) them.
        if !valid {
            prop_assert!(Frame::read_from(&mut &h[..], &small()).is_err());
        }
    }

    #[test]
    fn several_frames_in_one_stream(frames in proptest::collection::vec(
        (proptest::collection::vec(any::<u8>(), 0..40), proptest::collection::vec(any::<u8>(), 0..80)), 1..6)) {
        let mut stream = Vec::new();
        for (j, b) in &frames {
            Frame { json: j.clone(), binary: b.clone() }.write_to(&mut stream, &small()).unwrap();
        }
        let mut r = &stream[..];
        for (j, b) in &frames {
            let f = Frame::read_from(&mut r, &small()).unwrap();
            prop_assert_eq!(&f.json, j);
            prop_assert_eq!(&f.binary, b);
        }
        prop_assert!(r.is_empty());
    }

    #[test]
    fn any_json_gets_a_request_or_a_code(s in ".{0,200}") {
        // Never panics; an error carries a message.
        if let Err((_, _, msg)) = parse_request(s.as_bytes()) {
            prop_assert!(!msg.is_empty());
        }
    }
}
