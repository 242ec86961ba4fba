//! `hub`: model repositories served by a mock Hugging Face hub on 127.0.0.1.
//!
//! The mock serves folders in the hub's URL layout (`/{owner}/{name}/resolve/{revision}/{file}`,
//! with the `etag`, `x-repo-commit` and `content-range` headers `hf-hub` reads; 404 +
//! `x-error-code: EntryNotFound` for a missing file, 401 + `RepositoryNotFound` for an unknown
//! repository, like the real hub; `.safetensors` files answer with a 302 to a "CDN" path carrying
//! `x-linked-etag`, as LFS files do) and counts every request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use trellis::hub::status::{cache_state, CacheState, RepoKind};
use trellis::hub::{open_pipeline, resolve_conditioner, HubOptions, PipelineClass};

const IMAGE: &str = "testorg/TRELLIS-image-tiny";
const TEXT: &str = "testorg/TRELLIS-text-tiny";

/// One request as the mock saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
}

struct MockHub {
    endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// While set, CDN downloads send half their body, then nothing for 3 s, then close.
    stall: Arc<std::sync::atomic::AtomicBool>,
}

impl MockHub {
    fn start(repos: BTreeMap<String, PathBuf>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let base = endpoint.clone();
        let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stall2 = stall.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (repos, log, base, stall) =
                    (repos.clone(), log.clone(), base.clone(), stall2.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &repos, &log, &base, &stall);
                });
            }
        });
        Self {
            endpoint,
            seen,
            stall,
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn opts(&self, cache: &Path) -> HubOptions {
        let mut o = HubOptions::new(self.endpoint.clone(), cache);
        o.probe_timeout = Duration::from_secs(2);
        o
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn serve(
    stream: TcpStream,
    repos: &BTreeMap<String, PathBuf>,
    log: &Mutex<Vec<Seen>>,
    endpoint: &str,
    stall: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
    });
    let mut out = stream;
    let reply = |out: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        out.write_all(head.as_bytes())?;
        if method != "HEAD" {
            out.write_all(body)?;
        }
        out.flush()
    };
    // Large files live on a "CDN" (`/cdn/{owner}/{name}/{file}`), like LFS files on the hub.
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let Some((repo_file, dir)) = rest
            .splitn(3, '/')
            .collect::<Vec<_>>()
            .get(..3)
            .and_then(|p| Some((p[2], repos.get(&format!("{}/{}", p[0], p[1]))?)))
        else {
            return reply(&mut out, "404 Not Found", &[], b"not found");
        };
        let Ok(data) = std::fs::read(dir.join(repo_file)) else {
            return reply(&mut out, "404 Not Found", &[], b"not found");
        };
        let headers = vec![("ETag".to_string(), format!("\"{:016x}\"", fnv(&data)))];
        if stall.load(std::sync::atomic::Ordering::Relaxed) && method != "HEAD" {
            let size = data.len();
            let from: usize = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, _)| a.parse().ok())
                .unwrap_or(0)
                .min(size);
            let body = &data[from..];
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Range: bytes {from}-{}/{size}\r\nContent-Length: {}\r\n\r\n",
                size.saturating_sub(1),
                body.len()
            );
            out.write_all(head.as_bytes())?;
            out.write_all(&body[..body.len() / 2])?;
            out.flush()?;
            std::thread::sleep(Duration::from_secs(3));
            return Ok(());
        }
        return send_range(&mut out, range.as_deref(), headers, &data, &reply);
    }
    // /{owner}/{name}/resolve/{revision}/{file...}
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if segs.len() != 5 || segs[2] != "resolve" {
        return reply(&mut out, "404 Not Found", &[], b"not found");
    }
    let repo = format!("{}/{}", segs[0], segs[1]);
    let Some(dir) = repos.get(&repo) else {
        let h = [("X-Error-Code".to_string(), "RepositoryNotFound".to_string())];
        return reply(&mut out, "401 Unauthorized", &h, b"Repository not found");
    };
    let Ok(data) = std::fs::read(dir.join(segs[4])) else {
        let h = [("X-Error-Code".to_string(), "EntryNotFound".to_string())];
        return reply(&mut out, "404 Not Found", &h, b"Entry not found");
    };
    let commit = format!("{:016x}{:016x}{:08x}", fnv(repo.as_bytes()), 7u64, 9u32);
    let etag = format!("\"{:016x}\"", fnv(&data));
    if segs[4].ends_with(".safetensors") {
        // The hub's answer for LFS files: a redirect to the CDN carrying the repository headers.
        let h = [
            (
                "Location".to_string(),
                format!("{endpoint}/cdn/{repo}/{}", segs[4]),
            ),
            ("X-Repo-Commit".to_string(), commit),
            ("X-Linked-Etag".to_string(), etag),
            ("X-Linked-Size".to_string(), data.len().to_string()),
        ];
        return reply(&mut out, "302 Found", &h, b"");
    }
    let headers = vec![
        ("ETag".to_string(), etag),
        ("X-Repo-Commit".to_string(), commit),
    ];
    send_range(&mut out, range.as_deref(), headers, &data, &reply)
}

