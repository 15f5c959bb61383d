//! `roost shadow`: read and change shadows from the command line, through
//! the hub's IoT data plane, signed (SigV4) with the owner's credentials
//! from `DATA_DIR/aws-credentials` — the same files any AWS SDK would use.

use crate::owner::Owner;
use crate::HubArgs;
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ShadowOpts {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Args)]
struct Common {
    /// The hub's data dir, where its `aws-credentials` and `aws-config` are.
    #[arg(long, env = "ROOST_DATA_DIR", default_value = "./roost-data")]
    data_dir: PathBuf,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Print a shadow's document (desired, reported, delta, metadata, version).
    Get {
        thing: String,
        /// A named shadow (default: the classic one).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Apply an UpdateThingShadow document, e.g. '{"state":{"desired":{"on":true}}}'
    /// (`-` reads it from stdin).
    Update {
        thing: String,
        document: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a shadow (its version carries on if it is made again).
    Delete {
        thing: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// List a thing's named shadows.
    List {
        thing: String,
        #[command(flatten)]
        common: Common,
    },
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn run(opts: ShadowOpts) -> Result<()> {
    let name_q = |n: &Option<String>| {
        n.as_ref()
            .map(|n| format!("?name={}", encode(n)))
            .unwrap_or_default()
    };
    let (method, path, body, common): (&str, String, Vec<u8>, &Common) = match &opts.action {
        Action::Get {
            thing,
            name,
            common,
        } => (
            "GET",
            format!("/things/{}/shadow{}", encode(thing), name_q(name)),
            Vec::new(),
            common,
        ),
        Action::Update {
            thing,
            document,
            name,
            common,
        } => {
            let doc = if document == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                document.clone()
            };
            (
                "POST",
                format!("/things/{}/shadow{}", encode(thing), name_q(name)),
                doc.into_bytes(),
                common,
            )
        }
        Action::Delete {
            thing,
            name,
            common,
        } => (
            "DELETE",
            format!("/things/{}/shadow{}", encode(thing), name_q(name)),
            Vec::new(),
            common,
        ),
        Action::List { thing, common } => (
            "GET",
            format!(
                "/api/things/shadow/ListNamedShadowsForThing/{}?pageSize=100",
                encode(thing)
            ),
            Vec::new(),
            common,
        ),
    };
    let owner = Owner::load(&common.data_dir)?;
    let base = reqwest::Url::parse(&common.hub.hub).context("--hub is not a URL")?;
    let host = match (base.host_str(), base.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => bail!("--hub {} has no host", common.hub.hub),
    };
    let signed = owner.sign(method, &path, &host, &body)?;
    let client = reqwest::blocking::Client::new();
    let mut req = client.request(
        reqwest::Method::from_bytes(method.as_bytes())?,
        format!("{}{path}", common.hub.hub.trim_end_matches('/')),
    );
    for (k, v) in signed.iter() {
        req = req.header(k.as_str(), v.as_bytes());
    }
    let resp = req.body(body).send().map_err(|e| {
        anyhow!(
            "cannot reach the hub at {}: is `roost hub` running? ({e})",
            common.hub.hub
        )
    })?;
    let status = resp.status();
    let error_type = resp
        .headers()
        .get("x-amzn-ErrorType")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.text().unwrap_or_default();
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        bail!(
            "{} ({status}): {message}",
            error_type.unwrap_or_else(|| "error".into())
        );
    }
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => println!("{text}"),
    }
    Ok(())
}
