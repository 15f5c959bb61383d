//! Deployment packages are bounded in entries, depth and bytes, uploads go
//! to disk as they arrive (the hub's memory stays flat whatever their
//! size), few are received at once, and the packages kept for rollback fit
//! a disk budget.

mod common;
use common::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A gzipped tar of `files` (path, contents) and `folders`.
fn tarball(files: &[(&str, &[u8])], folders: impl Iterator<Item = String>) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, *data).unwrap();
    }
    for name in folders {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, name, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn echo_files() -> (String, Vec<u8>) {
    (
        task("echo", "echo.wat", ""),
        std::fs::read(wasm_dir().join("echo.wat")).unwrap(),
    )
}

fn post_package(
    hub: &TestHub,
    body: impl Into<reqwest::blocking::Body>,
) -> reqwest::blocking::Response {
    http()
        .post(format!("{}/v1/deployments", hub.url))
        .body(body)
        .send()
        .unwrap()
}

#[test]
fn packages_of_many_empty_folders_or_deep_nesting_are_refused_quickly() {
    let hub = TestHub::start(&["--package-max-entries", "1000"]);
    let (manifest, wat) = echo_files();
    let files: [(&str, &[u8]); 2] = [("manifest.toml", manifest.as_bytes()), ("echo.wat", &wat)];
    let many = tarball(&files, (0..20_000).map(|i| format!("empty/{i}")));
    let started = Instant::now();
    let (status, code, message) = error_of(post_package(&hub, many));
    assert_eq!((status, code.as_str()), (400, "bad_package"), "{message}");
    assert!(
        message.contains("more than 1000 entries") && message.contains("--package-max-entries"),
        "{message}"
    );
    // The 720-byte package nested 1,900 deep (94 s of kernel CPU).
    let deep = tarball(&files, (1..1900).map(|n| vec!["d"; n].join("/")));
    let (status, code, message) = error_of(post_package(&hub, deep));
    assert_eq!((status, code.as_str()), (400, "bad_package"), "{message}");
    assert!(
        message.contains("more than 32") && message.contains("--package-max-depth"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // Nothing of either is left on disk, and a sane package deploys.
    let left = std::fs::read_dir(hub.data_dir.join("deployments"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
    let ok = tarball(&files, (0..50).map(|i| format!("assets/{i}")));
    assert_eq!(post_package(&hub, ok).status(), 200);
}

/// Pseudo-random bytes (incompressible), generated as they are read.
struct Noise {
    left: u64,
    state: u64,
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for b in &mut buf[..n] {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *b = self.state as u8;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_large_upload_goes_to_disk_and_few_are_received_at_once() {
    let hub = TestHub::start(&[]);
    let pid = hub.pid();
    let base = rss_kib(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(base));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    // 100 MiB, under the 256 MiB limit: received whole, then refused as
    // not a package.
    const SIZE: u64 = 100 << 20;
    let body = reqwest::blocking::Body::sized(
        Noise {
            left: SIZE,
            state: 0x9e3779b97f4a7c15,
        },
        SIZE,
    );
    let (status, code, _) = error_of(post_package(&hub, body));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!((status, code.as_str()), (400, "bad_package"));
    let grew_mib = (peak.load(std::sync::atomic::Ordering::Relaxed) - base) / 1024;
    eprintln!("RSS during a 100 MiB upload: {base} KiB at rest, +{grew_mib} MiB at peak");
    assert!(
        grew_mib < 48,
        "RSS grew by {grew_mib} MiB during a 100 MiB upload"
    );
    // The upload file is gone.
    assert_eq!(
        std::fs::read_dir(hub.data_dir.join("uploads"))
            .unwrap()
            .count(),
        0
    );

    // Two uploads in flight (the default), held open: a third is 429.
    let addr = hub.url.trim_start_matches("http://").to_owned();
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            write!(
                s,
                "POST /v1/deployments HTTP/1.1\r\nHost: hub\r\nContent-Length: 10485760\r\n\r\n"
            )
            .unwrap();
            s.write_all(&[0u8; 4096]).unwrap();
            s
        })
        .collect();
    let mut refused = None;
    wait_until(
        "a third upload to be refused",
        Duration::from_secs(20),
        || {
            let (manifest, wat) = echo_files();
            let r = post_package(
                &hub,
                tarball(
                    &[("manifest.toml", manifest.as_bytes()), ("echo.wat", &wat)],
                    std::iter::empty(),
                ),
            );
            if r.status() == 429 {
                refused = Some(r);
                true
            } else {
                false
            }
        },
    );
    let r = refused.unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    let (_, code, message) = error_of(r);
    assert_eq!(code, "too_many_uploads", "{message}");
    assert!(message.contains("--max-concurrent-uploads"), "{message}");
    drop(held);
    wait_until(
        "uploads to be received again",
        Duration::from_secs(20),
        || {
            let (manifest, wat) = echo_files();
            post_package(
                &hub,
                tarball(
                    &[("manifest.toml", manifest.as_bytes()), ("echo.wat", &wat)],
                    std::iter::empty(),
                ),
            )
            .status()
                == 200
        },
    );
}

#[test]
fn old_deployments_are_removed_past_the_disk_budget() {
    let hub = TestHub::start(&["--deployments-disk-budget-mb", "2"]);
    let (manifest, wat) = echo_files();
    let mut blob = vec![0u8; 3 << 19];
    for round in 0..4u64 {
        Noise {
            left: blob.len() as u64,
            state: 0x1234_5678 + round,
        }
        .read_exact(&mut blob)
        .unwrap();
        let pkg = tarball(
            &[
                ("manifest.toml", manifest.as_bytes()),
                ("echo.wat", &wat),
                ("blob.bin", &blob),
            ],
            std::iter::empty(),
        );
        assert_eq!(post_package(&hub, pkg).status(), 200, "{}", hub.log_text());
    }
    // The active one and the one rollback goes back to: 1.5 MiB each; a
    // third would be over the 2 MiB budget for inactive packages.
    let kept = std::fs::read_dir(hub.data_dir.join("deployments"))
        .unwrap()
        .count();
    assert_eq!(kept, 2, "{}", hub.log_text());
    assert!(hub
        .log_text()
        .contains("removed an old deployment's package"));
    let r = http()
        .post(format!("{}/v1/deployments/rollback", hub.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hub.call("echo", "hi").text().unwrap(), "hi");
}
