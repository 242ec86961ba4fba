//! The `trellisd` command line: one module per subcommand.

pub mod bake_args;
pub mod bench;
pub mod decode;
pub mod doctor;
pub mod generate;
pub mod parity;
pub mod progress;
pub mod variant;
