//! The job queue shared by every client, and one worker thread per device. Workers keep their
//! models resident between jobs ([`ModelCache`]); a job's progress goes to its record (what
//! `status` reads) and to a watch channel (what `wait` follows).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use trellis_ipc_protocol::{JobInfo, JobState};

use super::assets::AssetStore;
use crate::jobs::{run_job, Job, ModelCache};
use crate::pipelines::base::{ProgressEvent, RunControl, Stage};
use crate::postprocessing::BakeOptions;

/// What a finished job does with its output.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A new asset, its GLB made with these options.
    NewAsset(BakeOptions),
    /// More formats for an existing asset (`decode`), its GLB made with these options.
    AddTo(String, BakeOptions),
}

struct Record {
    info: JobInfo,
    job: Option<(Job, Destination)>,
    cancel: Arc<AtomicBool>,
    queued_at: Instant,
    watch: tokio::sync::watch::Sender<JobInfo>,
}

#[derive(Default)]
struct State {
    jobs: BTreeMap<u64, Record>,
    queue: VecDeque<u64>,
    next_id: u64,
    stopping: bool,
}

pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    pub store: Arc<AssetStore>,
    /// Specs of the models resident per worker.
    resident: Mutex<Vec<Vec<String>>>,
}

impl Queue {
    pub fn new(store: Arc<AssetStore>, workers: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            store,
            resident: Mutex::new(vec![Vec::new(); workers]),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any worker holds `spec`.
    pub fn is_resident(&self, spec: &str) -> bool {
        self.resident
            .lock()
            .map(|r| r.iter().flatten().any(|s| s == spec))
            .unwrap_or(false)
    }

    /// Queues a validated job; returns its info and a receiver of its changes.
    pub fn submit(
        &self,
        job: Job,
        model: String,
        dest: Destination,
    ) -> Option<(JobInfo, tokio::sync::watch::Receiver<JobInfo>)> {
        let mut st = self.lock();
        if st.stopping {
            return None;
        }
        st.next_id += 1;
        let id = st.next_id;
        let info = JobInfo {
            job: id,
            kind: job.kind().to_string(),
            state: JobState::Queued,
            model,
            stage: Some("queued".into()),
            step: 0,
            total: 0,
            eta_s: None,
            queue_position: Some(st.queue.len() as u32),
            device: None,
            message: None,
            asset: None,
            preview: None,
            elapsed_s: 0.0,
            first_step_s: None,
            models_resident: None,
        };
        let (tx, rx) = tokio::sync::watch::channel(info.clone());
        st.jobs.insert(
            id,
            Record {
                info: info.clone(),
                job: Some((job, dest)),
                cancel: Arc::new(AtomicBool::new(false)),
                queued_at: Instant::now(),
                watch: tx,
            },
        );
        st.queue.push_back(id);
        drop(st);
        self.wake.notify_all();
        Some((info, rx))
    }

    fn snapshot(st: &State, id: u64) -> Option<JobInfo> {
        let r = st.jobs.get(&id)?;
        let mut i = r.info.clone();
        i.elapsed_s = r.queued_at.elapsed().as_secs_f64();
        i.queue_position = st.queue.iter().position(|q| *q == id).map(|p| p as u32);
        Some(i)
    }

    pub fn status(&self, id: u64) -> Option<JobInfo> {
        Self::snapshot(&self.lock(), id)
    }

    pub fn subscribe(&self, id: u64) -> Option<tokio::sync::watch::Receiver<JobInfo>> {
        self.lock().jobs.get(&id).map(|r| r.watch.subscribe())
    }

    pub fn list(&self) -> Vec<JobInfo> {
        let st = self.lock();
        st.jobs
            .keys()
            .filter_map(|id| Self::snapshot(&st, *id))
            .collect()
    }

    fn publish(r: &mut Record) {
        r.info.elapsed_s = r.queued_at.elapsed().as_secs_f64();
        r.watch.send_replace(r.info.clone());
    }

    /// Cancels a queued (removed at once) or running (stops within one sampler step) job.
    pub fn cancel(&self, id: u64) -> Option<JobInfo> {
        let mut st = self.lock();
        let queued = st.queue.iter().position(|q| *q == id);
        if let Some(p) = queued {
            st.queue.remove(p);
        }
        let r = st.jobs.get_mut(&id)?;
        r.cancel.store(true, Ordering::Relaxed);
        if queued.is_some() {
            r.job = None;
            r.info.state = JobState::Cancelled;
            r.info.message = Some("cancelled while queued".into());
            Self::publish(r);
        }
        Self::snapshot(&st, id)
    }

    /// Stops taking jobs, cancels the queued and running ones, wakes the workers.
    pub fn stop(&self) {
        let mut st = self.lock();
        st.stopping = true;
        let queued: Vec<u64> = st.queue.drain(..).collect();
        for r in st.jobs.values_mut() {
            r.cancel.store(true, Ordering::Relaxed);
        }
        for id in queued {
            if let Some(r) = st.jobs.get_mut(&id) {
                r.job = None;
                r.info.state = JobState::Cancelled;
                r.info.message = Some("the daemon stopped".into());
                Self::publish(r);
            }
        }
        drop(st);
        self.wake.notify_all();
    }

    /// The next job for a worker, or `None` when stopping.
    fn take(&self, device: &str) -> Option<(u64, Job, Destination, Arc<AtomicBool>)> {
        let mut st = self.lock();
        loop {
            if st.stopping {
                return None;
            }
            if let Some(id) = st.queue.pop_front() {
                let Some(r) = st.jobs.get_mut(&id) else {
                    continue;
                };
                let Some((job, dest)) = r.job.take() else {
                    continue;
                };
                r.info.state = JobState::Running;
                r.info.device = Some(device.to_string());
                r.info.stage = Some("loading".into());
                Self::publish(r);
                return Some((id, job, dest, r.cancel.clone()));
            }
            st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut JobInfo)) {
        let mut st = self.lock();
        if let Some(r) = st.jobs.get_mut(&id) {
            f(&mut r.info);
            Self::publish(r);
        }
    }

    /// A worker's loop: runs jobs on `cache`'s device until the queue stops.
    pub fn worker(self: Arc<Self>, index: usize, mut cache: ModelCache) {
        let device = cache.device_name.clone();
        while let Some((id, job, dest, cancel)) = self.take(&device) {
            let started = Instant::now();
            let mut stage_start: Option<(Stage, Instant)> = None;
            let mut progress = |e: &ProgressEvent| {
                let now = Instant::now();
                if stage_start.is_none_or(|(s, _)| s != e.stage) {
                    stage_start = Some((e.stage, now));
                }
                let sampling = matches!(e.stage, Stage::SparseStructure | Stage::StructuredLatent);
                let eta = match stage_start {
                    Some((_, t0)) if sampling && e.step > 0 => {
                        let per = now.duration_since(t0).as_secs_f64() / e.step as f64;
                        Some(per * e.steps.saturating_sub(e.step) as f64)
                    }
                    _ => None,
                };
                self.update(id, |i| {
                    i.stage = serde_json::to_value(e.stage)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from));
                    i.step = e.step as u32;
                    i.total = e.steps as u32;
                    i.eta_s = eta;
                    if e.detail.is_some() {
                        i.message = e.detail.clone();
                    }
                    if sampling && e.step >= 1 && i.first_step_s.is_none() {
                        i.first_step_s = Some(started.elapsed().as_secs_f64());
                    }
                });
            };
            let loads_before = cache.weight_loads();
            let result = {
                let mut ctl = RunControl {
                    progress: &mut progress,
                    cancel: Some(&cancel),
                    keep_trajectory: false,
                };
                run_job(&job, &mut cache, &mut ctl)
            };
            if let Ok(mut r) = self.resident.lock() {
                if let Some(slot) = r.get_mut(index) {
                    *slot = cache.resident();
                }
            }
            let resident = cache.weight_loads() == loads_before;
            self.update(id, |i| i.models_resident = Some(resident));
            let cancelled = cancel.load(Ordering::Relaxed);
            match result {
                Ok(out) if !cancelled => {
                    self.update(id, |i| {
                        i.stage = Some("writing".into());
                        i.eta_s = None;
                    });
                    let stored = match &dest {
                        Destination::NewAsset(glb) => {
                            self.store
                                .save_generation(&out, job.kind(), glb, &cache.device)
                        }
                        Destination::AddTo(a, glb) => {
                            self.store.add_formats(a, &out, glb, &cache.device)
                        }
                    };
                    drop(out);
                    self.update(id, |i| match stored {
                        Ok(a) => {
                            i.state = JobState::Done;
                            i.preview = a.files.get("preview").cloned();
                            i.asset = Some(a.asset);
                            i.stage = None;
                            i.message = None;
                        }
                        Err(e) => {
                            i.state = JobState::Failed;
                            i.message = Some(format!("storing the asset: {e:#}"));
                        }
                    });
                }
                Ok(_) => self.update(id, |i| {
                    i.state = JobState::Cancelled;
                    i.message = Some("cancelled".into());
                    i.eta_s = None;
                }),
                Err(e) => self.update(id, |i| {
                    i.eta_s = None;
                    if cancelled {
                        i.state = JobState::Cancelled;
                        i.message = Some(format!("{e:#}"));
                    } else {
                        i.state = JobState::Failed;
                        i.message = Some(format!("{e:#}"));
                    }
                }),
            }
        }
    }
}