type Reply<'a> =
    dyn Fn(&mut TcpStream, &str, &[(String, String)], &[u8]) -> std::io::Result<()> + 'a;

/// 206 with `Content-Range` for a `Range: bytes=a-[b]` request, else 200 with everything.
fn send_range(
    out: &mut TcpStream,
    range: Option<&str>,
    mut headers: Vec<(String, String)>,
    data: &[u8],
    reply: &Reply,
) -> std::io::Result<()> {
    let size = data.len();
    match range.and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() {
                size - 1
            } else {
                b.parse().unwrap()
            };
            let b = b.min(size.saturating_sub(1));
            headers.push(("Content-Range".to_string(), format!("bytes {a}-{b}/{size}")));
            let body = if a < size { &data[a..=b] } else { &data[0..0] };
            reply(out, "206 Partial Content", &headers, body)
        }
        None => reply(out, "200 OK", &headers, data),
    }
}

/// The tiny repositories (pipelines and conditioners side by side), generated from seeded
/// random weights.
fn pipelines_dir() -> PathBuf {
    trellis::test_tiny_repos().root
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
            // Reference files are read-only; copies must be editable.
            let mut perm = std::fs::metadata(&to).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&to, perm).unwrap();
        }
    }
}

/// The text-tiny repository, rewritten so its decoders point at another hub repository
/// (`testorg/TRELLIS-image-tiny/ckpts/<stem>`), like the official text repositories do.
fn text_repo_pointing_at_hub(tmp: &Path) -> PathBuf {
    let dst = tmp.join("text");
    copy_dir(&pipelines_dir().join("TRELLIS-text-tiny"), &dst);
    let pj = dst.join("pipeline.json");
    let text = std::fs::read_to_string(&pj)
        .unwrap()
        .replace("../TRELLIS-image-tiny/", &format!("{IMAGE}/"));
    assert!(text.contains(&format!("{IMAGE}/ckpts/slat_dec_gs")));
    std::fs::write(&pj, text).unwrap();
    dst
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn standard_hub(tmp: &Path) -> MockHub {
    let mut repos = BTreeMap::new();
    repos.insert(
        IMAGE.to_string(),
        pipelines_dir().join("TRELLIS-image-tiny"),
    );
    repos.insert(TEXT.to_string(), text_repo_pointing_at_hub(tmp));
    MockHub::start(repos)
}

#[test]
fn downloads_into_the_cache_once_then_reuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = standard_hub(tmp.path());
    let cache = tmp.path().join("cache");
    let opts = hub.opts(&cache);

    let text = open_pipeline(TEXT, &opts).unwrap();
    assert_eq!(text.config.class, PipelineClass::TextTo3D);
    assert_eq!(text.models.len(), 6);
    let first = hub.count();
    // pipeline.json + 6 models × 2 files (+ the probe, + a 404 per cross-repo entry tried inside
    // the text repository first).
    assert!(first >= 13, "{first} requests");
    for files in text.models.values() {
        assert!(files.config.is_file() && files.weights.is_file());
    }
    // The decoders came from the other repository, with the reference bytes.
    let gs = text.model("slat_decoder_gs").unwrap();
    assert!(gs
        .weights
        .starts_with(cache.join("models--testorg--TRELLIS-image-tiny/snapshots")));
    let reference =
        pipelines_dir().join("TRELLIS-image-tiny/ckpts/slat_dec_gs_swin8_tiny.safetensors");
    assert_eq!(
        std::fs::read(&gs.weights).unwrap(),
        std::fs::read(reference).unwrap()
    );
    // The standard layout.
    let repo_dir = cache.join("models--testorg--TRELLIS-text-tiny");
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).unwrap();
    assert_eq!(text.root, repo_dir.join("snapshots").join(commit.trim()));
    assert!(std::fs::read_dir(repo_dir.join("blobs")).unwrap().count() >= 3);

    // Second run: everything from the cache, not one request.
    let again = open_pipeline(TEXT, &opts).unwrap();
    assert_eq!(hub.count(), first);
    assert_eq!(again.models, text.models);

    // The image pipeline shares the four decoders: only pipeline.json and the two flows move.
    let image = open_pipeline(IMAGE, &opts).unwrap();
    let new: Vec<String> = hub.seen()[first..].iter().map(|s| s.path.clone()).collect();
    let downloads: Vec<&String> = new.iter().filter(|p| p.contains("/resolve/")).collect();
    // Each file costs a metadata request and a body request.
    assert_eq!(downloads.len(), 2 * 5, "{new:#?}");
    // Weights went through the LFS-style redirect; the two new ones each cost a metadata and a
    // body request at the CDN.
    assert_eq!(
        new.iter().filter(|p| p.starts_with("/cdn/")).count(),
        2 * 2,
        "{new:#?}"
    );
    assert!(
        downloads.iter().all(|p| !p.contains("slat_dec_")),
        "{new:#?}"
    );
    assert_eq!(
        image.config.image_cond_model.as_deref(),
        Some("dinov2_vitl14_reg")
    );

    assert!(matches!(
        cache_state(TEXT, RepoKind::Pipeline, &opts),
        CacheState::Complete { bytes } if bytes > 1_000_000
    ));
    assert_eq!(
        cache_state("microsoft/TRELLIS-image-large", RepoKind::Pipeline, &opts),
        CacheState::Absent
    );
}

