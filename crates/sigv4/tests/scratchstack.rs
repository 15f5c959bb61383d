//! Cross-check against another implementation: what `roost_sigv4::sign`
//! produces, `scratchstack-aws-signature` (an independent server-side
//! verifier) accepts, and what either side should refuse (a wrong secret, a
//! tampered header, body, path or query, a stale date), both refuse.
//! scratchstack has no signer, so the other direction is covered by the
//! botocore fixtures in the unit tests instead.

use chrono::DateTime;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use roost_sigv4::{sign, verify, SigError};
use scratchstack_aws_signature::principal::{Principal, User};
use scratchstack_aws_signature::{
    service_for_signing_key_fn, sigv4_validate_request, GetSigningKeyRequest,
    GetSigningKeyResponse, KSecretKey, SignatureOptions, NO_ADDITIONAL_SIGNED_HEADERS,
};
use std::str::FromStr;

const KEY: &str = "AKIDROOSTEXAMPLE0001";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const REGION: &str = "us-east-1";
/// 2026-11-24T10:00:00Z.
const NOW: u64 = 1_795_514_400;

/// A request before signing.
struct Case {
    name: &'static str,
    service: &'static str,
    method: &'static str,
    /// Path and query, as on the wire.
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static [u8],
}

const CASES: &[Case] = &[
    Case {
        name: "get shadow",
        service: "iotdata",
        method: "GET",
        target: "/things/pump-7/shadow",
        headers: &[],
        body: b"",
    },
    Case {
        name: "named shadow",
        service: "iotdata",
        method: "GET",
        target: "/things/pump-7/shadow?name=config",
        headers: &[],
        body: b"",
    },
    Case {
        name: "publish with an encoded topic and unsorted query",
        service: "iotdata",
        method: "POST",
        target: "/topics/plant%2F7%2Ftemp?retain=true&qos=1&contentType=text%2Fplain",
        headers: &[
            ("content-type", "application/octet-stream"),
            (
                "x-amz-mqtt5-user-properties",
                "W3sic2l0ZSI6ICJwbGFudC03In1d",
            ),
        ],
        body: b"21.5",
    },
    Case {
        name: "encoded slashes in the path",
        service: "iotdata",
        method: "POST",
        target: "/topics/plant%2F7%2Ftemp",
        headers: &[],
        body: b"21.5",
    },
    Case {
        name: "unsorted query with an encoded value",
        service: "iotdata",
        method: "POST",
        target: "/topics/temp?retain=true&qos=1&contentType=text%2Fplain",
        headers: &[],
        body: b"21.5",
    },
    Case {
        name: "query with repeated and empty values",
        service: "iotdata",
        method: "GET",
        target: "/retainedMessage?maxResults=10&b=2&a=&b=1",
        headers: &[],
        body: b"",
    },
    Case {
        name: "non-ASCII path",
        service: "iotdata",
        method: "GET",
        target: "/things/caf%C3%A9/shadow",
        headers: &[],
        body: b"",
    },
    Case {
        name: "lambda invoke",
        service: "lambda",
        method: "POST",
        target: "/2015-03-31/functions/resize/invocations",
        headers: &[
            ("content-type", "application/json"),
            ("x-amz-invocation-type", "RequestResponse"),
        ],
        body: br#"{"width": 640}"#,
    },
    Case {
        name: "secrets manager, JSON 1.1, with a folded header value",
        service: "secretsmanager",
        method: "POST",
        target: "/",
        headers: &[
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", "secretsmanager.GetSecretValue"),
            ("x-amz-meta-note", "  two   spaces  "),
        ],
        body: br#"{"SecretId": "db-password"}"#,
    },
    Case {
        name: "binary body",
        service: "iotdata",
        method: "POST",
        target: "/topics/raw",
        headers: &[],
        body: &[0, 159, 146, 150, 255, 0, 10, 13],
    },
];

