//! Task identities (MISSION row 10): when the hub runs as root, each process
//! task's workers run under a user and group of their own, so a task cannot
//! read the hub's data (its key, store, owner credentials), another task's
//! code, or signal another task's workers.
//!
//! The ids are derived, not allocated: a hash of the hub id and the task (or
//! its code group, whose workers share one pre-loaded parent and so one
//! identity) picked from a high range that no distribution hands out. They
//! need no `/etc/passwd` entry (like systemd's `DynamicUser`), stay the same
//! across restarts, and two hubs on one machine never share them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a task's user cannot reach a path, or the hub could not open one to
/// it.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("other users cannot enter {} (mode {mode:o}), above the data dir {}", folder.display(), data_dir.display())]
    ClosedAboveDataDir {
        folder: PathBuf,
        mode: u32,
        data_dir: PathBuf,
    },
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("the task's user (uid {uid}) cannot enter {} (mode {mode:o}, owner uid {owner})", path.display())]
    CannotEnter {
        uid: u32,
        path: PathBuf,
        mode: u32,
        owner: u32,
    },
    #[error("the task's user (uid {uid}) cannot execute {} (mode {mode:o}, owner uid {owner})", path.display())]
    CannotExecute {
        uid: u32,
        path: PathBuf,
        mode: u32,
        owner: u32,
    },
    #[error("the task's user (uid {uid}) cannot read {} (mode {mode:o})", path.display())]
    CannotRead { uid: u32, path: PathBuf, mode: u32 },
}

fn io_err(path: &Path, source: std::io::Error) -> AccessError {
    AccessError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The first id of the range, and how many ids it holds.
const BASE: u32 = 1_900_000_000;
const SPAN: u32 = 100_000_000;

/// Whether tasks get identities of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Workers run as the hub's user.
    Off,
    /// Each task gets its own, where its folder and runtime are reachable
    /// by that user; otherwise it runs as the hub's user, with a warning.
    Auto,
    /// Each task gets its own; a task it cannot serve is refused.
    On,
}

/// The user and group a task's workers run as (the same number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    /// The identity of `key` (`task:NAME` or `group:NAME`) on hub `hub_id`.
    pub fn derive(hub_id: &str, key: &str) -> Self {
        // FNV-1a: tiny, stable across releases and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in hub_id.bytes().chain([0]).chain(key.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let id = BASE + (h % SPAN as u64) as u32;
        Identity { uid: id, gid: id }
    }

    /// Runs in a forked child before exec: drops every privilege to this
    /// identity. Only async-signal-safe calls, and no allocation (another
    /// thread of the hub may have held the allocator's lock at the fork):
    /// its errors are raw errno values.
    pub fn drop_to(&self) -> std::io::Result<()> {
        // SAFETY: setgroups, setgid, setuid and prctl are async-signal-safe
        // and take no pointers but a null list of groups.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Dropped for good: a way back to root would be a bug.
            if libc::setuid(0) == 0 {
                return Err(still_root());
            }
            // Nor through a set-uid program (sudo, su, ...).
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Why a child does not exec after dropping to a task's identity: it could
/// still become root again. An errno (operation not permitted): building it
/// allocates nothing.
fn still_root() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EPERM)
}

/// What a task's identity is derived from: its code group when it has one
/// (the group's workers share one pre-loaded parent), else the task.
pub fn key_for(task: &str, code_group: Option<&str>) -> String {
    match code_group {
        Some(g) => format!("group:{g}"),
        None => format!("task:{task}"),
    }
}

/// Whether `uid` lies in the range task identities are taken from.
pub fn is_task_uid(uid: u32) -> bool {
    (BASE..BASE + SPAN).contains(&uid)
}

/// Whether the hub can switch users (it runs as root).
pub fn can_switch() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Gives `id` read access to a task folder the hub unpacked: the folder's
/// group becomes the task's, the group gets the owner's read and execute
/// bits (never write: a task cannot change its own code), others get
/// nothing. Folders between `managed_root` (the hub's data dir) and `dir`
/// become searchable (`o+x`, not listable), and every folder above is
/// checked: the error says which one keeps the task out.
pub fn open_task_dir(dir: &Path, managed_root: &Path, id: Identity) -> Result<(), AccessError> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| io_err(&p, e))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        std::os::unix::fs::lchown(&p, None, Some(id.gid)).map_err(|e| io_err(&p, e))?;
        let mode = meta.mode() & 0o7777;
        let owner = mode & 0o700;
        let mut new = (mode & 0o7700) | ((owner & 0o500) >> 3);
        if meta.is_dir() {
            new |= 0o050;
            for e in std::fs::read_dir(&p).map_err(|e| io_err(&p, e))? {
                stack.push(e.map_err(|e| io_err(&p, e))?.path());
            }
        }
        // No set-id bits on task files.
        new &= !0o6000;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(new))
            .map_err(|e| io_err(&p, e))?;
    }
    let root = managed_root
        .canonicalize()
        .map_err(|e| io_err(managed_root, e))?;
    let mut above = dir.canonicalize().map_err(|e| io_err(dir, e))?;
    while above.pop() {
        if above.starts_with(&root) {
            let meta = std::fs::metadata(&above).map_err(|e| io_err(&above, e))?;
            let mode = meta.mode() & 0o7777;
            if mode & 0o001 == 0 {
                std::fs::set_permissions(&above, std::fs::Permissions::from_mode(mode | 0o001))
                    .map_err(|e| io_err(&above, e))?;
            }
        } else {
            break;
        }
    }
    reachable(dir, id, true)
}

