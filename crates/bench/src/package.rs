//! Deployment packages the benchmarks send: the bundled example (the files
//! `roost hub --example` deploys, compiled in here too) and variants of it.

pub const FILES: &[(&str, &str)] = &[
    (
        "manifest.toml",
        include_str!("../../../examples/hello/manifest.toml"),
    ),
    ("echo.wat", include_str!("../../../examples/hello/echo.wat")),
    (
        "greet.wat",
        include_str!("../../../examples/hello/greet.wat"),
    ),
];

/// A deployment package (gzipped tar) of the given files.
pub fn package(files: &[(&str, &str)]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, body.as_bytes())?;
    }
    b.into_inner()?.finish()
}
