//! Memory tiers and the out-of-memory fallback (`runtime::residency`) on the tiny repositories,
//! on the CPU: a weights budget too small for everything makes the job drop tiers and still
//! complete with outputs bit-identical to the everything-resident run; jobs after the first read
//! no file again, whatever the tier.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use trellis::jobs::{
    run_job, BackgroundRemoval, ConditionerOverrides, GenerateJob, ImageSource, Job, JobOutput,
    ModelCache, Prompt, Sampling,
};
use trellis::models::config::SamplerParams;
use trellis::pipelines::base::{ProgressEvent, RunControl};
use trellis::pipelines::image_to_3d::MultiImageMode;
use trellis::pipelines::loader::Formats;
use trellis::runtime::precision::PrecisionChoice;
use trellis::runtime::residency::{MemoryOptions, Placeable};
use trellis::runtime::tiers::Tier;

/// A coloured disc on a transparent background (no background removal needed).
fn disc() -> Arc<image::RgbaImage> {
    let mut img = image::RgbaImage::new(64, 64);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - 32.0, y as f32 - 30.0);
        if dx * dx + dy * dy < 22.0 * 22.0 {
            *p = image::Rgba([(x * 3) as u8, 140, (y * 4) as u8, 255]);
        }
    }
    Arc::new(img)
}

fn job() -> Job {
    let tiny = trellis::test_tiny_repos();
    let steps = SamplerParams {
        steps: Some(3),
        ..SamplerParams::default()
    };
    Job::Generate(GenerateJob {
        model: Some(tiny.image.to_string_lossy().to_string()),
        prompt: Prompt::Images(vec![ImageSource::Rgba(disc())]),
        multi_image_mode: MultiImageMode::Stochastic,
        sampling: Sampling {
            seed: 11,
            ss: steps.clone(),
            slat: steps,
        },
        formats: Formats::ALL,
        conditioners: ConditionerOverrides {
            image: Some(tiny.dinov2.to_string_lossy().to_string()),
            text: None,
        },
        background: BackgroundRemoval::default(),
    })
}

fn cache(memory: MemoryOptions) -> ModelCache {
    ModelCache::with_memory(Device::Cpu, PrecisionChoice::Full, 1, memory).unwrap()
}