#[test]
fn offline_uses_the_cache_only_and_lists_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = standard_hub(tmp.path());
    let cache = tmp.path().join("cache");
    let mut opts = hub.opts(&cache);
    opts.offline = true;

    // Empty cache.
    let e = format!("{:#}", open_pipeline(TEXT, &opts).unwrap_err());
    assert!(
        e.contains("pipeline.json") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    assert!(e.contains("--model DIR"), "{e}");
    assert_eq!(hub.count(), 0);

    // Filled cache: works without a request.
    opts.offline = false;
    open_pipeline(TEXT, &opts).unwrap();
    let n = hub.count();
    opts.offline = true;
    let p = open_pipeline(TEXT, &opts).unwrap();
    assert_eq!(hub.count(), n);

    // Partial cache: both missing files are named, the present ones are not.
    std::fs::remove_file(&p.model("slat_flow_model").unwrap().weights).unwrap();
    std::fs::remove_file(&p.model("slat_decoder_mesh").unwrap().config).unwrap();
    let e = format!("{:#}", open_pipeline(TEXT, &opts).unwrap_err());
    assert!(e.contains("2 file(s) missing"), "{e}");
    assert!(
        e.contains(&format!("{TEXT}/ckpts/slat_flow_txt_dit_tiny.safetensors")),
        "{e}"
    );
    assert!(
        e.contains(&format!("{IMAGE}/ckpts/slat_dec_mesh_swin8_tiny.json")),
        "{e}"
    );
    assert!(!e.contains("ss_flow"), "{e}");
    assert_eq!(hub.count(), n);
    match cache_state(TEXT, RepoKind::Pipeline, &opts) {
        CacheState::Partial { missing } => assert_eq!(missing.len(), 2, "{missing:?}"),
        other => panic!("{other:?}"),
    }

    // Online again: only the two missing files are fetched.
    opts.offline = false;
    open_pipeline(TEXT, &opts).unwrap();
    let fetched: Vec<Seen> = hub.seen()[n..].to_vec();
    assert!(
        fetched
            .iter()
            .filter(|s| s.path.contains("/resolve/"))
            .all(|s| s.path.contains("slat_flow_txt") || s.path.contains("slat_dec_mesh")),
        "{fetched:#?}"
    );
}

