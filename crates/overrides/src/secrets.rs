//! Secrets Manager `GetSecretValue` for the secrets deployed with the
//! manifest (`[[secret]]`), opened from the store only when asked for.

use crate::service::{json, AwsError, LocalService, Protocol, Signed, ACCOUNT};
use crate::{LocalHub, Right, Rights};
use async_trait::async_trait;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use roost_model::Principal;
use sha2::{Digest, Sha256};

pub struct SecretsManager;

const TARGET_PREFIX: &str = "secretsmanager.";
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";
/// Largest GetSecretValue request body (it holds an id and two options).
const MAX_BODY: usize = 64 << 10;

fn invalid(code: &'static str, message: impl Into<String>) -> AwsError {
    AwsError::new(StatusCode::BAD_REQUEST, code, message)
}

fn not_found() -> AwsError {
    invalid(
        "ResourceNotFoundException",
        "Secrets Manager can't find the specified secret.",
    )
}

/// The six-character suffix AWS adds to a secret's ARN, derived from the
/// name so it is stable.
fn suffix(name: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    Sha256::digest(name.as_bytes())
        .iter()
        .take(6)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// A secret's name from `SecretId`: its name, or its ARN (with or without
/// the random suffix).
fn secret_name(id: &str) -> &str {
    match id.strip_prefix("arn:") {
        Some(rest) => match rest.split_once(":secret:") {
            Some((_, name)) => name
                .rsplit_once('-')
                .filter(|(base, s)| s.len() == 6 && suffix(base) == *s)
                .map(|(base, _)| base)
                .unwrap_or(name),
            None => id,
        },
        None => id,
    }
}

/// A version id (a UUID's shape) per secret and deployment.
fn version_id(name: &str, deployment: i64) -> String {
    let h = hex::encode(Sha256::digest(format!("{deployment}\0{name}").as_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[async_trait]
impl LocalService for SecretsManager {
    fn name(&self) -> &'static str {
        "secretsmanager"
    }
    fn signing_name(&self) -> &'static str {
        "secretsmanager"
    }
    fn protocol(&self) -> Protocol {
        Protocol::Json11
    }
    fn claims(&self, _uri: &Uri, headers: &HeaderMap) -> bool {
        headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with(TARGET_PREFIX))
    }
    fn max_body(&self, _hub: &dyn LocalHub) -> (usize, AwsError) {
        (
            MAX_BODY,
            invalid("ValidationException", "The request is too large"),
        )
    }

    async fn serve(
        &self,
        hub: &dyn LocalHub,
        caller: &Principal,
        req: Signed,
    ) -> Result<Response, AwsError> {
        let target = req
            .parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if req.parts.method != Method::POST || req.parts.uri.path() != "/" {
            return Err(invalid(
                "UnknownOperationException",
                "Secrets Manager requests are POST / with X-Amz-Target",
            ));
        }
        if target != "secretsmanager.GetSecretValue" {
            return Err(invalid(
                "UnknownOperationException",
                format!(
                    "{} is not answered by this hub; it serves GetSecretValue for the manifest's [[secret]]s",
                    target.trim_start_matches(TARGET_PREFIX)
                ),
            ));
        }
        let doc: serde_json::Value = serde_json::from_slice(&req.body).map_err(|e| {
            invalid(
                "SerializationException",
                format!("The request is not valid JSON: {e}"),
            )
        })?;
        let field = |k: &str| -> Result<Option<&str>, AwsError> {
            match doc.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(invalid(
                    "SerializationException",
                    format!("{k} must be a string"),
                )),
            }
        };
        let id = field("SecretId")?
            .filter(|s| !s.is_empty() && s.len() <= 2048)
            .ok_or_else(|| {
                invalid(
                    "InvalidParameterException",
                    "You must provide a SecretId of 1 to 2048 characters.",
                )
            })?;
        let version = field("VersionId")?;
        let stage = field("VersionStage")?;
        let name = secret_name(id);
        if !caller.may(Right::Secret, name) {
            return Err(invalid(
                "AccessDeniedException",
                format!(
                    "{} is not authorized to perform: secretsmanager:GetSecretValue on secret {name}; grant it in the task's manifest `allow.secrets`",
                    caller.describe()
                ),
            ));
        }
        let secret = hub
            .secret(name)
            .map_err(|e| {
                AwsError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServiceError",
                    e.to_string(),
                )
            })?
            .ok_or_else(not_found)?;
        let vid = version_id(name, secret.deployment);
        if version.is_some_and(|v| v != vid) || stage.is_some_and(|s| s != "AWSCURRENT") {
            return Err(not_found());
        }
        let arn = format!(
            "arn:aws:secretsmanager:{}:{ACCOUNT}:secret:{name}-{}",
            hub.settings().region,
            suffix(name)
        );
        Ok(json(
            &serde_json::json!({
                "ARN": arn,
                "Name": name,
                "VersionId": vid,
                "SecretString": secret.value,
                "VersionStages": ["AWSCURRENT"],
                "CreatedDate": secret.created_ms as f64 / 1000.0,
            }),
            CONTENT_TYPE,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_found_by_name_or_arn() {
        let arn = format!(
            "arn:aws:secretsmanager:us-east-1:000000000000:secret:db-password-{}",
            suffix("db-password")
        );
        assert_eq!(secret_name(&arn), "db-password");
        assert_eq!(
            secret_name("arn:aws:secretsmanager:us-east-1:0:secret:db-password"),
            "db-password"
        );
        assert_eq!(secret_name("db-password"), "db-password");
        assert_eq!(secret_name("a-bcdefg"), "a-bcdefg");
        assert_eq!(version_id("a", 1).len(), 36);
        assert_ne!(version_id("a", 1), version_id("a", 2));
    }
}