fn run(cache: &mut ModelCache) -> JobOutput {
    let job = job();
    job.validate().unwrap();
    let mut sink = |_: &ProgressEvent| {};
    let mut ctl = RunControl {
        progress: &mut sink,
        cancel: None,
        keep_trajectory: false,
    };
    run_job(&job, cache, &mut ctl).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Everything a generation produced, as bits.
fn fingerprint(out: &JobOutput) -> Vec<Vec<u32>> {
    let JobOutput::Generated { generation: g, .. } = out else {
        panic!("not a generation");
    };
    let mut v = vec![
        bits(&g.coords.to_dtype(candle_core::DType::F32).unwrap()),
        bits(&g.slat.slat),
    ];
    let s = g.structure.as_ref().expect("structure");
    v.push(bits(&s.samples));
    let d = &g.decoded;
    assert!(!d.meshes.is_empty() && !d.gaussians.is_empty() && !d.radiance_fields.is_empty());
    for m in &d.meshes {
        v.push(m.vertices.iter().flatten().map(|x| x.to_bits()).collect());
        v.push(m.faces.iter().flatten().copied().collect());
        v.push(m.vertex_attrs.iter().map(|x| x.to_bits()).collect());
    }
    for gs in &d.gaussians {
        v.push(gs.xyz.iter().map(|x| x.to_bits()).collect());
    }
    v
}

fn memory(out: &JobOutput) -> (String, String) {
    let m = &out.meta()["memory"];
    (
        m["tier"].as_str().unwrap().to_string(),
        m["tier_at_end"].as_str().unwrap().to_string(),
    )
}

/// Weight bytes of the resident pipeline's networks: (all of them, largest one, decoders).
fn sizes(cache: &mut ModelCache) -> (u64, u64, u64) {
    let spec = trellis::test_tiny_repos()
        .image
        .to_string_lossy()
        .to_string();
    let r = cache.resident_mut(&spec).expect("resident pipeline");
    let p = &r.pipeline;
    let mut nets: Vec<u64> = vec![
        p.ss_flow.as_ref().unwrap().bytes(),
        p.ss_decoder.as_ref().unwrap().bytes(),
        p.slat_flow.bytes(),
    ];
    let dec = [
        p.decoders.mesh.as_ref().unwrap().bytes(),
        p.decoders.gaussian.as_ref().unwrap().bytes(),
        p.decoders.radiance_field.as_ref().unwrap().bytes(),
    ];
    nets.extend(dec);
    nets.push(r.image_conditioner.as_ref().unwrap().1.bytes());
    (
        nets.iter().sum(),
        *nets.iter().max().unwrap(),
        dec.iter().sum(),
    )
}

#[test]
fn a_small_budget_drops_tiers_and_gives_the_same_outputs() {
    // Everything resident (the CPU's tier), no budget.
    let mut resident = cache(MemoryOptions::default());
    let base = run(&mut resident);
    assert_eq!(memory(&base), ("cpu".into(), "cpu".into()));
    let (all, largest, decoders) = sizes(&mut resident);
    assert!(resident.residency.placed_bytes() == all, "cpu keeps all");
    let expected = fingerprint(&base);

    // A budget that holds the largest network but not everything: the first stage that would
    // exceed it drops to medium, which frees each stage's networks after it.
    let budget = largest;
    assert!(budget < all);
    let mut small = cache(MemoryOptions {
        budget: Some(budget),
        ..MemoryOptions::default()
    });
    let out = run(&mut small);
    let (start, end) = memory(&out);
    assert_eq!(start, "cpu");
    assert!(end == "medium" || end == "low", "{end}");
    assert_eq!(
        fingerprint(&out),
        expected,
        "outputs differ after the fallback"
    );
    assert_eq!(
        small.residency.placed_bytes(),
        0,
        "below high nothing stays"
    );
    let log = small.residency.stage_log();
    let fallbacks: usize = log.iter().map(|r| r.fallbacks).sum();
    assert!(fallbacks >= 1, "{log:?}");
    assert!(log.iter().all(|r| r.uploads <= 3), "{log:?}");

    // A second job reads no file again, though every network is placed anew.
    let loads = small.weight_loads();
    let again = run(&mut small);
    assert_eq!(small.weight_loads(), loads);
    assert_eq!(fingerprint(&again), expected);
    assert!(small
        .residency
        .stage_log()
        .iter()
        .any(|r| r.uploads > 0 && r.upload_bytes > 0));

    // Medium places the three decoders in one stage: a budget below their sum (but above every
    // single network) drops it to low there, which runs them one at a time.
    assert!(decoders > budget, "decoders {decoders} vs budget {budget}");
    let mut medium = cache(MemoryOptions {
        tier: Some(Tier::Medium),
        budget: Some(budget),
        ..MemoryOptions::default()
    });
    let out = run(&mut medium);
    assert_eq!(memory(&out), ("medium".into(), "low".into()));
    assert_eq!(fingerprint(&out), expected);
    let log = medium.residency.stage_log();
    let fell: Vec<(&str, &str, usize)> = log
        .iter()
        .filter(|r| r.fallbacks > 0)
        .map(|r| (r.stage.as_str(), r.tier.as_str(), r.fallbacks))
        .collect();
    assert_eq!(fell, vec![("mesh decoder", "low", 1)], "{log:?}");
}

#[test]
fn fixed_tiers_run_per_stage_and_match_the_resident_run() {
    let expected = fingerprint(&run(&mut cache(MemoryOptions::default())));
    for tier in [Tier::Medium, Tier::Low, Tier::Minimal] {
        let mut c = cache(MemoryOptions {
            tier: Some(tier),
            ..MemoryOptions::default()
        });
        let out = run(&mut c);
        assert_eq!(memory(&out), (tier.name().into(), tier.name().into()));
        assert_eq!(fingerprint(&out), expected, "tier {tier}");
        let log = c.residency.stage_log();
        let names: Vec<&str> = log.iter().map(|r| r.stage.as_str()).collect();
        if tier == Tier::Medium {
            assert!(names.contains(&"decoders"), "{names:?}");
        } else {
            for d in ["mesh decoder", "Gaussian decoder", "radiance-field decoder"] {
                assert!(names.contains(&d), "{names:?}");
            }
        }
        assert!(names.contains(&"conditioner") && names.contains(&"SLat flow"));
        assert_eq!(c.residency.placed_bytes(), 0);
        // Only minimal streams, and there both flows copy their two blocks in per forward.
        for r in &log {
            let flow = r.stage == "SLat flow" || r.stage == "sparse-structure flow";
            match r.streamed {
                Some(s) => assert!(
                    tier == Tier::Minimal && flow && s.blocks > 0 && s.blocks % 2 == 0,
                    "{tier}: {r:?}"
                ),
                None => assert!(tier != Tier::Minimal || !flow, "{tier}: {r:?}"),
            }
        }
    }
}

#[test]
fn a_budget_below_the_largest_network_fails_with_an_out_of_memory_error() {
    let mut c = cache(MemoryOptions {
        budget: Some(1024),
        ..MemoryOptions::default()
    });
    let job = job();
    let mut sink = |_: &ProgressEvent| {};
    let mut ctl = RunControl {
        progress: &mut sink,
        cancel: None,
        keep_trajectory: false,
    };
    let e = match run_job(&job, &mut c, &mut ctl) {
        Ok(_) => panic!("a 1 KiB budget cannot hold a network"),
        Err(e) => e,
    };
    assert!(trellis::runtime::residency::is_oom(&e), "{e:#}");
    let text = format!("{e:#}");
    assert!(text.contains("lowest tier (minimal)"), "{text}");
}

/// A sparse-structure flow of five blocks (more than `block_stream::AHEAD + 1`) with random
/// weights, as a loader builds it: placed at `minimal` it streams its blocks, keeps less on the
/// device, and gives the resident flow's output bit for bit, forward after forward.
#[test]
fn a_flow_streaming_its_blocks_gives_the_resident_flows_output() {
    use candle_nn::{VarBuilder, VarMap};
    use trellis::models::config::SparseStructureFlowConfig;
    use trellis::models::ss_flow::SparseStructureFlowModel;
    use trellis::modules::context::ContextCache;
    use trellis::pipelines::loader::host_network_streaming;
    use trellis::runtime::residency::Residency;
    use trellis::runtime::weights;

    let dev = Device::Cpu;
    let cfg: SparseStructureFlowConfig = serde_json::from_value(serde_json::json!({
        "resolution": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "cond_channels": 16, "num_blocks": 5, "num_heads": 2, "mlp_ratio": 2, "patch_size": 1,
        "pe_mode": "ape", "qk_rms_norm": true, "qk_rms_norm_cross": true, "use_fp16": false}))
    .unwrap();
    let varmap = VarMap::new();
    SparseStructureFlowModel::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev),
        candle_core::DType::F32,
    )
    .unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let network = || {
        host_network_streaming(
            "ss_flow",
            weights::from_tensors(tensors.clone(), "test", candle_core::DType::F32, &dev),
            cfg.clone(),
            candle_core::DType::F32,
            Some("blocks"),
            |c, vb, dt, stream| SparseStructureFlowModel::placed(c, vb, dt, stream),
            |check| Ok(check.finish()?),
        )
        .unwrap()
    };
    let (resident, streamed) = (network(), network());
    let x = Tensor::randn(0f32, 1.0, (2, 4, 4, 4, 4), &dev).unwrap();
    let t = Tensor::new(&[500f32, 250.0], &dev).unwrap();
    let cond = Tensor::randn(0f32, 1.0, (2, 6, 16), &dev).unwrap();

    let all = Residency::keep_all(&dev);
    let want = resident.place_on(&all).unwrap();
    let minimal = Residency::new(
        &dev,
        MemoryOptions {
            tier: Some(Tier::Minimal),
            ..MemoryOptions::default()
        },
    )
    .unwrap();
    let got = streamed.place_on(&minimal).unwrap();
    assert!(
        minimal.placed_bytes() < streamed.bytes() && streamed.placed_bytes() < streamed.bytes(),
        "{} of {} bytes placed",
        minimal.placed_bytes(),
        streamed.bytes()
    );
    let (mut a, mut b) = (ContextCache::new(), ContextCache::new());
    for _ in 0..2 {
        let w = want.forward_cached(&x, &t, &cond, &mut a).unwrap();
        let g = got.forward_cached(&x, &t, &cond, &mut b).unwrap();
        assert_eq!(bits(&g), bits(&w));
    }
}