#[test]
fn a_file_missing_on_the_hub_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    copy_dir(&pipelines_dir().join("TRELLIS-image-tiny"), &img);
    std::fs::remove_file(img.join("ckpts/ss_dec_conv3d_tiny.safetensors")).unwrap();
    std::fs::remove_file(img.join("ckpts/slat_dec_rf_swin8_tiny.json")).unwrap();
    let hub = MockHub::start(BTreeMap::from([(IMAGE.to_string(), img.clone())]));
    let opts = hub.opts(&tmp.path().join("cache"));
    let e = format!("{:#}", open_pipeline(IMAGE, &opts).unwrap_err());
    assert!(e.contains("2 file(s) missing"), "{e}");
    assert!(
        e.contains(&format!("{IMAGE}/ckpts/ss_dec_conv3d_tiny.safetensors")),
        "{e}"
    );
    assert!(
        e.contains(&format!("{IMAGE}/ckpts/slat_dec_rf_swin8_tiny.json")),
        "{e}"
    );

    // An unknown repository.
    let e = format!(
        "{:#}",
        open_pipeline("testorg/nothing-here", &opts).unwrap_err()
    );
    assert!(
        e.contains("testorg/nothing-here") && e.contains("no such repository"),
        "{e}"
    );

    // The same folder used locally: the missing files are named by path.
    let e = format!(
        "{:#}",
        open_pipeline(img.to_str().unwrap(), &opts).unwrap_err()
    );
    assert!(
        e.contains("ss_dec_conv3d_tiny.safetensors") && e.contains("slat_dec_rf_swin8_tiny.json"),
        "{e}"
    );
}

#[test]
fn an_unknown_pipeline_key_is_an_error_naming_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    copy_dir(&pipelines_dir().join("TRELLIS-image-tiny"), &img);
    edit_json(&img.join("pipeline.json"), |v| {
        v["args"]["slat_sampler"]["params"]["eta"] = serde_json::Value::from(0.5);
    });
    let hub = MockHub::start(BTreeMap::from([(IMAGE.to_string(), img.clone())]));
    let opts = hub.opts(&tmp.path().join("cache"));
    let e = format!("{:#}", open_pipeline(IMAGE, &opts).unwrap_err());
    assert!(
        e.contains("pipeline.json") && e.contains("args.slat_sampler.params") && e.contains("eta"),
        "{e}"
    );

    edit_json(&img.join("pipeline.json"), |v| {
        v["args"]["slat_sampler"]["params"]
            .as_object_mut()
            .unwrap()
            .remove("eta");
        v["args"]["preprocess"] = serde_json::Value::from(true);
    });
    let e = format!(
        "{:#}",
        open_pipeline(img.to_str().unwrap(), &opts).unwrap_err()
    );
    assert!(
        e.contains(&img.join("pipeline.json").display().to_string())
            && e.contains("args.preprocess"),
        "{e}"
    );
}

