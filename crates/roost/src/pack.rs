//! Packing a manifest for the hub: a gzipped tar with `manifest.toml` and
//! every file the manifest names (`code`, `dir`), file modes kept.
//!
//! Each `[[secret]]`'s value is read from the deploying shell's environment
//! (`value_env`) and sent beside the manifest in one entry the hub seals
//! into its store and never writes to disk.
//!
//! The CLI packs only what lies inside the manifest's folder; the hub checks
//! the paths again and reports anything missing or escaping as a problem, so
//! there is one place where a manifest is judged.

use anyhow::{Context, Result};
use std::path::{Component, Path, PathBuf};

/// A packed deployment and the secret values read for it.
pub struct Packed {
    pub bytes: Vec<u8>,
    /// Each `[[secret]]`'s value, by name.
    pub secrets: std::collections::BTreeMap<String, String>,
}

/// Where the secret values go: into the package, for a hub's own API, or
/// apart from it, for the cloud (which seals them and never stores them in
/// a package).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    InPackage,
    Apart,
}

pub fn pack(manifest: &Path, where_secrets: Secrets) -> Result<Packed> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read the manifest {}", manifest.display()))?;
    let root = manifest
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .canonicalize()
        .context("cannot resolve the manifest's folder")?;
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, "manifest.toml", text.as_bytes())?;

    // Parse loosely: the hub does the real validation.
    let mut secrets = std::collections::BTreeMap::new();
    if let Ok(doc) = text.parse::<toml::Table>() {
        secrets = secret_values(&doc)?;
        if !secrets.is_empty() && where_secrets == Secrets::InPackage {
            let body = serde_json::to_vec(&secrets)?;
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            builder.append_data(&mut header, roost_hub::SECRETS_ENTRY, body.as_slice())?;
        }
        let tasks = doc
            .get("task")
            .and_then(|t| t.as_array())
            .cloned()
            .unwrap_or_default();
        let mut packed = std::collections::HashSet::new();
        for t in tasks {
            for key in ["code", "dir"] {
                let Some(rel) = t.get(key).and_then(|v| v.as_str()) else {
                    continue;
                };
                let Some(path) = inside(&root, rel) else {
                    eprintln!(
                        "warning: {key} = {rel:?} is not inside the manifest's folder; not sent"
                    );
                    continue;
                };
                let name = normal(rel);
                if !packed.insert(name.clone()) {
                    continue;
                }
                if path.is_dir() {
                    builder.append_dir_all(&name, &path)?;
                } else if path.is_file() {
                    builder.append_path_with_name(&path, &name)?;
                }
            }
        }
    }
    Ok(Packed {
        bytes: builder.into_inner()?.finish()?,
        secrets,
    })
}

/// The value of each `[[secret]]`, from the variable its `value_env` names.
fn secret_values(doc: &toml::Table) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    let secrets = doc.get("secret").and_then(|s| s.as_array());
    for s in secrets.into_iter().flatten() {
        let (Some(name), Some(var)) = (
            s.get("name").and_then(|v| v.as_str()),
            s.get("value_env").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        match std::env::var(var) {
            Ok(v) => {
                out.insert(name.to_owned(), v);
            }
            Err(_) => anyhow::bail!(
                "secret {name:?} takes its value from ${var}, which is not set (or not UTF-8) in this shell; export it and deploy again"
            ),
        }
    }
    Ok(out)
}

fn normal(rel: &str) -> PathBuf {
    Path::new(rel)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

fn inside(root: &Path, rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return None;
    }
    let real = root.join(p).canonicalize().ok()?;
    real.starts_with(root).then_some(real)
}
