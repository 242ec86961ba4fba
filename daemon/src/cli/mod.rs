//! The `trellisd` command line: one module per subcommand.

pub mod parity;
