//! `roost`: the command line. A thin layer over the library crates: `hub`
//! runs the daemon (hub + api), the other commands talk to a running hub
//! over its HTTP API.

mod assembly;
mod bench;
mod client;
mod cloud_cmd;
mod example;
mod hub_cmd;
mod owner;
mod pack;
mod shadow_cmd;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Roost: an edge hub that runs your tasks next to your devices.
#[derive(Parser)]
#[command(name = "roost", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the CLI finds the hub.
#[derive(clap::Args, Clone)]
pub struct HubArgs {
    /// The hub's HTTP address.
    #[arg(long, env = "ROOST_HUB", default_value = "http://127.0.0.1:8420")]
    pub hub: String,
    /// Bearer token, when the hub was started with one.
    #[arg(long, env = "ROOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub daemon: the scheduler, the runtimes, the MQTT broker, the
    /// shadows and the HTTP API (with the local AWS APIs: Lambda Invoke, the
    /// IoT data plane, Secrets Manager).
    Hub(Box<hub_cmd::HubOpts>),
    /// Send a deployment manifest (and the files it names) to the hub.
    ///
    /// The hub validates the whole manifest, lists every problem, and applies
    /// it atomically: all tasks or none. The previous deployment is kept.
    /// Each `[[secret]]`'s value is read from the variable its `value_env`
    /// names in this shell and sent beside the manifest, never in it.
    Deploy {
        /// The manifest (TOML); `code` paths are relative to its folder.
        #[arg(required_unless_present = "rollback")]
        manifest: Option<PathBuf>,
        /// Go back to the deployment that was active before the current one.
        #[arg(long, conflicts_with = "manifest")]
        rollback: bool,
        /// Change a hub the fleet manages (`roost hub --cloud`) here
        /// anyway; the hub then reports the drift to the cloud.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Call a task and print its output.
    Call {
        /// The task's name.
        task: String,
        /// Queue the call durably and print its id instead of waiting.
        #[arg(long = "async")]
        asynchronous: bool,
        /// Read the input from FILE, or from stdin with `-` (default: empty).
        #[arg(long, short)]
        input: Option<String>,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Show an async call's status, or its output with --output.
    Status {
        /// The call id printed by `roost call --async`.
        id: String,
        /// Print the output (or the error) instead of the status.
        #[arg(long)]
        output: bool,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// List the deployed tasks with their limits and counters.
    Tasks {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// List the deployed devices and whether each is connected over MQTT.
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Print task log lines (what tasks write to stderr).
    Logs {
        /// Only this task's lines.
        task: Option<String>,
        /// Keep printing new lines as they come.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Read and change device shadows (signed with the owner's credentials
    /// from the hub's data dir).
    Shadow(shadow_cmd::ShadowOpts),
    /// Read a password on stdin and print its argon2id hash (for [[device]]).
    Passwd,
    /// Measure the hub against baselines measured in the same run (runs the
    /// roost-bench binary; `roost bench --help` lists the figures).
    Bench(bench::BenchArgs),
    /// Run the control plane that manages a fleet of hubs, or, with a
    /// subcommand, manage the fleet through it (`roost cloud hubs ...`).
    Cloud(Box<cloud_cmd::CloudArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Hub(opts) => hub_cmd::run(*opts),
        Command::Deploy {
            manifest,
            rollback,
            force,
            hub,
        } => client::deploy(&hub, manifest.as_deref(), rollback, force),
        Command::Call {
            task,
            asynchronous,
            input,
            hub,
        } => client::call(&hub, &task, asynchronous, input.as_deref()),
        Command::Status { id, output, hub } => client::status(&hub, &id, output),
        Command::Tasks { json, hub } => client::tasks(&hub, json),
        Command::Devices { json, hub } => client::devices(&hub, json),
        Command::Logs { task, follow, hub } => client::logs(&hub, task.as_deref(), follow),
        Command::Shadow(opts) => shadow_cmd::run(opts),
        Command::Passwd => passwd(),
        Command::Bench(opts) => bench::run(opts),
        Command::Cloud(args) => cloud_cmd::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn passwd() -> anyhow::Result<()> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        anyhow::bail!("no password on stdin; try: echo -n 'secret' | roost passwd");
    }
    let salt = SaltString::generate(&mut rand_core::OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
    println!("{hash}");
    Ok(())
}
