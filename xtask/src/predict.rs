//! `cargo xtask predict`.

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    crate::not_built_yet("predict")
}
