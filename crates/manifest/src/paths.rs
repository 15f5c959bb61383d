//! Paths from the manifest into its package folder: `code` and `dir` may
//! not leave it, not even through a symlink.

use std::path::{Component, Path, PathBuf};

/// Resolves a path from the manifest inside the package folder, refusing
/// anything that leaves it (absolute paths, `..`, symlinks pointing out).
pub fn inside(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    if rel.is_empty() || p.is_absolute() || rel.contains('\0') {
        return Err("must be a path relative to the manifest's folder".into());
    }
    let mut depth = 0i32;
    for comp in p.components() {
        match comp {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(
                        "leaves the manifest's folder; keep code beside the manifest".into(),
                    );
                }
            }
            _ => return Err("must be a path relative to the manifest's folder".into()),
        }
    }
    let full = root.join(p);
    let real = full
        .canonicalize()
        .map_err(|_| "not found in the deployment package (is the path right?)".to_string())?;
    if !real.starts_with(root) {
        return Err("leaves the manifest's folder (through a symlink)".into());
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pkg;

    #[test]
    fn code_may_not_leave_the_package() {
        let outer = pkg(&[("secret.wasm", "x"), ("pkg/ok.wasm", "x")]);
        let root = outer.path().join("pkg").canonicalize().unwrap();
        assert!(inside(&root, "ok.wasm").is_ok());
        assert!(inside(&root, "../secret.wasm").is_err());
        assert!(inside(&root, "/etc/passwd").is_err());
        assert!(inside(&root, "a/../../secret.wasm").is_err());
        std::os::unix::fs::symlink(outer.path().join("secret.wasm"), root.join("link.wasm"))
            .unwrap();
        assert!(inside(&root, "link.wasm").unwrap_err().contains("symlink"));
    }
}
