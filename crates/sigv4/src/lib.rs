//! AWS Signature Version 4 (header form) for the AWS APIs the hub answers:
//! `verify` checks a request the way AWS would, `sign` produces one the way
//! botocore would (for tests, benchmarks and our own CLI).
//!
//! Its own crate because both the hub's local AWS APIs (`roost-overrides`,
//! verifying) and the CLI (`roost shadow`, signing) use it, and it depends
//! on nothing of the hub.
//!
//! Hand-written on purpose. `aws-sigv4` only signs, and it chooses its own
//! header set, so it cannot recompute a signature over the headers a client
//! chose to sign. `scratchstack-aws-signature` does verify on the server
//! side, and the tests cross-check against it (`tests/scratchstack.rs`:
//! what we sign it accepts, what we refuse it refuses), but we keep ours:
//! it allows 15 minutes of clock skew where AWS (and we) allow 5; it reads
//! no `x-amz-content-sha256`, so it cannot refuse `UNSIGNED-PAYLOAD` the way
//! AWS does; it sets no bound on the size of a hostile `Authorization`
//! header; it takes the whole request, body included, so a server cannot
//! refuse an unknown key before reading the body (the hub does); it is
//! async through a `tower` service and brings chrono, regex, derive_builder
//! and its own principal types for what is here a pure function; and it
//! does not sign, which our CLI and tests need.
//!
//! Everything here follows botocore's `SigV4Auth` for non-S3 services byte for
//! byte, because botocore (boto3, the AWS CLI) is the client we must accept.
//! Only header-based auth is handled; presigned query-string URLs are not.

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use percent_encoding::{percent_decode_str, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The only signing algorithm accepted (and produced).
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// How far `X-Amz-Date` may be from the hub's clock, either way, as on AWS.
pub const MAX_SKEW_SECS: u64 = 300;

/// Longest `Authorization` header we parse. Real ones are ~200-400 bytes; the
/// bound keeps hostile input from costing more than a few microseconds.
pub const MAX_AUTHORIZATION_LEN: usize = 4096;

/// Most names allowed in `SignedHeaders`; each one costs a header lookup.
pub const MAX_SIGNED_HEADERS: usize = 64;

/// RFC 3986 unreserved characters stay as they are; everything else is escaped
/// (upper-case hex, like Python's `quote`).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// botocore quotes the path with `safe='/~'` on top of Python's always-safe
/// set, which is exactly unreserved plus `/`.
const PATH_SAFE: &AsciiSet = &UNRESERVED.remove(b'/');

const X_AMZ_DATE: &str = "x-amz-date";
const X_AMZ_CONTENT_SHA256: &str = "x-amz-content-sha256";

/// The parts of an incoming HTTP request that SigV4 covers, borrowed as they
/// arrived on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method, e.g. `POST`.
    pub method: &'a str,
    /// Raw path exactly as received, still percent-encoded (`uri.path()`).
    /// It must not be decoded or normalised first: the signature covers the
    /// encoded form.
    pub path: &'a str,
    /// Raw query string without the `?`, still percent-encoded.
    pub query: Option<&'a str>,
    /// All request headers; only the ones named in `SignedHeaders` are read.
    pub headers: &'a HeaderMap,
    /// The complete body, exactly as received.
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// Borrows the signed parts out of `http` types. `uri` must be the URI as
    /// received (under axum, `OriginalUri` if the router is nested).
    pub fn from_http(
        method: &'a http::Method,
        uri: &'a http::Uri,
        headers: &'a HeaderMap,
        body: &'a [u8],
    ) -> Self {
        Request {
            method: method.as_str(),
            path: uri.path(),
            query: uri.query(),
            headers,
            body,
        }
    }
}

/// Who signed an accepted request, and for which scope. Callers must still
/// check that `service` (and `region`, if they care) match the API answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Access key ID from the credential scope.
    pub access_key_id: String,
    /// Region from the credential scope, e.g. `us-east-1`.
    pub region: String,
    /// Signing name from the credential scope, e.g. `lambda`, `iotdata`.
    pub service: String,
}

/// Why a request was refused. `Display` is the message AWS would send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// No `Authorization` header at all.
    #[error("Missing Authentication Token")]
    Missing,
    /// The request cannot be checked: malformed `Authorization`, missing or
    /// malformed `X-Amz-Date`, unsupported algorithm, `host` not signed, a
    /// scope date other than the `X-Amz-Date` day, or an unsigned payload.
    #[error("{0}")]
    Incomplete(String),
    /// The access key ID is not one we know.
    #[error("The security token included in the request is invalid.")]
    UnknownKey,
    /// `X-Amz-Date` (`signed_at`) is more than [`MAX_SKEW_SECS`] from `now`,
    /// both as unix seconds.
    #[error("{}", expired_message(*signed_at, *now))]
    Expired {
        /// When the client says it signed.
        signed_at: u64,
        /// The hub's clock at verification.
        now: u64,
    },
    /// Everything parsed but the signature (or the declared payload hash)
    /// does not match.
    #[error(
        "The request signature we calculated does not match the signature you provided. \
         Check your AWS Secret Access Key and signing method. \
         Consult the service documentation for details."
    )]
    Mismatch,
    /// An `x-amz-*` header the signature does not cover (named here,
    /// comma-separated): one added to a captured request, such as
    /// `X-Amz-Invocation-Type`, would change what the request does.
    #[error("There were headers present in the request which were not signed: {0}.")]
    UnsignedHeaders(String),
}

impl SigError {
    /// The AWS error code (`__type` / `x-amzn-ErrorType`) for this error.
    pub fn aws_code(&self) -> &'static str {
        match self {
            SigError::Missing => "MissingAuthenticationTokenException",
            SigError::Incomplete(_) => "IncompleteSignatureException",
            SigError::UnknownKey => "UnrecognizedClientException",
            SigError::Expired { .. } | SigError::Mismatch | SigError::UnsignedHeaders(_) => {
                "InvalidSignatureException"
            }
        }
    }

    /// The HTTP status AWS answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            SigError::Incomplete(_) => 400,
            SigError::Missing
            | SigError::UnknownKey
            | SigError::Expired { .. }
            | SigError::Mismatch
            | SigError::UnsignedHeaders(_) => 403,
        }
    }
}

fn incomplete(msg: impl Into<String>) -> SigError {
    SigError::Incomplete(msg.into())
}

/// At most 40 characters of client input, so error messages stay small.
fn snippet(s: &str) -> &str {
    s.char_indices().nth(40).map_or(s, |(i, _)| &s[..i])
}