/// The request `case` describes, signed by ours with `secret` at `at`.
fn signed(case: &Case, secret: &str, at: u64) -> Request<Vec<u8>> {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("localhost:7780"));
    for (k, v) in case.headers {
        headers.append(
            HeaderName::from_static(k),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let method = Method::from_bytes(case.method.as_bytes()).unwrap();
    let uri: http::Uri = case.target.parse().unwrap();
    let auth = sign(
        &roost_sigv4::Request::from_http(&method, &uri, &headers, case.body),
        KEY,
        secret,
        REGION,
        case.service,
        at,
    )
    .unwrap();
    headers.extend(auth);
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(case.body.to_vec())
        .unwrap();
    *req.headers_mut() = headers;
    req
}

/// Whether the case's path holds percent-encoded bytes (signed encoded
/// twice by AWS's rule for services other than S3).
fn encoded_path(case: &Case) -> bool {
    case.target.split('?').next().unwrap_or("").contains('%')
}

/// What ours makes of `req`, the hub's clock at `now`.
fn ours(req: &Request<Vec<u8>>, now: u64) -> Result<roost_sigv4::Verified, SigError> {
    let signed =
        roost_sigv4::Request::from_http(req.method(), req.uri(), req.headers(), req.body());
    verify(&signed, |k| (k == KEY).then_some(SECRET), now)
}

async fn signing_key(
    req: GetSigningKeyRequest,
) -> Result<GetSigningKeyResponse, Box<dyn std::error::Error + Send + Sync>> {
    if req.access_key() != KEY {
        return Err("unknown access key".into());
    }
    let key = KSecretKey::from_str(SECRET).unwrap();
    let user = User::new("aws", "000000000000", "/", "owner").unwrap();
    Ok(GetSigningKeyResponse::builder()
        .principal(Principal::from(vec![user.into()]))
        .signing_key(key.to_ksigning(req.request_date(), req.region(), req.service()))
        .build()
        .unwrap())
}

/// Whether scratchstack accepts `req` for `service`, its clock at `now`.
async fn theirs(req: Request<Vec<u8>>, service: &str, now: u64) -> Result<(), String> {
    let mut keys = service_for_signing_key_fn(signing_key);
    sigv4_validate_request(
        req,
        REGION,
        service,
        &mut keys,
        DateTime::from_timestamp(now as i64, 0).unwrap(),
        &NO_ADDITIONAL_SIGNED_HEADERS,
        SignatureOptions::default(),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

#[tokio::test]
async fn what_we_sign_another_verifier_accepts() {
    for case in CASES {
        let req = signed(case, SECRET, NOW);
        let v = ours(&req, NOW).unwrap_or_else(|e| panic!("{}: ours refused: {e}", case.name));
        assert_eq!(v.service, case.service);
        let verdict = theirs(req, case.service, NOW + 30).await;
        if encoded_path(case) {
            // The one known difference: for every service but S3, AWS
            // encodes an already-encoded path a second time (`%2F` is signed
            // as `%252F`), as botocore and the AWS CLI sign it, and as our
            // unit tests check against botocore's output. scratchstack
            // encodes it once, so it refuses what every SDK sends. This
            // pins the difference: if scratchstack changes, look again.
            assert!(verdict.is_err(), "{}: scratchstack now agrees", case.name);
            continue;
        }
        verdict.unwrap_or_else(|e| panic!("{}: scratchstack refused: {e}", case.name));
    }
}

#[tokio::test]
async fn a_wrong_secret_is_refused_by_both() {
    for case in CASES {
        let req = signed(case, "not-the-secret-not-the-secret-not-the-se", NOW);
        assert_eq!(ours(&req, NOW), Err(SigError::Mismatch), "{}", case.name);
        assert!(
            theirs(req, case.service, NOW).await.is_err(),
            "{}",
            case.name
        );
    }
}

/// Each change after signing, applied to every case that it fits.
type Tamper = fn(&mut Request<Vec<u8>>) -> bool;

const TAMPERING: &[(&str, Tamper)] = &[
    ("body changed", |r| {
        r.body_mut().push(b'!');
        true
    }),
    ("signed header changed", |r| {
        match r.headers().contains_key("content-type") {
            true => {
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("text/html"));
                true
            }
            false => false,
        }
    }),
    ("host changed", |r| {
        r.headers_mut()
            .insert("host", HeaderValue::from_static("evil.example:7780"));
        true
    }),
    ("query added", |r| {
        let t = r.uri().path_and_query().unwrap().as_str();
        let sep = if t.contains('?') { '&' } else { '?' };
        *r.uri_mut() = format!("{t}{sep}qos=1").parse().unwrap();
        true
    }),
    ("path changed", |r| {
        let t = r
            .uri()
            .path_and_query()
            .unwrap()
            .as_str()
            .replacen('/', "/x", 2);
        *r.uri_mut() = t.parse().unwrap();
        true
    }),
    ("date changed, signature kept", |r| {
        let d = r.headers()["x-amz-date"]
            .to_str()
            .unwrap()
            .replace("T10", "T11");
        r.headers_mut()
            .insert("x-amz-date", HeaderValue::from_str(&d).unwrap());
        true
    }),
    ("signature flipped", |r| {
        let a = r.headers()["authorization"].to_str().unwrap().to_owned();
        let last = a.chars().last().unwrap();
        let flipped = format!(
            "{}{}",
            &a[..a.len() - 1],
            if last == '0' { '1' } else { '0' }
        );
        r.headers_mut()
            .insert("authorization", HeaderValue::from_str(&flipped).unwrap());
        true
    }),
];

#[tokio::test]
async fn a_request_changed_after_signing_is_refused_by_both() {
    for case in CASES {
        for (what, tamper) in TAMPERING {
            let mut req = signed(case, SECRET, NOW);
            if !tamper(&mut req) {
                continue;
            }
            // The changed date is an hour on: both clocks are there too, so
            // only the signature can refuse it.
            let now = if what.starts_with("date") {
                NOW + 3600
            } else {
                NOW
            };
            assert!(
                ours(&req, now).is_err(),
                "{}: {what}: ours accepted",
                case.name
            );
            assert!(
                theirs(req, case.service, now).await.is_err(),
                "{}: {what}: scratchstack accepted",
                case.name
            );
        }
    }
}

#[tokio::test]
async fn stale_and_future_dates_are_refused_by_both() {
    // Past both windows (ours 5 minutes, theirs 15).
    for skew in [-3600i64, -20 * 60, 20 * 60, 86_400] {
        let case = &CASES[0];
        let at = (NOW as i64 + skew) as u64;
        let req = signed(case, SECRET, at);
        assert!(
            matches!(ours(&req, NOW), Err(SigError::Expired { .. })),
            "skew {skew}"
        );
        assert!(theirs(req, case.service, NOW).await.is_err(), "skew {skew}");
    }
    // Inside ours: both accept.
    let req = signed(&CASES[0], SECRET, NOW - 240);
    assert!(ours(&req, NOW).is_ok());
    assert!(theirs(req, CASES[0].service, NOW).await.is_ok());
}

#[tokio::test]
async fn a_scope_for_another_service_is_refused_by_both() {
    // Ours reports the scope and the hub compares it; theirs is told.
    let req = signed(&CASES[0], SECRET, NOW);
    assert_eq!(ours(&req, NOW).unwrap().service, "iotdata");
    assert!(theirs(req, "lambda", NOW).await.is_err());
}

#[tokio::test]
async fn an_unknown_key_is_refused_by_both() {
    let case = &CASES[0];
    let mut req = signed(case, SECRET, NOW);
    let a = req.headers()["authorization"]
        .to_str()
        .unwrap()
        .replace(KEY, "AKIDSOMEONEELSE00001");
    req.headers_mut()
        .insert("authorization", HeaderValue::from_str(&a).unwrap());
    assert_eq!(ours(&req, NOW), Err(SigError::UnknownKey));
    assert!(theirs(req, case.service, NOW).await.is_err());
}
