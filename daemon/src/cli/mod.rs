//! The `trellisd` command line: one module per subcommand.

pub mod bench;
pub mod doctor;
pub mod parity;
