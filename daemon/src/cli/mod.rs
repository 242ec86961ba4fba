//! The `trellisd` command line: one module per subcommand.

pub mod background;
pub mod bake_args;
pub mod bench;
pub mod client;
pub mod decode;
pub mod doctor;
pub mod edit;
pub mod generate;
pub mod memory_args;
pub mod parity;
pub mod progress;
pub mod serve;
pub mod tiny_repos;
pub mod variant;
