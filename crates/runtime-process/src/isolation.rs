//! Where a worker's limits come from: a cgroup per worker when the machine
//! offers one (v2 with the memory controller delegated, or v1 with the
//! memory, cpu and pids hierarchies mounted), `setrlimit` otherwise.
//!
//! Cgroups live under `roost/<hub-id>/` (the hub id is derived from the data
//! dir), so several hubs on one machine never touch each other's workers,
//! and a starting hub can sweep exactly what an earlier run of itself left.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Which mechanism enforces worker limits on this machine.
#[derive(Clone, Debug)]
pub enum Isolation {
    /// Unified hierarchy: one folder per worker with memory.max, cpu.weight, pids.max.
    CgroupV2 { base: PathBuf },
    /// Legacy hierarchies: a folder per worker in each controller.
    CgroupV1 {
        memory: PathBuf,
        cpu: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
    /// No usable cgroup: RLIMIT_DATA per worker process.
    Rlimit,
}

impl Isolation {
    pub fn describe(&self) -> &'static str {
        match self {
            Isolation::CgroupV2 { .. } => "cgroup v2 (memory.max, cpu.weight, pids.max per worker)",
            Isolation::CgroupV1 { .. } => {
                "cgroup v1 (memory.limit_in_bytes, cpu.shares, pids.max per worker)"
            }
            Isolation::Rlimit => "setrlimit (RLIMIT_DATA per worker; no cgroup available)",
        }
    }

    /// Picks the best mechanism available to this process.
    pub fn detect(hub_id: &str) -> Self {
        let root = Path::new("/sys/fs/cgroup");
        // v2: the unified root must offer the memory controller.
        if let Ok(ctrl) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            if ctrl.split_whitespace().any(|c| c == "memory") {
                let base = root.join("roost").join(hub_id);
                let ok = std::fs::create_dir_all(&base).is_ok()
                    && enable_v2_controllers(&root.join("roost"))
                    && enable_v2_controllers(&base);
                if ok {
                    return Isolation::CgroupV2 { base };
                }
            }
        }
        let memory = root.join("memory");
        if memory.join("memory.limit_in_bytes").exists() {
            let mem_base = memory.join("roost").join(hub_id);
            if std::fs::create_dir_all(&mem_base).is_ok() {
                let sub = |name: &str, probe: &str| {
                    let d = root.join(name);
                    if !d.join(probe).exists() {
                        return None;
                    }
                    let b = d.join("roost").join(hub_id);
                    std::fs::create_dir_all(&b).ok().map(|_| b)
                };
                return Isolation::CgroupV1 {
                    memory: mem_base,
                    cpu: sub("cpu", "cpu.shares"),
                    pids: sub("pids", "pids.max"),
                };
            }
        }
        Isolation::Rlimit
    }

    /// Kills every process left in this hub's cgroups by an earlier run and
    /// removes the folders. Returns how many processes were killed.
    pub fn sweep(&self) -> usize {
        let mut killed = 0;
        for base in self.bases() {
            let Ok(entries) = std::fs::read_dir(&base) else {
                continue;
            };
            for e in entries.flatten() {
                if e.path().is_dir() {
                    killed += kill_all_in(&e.path());
                    remove_cgroup(&e.path());
                }
            }
        }
        killed
    }

    /// Removes the empty cgroups other hubs left when they were killed:
    /// rmdir of a cgroup that still has processes fails, so only dead
    /// workers' folders go. A folder younger than `TIDY_AFTER` is left
    /// alone: a live hub creates a worker's cgroup a moment before the
    /// worker joins it, and it must not vanish in between.
    pub fn tidy_others(&self) {
        const TIDY_AFTER: std::time::Duration = std::time::Duration::from_secs(600);
        let stale = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > TIDY_AFTER)
        };
        for base in self.bases() {
            let Some(all_hubs) = base.parent() else {
                continue;
            };
            let Ok(hubs) = std::fs::read_dir(all_hubs) else {
                continue;
            };
            for hub in hubs.flatten() {
                if hub.path() == base || !hub.path().is_dir() {
                    continue;
                }
                if let Ok(workers) = std::fs::read_dir(hub.path()) {
                    for w in workers.flatten() {
                        if w.path().is_dir() && stale(&w.path()) {
                            let _ = std::fs::remove_dir(w.path());
                        }
                    }
                }
                if stale(&hub.path()) {
                    let _ = std::fs::remove_dir(hub.path());
                }
            }
        }
    }

    fn bases(&self) -> Vec<PathBuf> {
        match self {
            Isolation::CgroupV2 { base } => vec![base.clone()],
            Isolation::CgroupV1 { memory, cpu, pids } => {
                let mut v = vec![memory.clone()];
                v.extend(cpu.clone());
                v.extend(pids.clone());
                v
            }
            Isolation::Rlimit => Vec::new(),
        }
    }

    /// Creates the cgroup(s) of one worker with its limits.
    pub fn worker_group(&self, name: &str, memory_mb: u32) -> std::io::Result<WorkerGroup> {
        let bytes = memory_mb as u64 * (1 << 20);
        let mut dirs = Vec::new();
        match self {
            Isolation::CgroupV2 { base } => {
                if !base.exists() {
                    // Tidied away by another hub after a long idle spell.
                    std::fs::create_dir_all(base)?;
                    enable_v2_controllers(base);
                }
                let d = base.join(name);
                std::fs::create_dir_all(&d)?;
                std::fs::write(d.join("memory.max"), bytes.to_string())?;
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                let _ = std::fs::write(d.join("cpu.weight"), "100");
                let _ = std::fs::write(d.join("pids.max"), "512");
                dirs.push(d);
            }
            Isolation::CgroupV1 { memory, cpu, pids } => {
                let d = memory.join(name);
                std::fs::create_dir_all(&d)?;
                std::fs::write(d.join("memory.limit_in_bytes"), bytes.to_string())?;
                // Without swap accounting this file is absent; the limit on
                // memory alone still holds.
                let _ = std::fs::write(d.join("memory.memsw.limit_in_bytes"), bytes.to_string());
                dirs.push(d);
                if let Some(cpu) = cpu {
                    let d = cpu.join(name);
                    if std::fs::create_dir_all(&d).is_ok() {
                        let _ = std::fs::write(d.join("cpu.shares"), "1024");
                        dirs.push(d);
                    }
                }
                if let Some(pids) = pids {
                    let d = pids.join(name);
                    if std::fs::create_dir_all(&d).is_ok() {
                        let _ = std::fs::write(d.join("pids.max"), "512");
                        dirs.push(d);
                    }
                }
            }
            Isolation::Rlimit => {}
        }
        let procs = dirs
            .iter()
            .filter_map(|d| {
                CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes()).ok()
            })
            .collect();
        Ok(WorkerGroup {
            dirs,
            procs,
            rlimit_bytes: matches!(self, Isolation::Rlimit).then_some(bytes),
            v2: matches!(self, Isolation::CgroupV2 { .. }),
        })
    }
}

