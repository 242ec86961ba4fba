//! Every bad input gets an error reply while the daemon keeps serving: malformed JSON, unknown
//! ops, missing and mistyped fields, limits, bad uploads, unknown jobs / assets / buffers, an
//! `edit` without a region, another protocol version; broken framing closes only that
//! connection; random JSON sections never stop the connection; a second `serve` names the
//! running one.
#![cfg(unix)]

mod serve_common;

use std::io::{Read, Write};

use serve_common::*;
use trellis_ipc_protocol::{ErrorCode, Outcome, Reply};

fn expect_error(r: &Reply, id: u64, code: ErrorCode, what: &str) {
    match &r.outcome {
        Outcome::Error(e) => {
            assert_eq!(r.id, id, "{what}: {r:?}");
            assert_eq!(e.code, code, "{what}: {}", e.message);
            assert!(!e.message.is_empty());
        }
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

fn ping(s: &mut std::os::unix::net::UnixStream, id: u64) {
    send_raw(s, format!(r#"{{"id":{id},"op":"ping"}}"#).as_bytes(), &[]);
    let (r, _) = recv(s);
    assert_eq!(r.id, id);
    assert!(matches!(r.outcome, Outcome::Ok { .. }), "{r:?}");
}

#[test]
fn bad_inputs_are_answered_and_the_daemon_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let d = Daemon::start(tmp.path(), &tiny, "cpu");
    // A second daemon on the same address refuses to start and names the first.
    let out = serve_command(tmp.path(), &tiny, "cpu").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already serving") && err.contains(&d.pid.to_string()),
        "{err}"
    );

    let mut s = d.raw();
    let png = png_bytes();
    let image = tiny.image.display().to_string();
    // (request JSON, binary, expected id, expected code)
    let cases: Vec<(String, Vec<u8>, u64, ErrorCode)> = vec![
        ("{not json".into(), vec![], 0, ErrorCode::BadRequest),
        ("[1,2]".into(), vec![], 0, ErrorCode::BadRequest),
        (r#"{"op":"ping"}"#.into(), vec![], 0, ErrorCode::BadRequest),
        (r#"{"id":-3,"op":"ping"}"#.into(), vec![], 0, ErrorCode::BadRequest),
        (r#"{"id":1,"op":"explode"}"#.into(), vec![], 1, ErrorCode::UnknownOp),
        (r#"{"id":2,"op":7}"#.into(), vec![], 2, ErrorCode::BadRequest),
        (r#"{"id":3}"#.into(), vec![], 3, ErrorCode::BadRequest),
        (r#"{"id":4,"op":"status"}"#.into(), vec![], 4, ErrorCode::BadRequest),
        (r#"{"id":5,"op":"status","job":"x"}"#.into(), vec![], 5, ErrorCode::BadRequest),
        (r#"{"id":6,"op":"status","job":999}"#.into(), vec![], 6, ErrorCode::NotFound),
        (r#"{"id":7,"op":"cancel","job":999}"#.into(), vec![], 7, ErrorCode::NotFound),
        (r#"{"id":8,"op":"hello","protocol":2}"#.into(), vec![], 8, ErrorCode::VersionMismatch),
        (r#"{"id":9,"op":"edit","asset":"x"}"#.into(), vec![], 9, ErrorCode::BadRequest),
        (r#"{"id":10,"op":"generate"}"#.into(), vec![], 10, ErrorCode::BadRequest),
        (r#"{"id":11,"op":"generate","text":"a","images":[{"path":"/x.png"}]}"#.into(), vec![], 11, ErrorCode::BadRequest),
        (r#"{"id":12,"op":"generate","text":"  "}"#.into(), vec![], 12, ErrorCode::BadRequest),
        (format!(r#"{{"id":13,"op":"generate","text":"{}"}}"#, "a".repeat(5000)), vec![], 13, ErrorCode::TooLarge),
        (r#"{"id":14,"op":"generate","text":"a","ss_steps":0}"#.into(), vec![], 14, ErrorCode::BadRequest),
        (r#"{"id":15,"op":"generate","text":"a","slat_steps":5000}"#.into(), vec![], 15, ErrorCode::TooLarge),
        (r#"{"id":16,"op":"generate","text":"a","slat_cfg":1e9}"#.into(), vec![], 16, ErrorCode::BadRequest),
        (r#"{"id":17,"op":"generate","text":"a","seeed":1}"#.into(), vec![], 17, ErrorCode::BadRequest),
        (r#"{"id":18,"op":"generate","text":"a","formats":["voxels"]}"#.into(), vec![], 18, ErrorCode::BadRequest),
        (r#"{"id":19,"op":"generate","text":"a","model":"nope/none"}"#.into(), vec![], 19, ErrorCode::ModelUnavailable),
        (format!(r#"{{"id":20,"op":"generate","text":"a","model":"{image}"}}"#), vec![], 20, ErrorCode::BadRequest),
        (r#"{"id":21,"op":"generate","images":[{"path":"relative.png"}]}"#.into(), vec![], 21, ErrorCode::BadRequest),
        (r#"{"id":22,"op":"generate","images":[{"path":"/no/such.png"}]}"#.into(), vec![], 22, ErrorCode::BadRequest),
        (r#"{"id":23,"op":"generate","images":[{"array":"missing"}]}"#.into(), vec![], 23, ErrorCode::BadRequest),
        (r#"{"id":24,"op":"generate","images":[{"array":"im"}],"arrays":[{"name":"im","dtype":"f32","shape":[2,2,4],"offset":0}]}"#.into(), vec![0; 64], 24, ErrorCode::BadRequest),
        (r#"{"id":25,"op":"generate","images":[{"array":"im"}],"arrays":[{"name":"im","dtype":"u8","shape":[9000,2,4],"offset":0}]}"#.into(), vec![0; 72000], 25, ErrorCode::TooLarge),
        (r#"{"id":26,"op":"generate","images":[{"array":"im"}],"arrays":[{"name":"im","dtype":"u8","shape":[8,8,4],"offset":0}]}"#.into(), vec![0; 16], 26, ErrorCode::BadRequest),
        (r#"{"id":27,"op":"generate","images":[{"array":"im"}],"arrays":[{"name":"im","dtype":"u8","shape":[8,8,4],"offset":0}]}"#.into(), vec![0; 256], 27, ErrorCode::BadRequest),
        (r#"{"id":28,"op":"generate","images":[{"encoded":"im"}],"arrays":[{"name":"im","dtype":"u8","shape":[5],"offset":0}]}"#.into(), b"junk!".to_vec(), 28, ErrorCode::BadRequest),
        (format!(r#"{{"id":29,"op":"generate","images":[{}],"arrays":[{{"name":"im","dtype":"u8","shape":[{}],"offset":0}}]}}"#, vec![r#"{"encoded":"im"}"#; 17].join(","), png.len()), png.clone(), 29, ErrorCode::TooLarge),
        (r#"{"id":30,"op":"variant","mesh":{"arrays":{"vertices":"v","faces":"f"}},"text":"a","arrays":[{"name":"v","dtype":"f32","shape":[3,3],"offset":0},{"name":"f","dtype":"u32","shape":[1,3],"offset":48}]}"#.into(), {
            let mut b: Vec<u8> = [0f32, 0., 0., 1., 0., 0., 0., 1., 0.].iter().flat_map(|x| x.to_le_bytes()).collect();
            b.resize(48, 0);
            b.extend([0u32, 1, 7].iter().flat_map(|x| x.to_le_bytes()));
            b
        }, 30, ErrorCode::BadRequest),
        (r#"{"id":31,"op":"variant","mesh":{"path":"/no/such.obj"},"text":"a"}"#.into(), vec![], 31, ErrorCode::BadRequest),
        (r#"{"id":32,"op":"variant","mesh":{"path":"/x.obj"},"text":"a","voxel_resolution":0}"#.into(), vec![], 32, ErrorCode::BadRequest),
        (r#"{"id":33,"op":"fetch","asset":"nope","what":"mesh"}"#.into(), vec![], 33, ErrorCode::NotFound),
        (r#"{"id":34,"op":"fetch","asset":"../../etc","what":"mesh"}"#.into(), vec![], 34, ErrorCode::NotFound),
        (r#"{"id":35,"op":"fetch","asset":"x","what":"mesh","transport":"pigeon"}"#.into(), vec![], 35, ErrorCode::BadRequest),
        (r#"{"id":36,"op":"release","buffer":"b1"}"#.into(), vec![], 36, ErrorCode::NotFound),
        (r#"{"id":37,"op":"assets_get","asset":"nope"}"#.into(), vec![], 37, ErrorCode::NotFound),
        (r#"{"id":38,"op":"assets_delete","asset":"../data"}"#.into(), vec![], 38, ErrorCode::NotFound),
        (r#"{"id":39,"op":"decode","asset":"nope","formats":["mesh"]}"#.into(), vec![], 39, ErrorCode::NotFound),
        (r#"{"id":40,"op":"decode","asset":"nope","formats":[]}"#.into(), vec![], 40, ErrorCode::BadRequest),
        (r#"{"id":41,"op":"generate","text":"a","arrays":[{"name":"x","dtype":"u8","shape":[4],"offset":0,"extra":1}]}"#.into(), vec![0; 4], 41, ErrorCode::BadRequest),
    ];
    let n = cases.len();
    for (i, (json, bin, id, code)) in cases.into_iter().enumerate() {
        send_raw(&mut s, json.as_bytes(), &bin);
        let (r, _) = recv(&mut s);
        expect_error(&r, id, code, &json[..json.len().min(120)]);
        ping(&mut s, 1000 + i as u64);
    }
    eprintln!("{n} bad requests answered on one connection");

    // Random JSON sections in well-formed frames: each answered, the connection stays usable.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let pieces = [
        "{",
        "}",
        "[",
        "]",
        "\"id\"",
        "\"op\"",
        ":",
        ",",
        "1",
        "-1",
        "\"generate\"",
        "\"status\"",
        "null",
        "true",
        "\"text\"",
        "1e999",
        "\"\\u0000\"",
        " ",
        "\"job\"",
        "{\"id\":5,",
    ];
    let fuzz_cases = 300;
    for k in 0..fuzz_cases {
        let len = (next() % 12) as usize;
        let json: String = (0..len)
            .map(|_| pieces[(next() % pieces.len() as u64) as usize])
            .collect();
        send_raw(&mut s, json.as_bytes(), &[]);
        let (r, _) = recv(&mut s);
        assert!(!matches!(r.outcome, Outcome::Progress(_)), "{json}: {r:?}");
        if k % 50 == 0 {
            ping(&mut s, 5000 + k);
        }
    }
    ping(&mut s, 9999);
    eprintln!("{fuzz_cases} random JSON sections answered");

    // Broken framing: one error reply with id 0, then that connection closes; others go on.
    for (bytes, code) in [
        (header(b"XXXX", 1, 0, 2, 0), ErrorCode::BadRequest),
        (header(b"TRLS", 9, 0, 2, 0), ErrorCode::VersionMismatch),
        (header(b"TRLS", 1, 4, 2, 0), ErrorCode::BadRequest),
        (header(b"TRLS", 1, 0, 2, 1 << 40), ErrorCode::TooLarge),
        (header(b"TRLS", 1, 0, u32::MAX, 0), ErrorCode::TooLarge),
    ] {
        let mut b = d.raw();
        b.write_all(&bytes).unwrap();
        let (r, _) = recv(&mut b);
        expect_error(&r, 0, code, "framing");
        let mut rest = Vec::new();
        assert_eq!(
            b.read_to_end(&mut rest).unwrap(),
            0,
            "connection not closed"
        );
    }
    // A frame cut short by a disconnect leaks nothing and blocks no one.
    {
        let mut b = d.raw();
        b.write_all(&header(b"TRLS", 1, 0, 100, 0)).unwrap();
        b.write_all(b"{\"id\":1").unwrap();
    }
    ping(&mut s, 10_000);
    let mut c = d.client();
    assert!(c.call(trellis_ipc_protocol::Op::Jobs {}).is_ok());
}
