//! `roost bench`: runs `roost-bench`, a binary of its own, so the shipped
//! hub carries neither the benchmarks nor their baselines (SQLite, an HTTP
//! client). This side only finds it and hands over.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Everything after `roost bench` goes to `roost-bench` as it is, `--help`
/// included, so `roost bench --help` lists the figures and their options.
#[derive(clap::Args)]
#[command(disable_help_flag = true, disable_version_flag = true)]
pub struct BenchArgs {
    /// The figures to measure (http, instantiate, throughput, async, rss,
    /// process, pss, burst, mqtt, shadow, identity, fleet; default all) and their
    /// options: `roost bench --help` lists them.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<OsString>,
}

/// Replaces this process with `roost-bench ARGS`: the one next to this
/// executable, else the one on PATH. It gets stdio and its exit status is
/// ours; `ROOST_BIN` tells it to measure this very `roost`.
pub fn run(opts: BenchArgs) -> Result<()> {
    let me = std::env::current_exe().context("cannot tell where this roost is")?;
    let beside = me.with_file_name("roost-bench");
    let program = if beside.is_file() {
        beside.clone().into_os_string()
    } else {
        OsString::from("roost-bench")
    };
    // Only returns if the program could not be started.
    let err = Command::new(&program)
        .arg0("roost bench")
        .args(&opts.args)
        .env("ROOST_BIN", &me)
        .exec();
    if err.kind() == std::io::ErrorKind::NotFound {
        bail!(
            "roost bench needs the roost-bench binary, and there is none at {} nor on PATH: build it with `cargo build --release -p roost-bench` (it lands next to roost)",
            beside.display()
        );
    }
    Err(err).with_context(|| format!("cannot run {}", program.to_string_lossy()))
}