fn enable_v2_controllers(dir: &Path) -> bool {
    let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu +pids");
    std::fs::read_to_string(dir.join("cgroup.subtree_control"))
        .map(|s| s.split_whitespace().any(|c| c == "memory"))
        .unwrap_or(false)
}

fn kill_all_in(dir: &Path) -> usize {
    let mut killed = 0;
    // Processes can fork while we kill; a few rounds catch them.
    for _ in 0..5 {
        let pids = pids_in(dir);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from our own cgroup.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    killed
}

fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// One worker's cgroup folders (or rlimit), applied in the child before exec.
pub struct WorkerGroup {
    dirs: Vec<PathBuf>,
    procs: Vec<CString>,
    rlimit_bytes: Option<u64>,
    v2: bool,
}

impl WorkerGroup {
    /// Runs in the forked child before exec: only async-signal-safe calls.
    pub fn enter(&self) -> std::io::Result<()> {
        // SAFETY: getpid, open, write, close and setrlimit are
        // async-signal-safe; the buffers were allocated before fork.
        unsafe {
            let pid = libc::getpid();
            let mut buf = [0u8; 16];
            let mut n = pid as u32;
            let mut i = buf.len();
            loop {
                i -= 1;
                buf[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            for p in &self.procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let w = libc::write(fd, buf[i..].as_ptr().cast(), buf.len() - i);
                libc::close(fd);
                if w < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(bytes) = self.rlimit_bytes {
                let lim = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer fired in this group.
    pub fn oom_killed(&self) -> bool {
        let Some(mem) = self.dirs.first() else {
            return false;
        };
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(mem.join(file))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.starts_with("oom_kill ") && l.split_whitespace().nth(1).is_some_and(|n| n != "0")
            })
    }

    /// Kills every process in the group (grandchildren included), without
    /// waiting.
    pub fn kill_all(&self) {
        for d in &self.dirs {
            for pid in pids_in(d) {
                // SAFETY: kill(2) with a pid read from our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Puts an already running process (a worker forked by a zygote, held
    /// until this is done) into the group, from the hub's side.
    pub fn place(&self, pid: i32) -> std::io::Result<()> {
        for d in &self.dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// The first of the group's `cgroup.procs` files (who is in it).
    pub fn procs_file(&self) -> Option<PathBuf> {
        self.dirs.first().map(|d| d.join("cgroup.procs"))
    }

    pub fn rlimit_bytes(&self) -> Option<u64> {
        self.rlimit_bytes
    }

    pub fn uses_cgroup(&self) -> bool {
        !self.dirs.is_empty()
    }
}

impl Drop for WorkerGroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            for pid in pids_in(d) {
                // SAFETY: kill(2) with a pid read from our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // A cgroup can only be removed once its processes are reaped; try
        // now, and finish off the async runtime's threads if that fails.
        let left: Vec<PathBuf> = self
            .dirs
            .iter()
            .filter(|d| std::fs::remove_dir(d).is_err() && d.exists())
            .cloned()
            .collect();
        if !left.is_empty() {
            std::thread::spawn(move || {
                for d in left {
                    kill_all_in(&d);
                    remove_cgroup(&d);
                }
            });
        }
    }
}

fn pids_in(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}