#[test]
fn local_folders_resolve_relative_entries_without_network() {
    let opts = HubOptions::new("http://127.0.0.1:9", "/nonexistent-cache");
    let dir = pipelines_dir().join("TRELLIS-text-tiny");
    let p = open_pipeline(dir.to_str().unwrap(), &opts).unwrap();
    assert_eq!(p.models.len(), 6);
    let dec = p.model("sparse_structure_decoder").unwrap();
    assert!(dec.weights.is_file());
    assert!(dec.weights.to_string_lossy().contains("TRELLIS-image-tiny"));
    assert!(p.model("nope").is_err());
    // A conditioner folder relative to the repository becomes a usable path.
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repos/img");
    copy_dir(&pipelines_dir().join("TRELLIS-image-tiny"), &repo);
    copy_dir(
        &pipelines_dir().join("dinov2_reg_tiny"),
        &tmp.path().join("conds/dino"),
    );
    edit_json(&repo.join("pipeline.json"), |v| {
        v["args"]["image_cond_model"] = serde_json::Value::from("../../conds/dino");
    });
    let p = open_pipeline(repo.to_str().unwrap(), &opts).unwrap();
    let cond = p.config.image_cond_model.clone().unwrap();
    let dir = resolve_conditioner(&cond, &opts).unwrap();
    assert!(dir.join("model.safetensors").is_file(), "{cond}");
    let e = format!(
        "{:#}",
        open_pipeline("/definitely/not/here", &opts).unwrap_err()
    );
    assert!(e.contains("no such folder"), "{e}");
}

#[test]
fn corrupt_or_truncated_weights_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    copy_dir(&pipelines_dir().join("TRELLIS-image-tiny"), &img);
    let opts = HubOptions::new("http://127.0.0.1:9", tmp.path().join("cache"));
    let p = open_pipeline(img.to_str().unwrap(), &opts).unwrap();
    let w = &p.model("sparse_structure_flow_model").unwrap().weights;
    let bytes = std::fs::read(w).unwrap();
    // Intact: loads.
    assert!(trellis::runtime::weights::from_safetensors(w, DType::F32, &Device::Cpu).is_ok());
    // Truncated in the tensor data, in the header, and to nothing; garbage header.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated data", bytes[..bytes.len() / 2].to_vec()),
        ("truncated header", bytes[..20].to_vec()),
        ("empty", Vec::new()),
        ("garbage", {
            let mut b = bytes.clone();
            b[8..40].copy_from_slice(&[b'#'; 32]);
            b
        }),
        ("huge header length", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
    ];
    for (what, data) in cases {
        std::fs::write(w, &data).unwrap();
        let r = std::panic::catch_unwind(|| {
            trellis::runtime::weights::from_safetensors(w, DType::F32, &Device::Cpu).map(|_| ())
        });
        match r {
            Ok(Err(e)) => assert!(!format!("{e:#}").is_empty(), "{what}"),
            Ok(Ok(())) => panic!("{what}: loaded a broken file"),
            Err(_) => panic!("{what}: panicked"),
        }
    }
}

