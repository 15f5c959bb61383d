//! Deployment packages: the gzipped tar `roost deploy` builds (the
//! manifest and the files it names), unpacked safely, for the hub that
//! applies one and the control plane that validates one before it signs
//! it.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The manifest's name inside a package.
pub const MANIFEST_FILE: &str = "manifest.toml";
/// The package entry that carries `[[secret]]` values from the deploying
/// shell: read into memory, sealed into the store, never unpacked to disk.
pub const SECRETS_ENTRY: &str = ".roost-secrets.json";
/// Largest secrets entry accepted.
const MAX_SECRETS_BYTES: u64 = 1 << 20;

/// Why a package cannot be used, for a person.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PackageError(pub String);

/// What a package may unpack to.
pub struct Bounds {
    /// Bytes of file content.
    pub bytes: usize,
    /// Entries, files and folders.
    pub entries: usize,
    /// Path components of the deepest entry.
    pub depth: usize,
}

/// Unpacks regular files and folders only (no links, devices or paths that
/// leave `dir`), keeping file modes, within `bounds`: bytes, so a
/// compressed bomb cannot fill the disk, entries and depth, so a small
/// package of empty or deeply nested folders cannot eat inodes or hold the
/// deploy lock. Each entry is checked before it is written. The secrets
/// entry is returned instead of unpacked.
pub fn unpack(
    package: impl Read,
    dir: &Path,
    bounds: &Bounds,
) -> Result<Option<Vec<u8>>, PackageError> {
    let max_bytes = bounds.bytes;
    let mut secrets = None;
    let mut entries = 0usize;
    let bad = |e: std::io::Error| PackageError(format!("not a gzipped tar archive: {e}"));
    let gz = flate2::read::GzDecoder::new(package);
    let mut archive = tar::Archive::new(gz.take(max_bytes as u64 + 1));
    archive.set_preserve_permissions(true);
    // No set-id bits, no group write, nothing for others: what a task may
    // read is opened to it when it is prepared.
    archive.set_mask(0o7027);
    archive.set_overwrite(true);
    let mut total = 0u64;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        let path = entry.path().map_err(bad)?.into_owned();
        entries += 1;
        if entries > bounds.entries {
            return Err(PackageError(format!(
                "it holds more than {} entries (files and folders); the hub's limit is --package-max-entries",
                bounds.entries
            )));
        }
        let depth = path
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .count();
        if depth > bounds.depth {
            return Err(PackageError(format!(
                "{}... is {depth} levels deep, more than {}; the hub's limit is --package-max-depth",
                path.iter().take(4).collect::<PathBuf>().display(),
                bounds.depth
            )));
        }
        if !(kind.is_file() || kind.is_dir()) {
            return Err(PackageError(format!(
                "{} is a link or special file; packages may hold only files and folders",
                path.display()
            )));
        }
        // Compare the path as it would be unpacked (`./x` is `x`), so no
        // spelling of the secrets entry ever reaches the disk.
        let normal: PathBuf = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        if normal.as_os_str() == SECRETS_ENTRY {
            if entry.size() > MAX_SECRETS_BYTES {
                return Err(PackageError(format!(
                    "{SECRETS_ENTRY} is over {} KiB",
                    MAX_SECRETS_BYTES >> 10
                )));
            }
            let mut v = Vec::new();
            entry.read_to_end(&mut v).map_err(bad)?;
            secrets = Some(v);
            continue;
        }
        total += entry.size();
        if total > max_bytes as u64 {
            return Err(PackageError(format!(
                "it unpacks to more than {} MiB",
                max_bytes >> 20
            )));
        }
        let unpacked = entry.unpack_in(dir).map_err(bad)?;
        if !unpacked {
            return Err(PackageError(format!(
                "{} points outside the package",
                path.display()
            )));
        }
    }
    Ok(secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            // Written raw, so `./` spellings reach the hub as sent.
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn bounds() -> Bounds {
        Bounds {
            bytes: 1 << 20,
            entries: 100,
            depth: 8,
        }
    }

    fn folders(names: impl Iterator<Item = String>) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for name in names {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o700);
            h.set_size(0);
            b.append_data(&mut h, name, std::io::empty()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn many_or_deep_folders_are_refused_before_they_are_made() {
        let dir = tempfile::tempdir().unwrap();
        let many = folders((0..1000).map(|i| format!("d{i}")));
        let err = unpack(&many[..], dir.path(), &bounds()).unwrap_err();
        assert!(err.to_string().contains("more than 100 entries"), "{err}");
        assert!(err.to_string().contains("--package-max-entries"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 100);
        let dir = tempfile::tempdir().unwrap();
        let deep = folders((1..2000).map(|n| vec!["a"; n].join("/")));
        let err = unpack(&deep[..], dir.path(), &bounds()).unwrap_err();
        assert!(
            err.to_string().contains("9 levels deep, more than 8"),
            "{err}"
        );
        assert!(err.to_string().contains("--package-max-depth"), "{err}");
        let ok = folders((1..=8).map(|n| vec!["a"; n].join("/")));
        unpack(&ok[..], dir.path(), &bounds()).unwrap();
    }

    #[test]
    fn the_secrets_entry_is_kept_in_memory_in_any_spelling() {
        for name in [
            SECRETS_ENTRY,
            "./.roost-secrets.json",
            "././.roost-secrets.json",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let pkg = package(&[("manifest.toml", b"x"), (name, br#"{"db":"hunter2"}"#)]);
            let secrets = unpack(&pkg[..], dir.path(), &bounds()).unwrap();
            assert_eq!(
                secrets.as_deref(),
                Some(&br#"{"db":"hunter2"}"#[..]),
                "{name}"
            );
            assert!(dir.path().join("manifest.toml").exists());
            assert!(
                !dir.path().join(SECRETS_ENTRY).exists(),
                "{name} reached the disk"
            );
        }
    }
}