fn expired_message(signed_at: u64, now: u64) -> String {
    if signed_at < now {
        format!(
            "Signature expired: {} is now earlier than {} ({} - 5 min.)",
            format_amz_date(signed_at),
            format_amz_date(now.saturating_sub(MAX_SKEW_SECS)),
            format_amz_date(now),
        )
    } else {
        format!(
            "Signature not yet current: {} is still later than {} ({} + 5 min.)",
            format_amz_date(signed_at),
            format_amz_date(now + MAX_SKEW_SECS),
            format_amz_date(now),
        )
    }
}

/// Checks the SigV4 `Authorization` header of `req`. `secret_for` maps an
/// access key ID to its secret access key; `now_unix` is the hub's clock.
pub fn verify<S: AsRef<str>>(
    req: &Request<'_>,
    secret_for: impl FnOnce(&str) -> Option<S>,
    now_unix: u64,
) -> Result<Verified, SigError> {
    let auth = authorization(req.headers)?;

    let amz_date = single_header_str(req.headers, X_AMZ_DATE)?.ok_or_else(|| {
        // Unlike AWS we do not fall back to `Date`: no SDK we serve sends it.
        incomplete("Authorization header requires existence of a 'X-Amz-Date' header.")
    })?;
    let signed_at = parse_amz_date(amz_date)
        .ok_or_else(|| incomplete(format!("Invalid X-Amz-Date '{}'.", snippet(amz_date))))?;
    if auth.date != &amz_date[..8] {
        return Err(incomplete(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date \
             from HTTP: '{}' != '{}', from '{amz_date}'.",
            auth.date,
            &amz_date[..8]
        )));
    }
    if signed_at.abs_diff(now_unix) > MAX_SKEW_SECS {
        return Err(SigError::Expired {
            signed_at,
            now: now_unix,
        });
    }

    // Lambda, IoT and Secrets Manager bodies are always signed; accepting
    // UNSIGNED-PAYLOAD (or the streaming variants) would let anyone who sees
    // one request replay its headers with a body of their choosing.
    let body_hash = hex::encode(Sha256::digest(req.body));
    if let Some(declared) = single_header_str(req.headers, X_AMZ_CONTENT_SHA256)? {
        if declared == "UNSIGNED-PAYLOAD" || declared.starts_with("STREAMING-") {
            return Err(incomplete(format!(
                "Unsigned payloads are not accepted (x-amz-content-sha256: {}).",
                snippet(declared)
            )));
        }
        if declared != body_hash {
            return Err(SigError::Mismatch);
        }
    }

    unsigned_amz_headers(req.headers, &auth.signed_headers)?;

    let secret = secret_for(auth.access_key_id).ok_or(SigError::UnknownKey)?;

    let canonical = canonical_request(
        req,
        &auth.signed_headers,
        auth.signed_headers_raw,
        &body_hash,
    )?;
    let mut mac = HmacSha256::new_from_slice(&signing_key(
        secret.as_ref(),
        auth.date,
        auth.region,
        auth.service,
    ))
    .expect("HMAC accepts keys of any length");
    mac.update(
        string_to_sign(amz_date, auth.date, auth.region, auth.service, &canonical).as_bytes(),
    );
    // verify_slice compares in constant time.
    mac.verify_slice(&auth.signature)
        .map_err(|_| SigError::Mismatch)?;

    Ok(Verified {
        access_key_id: auth.access_key_id.to_owned(),
        region: auth.region.to_owned(),
        service: auth.service.to_owned(),
    })
}

/// Refuses a request carrying an `x-amz-*` header outside `SignedHeaders`.
/// Every header the local services act on is one (`X-Amz-Invocation-Type`,
/// `X-Amz-Log-Type`, `X-Amz-Client-Context`, `X-Amz-Target`,
/// `x-amz-mqtt5-*`), and every SDK we serve signs them all. Two need no
/// signing because the signature covers them another way: `x-amz-date` is
/// in the string to sign, and `x-amz-content-sha256` must equal the hash
/// of the body, which the canonical request carries.
fn unsigned_amz_headers(headers: &HeaderMap, signed: &[HeaderName]) -> Result<(), SigError> {
    let mut unsigned: Vec<&str> = headers
        .keys()
        .map(HeaderName::as_str)
        .filter(|n| n.starts_with("x-amz-") && *n != X_AMZ_DATE && *n != X_AMZ_CONTENT_SHA256)
        .filter(|n| !signed.iter().any(|s| s.as_str() == *n))
        .collect();
    if unsigned.is_empty() {
        return Ok(());
    }
    unsigned.sort_unstable();
    // A hostile request may carry many; naming a few is enough.
    unsigned.truncate(8);
    Err(SigError::UnsignedHeaders(unsigned.join(", ")))
}

/// The access key ID a request's `Authorization` header names, checked only
/// for its form: lets a server refuse a request it cannot verify before it
/// reads the body.
pub fn access_key_id(headers: &HeaderMap) -> Result<&str, SigError> {
    authorization(headers).map(|a| a.access_key_id)
}

/// The one `Authorization` header, bounded and parsed.
fn authorization(headers: &HeaderMap) -> Result<Authorization<'_>, SigError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(SigError::Missing);
    };
    if values.next().is_some() {
        return Err(incomplete("More than one Authorization header."));
    }
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(incomplete("Authorization header is too long."));
    }
    let value = value
        .to_str()
        .map_err(|_| incomplete("Authorization header is not ASCII."))?;
    parse_authorization(value)
}

/// Signs `req` as botocore would and returns the headers to add to it:
/// `x-amz-date` and `authorization`. Signed are `host`, `x-amz-date`, and,
/// when present, `content-type` and every `x-amz-*` header. Any
/// `authorization` or `x-amz-date` already in `req.headers` is ignored.
///
/// Fails only if `req.headers` has no `Host` (which every request signs) or
/// the scope parts are not acceptable to [`verify`].
pub fn sign(
    req: &Request<'_>,
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    now_unix: u64,
) -> Result<HeaderMap, SigError> {
    if !valid_key_id(access_key_id) || !valid_scope_part(region) || !valid_scope_part(service) {
        return Err(incomplete("Invalid access key ID, region or service."));
    }
    let amz_date = format_amz_date(now_unix);
    let date = &amz_date[..8];

    let mut headers = req.headers.clone();
    headers.remove(http::header::AUTHORIZATION);
    headers.insert(
        X_AMZ_DATE,
        http::HeaderValue::from_str(&amz_date).expect("amz date is ASCII"),
    );
    if !headers.contains_key(http::header::HOST) {
        return Err(incomplete("The request has no Host header to sign."));
    }
    let mut names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            *n == http::header::HOST
                || *n == http::header::CONTENT_TYPE
                || n.as_str().starts_with("x-amz-")
        })
        .cloned()
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let signed_headers = names
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(";");

    let signing = Request {
        headers: &headers,
        ..*req
    };
    let body_hash = hex::encode(Sha256::digest(req.body));
    let canonical = canonical_request(&signing, &names, &signed_headers, &body_hash)?;
    let sts = string_to_sign(&amz_date, date, region, service, &canonical);
    let signature = hex::encode(hmac(
        &signing_key(secret, date, region, service),
        sts.as_bytes(),
    ));

    let authorization = format!(
        "{ALGORITHM} Credential={access_key_id}/{date}/{region}/{service}/aws4_request, \
         SignedHeaders={signed_headers}, Signature={signature}"
    );
    let mut out = HeaderMap::new();
    out.insert(
        X_AMZ_DATE,
        headers.remove(X_AMZ_DATE).expect("inserted above"),
    );
    out.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&authorization)
            .map_err(|_| incomplete("Authorization header would not be a valid header value."))?,
    );
    Ok(out)
}