#[test]
fn unreachable_or_silent_endpoints_fail_fast_with_the_model_hint() {
    let tmp = tempfile::tempdir().unwrap();
    // A closed port.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut opts = HubOptions::new(format!("http://127.0.0.1:{port}"), tmp.path().join("c1"));
    opts.probe_timeout = Duration::from_secs(2);
    let t = Instant::now();
    let e = format!("{:#}", open_pipeline(IMAGE, &opts).unwrap_err());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(e.contains("--model DIR"), "{e}");

    // A server that accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    let mut opts = HubOptions::new(format!("http://{addr}"), tmp.path().join("c2"));
    opts.probe_timeout = Duration::from_secs(2);
    let t = Instant::now();
    let e = format!(
        "{:#}",
        resolve_conditioner("dinov2_vitl14_reg", &opts).unwrap_err()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(e.contains("--model DIR"), "{e}");
}

#[test]
fn conditioners_resolve_from_names_ids_and_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let cond = pipelines_dir();
    let clip_no_tok = tmp.path().join("clip");
    copy_dir(&cond.join("clip_text_tiny"), &clip_no_tok);
    std::fs::remove_file(clip_no_tok.join("tokenizer.json")).unwrap();
    let hub = MockHub::start(BTreeMap::from([
        (
            "facebook/dinov2-with-registers-large".to_string(),
            cond.join("dinov2_reg_tiny"),
        ),
        (
            "openai/clip-vit-large-patch14".to_string(),
            cond.join("clip_text_tiny"),
        ),
        ("testorg/clip-broken".to_string(), clip_no_tok.clone()),
    ]));
    let opts = hub.opts(&tmp.path().join("cache"));

    let d = resolve_conditioner("dinov2_vitl14_reg", &opts).unwrap();
    assert!(d.join("config.json").is_file() && d.join("model.safetensors").is_file());
    assert!(!d.join("tokenizer.json").exists());
    let c = resolve_conditioner("openai/clip-vit-large-patch14", &opts).unwrap();
    assert!(c.join("tokenizer.json").is_file());
    let n = hub.count();
    assert_eq!(
        resolve_conditioner("openai/clip-vit-large-patch14", &opts).unwrap(),
        c
    );
    assert_eq!(hub.count(), n);
    assert!(matches!(
        cache_state(
            "openai/clip-vit-large-patch14",
            RepoKind::Conditioner,
            &opts
        ),
        CacheState::Complete { .. }
    ));

    let e = format!(
        "{:#}",
        resolve_conditioner("testorg/clip-broken", &opts).unwrap_err()
    );
    assert!(e.contains("testorg/clip-broken/tokenizer.json"), "{e}");
    let e = format!(
        "{:#}",
        resolve_conditioner(clip_no_tok.to_str().unwrap(), &opts).unwrap_err()
    );
    assert!(e.contains("tokenizer.json"), "{e}");
    // Local folder, complete.
    let local = cond.join("dinov2_reg_tiny");
    assert_eq!(
        resolve_conditioner(local.to_str().unwrap(), &opts).unwrap(),
        local
    );
}

#[test]
fn an_interrupted_download_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = standard_hub(tmp.path());
    let cache = tmp.path().join("cache");
    let opts = hub.opts(&cache);
    let p = open_pipeline(IMAGE, &opts).unwrap();
    // Simulate an interruption: drop the finished blob and its snapshot link, keep half of it
    // as `<etag>.part`.
    let link = p.model("slat_decoder_mesh").unwrap().weights.clone();
    let blob = std::fs::canonicalize(&link).unwrap();
    let full = std::fs::read(&blob).unwrap();
    std::fs::remove_file(&link).unwrap();
    std::fs::remove_file(&blob).unwrap();
    let half = full.len() / 2;
    std::fs::write(blob.with_extension("part"), &full[..half]).unwrap();
    let n = hub.count();
    let again = open_pipeline(IMAGE, &opts).unwrap();
    let w = &again.model("slat_decoder_mesh").unwrap().weights;
    assert_eq!(std::fs::read(w).unwrap(), full);
    // The rest was asked for from the CDN the hub redirected to.
    let seen = hub.seen()[n..].to_vec();
    assert!(
        seen.iter().any(|s| s.path.starts_with("/cdn/")
            && s.path.ends_with("slat_dec_mesh_swin8_tiny.safetensors")
            && s.range == Some(format!("bytes={half}-"))),
        "{seen:#?}"
    );
}

