//! One job layer below both front ends: `trellisd generate` / `variant` / `edit` / `decode` run a job
//! in-process, the daemon runs the same job on a worker for a client. A job is its parameters
//! ([`params`]), the checks made before any network loads ([`Job::validate`]), a run on a
//! worker's resident models ([`run_job`], [`ModelCache`]) with progress events and cancel through
//! [`crate::pipelines::base::RunControl`], and its outputs ([`outputs`]).

pub mod models;
pub mod outputs;
pub mod params;
mod run;

pub use models::ModelCache;
pub use params::{
    BackgroundRemoval, ConditionerOverrides, DecodeJob, EditInput, EditJob, GenerateJob,
    ImageSource, Job, MeshSource, Prompt, Sampling, VariantJob,
};
pub use run::{run_job, sampler_meta, JobOutput};