/// A parsed `Authorization` header, borrowing from it.
struct Authorization<'h> {
    access_key_id: &'h str,
    date: &'h str,
    region: &'h str,
    service: &'h str,
    signed_headers: Vec<HeaderName>,
    signed_headers_raw: &'h str,
    signature: [u8; 32],
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, SigError> {
    let Some(rest) = value.strip_prefix(ALGORITHM) else {
        let algorithm = value.split(' ').next().unwrap_or_default();
        return Err(incomplete(format!(
            "Unsupported AWS 'algorithm': '{}'.",
            snippet(algorithm)
        )));
    };
    if !rest.starts_with(' ') {
        return Err(incomplete("Malformed Authorization header."));
    }

    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    // botocore writes ", " between parts; other signers write "," alone.
    for part in rest.split(',') {
        let part = part.trim_matches(' ');
        let Some((key, val)) = part.split_once('=') else {
            return Err(incomplete(
                "Authorization header parts must look like key=value.",
            ));
        };
        let slot = match key {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => {
                return Err(incomplete(
                    "Authorization header has an unknown part; expected Credential, SignedHeaders and Signature.",
                ))
            }
        };
        if val.is_empty() {
            return Err(incomplete(format!(
                "Authorization header has an empty '{key}'."
            )));
        }
        if slot.replace(val).is_some() {
            return Err(incomplete(format!("Authorization header repeats '{key}'.")));
        }
    }
    let (Some(credential), Some(signed_headers_raw), Some(signature_hex)) =
        (credential, signed_headers, signature)
    else {
        return Err(incomplete(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters.",
        ));
    };

    let scope: Vec<&str> = credential.splitn(6, '/').collect();
    let &[access_key_id, date, region, service, terminator] = scope.as_slice() else {
        return Err(incomplete(
            "Credential should be scoped to a valid region, not a malformed scope: \
             expected <key>/<YYYYMMDD>/<region>/<service>/aws4_request.",
        ));
    };
    if terminator != "aws4_request" {
        return Err(incomplete(
            "Credential should be scoped with a valid terminator: 'aws4_request'.",
        ));
    }
    if !valid_key_id(access_key_id) {
        return Err(incomplete("Credential has a malformed access key ID."));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(incomplete("Credential date must be YYYYMMDD."));
    }
    if !valid_scope_part(region) || !valid_scope_part(service) {
        return Err(incomplete("Credential has a malformed region or service."));
    }

    let mut names: Vec<HeaderName> = Vec::new();
    for name in signed_headers_raw.split(';') {
        if names.len() == MAX_SIGNED_HEADERS {
            return Err(incomplete(format!(
                "SignedHeaders lists more than {MAX_SIGNED_HEADERS} headers."
            )));
        }
        // Canonical names are lower-case tokens; anything else could never
        // have been signed by a conforming client.
        if name.is_empty() || !name.bytes().all(is_lower_token_byte) {
            return Err(incomplete("SignedHeaders has a malformed header name."));
        }
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| incomplete("SignedHeaders has a malformed header name."))?;
        if names.contains(&name) {
            return Err(incomplete("SignedHeaders repeats a header."));
        }
        names.push(name);
    }
    if !names.contains(&http::header::HOST) {
        return Err(incomplete("'Host' must be a signed header."));
    }

    let mut signature = [0u8; 32];
    if signature_hex.len() != 64 || hex::decode_to_slice(signature_hex, &mut signature).is_err() {
        return Err(incomplete("Signature must be 64 hex digits."));
    }

    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers: names,
        signed_headers_raw,
        signature,
    })
}

fn is_lower_token_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Access key IDs are AWS-style (`AKIA...`) or the hub's own; both are short
/// and plain, so anything else is refused before it reaches the key store.
fn valid_key_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn valid_scope_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The one value of header `name` as text, `None` if absent; repeated or
/// non-ASCII values are refused rather than guessed at.
fn single_header_str<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, SigError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(incomplete(format!("More than one '{name}' header.")));
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| incomplete(format!("The '{name}' header is not ASCII.")))
}

/// Builds the canonical request as bytes: header values may hold obs-text,
/// which botocore would carry through untouched.
fn canonical_request(
    req: &Request<'_>,
    signed: &[HeaderName],
    signed_headers_raw: &str,
    payload_hash: &str,
) -> Result<Vec<u8>, SigError> {
    let mut out = Vec::with_capacity(256 + req.path.len() + req.query.map_or(0, str::len));
    out.extend_from_slice(req.method.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_uri(req.path).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_query(req.query.unwrap_or("")).as_bytes());
    out.push(b'\n');
    for name in signed {
        out.extend_from_slice(name.as_str().as_bytes());
        out.push(b':');
        let mut any = false;
        for (i, value) in req.headers.get_all(name).iter().enumerate() {
            any = true;
            if i > 0 {
                out.push(b',');
            }
            push_trimmed(&mut out, value.as_bytes());
        }
        if !any {
            return Err(incomplete(format!(
                "Signed header '{}' is not in the request.",
                name.as_str()
            )));
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(signed_headers_raw.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload_hash.as_bytes());
    Ok(out)
}

/// SigV4 "Trimall": drop leading and trailing whitespace and squeeze inner
/// runs to one space (botocore: `' '.join(value.split())`).
fn push_trimmed(out: &mut Vec<u8>, value: &[u8]) {
    let mut first = true;
    for word in value
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|w| !w.is_empty())
    {
        if !first {
            out.push(b' ');
        }
        out.extend_from_slice(word);
        first = false;
    }
}

/// botocore for non-S3 services: remove dot segments and empty segments from
/// the raw path, then percent-encode it *again*, so `%3A` on the wire signs
/// as `%253A`.
fn canonical_uri(path: &str) -> String {
    let normalized = remove_dot_segments(path);
    percent_encode(normalized.as_bytes(), PATH_SAFE).to_string()
}

/// RFC 3986 5.2.4 plus AWS's collapsing of `//`, on the still-encoded path
/// (so `%2E%2E` is an ordinary segment, as in botocore).
fn remove_dot_segments(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    if path.starts_with('/') {
        out.push('/');
    }
    out.push_str(&segments.join("/"));
    if path.ends_with('/') && !segments.is_empty() {
        out.push('/');
    }
    out
}

/// Decodes each `key=value` pair (`+` stays a plus, as AWS does), re-encodes
/// both with the unreserved set and sorts by key, then value. For queries
/// botocore itself sends (already in that encoding) this equals botocore's
/// sort of the raw pairs.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (reencode(k), reencode(v))
        })
        .collect();
    pairs.sort_unstable();
    let mut out = String::with_capacity(query.len() + 16);
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