/// The home (and temp) folder of `id`: `DATA_DIR/homes/UID`, 0700 and its
/// own; `homes` is searchable, not listable.
pub fn home_dir(data_dir: &Path, id: Identity) -> std::io::Result<PathBuf> {
    let homes = data_dir.join("homes");
    std::fs::create_dir_all(&homes)?;
    std::fs::set_permissions(&homes, std::fs::Permissions::from_mode(0o711))?;
    let home = homes.join(id.uid.to_string());
    std::fs::create_dir_all(&home)?;
    std::os::unix::fs::chown(&home, Some(id.uid), Some(id.gid))?;
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))?;
    Ok(home)
}

/// Whether task folders under `data_dir` can be opened to other users at
/// all: every folder above the data dir must be searchable by others (the
/// hub makes the ones inside it so).
pub fn check_data_dir(data_dir: &Path) -> Result<(), AccessError> {
    let root = data_dir.canonicalize().map_err(|e| io_err(data_dir, e))?;
    let mut above = root.clone();
    while above.pop() {
        let meta = std::fs::metadata(&above).map_err(|e| io_err(&above, e))?;
        if meta.mode() & 0o001 == 0 {
            return Err(AccessError::ClosedAboveDataDir {
                mode: meta.mode() & 0o7777,
                folder: above,
                data_dir: root,
            });
        }
    }
    Ok(())
}

/// Checks that `id` can reach `path` (every folder on the way searchable by
/// it) and, when `exec`, execute it. Symlinks are followed the way exec
/// follows them, so both the named path and its target must be reachable.
pub fn reachable(path: &Path, id: Identity, exec: bool) -> Result<(), AccessError> {
    let mut walk: Vec<PathBuf> = vec![path.to_path_buf()];
    if let Ok(real) = path.canonicalize() {
        if real != path {
            walk.push(real);
        }
    }
    for p in walk {
        let mut prefix = PathBuf::new();
        let comps: Vec<_> = p.components().collect();
        for (i, c) in comps.iter().enumerate() {
            prefix.push(c);
            let last = i + 1 == comps.len();
            if last && !exec {
                break;
            }
            // metadata() follows links: a link's target folder decides.
            let Ok(meta) = std::fs::metadata(&prefix) else {
                return Err(AccessError::Missing(prefix));
            };
            if !last && !meta.is_dir() {
                continue;
            }
            let bits = if meta.uid() == id.uid {
                (meta.mode() >> 6) & 7
            } else if meta.gid() == id.gid {
                (meta.mode() >> 3) & 7
            } else {
                meta.mode() & 7
            };
            let (uid, mode, owner) = (id.uid, meta.mode() & 0o7777, meta.uid());
            if bits & 1 == 0 {
                return Err(if last {
                    AccessError::CannotExecute {
                        uid,
                        path: prefix,
                        mode,
                        owner,
                    }
                } else {
                    AccessError::CannotEnter {
                        uid,
                        path: prefix,
                        mode,
                        owner,
                    }
                });
            }
            if last && bits & 4 == 0 && meta.is_file() {
                return Err(AccessError::CannotRead {
                    uid,
                    path: prefix,
                    mode,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_distinct_and_in_range() {
        let a = Identity::derive("hub1", "task:a");
        assert_eq!(a, Identity::derive("hub1", "task:a"));
        assert_ne!(a, Identity::derive("hub1", "task:b"));
        assert_ne!(a, Identity::derive("hub2", "task:a"));
        assert_ne!(a, Identity::derive("hub1", "group:a"));
        for k in 0..1000 {
            let i = Identity::derive("h", &format!("task:{k}"));
            assert!((BASE..BASE + SPAN).contains(&i.uid));
            assert_eq!(i.uid, i.gid);
        }
    }

    #[test]
    fn a_child_that_could_become_root_again_reports_it_without_allocating() {
        let e = crate::spawn::tests::exec_after(|| Err(still_root())).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    }

    #[test]
    fn a_folder_closed_to_others_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let closed = tmp.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::write(closed.join("python"), "").unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(
            closed.join("python"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let id = Identity::derive("h", "task:t");
        let e = reachable(&closed.join("python"), id, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot enter") && e.contains("closed"), "{e}");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        reachable(&closed.join("python"), id, true).unwrap();
        std::fs::set_permissions(
            closed.join("python"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        let e = reachable(&closed.join("python"), id, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot execute"), "{e}");
    }
}
