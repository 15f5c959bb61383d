//! A package as the cloud takes it: unpacked into a scratch folder within
//! the hub's own bounds and validated by the manifest code `roost deploy`
//! uses, refused whole with every problem listed, then content addressed
//! (SHA-256) and signed with the fleet's key. It is stored once, however
//! many hubs and deployments use it.

use crate::store::PackageRecord;
use crate::Cloud;
use roost_manifest::package::{unpack, Bounds, MANIFEST_FILE};
use roost_manifest::Problem;
use sha2::{Digest, Sha256};

/// Why a package is refused.
#[derive(Debug)]
pub enum Refusal {
    /// Not a usable archive, or it carries secrets.
    Bad(String),
    /// The manifest's problems, every one.
    Invalid(Vec<Problem>),
}

/// What a validated package holds that the cloud needs later.
pub struct Validated {
    pub record: PackageRecord,
    pub tasks: Vec<String>,
    /// The names of its `[[secret]]`s, whose values come with each
    /// deployment.
    pub secrets: Vec<String>,
}

/// Validates and signs a package (blocking: it unpacks to disk).
pub fn validate(cloud: &Cloud, bytes: &[u8], now_ms: i64) -> Result<Validated, Refusal> {
    let scratch = tempfile::tempdir()
        .map_err(|e| Refusal::Bad(format!("cannot make a scratch folder: {e}")))?;
    let bounds = Bounds {
        bytes: cloud.options.max_package_bytes,
        entries: 10_000,
        depth: 32,
    };
    let secrets_inside = unpack(bytes, scratch.path(), &bounds).map_err(|e| Refusal::Bad(e.0))?;
    if secrets_inside.is_some() {
        return Err(Refusal::Bad(format!(
            "it carries {}: a fleet package never holds secret values; give them with the deployment (roost cloud deploy reads each value_env from your shell)",
            roost_manifest::package::SECRETS_ENTRY
        )));
    }
    let text = std::fs::read_to_string(scratch.path().join(MANIFEST_FILE)).map_err(|_| {
        Refusal::Bad(format!(
            "it has no {MANIFEST_FILE} (build it with `roost cloud deploy MANIFEST`)"
        ))
    })?;
    let manifest = roost_manifest::parse(&text, scratch.path()).map_err(Refusal::Invalid)?;
    let sha256 = hex::encode(Sha256::digest(bytes));
    let signature = roost_fleet::sign(&cloud.signing_key, &roost_fleet::package_text(&sha256));
    Ok(Validated {
        record: PackageRecord {
            sha256,
            size: bytes.len() as i64,
            signature,
            manifest: text,
            created_ms: now_ms,
        },
        tasks: manifest.tasks.iter().map(|t| t.name.to_string()).collect(),
        secrets: manifest.secrets.iter().map(|s| s.name.clone()).collect(),
    })
}

/// The `[[secret]]` names a stored manifest declares (read from its text:
/// the files it names are not unpacked again).
pub fn secret_names(manifest: &str) -> Vec<String> {
    let Ok(doc) = manifest.parse::<toml::Table>() else {
        return Vec::new();
    };
    doc.get("secret")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|s| s.get("name").and_then(|n| n.as_str()).map(str::to_owned))
        .collect()
}
