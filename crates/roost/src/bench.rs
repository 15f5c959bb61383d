//! `roost bench`: performance figures, each against a baseline measured in
//! the same run.
pub fn run(_opts: BenchOpts) -> anyhow::Result<()> {
    anyhow::bail!("bench is being written")
}
#[derive(clap::Args)]
pub struct BenchOpts {}
