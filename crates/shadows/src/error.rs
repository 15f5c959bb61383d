//! Shadow errors as AWS reports them: an HTTP-style code, a message, and the
//! `/rejected` document built from both.

use serde_json::{json, Map, Value};

/// The class of a shadow error; each maps to the HTTP code AWS uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShadowErrorKind {
    /// 400: the request is malformed or breaks a limit on its shape.
    BadRequest,
    /// 404: the shadow does not exist (never created, or deleted).
    NotFound,
    /// 409: the request's `version` is not the shadow's current version.
    Conflict,
    /// 413: the request or the resulting state is too large.
    TooLarge,
    /// 429: too many requests in flight; for the caller's own throttling.
    Throttled,
    /// 500: the caller failed to store or load the shadow.
    Internal,
}

impl ShadowErrorKind {
    /// The HTTP status code AWS uses for this kind.
    pub fn code(self) -> u16 {
        match self {
            ShadowErrorKind::BadRequest => 400,
            ShadowErrorKind::NotFound => 404,
            ShadowErrorKind::Conflict => 409,
            ShadowErrorKind::TooLarge => 413,
            ShadowErrorKind::Throttled => 429,
            ShadowErrorKind::Internal => 500,
        }
    }
}

/// Why a shadow request failed: the shadow's own rule, or the hub that
/// runs it (its queue for the shadow is full, or its store failed).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShadowFailure {
    #[error(transparent)]
    Rejected(#[from] ShadowError),
    #[error("too many requests are waiting for this shadow; retry later")]
    Throttled,
    #[error("the shadow could not be stored: {0}")]
    Store(String),
}

/// A rejected shadow request. Its message is the one AWS sends, because
/// device code sometimes matches on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {message}", code = .kind.code())]
pub struct ShadowError {
    kind: ShadowErrorKind,
    message: String,
}

impl ShadowError {
    /// An error of `kind` with AWS's `message`.
    pub fn new(kind: ShadowErrorKind, message: impl Into<String>) -> Self {
        ShadowError {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ShadowErrorKind::BadRequest, message)
    }

    pub(crate) fn too_large() -> Self {
        Self::new(
            ShadowErrorKind::TooLarge,
            "The payload exceeds the maximum size allowed",
        )
    }

    pub(crate) fn conflict() -> Self {
        Self::new(ShadowErrorKind::Conflict, "Version conflict")
    }

    /// The error's class.
    pub fn kind(&self) -> ShadowErrorKind {
        self.kind
    }

    /// The HTTP status code (400, 404, 409, 413, 429, 500).
    pub fn code(&self) -> u16 {
        self.kind.code()
    }

    /// The human-readable message, as AWS words it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The document published on `.../rejected` (or sent as the HTTP error
    /// body): `{"code", "message", "timestamp", "clientToken"?}`.
    pub fn rejected(&self, client_token: Option<&str>, now: u64) -> Value {
        let mut doc = Map::new();
        doc.insert("code".into(), json!(self.code()));
        doc.insert("message".into(), json!(self.message));
        stamp(doc, None, client_token, now)
    }
}

/// Adds the fields every response document ends with. Shared so accepted
/// and rejected documents can never disagree on their spelling.
pub(crate) fn stamp(
    mut doc: Map<String, Value>,
    version: Option<u64>,
    client_token: Option<&str>,
    now: u64,
) -> Value {
    if let Some(v) = version {
        doc.insert("version".into(), json!(v));
    }
    doc.insert("timestamp".into(), json!(now));
    if let Some(t) = client_token {
        doc.insert("clientToken".into(), json!(t));
    }
    Value::Object(doc)
}

/// A stored record that cannot be read back; storage corruption, not a
/// client mistake, so it is kept apart from [`ShadowError`].
#[derive(Debug, thiserror::Error)]
#[error("stored shadow record is unreadable: {0}")]
pub struct StoredRecordError(#[from] serde_json::Error);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_document_matches_aws() {
        let e = ShadowError::conflict();
        assert_eq!(
            e.rejected(Some("tok"), 7),
            json!({"code": 409, "message": "Version conflict", "timestamp": 7, "clientToken": "tok"})
        );
        assert_eq!(
            e.rejected(None, 7),
            json!({"code": 409, "message": "Version conflict", "timestamp": 7})
        );
    }

    #[test]
    fn codes_follow_kinds() {
        assert_eq!(ShadowError::too_large().code(), 413);
        assert_eq!(ShadowError::bad_request("x").code(), 400);
        assert_eq!(ShadowError::new(ShadowErrorKind::NotFound, "x").code(), 404);
        assert_eq!(
            ShadowError::new(ShadowErrorKind::Throttled, "x").code(),
            429
        );
        assert_eq!(ShadowError::new(ShadowErrorKind::Internal, "x").code(), 500);
        assert_eq!(ShadowError::conflict().to_string(), "409 Version conflict");
    }
}
