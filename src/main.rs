//! `sq-cloud`: one binary for the whole service. This file only parses flags and hands over to
//! the crate that does the work (the ripgrep pattern: the root package is the thin binary).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sq-cloud", version, about = "A hosted, clustered SQ: the phext database for many tenants")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write to a tenant store forever, printing each acknowledged write (crash tests).
    #[command(hide = true)]
    StoreWriter {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::StoreWriter { data, tenant, seed } => node::store::crash_writer(&data, &tenant, seed)?,
    }
    Ok(())
}
