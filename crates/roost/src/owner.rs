//! The hub owner's keys, read from the profile files a hub writes in its
//! data dir, and signing as botocore does. Shared by `roost shadow` and
//! `roost-bench` (which compiles this file in through `#[path]`).

use anyhow::{anyhow, Context, Result};
use roost_sigv4 as sigv4;
use std::path::Path;

/// The hub owner's keys and region, from the profile files the hub writes.
#[derive(Clone)]
pub(crate) struct Owner {
    pub key: String,
    pub secret: String,
    pub region: String,
}

impl Owner {
    pub(crate) fn load(data_dir: &Path) -> Result<Self> {
        let read = |f: &str| {
            std::fs::read_to_string(data_dir.join(f)).with_context(|| {
                format!(
                    "cannot read {} (is --data-dir the hub's data dir? the hub writes it at start)",
                    data_dir.join(f).display()
                )
            })
        };
        let field = |text: &str, k: &str| {
            text.lines()
                .find_map(|l| {
                    let (key, v) = l.split_once('=')?;
                    (key.trim() == k).then(|| v.trim().to_owned())
                })
                .ok_or_else(|| anyhow!("{k} is missing from the hub's profile files"))
        };
        let creds = read("aws-credentials")?;
        let config = read("aws-config")?;
        Ok(Self {
            key: field(&creds, "aws_access_key_id")?,
            secret: field(&creds, "aws_secret_access_key")?,
            region: field(&config, "region")?,
        })
    }

    /// The headers that sign an IoT data plane request to `host` as
    /// botocore would (`x-amz-date`, `authorization`; `host` included).
    pub(crate) fn sign(
        &self,
        method: &str,
        path: &str,
        host: &str,
        body: &[u8],
    ) -> Result<http::HeaderMap> {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, host.parse()?);
        let m: http::Method = method.parse()?;
        let uri: http::Uri = path.parse()?;
        let now = (roost_store::now_ms() / 1000) as u64;
        let auth = sigv4::sign(
            &sigv4::Request::from_http(&m, &uri, &headers, body),
            &self.key,
            &self.secret,
            &self.region,
            "iotdata",
            now,
        )
        .map_err(|e| anyhow!("cannot sign the request: {e}"))?;
        headers.extend(auth);
        Ok(headers)
    }
}
