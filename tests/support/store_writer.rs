//! `store-writer --data DIR --tenant ID [--seed N]`: writes to a tenant store until killed,
//! printing each acknowledged write. A test binary for `tests/store_crash.rs`, not part of the
//! product.

use std::path::PathBuf;

use anyhow::{bail, Context};

#[allow(dead_code)] // the crash test reads the expected states from the same file
mod crash_writer;

fn main() -> anyhow::Result<()> {
    let (mut data, mut tenant, mut seed) = (None, None, 0u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--data" => data = Some(PathBuf::from(value)),
            "--tenant" => tenant = Some(value),
            "--seed" => seed = value.parse().context("--seed takes a number")?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let data = data.context("--data is required")?;
    let tenant = tenant.context("--tenant is required")?;
    crash_writer::crash_writer(&data, &tenant, seed)
}
