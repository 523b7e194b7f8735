//! `cargo xtask bench`.

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Name of the results file (bench/results/<name>.json).
    #[arg(long, default_value = "baseline")]
    pub name: String,
}

pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("xtask bench: not written yet")
}
