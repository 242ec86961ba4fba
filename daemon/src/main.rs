use clap::{Parser, Subcommand};

use trellis::cli;

/// trellisd: TRELLIS image/text → 3D, locally.
#[derive(Debug, Parser)]
#[command(name = "trellisd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compare every network with the original TRELLIS on a fixture directory.
    Parity(cli::parity::ParityArgs),
    /// Report this machine, this build, the cached models and the tier a run would use.
    Doctor(cli::doctor::DoctorArgs),
    /// Speed and memory benchmarks of full-size networks with random weights.
    Bench(cli::bench::BenchArgs),
    /// Image(s) or text -> 3D: GLB mesh, Gaussian PLY, .trellis asset.
    Generate(Box<cli::generate::GenerateArgs>),
    /// A new appearance for an existing mesh (OBJ/PLY/GLB), from a prompt or an image.
    Variant(Box<cli::variant::VariantArgs>),
    /// Decode a saved .trellis asset again (no sampling).
    Decode(cli::decode::DecodeArgs),
    /// Run the resident daemon (local socket; docs/PROTOCOL.md).
    Serve(cli::serve::ServeArgs),
    /// Send a request to the running daemon.
    Client(cli::client::ClientArgs),
    /// Write tiny model repositories from seeded random weights (tests, offline demos).
    #[command(hide = true)]
    TinyRepos(cli::tiny_repos::TinyReposArgs),
    /// Regenerate a region of an asset or a mesh from a prompt or an image; keep the rest exactly.
    Edit(Box<cli::edit::EditArgs>),
}

fn main() {
    trellis::runtime::malloc::tune();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Parity(a) => cli::parity::run(a),
        Command::Doctor(a) => cli::doctor::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Variant(a) => cli::variant::run(a),
        Command::Decode(a) => cli::decode::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Client(a) => cli::client::run(a),
        Command::TinyRepos(a) => cli::tiny_repos::run(a),
        Command::Edit(a) => cli::edit::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