fn reencode(s: &str) -> String {
    let decoded: Vec<u8> = percent_decode_str(s).collect();
    percent_encode(&decoded, UNRESERVED).to_string()
}

fn string_to_sign(
    amz_date: &str,
    date: &str,
    region: &str,
    service: &str,
    canonical: &[u8],
) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{date}/{region}/{service}/aws4_request\n{}",
        hex::encode(Sha256::digest(canonical))
    )
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

/// Parses `YYYYMMDDTHHMMSSZ` (UTC) to unix seconds; `None` unless it is a real
/// instant from 1970 on.
fn parse_amz_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u64> {
        let digits = &b[range];
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
    };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if year < 1970
        || !(1..=12).contains(&month)
        || day < 1
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    // Round-tripping rejects days past the end of the month (Feb 30 etc.).
    if civil_from_days(days) != (year, month, day) {
        return None;
    }
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Formats unix seconds as `YYYYMMDDTHHMMSSZ`.
fn format_amz_date(unix: u64) -> String {
    let (year, month, day) = civil_from_days(unix / 86_400);
    let secs = unix % 86_400;
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

// Calendar arithmetic in "shifted" years that start on 1 March, so the leap
// day falls at the end; eras are 400-year cycles of 146097 days. Day 0 is
// 1970-01-01, which is day 719468 counted from 0000-03-01. Only dates from
// 1970 on reach here, so everything stays unsigned.

fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let year_of_era = y % 400;
    let shifted_month = (month + 9) % 12; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_key_is_read_before_anything_else_is_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(access_key_id(&h), Err(SigError::Missing));
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKID/20261124/us-east-1/iotdata/aws4_request, SignedHeaders=host, Signature={}",
            "0".repeat(64)
        );
        h.insert("authorization", auth.parse().unwrap());
        assert_eq!(access_key_id(&h), Ok("AKID"));
        h.insert("authorization", "garbage".parse().unwrap());
        assert!(matches!(access_key_id(&h), Err(SigError::Incomplete(_))));
    }

    /// A request as some client put it on the wire.
    struct Fixture {
        name: &'static str,
        service: &'static str,
        method: &'static str,
        path: &'static str,
        query: Option<&'static str>,
        headers: &'static [(&'static str, &'static str)],
        body: &'static [u8],
    }

    impl Fixture {
        fn header_map(&self) -> HeaderMap {
            let mut map = HeaderMap::new();
            for (k, v) in self.headers {
                map.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                );
            }
            map
        }

        fn authorization(&self) -> &'static str {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                .unwrap()
                .1
        }
    }

    fn request<'a>(f: &Fixture, headers: &'a HeaderMap) -> Request<'a> {
        Request {
            method: f.method,
            path: f.path,
            query: f.query,
            headers,
            body: f.body,
        }
    }

    /// SHA-256 of the empty body, as hex.
    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    const BOTO_KEY: &str = "AKIDROOSTEXAMPLE";
    const BOTO_SECRET: &str = "roost/Secret+Key/EXAMPLE0123456789abcdef";
    /// 2026-11-24T04:05:00Z
    const BOTO_NOW: u64 = 1_795_493_100;

    fn boto_secret(id: &str) -> Option<&'static str> {
        (id == BOTO_KEY).then_some(BOTO_SECRET)
    }

    // Produced by tests/sigv4_vectors.py (real boto3 clients, caught at
    // `before-send`). Note what botocore leaves unsigned: User-Agent,
    // amz-sdk-invocation-id, amz-sdk-request and Content-Length.
    // botocore 1.44.5, boto3 1.44.5
    const BOTOCORE: &[Fixture] = &[
        Fixture {
            name: "lambda invoke",
            service: "lambda",
            method: "POST",
            path: "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Aecho/invocations",
            query: Some("Qualifier=%24LATEST"),
            headers: &[
                ("Host", "127.0.0.1:8420"),
                ("User-Agent", "Boto3/1.44.5 md/Botocore#1.44.5 ua/2.1 os/linux#6.18.44-fc-v657 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython m/Z,e,E,N,b cfg/retry-mode#standard Botocore/1.44.5"),
                ("X-Amz-Date", "20261124T040500Z"),
                ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDROOSTEXAMPLE/20261124/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=970b061bfecc379d5394406e808baf5e32130bf1cbe0da6f9921d065293a3f63"),
                ("amz-sdk-invocation-id", "8db5b7e0-6aa6-498b-b0e0-d22db592f392"),
                ("amz-sdk-request", "attempt=1; max=2"),
                ("Content-Length", "26"),
            ],
            body: b"{\"hello\": \"world\", \"n\": 1}",
        },
        Fixture {
            name: "iot get shadow",
            service: "iotdata",
            method: "GET",
            path: "/things/my-thing/shadow",
            query: Some("name=cfg"),
            headers: &[
                ("Host", "127.0.0.1:8420"),
                ("User-Agent", "Boto3/1.44.5 md/Botocore#1.44.5 ua/2.1 os/linux#6.18.44-fc-v657 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython m/Z,e,E,N,b cfg/retry-mode#standard Botocore/1.44.5"),
                ("X-Amz-Date", "20261124T040500Z"),
                ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDROOSTEXAMPLE/20261124/us-east-1/iotdata/aws4_request, SignedHeaders=host;x-amz-date, Signature=757312ff854259b2177373a78fba1986e10ca02836320f1bf5760669c3d0d83d"),
                ("amz-sdk-invocation-id", "ab793196-6111-4665-835b-5589888bb7d9"),
                ("amz-sdk-request", "attempt=1; max=2"),
            ],
            body: b"",
        },
        Fixture {
            name: "iot publish",
            service: "iotdata",
            method: "POST",
            path: "/topics/a%2Fb%2Fc",
            query: Some("qos=1"),
            headers: &[
                ("Host", "127.0.0.1:8420"),
                ("User-Agent", "Boto3/1.44.5 md/Botocore#1.44.5 ua/2.1 os/linux#6.18.44-fc-v657 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython m/Z,e,E,N,b cfg/retry-mode#standard Botocore/1.44.5"),
                ("X-Amz-Date", "20261124T040500Z"),
                ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDROOSTEXAMPLE/20261124/us-east-1/iotdata/aws4_request, SignedHeaders=host;x-amz-date, Signature=94ca9c3006a81cffda21109f43afe2a85ab0a05f8b722ae2c47d832b2b730f3c"),
                ("amz-sdk-invocation-id", "d61a7e19-107a-432b-8815-496f755de3b7"),
                ("amz-sdk-request", "attempt=1; max=2"),
                ("Content-Length", "9"),
            ],
            body: b"\x00\x01binary\xff",
        },
        Fixture {
            name: "secretsmanager get",
            service: "secretsmanager",
            method: "POST",
            path: "/",
            query: None,
            headers: &[
                ("Host", "127.0.0.1:8420"),
                ("X-Amz-Target", "secretsmanager.GetSecretValue"),
                ("Content-Type", "application/x-amz-json-1.1"),
                ("User-Agent", "Boto3/1.44.5 md/Botocore#1.44.5 ua/2.1 os/linux#6.18.44-fc-v657 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython m/Z,e,E,N,b cfg/retry-mode#standard Botocore/1.44.5"),
                ("X-Amz-Date", "20261124T040500Z"),
                ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDROOSTEXAMPLE/20261124/us-east-1/secretsmanager/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=846dd23b8fee5d14f49e85d9fa5d2c1d39bf05a03be8955330334d050572f127"),
                ("amz-sdk-invocation-id", "a5e0641d-6e88-4602-be23-e3ab06aadb0f"),
                ("amz-sdk-request", "attempt=1; max=2"),
                ("Content-Length", "27"),
            ],
            body: b"{\"SecretId\": \"db/password\"}",
        },
        Fixture {
            name: "raw awsrequest",
            service: "lambda",
            method: "GET",
            path: "/a/./b//c/../d%20e/",
            query: Some("b=2&a=%2F&a=1&flag"),
            headers: &[
                ("Host", "127.0.0.1:8420"),
                ("Content-Type", "text/plain"),
                ("X-Amz-Meta-Note", "  two   spaces  here "),
                ("X-Amz-Date", "20261124T040500Z"),
                ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDROOSTEXAMPLE/20261124/us-east-1/lambda/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-meta-note, Signature=294f5485f511fd98382ccc4a932064e5f35c0183872a752c2fde5da17631d028"),
            ],
            body: b"",
        },
    ];

    const DOC_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    /// 2015-08-30T12:36:00Z
    const DOC_NOW: u64 = 1_440_938_160;

    // From AWS's SigV4 documentation (IAM ListUsers) and its test suite
    // (get-vanilla); both re-checked against botocore.
    const AWS_DOCS: &[Fixture] = &[
        Fixture {
            name: "iam list users",
            service: "iam",
            method: "GET",
            path: "/",
            query: Some("Action=ListUsers&Version=2010-05-08"),
            headers: &[
                ("Host", "iam.amazonaws.com"),
                ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
                ("X-Amz-Date", "20150830T123600Z"),
                ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"),
            ],
            body: b"",
        },
        Fixture {
            name: "get-vanilla",
            service: "service",
            method: "GET",
            path: "/",
            query: None,
            headers: &[
                ("Host", "example.amazonaws.com"),
                ("X-Amz-Date", "20150830T123600Z"),
                ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
            ],
            body: b"",
        },
    ];

    fn doc_secret(id: &str) -> Option<&'static str> {
        (id == "AKIDEXAMPLE").then_some(DOC_SECRET)
    }

    #[test]
    fn aws_documentation_vectors_verify_and_sign() {
        for f in AWS_DOCS {
            let headers = f.header_map();
            let req = request(f, &headers);
            let ok =
                verify(&req, doc_secret, DOC_NOW).unwrap_or_else(|e| panic!("{}: {e}", f.name));
            assert_eq!(ok.access_key_id, "AKIDEXAMPLE");
            assert_eq!(ok.service, f.service);
            let signed = sign(
                &req,
                "AKIDEXAMPLE",
                DOC_SECRET,
                "us-east-1",
                f.service,
                DOC_NOW,
            )
            .unwrap();
            assert_eq!(signed["authorization"], f.authorization(), "{}", f.name);
            assert_eq!(signed["x-amz-date"], "20150830T123600Z");
        }
    }

    #[test]
    fn botocore_vectors_verify_and_sign() {
        for f in BOTOCORE {
            let headers = f.header_map();
            let req = request(f, &headers);
            let ok =
                verify(&req, boto_secret, BOTO_NOW).unwrap_or_else(|e| panic!("{}: {e}", f.name));
            assert_eq!(
                ok,
                Verified {
                    access_key_id: BOTO_KEY.into(),
                    region: "us-east-1".into(),
                    service: f.service.into(),
                },
                "{}",
                f.name
            );
            let signed = sign(
                &req,
                BOTO_KEY,
                BOTO_SECRET,
                "us-east-1",
                f.service,
                BOTO_NOW,
            )
            .unwrap();
            assert_eq!(signed["authorization"], f.authorization(), "{}", f.name);
        }
    }

    #[test]
    fn canonical_forms_match_botocore() {
        assert_eq!(
            canonical_uri("/2015-03-31/functions/arn%3Aaws%3Alambda/invocations"),
            "/2015-03-31/functions/arn%253Aaws%253Alambda/invocations"
        );
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/"), "/");
        assert_eq!(canonical_uri("/a/./b//c/../d%20e/"), "/a/b/d%2520e/");
        assert_eq!(canonical_uri("/.."), "/");
        assert_eq!(canonical_uri("/x/%2E%2E/y"), "/x/%252E%252E/y");
        assert_eq!(canonical_uri("/~a-b_c.d!"), "/~a-b_c.d%21");
        assert_eq!(canonical_uri("/caf\u{e9}"), "/caf%C3%A9");
        assert_eq!(canonical_query("b=2&a=%2F&a=1&flag"), "a=%2F&a=1&b=2&flag=");
        assert_eq!(canonical_query("a=x+y&c=%7e&d=%3a"), "a=x%2By&c=~&d=%3A");
        assert_eq!(canonical_query(""), "");
        assert_eq!(canonical_query("&&z&"), "z=");
        let mut out = Vec::new();
        push_trimmed(&mut out, b" \t a   b\tc  ");
        assert_eq!(out, b"a b c");
    }

    #[test]
    fn amz_dates_round_trip() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(DOC_NOW));
        assert_eq!(parse_amz_date("20261124T040500Z"), Some(BOTO_NOW));
        assert_eq!(parse_amz_date("20240229T235959Z"), Some(1_709_251_199));
        for bad in [
            "20230229T000000Z",
            "20261324T040500Z",
            "20261100T040500Z",
            "20261124T240000Z",
            "20261124T046000Z",
            "20261124 040500Z",
            "20261124T040500",
            "2026-11-24T04:05",
            "19691231T235959Z",
            "+0261124T040500Z",
            "",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
        for t in [
            0,
            DOC_NOW,
            BOTO_NOW,
            951_782_400,
            4_102_444_800,
            253_402_300_799,
        ] {
            assert_eq!(parse_amz_date(&format_amz_date(t)), Some(t));
        }
    }

    /// The lambda fixture with one header replaced (or removed, if `value` is
    /// `None`), verified at `now`.
    fn verify_lambda_with(name: &str, value: Option<&str>, now: u64) -> Result<Verified, SigError> {
        let f = &BOTOCORE[0];
        let mut headers = f.header_map();
        match value {
            Some(v) => {
                headers.insert(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                );
            }
            None => {
                headers.remove(name);
            }
        }
        verify(&request(f, &headers), boto_secret, now)
    }

    fn lambda_auth_with(sig_part: &str) -> String {
        BOTOCORE[0].authorization().replace(
            "Signature=970b061bfecc379d5394406e808baf5e32130bf1cbe0da6f9921d065293a3f63",
            sig_part,
        )
    }

    #[test]
    fn wrong_secret_or_unknown_key_is_refused() {
        let f = &BOTOCORE[0];
        let headers = f.header_map();
        let req = request(f, &headers);
        assert_eq!(
            verify(&req, |_| Some("not the secret"), BOTO_NOW),
            Err(SigError::Mismatch)
        );
        let unknown = verify(&req, |_| None::<String>, BOTO_NOW).unwrap_err();
        assert_eq!(unknown, SigError::UnknownKey);
        assert_eq!(unknown.aws_code(), "UnrecognizedClientException");
        assert_eq!(unknown.status(), 403);
        assert_eq!(
            unknown.to_string(),
            "The security token included in the request is invalid."
        );
    }

    #[test]
    fn tampering_is_refused() {
        let f = &BOTOCORE[3]; // secrets manager: signs content-type and x-amz-target
        let headers = f.header_map();
        let base = request(f, &headers);
        assert!(verify(&base, boto_secret, BOTO_NOW).is_ok());

        let body: &[u8] = br#"{"SecretId": "db/passwore"}"#;
        let cases = [
            Request { body, ..base },
            Request { path: "/x", ..base },
            Request {
                method: "PUT",
                ..base
            },
            Request {
                query: Some("a=1"),
                ..base
            },
        ];
        for req in cases {
            assert_eq!(verify(&req, boto_secret, BOTO_NOW), Err(SigError::Mismatch));
        }

        let lambda = &BOTOCORE[0];
        let lh = lambda.header_map();
        let lreq = request(lambda, &lh);
        for query in [
            None,
            Some("Qualifier=%24LATES"),
            Some("Qualifier=%24LATEST&x=1"),
        ] {
            let req = Request { query, ..lreq };
            assert_eq!(verify(&req, boto_secret, BOTO_NOW), Err(SigError::Mismatch));
        }
        // The encoded and decoded forms of a path sign differently.
        let decoded =
            "/2015-03-31/functions/arn:aws:lambda:us-east-1:123456789012:function:echo/invocations";
        let req = Request {
            path: decoded,
            ..lreq
        };
        assert_eq!(verify(&req, boto_secret, BOTO_NOW), Err(SigError::Mismatch));

        for (name, value) in [
            ("x-amz-target", "secretsmanager.PutSecretValue"),
            ("content-type", "application/json"),
            ("host", "127.0.0.1:8421"),
        ] {
            let mut h = f.header_map();
            h.insert(
                HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
            assert_eq!(
                verify(&request(f, &h), boto_secret, BOTO_NOW),
                Err(SigError::Mismatch),
                "{name}"
            );
        }
        // Unsigned headers may change freely.
        let mut h = f.header_map();
        h.insert("user-agent", http::HeaderValue::from_static("curl/8"));
        h.insert(
            "amz-sdk-request",
            http::HeaderValue::from_static("attempt=2; max=2"),
        );
        assert!(verify(&request(f, &h), boto_secret, BOTO_NOW).is_ok());
        // A second value of a signed header changes its canonical form.
        let mut h = f.header_map();
        h.append("x-amz-target", http::HeaderValue::from_static("extra"));
        assert_eq!(
            verify(&request(f, &h), boto_secret, BOTO_NOW),
            Err(SigError::Mismatch)
        );
        // A signed header that went missing.
        let mut h = f.header_map();
        h.remove("x-amz-target");
        assert!(matches!(
            verify(&request(f, &h), boto_secret, BOTO_NOW),
            Err(SigError::Incomplete(_))
        ));
    }

    #[test]
    fn amz_headers_outside_signed_headers_are_refused() {
        // A captured Invoke with a header the service acts on added: it
        // would become an `Event` call, a `DryRun`, or return the log.
        let lambda = &BOTOCORE[0];
        for (name, value) in [
            ("x-amz-invocation-type", "Event"),
            ("x-amz-log-type", "Tail"),
            ("x-amz-client-context", "e30="),
            ("x-amz-security-token", "t"),
        ] {
            let mut h = lambda.header_map();
            h.insert(
                HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
            let err = verify(&request(lambda, &h), boto_secret, BOTO_NOW).unwrap_err();
            assert_eq!(err, SigError::UnsignedHeaders(name.into()), "{name}");
            assert_eq!(
                (err.status(), err.aws_code()),
                (403, "InvalidSignatureException")
            );
            assert!(err.to_string().contains(name), "{err}");
        }
        // Covered another way: the date is in the string to sign, and a
        // declared payload hash must be the body's.
        let mut h = lambda.header_map();
        h.insert(
            X_AMZ_CONTENT_SHA256,
            http::HeaderValue::from_str(&hex::encode(Sha256::digest(lambda.body))).unwrap(),
        );
        assert!(verify(&request(lambda, &h), boto_secret, BOTO_NOW).is_ok());
        // `x-amzn-` is not `x-amz-`: botocore leaves the trace id unsigned.
        let mut h = lambda.header_map();
        h.insert("x-amzn-trace-id", http::HeaderValue::from_static("Root=1"));
        assert!(verify(&request(lambda, &h), boto_secret, BOTO_NOW).is_ok());
    }

    #[test]
    fn repeated_query_parameters_sign_in_sorted_order_as_on_aws() {
        // AWS sorts by name, then by value: the order on the wire does not
        // change the signature, so a service must refuse repeats it would
        // read only one of.
        assert_eq!(canonical_query("name=b&name=a"), "name=a&name=b");
        assert_eq!(canonical_query("b=2&a=1&a=0"), "a=0&a=1&b=2");
        assert_eq!(canonical_query("a=%2F&a=-"), "a=%2F&a=-");
        let mut headers = HeaderMap::new();
        headers.insert("host", http::HeaderValue::from_static("localhost"));
        let signed = |query: &'static str| Request {
            method: "GET",
            path: "/retainedMessage/t",
            query: Some(query),
            headers: &headers,
            body: b"",
        };
        let mut with_auth = headers.clone();
        with_auth.extend(
            sign(
                &signed("name=a&name=b"),
                "AKID",
                "s",
                "us-east-1",
                "iotdata",
                BOTO_NOW,
            )
            .unwrap(),
        );
        let swapped = Request {
            headers: &with_auth,
            ..signed("name=b&name=a")
        };
        assert!(verify(&swapped, |_| Some("s"), BOTO_NOW).is_ok());
    }

    #[test]
    fn unsigned_request_is_missing() {
        let err = verify_lambda_with("authorization", None, BOTO_NOW).unwrap_err();
        assert_eq!(err, SigError::Missing);
        assert_eq!(err.aws_code(), "MissingAuthenticationTokenException");
        assert_eq!(err.status(), 403);
        assert_eq!(err.to_string(), "Missing Authentication Token");
    }

    #[test]
    fn clock_skew_is_bounded_both_ways() {
        assert!(verify_lambda_with("user-agent", Some("x"), BOTO_NOW + 299).is_ok());
        assert!(verify_lambda_with("user-agent", Some("x"), BOTO_NOW - 299).is_ok());
        assert!(verify_lambda_with("user-agent", Some("x"), BOTO_NOW + 300).is_ok());

        let late = verify_lambda_with("user-agent", Some("x"), BOTO_NOW + 301).unwrap_err();
        assert_eq!(
            late,
            SigError::Expired {
                signed_at: BOTO_NOW,
                now: BOTO_NOW + 301
            }
        );
        assert_eq!(late.aws_code(), "InvalidSignatureException");
        assert_eq!(late.status(), 403);
        assert_eq!(
            late.to_string(),
            "Signature expired: 20261124T040500Z is now earlier than 20261124T040501Z \
             (20261124T041001Z - 5 min.)"
        );

        let early = verify_lambda_with("user-agent", Some("x"), BOTO_NOW - 301).unwrap_err();
        assert_eq!(
            early.to_string(),
            "Signature not yet current: 20261124T040500Z is still later than 20261124T040459Z \
             (20261124T035959Z + 5 min.)"
        );
    }

    #[test]
    fn payload_hash_header_is_checked() {
        let f = &BOTOCORE[0];
        let good = hex::encode(Sha256::digest(f.body));
        // Present but unsigned, and right: the body hash is what was signed.
        assert!(verify_lambda_with(X_AMZ_CONTENT_SHA256, Some(&good), BOTO_NOW).is_ok());
        assert_eq!(
            verify_lambda_with(X_AMZ_CONTENT_SHA256, Some(EMPTY_SHA256), BOTO_NOW),
            Err(SigError::Mismatch)
        );
        for unsigned in ["UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"] {
            let err =
                verify_lambda_with(X_AMZ_CONTENT_SHA256, Some(unsigned), BOTO_NOW).unwrap_err();
            assert!(matches!(err, SigError::Incomplete(_)), "{unsigned}");
            assert_eq!(err.status(), 400);
            assert_eq!(err.aws_code(), "IncompleteSignatureException");
        }
    }

    #[test]
    fn scope_and_date_problems_are_incomplete() {
        let incomplete = |r: Result<Verified, SigError>| matches!(r, Err(SigError::Incomplete(_)));
        // Scope date one day off from X-Amz-Date.
        let auth = BOTOCORE[0]
            .authorization()
            .replace("/20261124/", "/20261123/");
        assert!(incomplete(verify_lambda_with(
            "authorization",
            Some(&auth),
            BOTO_NOW
        )));
        // X-Amz-Date missing, malformed, repeated.
        assert!(incomplete(verify_lambda_with("x-amz-date", None, BOTO_NOW)));
        assert!(incomplete(verify_lambda_with(
            "x-amz-date",
            Some("Tue, 24 Nov 2026 04:05:00 GMT"),
            BOTO_NOW
        )));
        let f = &BOTOCORE[0];
        let mut h = f.header_map();
        h.append(
            "x-amz-date",
            http::HeaderValue::from_static("20261124T040500Z"),
        );
        assert!(incomplete(verify(&request(f, &h), boto_secret, BOTO_NOW)));
        // Two Authorization headers.
        let mut h = f.header_map();
        h.append(
            "authorization",
            http::HeaderValue::from_static(f.authorization()),
        );
        assert!(incomplete(verify(&request(f, &h), boto_secret, BOTO_NOW)));
    }

    #[test]
    fn malformed_authorization_is_incomplete() {
        let cred = "Credential=AKIDROOSTEXAMPLE/20261124/us-east-1/lambda/aws4_request";
        let sig = "Signature=970b061bfecc379d5394406e808baf5e32130bf1cbe0da6f9921d065293a3f63";
        let huge = format!(
            "{ALGORITHM} {cred}, SignedHeaders={}, {sig}",
            "a;".repeat(3000)
        );
        let many = (0..65)
            .map(|i| format!("h{i}"))
            .collect::<Vec<_>>()
            .join(";");
        let too_many = format!("{ALGORITHM} {cred}, SignedHeaders=host;{many}, {sig}");
        let cases: Vec<String> = vec![
            "garbage".into(),
            "".into(),
            ALGORITHM.into(),
            format!("{ALGORITHM} "),
            format!("{ALGORITHM}{cred}, SignedHeaders=host;x-amz-date, {sig}"),
            format!("AWS4-HMAC-SHA512 {cred}, SignedHeaders=host;x-amz-date, {sig}"),
            format!("AWS {cred}, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date, Signature=970b06"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date, {sig}, {sig}"),
            format!("{ALGORITHM} {cred}, {cred}, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date, SignedHeaders=host, {sig}"),
            format!("{ALGORITHM} Credential=, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date, Signature="),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date, Signature={}", "g".repeat(64)),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date, Signature={}", "a".repeat(66)),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date, {sig}, Foo=bar"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date, {sig}, junk"),
            format!("{ALGORITHM} {cred} SignedHeaders=host;x-amz-date {sig}"),
            format!("{ALGORITHM} Credential=AKIDROOSTEXAMPLE/20261124/us-east-1/lambda, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} Credential=AKIDROOSTEXAMPLE/20261124/us-east-1/lambda/aws4_request/x, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} Credential=AKIDROOSTEXAMPLE/20261124/us-east-1/lambda/aws5_request, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} Credential=AKIDROOSTEXAMPLE//us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} Credential=AKID ROOST/20261124/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} Credential=AKIDROOSTEXAMPLE/2026112x/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} Credential=AKIDROOSTEXAMPLE/20261124/US-EAST-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=x-amz-date, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=Host;x-amz-date, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;;x-amz-date, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date;host, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x(amz)date, {sig}"),
            format!("{ALGORITHM} {cred}, SignedHeaders=host;x-amz-date:, {sig}"),
            too_many,
            huge,
        ];
        for auth in &cases {
            let got = verify_lambda_with("authorization", Some(auth), BOTO_NOW);
            assert!(
                matches!(got, Err(SigError::Incomplete(_))),
                "{auth:.120}: {got:?}"
            );
        }
        // Truncations of a good header never panic and never verify.
        let good = BOTOCORE[0].authorization();
        for end in 0..good.len() {
            let got = verify_lambda_with("authorization", Some(&good[..end]), BOTO_NOW);
            assert!(got.is_err(), "{}", &good[..end]);
        }
        // A valid but different signature is a mismatch, not a parse error.
        let other = lambda_auth_with(&format!("Signature={}", "0".repeat(64)));
        assert_eq!(
            verify_lambda_with("authorization", Some(&other), BOTO_NOW),
            Err(SigError::Mismatch)
        );
        // Upper-case hex and "," without a space still parse.
        let upper = lambda_auth_with(
            "Signature=970B061BFECC379D5394406E808BAF5E32130BF1CBE0DA6F9921D065293A3F63",
        )
        .replace(", ", ",");
        assert!(verify_lambda_with("authorization", Some(&upper), BOTO_NOW).is_ok());
        // Non-ASCII in the header.
        let mut h = BOTOCORE[0].header_map();
        h.insert(
            "authorization",
            http::HeaderValue::from_bytes(b"AWS4-HMAC-SHA256 Credential=\xff").unwrap(),
        );
        assert!(matches!(
            verify(&request(&BOTOCORE[0], &h), boto_secret, BOTO_NOW),
            Err(SigError::Incomplete(_))
        ));
    }

    #[test]
    fn mismatch_message_is_aws_text() {
        let e = SigError::Mismatch;
        assert_eq!(e.aws_code(), "InvalidSignatureException");
        assert_eq!(e.status(), 403);
        assert_eq!(
            e.to_string(),
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method. Consult the service \
             documentation for details."
        );
    }

    #[test]
    fn sign_needs_host_and_sane_scope() {
        let headers = HeaderMap::new();
        let req = Request {
            method: "GET",
            path: "/",
            query: None,
            headers: &headers,
            body: b"",
        };
        assert!(sign(&req, "AKID", "s", "us-east-1", "lambda", BOTO_NOW).is_err());
        let mut headers = HeaderMap::new();
        headers.insert("host", http::HeaderValue::from_static("h"));
        let req = Request {
            headers: &headers,
            ..req
        };
        assert!(sign(&req, "AKID/x", "s", "us-east-1", "lambda", BOTO_NOW).is_err());
        assert!(sign(&req, "AKID", "s", "us east", "lambda", BOTO_NOW).is_err());
        assert!(sign(&req, "AKID", "s", "us-east-1", "lambda", BOTO_NOW).is_ok());
    }

    #[test]
    fn from_http_borrows_the_raw_uri() {
        let uri: http::Uri = "/topics/a%2Fb%2Fc?qos=1".parse().unwrap();
        let method = http::Method::POST;
        let headers = HeaderMap::new();
        let req = Request::from_http(&method, &uri, &headers, b"");
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/topics/a%2Fb%2Fc");
        assert_eq!(req.query, Some("qos=1"));
    }

    mod round_trip {
        use super::*;
        use proptest::prelude::*;

        fn signed_headers(path: &str, query: Option<&str>, body: &[u8], extra: &str) -> HeaderMap {
            let mut headers = HeaderMap::new();
            headers.insert("host", http::HeaderValue::from_static("127.0.0.1:8420"));
            headers.insert(
                "content-type",
                http::HeaderValue::from_static("application/json"),
            );
            headers.insert("x-amz-target", http::HeaderValue::from_str(extra).unwrap());
            let req = Request {
                method: "POST",
                path,
                query,
                headers: &headers,
                body,
            };
            let added = sign(&req, BOTO_KEY, BOTO_SECRET, "eu-west-1", "lambda", BOTO_NOW).unwrap();
            headers.extend(added);
            headers
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn sign_then_verify(
                path in "/[a-zA-Z0-9%/._~:+-]{0,40}",
                query in proptest::option::of("[a-zA-Z0-9%=&+._~-]{0,40}"),
                body in proptest::collection::vec(any::<u8>(), 0..256),
                extra in "[ -~]{0,20}",
                flip in any::<prop::sample::Index>(),
                bit in 0u8..8,
            ) {
                let headers = signed_headers(&path, query.as_deref(), &body, &extra);
                let req = Request { method: "POST", path: &path, query: query.as_deref(), headers: &headers, body: &body };
                let ok = verify(&req, boto_secret, BOTO_NOW).unwrap();
                prop_assert_eq!(ok.region, "eu-west-1");

                if !body.is_empty() {
                    let mut tampered = body.clone();
                    tampered[flip.index(body.len())] ^= 1 << bit;
                    let req = Request { body: &tampered, ..req };
                    prop_assert_eq!(verify(&req, boto_secret, BOTO_NOW), Err(SigError::Mismatch));
                }
            }

            #[test]
            fn hostile_authorization_never_panics(auth in "[ -~]{0,300}") {
                let f = &BOTOCORE[0];
                let mut h = f.header_map();
                h.insert("authorization", http::HeaderValue::from_str(&auth).unwrap());
                prop_assert!(verify(&request(f, &h), boto_secret, BOTO_NOW).is_err());
            }
        }
    }
}