#[test]
fn a_stalled_download_times_out_with_a_clear_message_and_resumes_later() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = standard_hub(tmp.path());
    let cache = tmp.path().join("cache");
    let mut opts = hub.opts(&cache);
    opts.stall_timeout = Duration::from_secs(1);
    hub.stall.store(true, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::Instant::now();
    let e = format!("{:#}", open_pipeline(IMAGE, &opts).unwrap_err());
    assert!(e.contains("stalled") && e.contains("run again"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    hub.stall.store(false, std::sync::atomic::Ordering::Relaxed);
    // The stalled connection ends (as a dead one does, in the end); the next run resumes.
    std::thread::sleep(Duration::from_secs(4));
    let n = hub.count();
    let p = open_pipeline(IMAGE, &opts).unwrap();
    assert!(
        hub.seen()[n..]
            .iter()
            .any(|s| s.path.starts_with("/cdn/") && s.range.as_deref() != Some("bytes=0-")),
        "nothing was resumed: {:#?}",
        &hub.seen()[n..]
    );
    assert!(p.model("slat_flow_model").unwrap().weights.is_file());
}

#[test]
fn doctor_reports_complete_partial_and_absent_official_repositories() {
    let tmp = tempfile::tempdir().unwrap();
    // The tiny repositories under official names: image-large itself, and text-base pointing at
    // the image repository by its old name (as the official text pipeline.json files do).
    let text = text_repo_pointing_at_hub(tmp.path());
    let pj = text.join("pipeline.json");
    let t = std::fs::read_to_string(&pj)
        .unwrap()
        .replace(IMAGE, "JeffreyXiang/TRELLIS-image-large");
    std::fs::write(&pj, t).unwrap();
    let hub = MockHub::start(BTreeMap::from([
        (
            "microsoft/TRELLIS-image-large".to_string(),
            pipelines_dir().join("TRELLIS-image-tiny"),
        ),
        ("microsoft/TRELLIS-text-base".to_string(), text),
    ]));
    let opts = hub.opts(&tmp.path().join("cache"));
    let p = open_pipeline("microsoft/TRELLIS-text-base", &opts).unwrap();
    // The decoders were fetched once, under the current name of the moved repository.
    assert!(p.model("slat_decoder_gs").unwrap().weights.starts_with(
        tmp.path()
            .join("cache/models--microsoft--TRELLIS-image-large")
    ));
    std::fs::remove_file(&p.model("slat_flow_model").unwrap().weights).unwrap();

    let mut out = Vec::new();
    let args = trellis::cli::doctor::DoctorArgs {
        device: Some("cpu".into()),
        check_kernels: false,
    };
    trellis::cli::doctor::report(&args, &opts, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let line = |repo: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(repo))
            .unwrap_or_else(|| panic!("{repo} not in\n{text}"))
            .to_string()
    };
    // image-large: only the decoders are there (no pipeline.json) → partial.
    assert!(
        line("microsoft/TRELLIS-image-large").contains("partial"),
        "{text}"
    );
    assert!(
        line("microsoft/TRELLIS-text-base").contains("partial: 1 missing"),
        "{text}"
    );
    assert!(
        line("microsoft/TRELLIS-text-large").contains("not downloaded"),
        "{text}"
    );

    // Fetch the rest: both complete.
    open_pipeline("microsoft/TRELLIS-text-base", &opts).unwrap();
    open_pipeline("microsoft/TRELLIS-image-large", &opts).unwrap();
    let mut out = Vec::new();
    trellis::cli::doctor::report(&args, &opts, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        line_of(&text, "microsoft/TRELLIS-image-large").contains("complete"),
        "{text}"
    );
    assert!(
        line_of(&text, "microsoft/TRELLIS-text-base").contains("complete"),
        "{text}"
    );
}

fn line_of(text: &str, repo: &str) -> String {
    text.lines()
        .find(|l| l.trim_start().starts_with(repo))
        .unwrap_or_default()
        .to_string()
}
