//! Lambda `Invoke` (`POST /2015-03-31/functions/{name}/invocations`): a
//! task named by name, ARN or with a qualifier, run synchronously
//! (RequestResponse), queued durably (Event) or only checked (DryRun).

use crate::service::{with_request_id, AwsError, LocalService, Protocol, Signed, ACCOUNT};
use crate::{CallRefused, LocalHub, Right, Rights};
use async_trait::async_trait;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine;
use roost_model::{Failure, FailureCode, Principal, CLIENT_CONTEXT_VAR};

const PREFIX: &str = "/2015-03-31/functions/";
const SUFFIX: &str = "/invocations";
/// How much of a call's log `X-Amz-Log-Type: Tail` returns, as Lambda does.
const TAIL_BYTES: usize = 4096;

pub struct Lambda;

/// A function reference resolved to a task name and a qualifier.
#[derive(Debug, PartialEq, Eq)]
struct FunctionRef {
    name: String,
    qualifier: Option<String>,
}

/// Accepts `NAME`, `NAME:QUALIFIER`, `ACCOUNT:function:NAME[:QUALIFIER]`
/// and `arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]`.
fn parse_function(s: &str) -> Option<FunctionRef> {
    let parts: Vec<&str> = s.split(':').collect();
    let (name, qualifier) = match parts.as_slice() {
        [n] => (*n, None),
        [n, q] => (*n, Some(*q)),
        [_account, "function", n] => (*n, None),
        [_account, "function", n, q] => (*n, Some(*q)),
        ["arn", _, "lambda", _region, _account, "function", n] => (*n, None),
        ["arn", _, "lambda", _region, _account, "function", n, q] => (*n, Some(*q)),
        _ => return None,
    };
    if name.is_empty() || qualifier.is_some_and(str::is_empty) {
        return None;
    }
    Some(FunctionRef {
        name: name.to_owned(),
        qualifier: qualifier.map(str::to_owned),
    })
}

fn arn(hub: &dyn LocalHub, name: &str) -> String {
    format!(
        "arn:aws:lambda:{}:{ACCOUNT}:function:{name}",
        hub.settings().region
    )
}

fn bad_value(message: impl Into<String>) -> AwsError {
    AwsError::new(
        StatusCode::BAD_REQUEST,
        "InvalidParameterValueException",
        message,
    )
}

#[async_trait]
impl LocalService for Lambda {
    fn name(&self) -> &'static str {
        "lambda"
    }
    fn signing_name(&self) -> &'static str {
        "lambda"
    }
    fn protocol(&self) -> Protocol {
        Protocol::RestJson
    }
    fn claims(&self, uri: &Uri, _headers: &HeaderMap) -> bool {
        uri.path().starts_with(PREFIX)
    }
    fn max_body(&self, hub: &dyn LocalHub) -> (usize, AwsError) {
        let limit = hub.settings().max_call_input;
        (
            limit,
            AwsError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLargeException",
                format!(
                    "Request must be smaller than {limit} bytes for the InvokeFunction operation"
                ),
            ),
        )
    }

    async fn serve(
        &self,
        hub: &dyn LocalHub,
        caller: &Principal,
        req: Signed,
    ) -> Result<Response, AwsError> {
        let path = req.parts.uri.path();
        let raw = path
            .strip_prefix(PREFIX)
            .and_then(|p| p.strip_suffix(SUFFIX))
            .filter(|p| !p.contains('/'));
        let Some(raw) = raw else {
            return Err(AwsError::new(
                StatusCode::NOT_FOUND,
                "UnknownOperationException",
                "Unknown operation; the hub answers Invoke at POST /2015-03-31/functions/{name}/invocations",
            ));
        };
        if req.parts.method != Method::POST {
            return Err(AwsError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "UnknownOperationException",
                "Invoke takes POST",
            ));
        }
        let decoded = crate::service::decode(raw)
            .ok_or_else(|| bad_value("The function name is not valid UTF-8"))?;
        let f = parse_function(&decoded).ok_or_else(|| {
            bad_value(format!(
                "1 validation error detected: Value '{decoded}' at 'functionName' failed to satisfy constraint: give a function name, NAME:QUALIFIER or an ARN"
            ))
        })?;
        let qualifier = match (f.qualifier, crate::service::query_param(&req.parts, "Qualifier")) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad_value(
                    "The derived qualifier from the function name does not match the specified qualifier.",
                ))
            }
            (a, b) => a.or(b),
        };
        let function_arn = arn(hub, &f.name);
        if !caller.may(Right::Invoke, &f.name) {
            return Err(AwsError::new(
                StatusCode::FORBIDDEN,
                "AccessDeniedException",
                format!(
                    "{} is not authorized to perform: lambda:InvokeFunction on resource: {function_arn} because its manifest `allow.invoke` does not grant it",
                    caller.describe()
                ),
            ));
        }
        let not_found = |what: &str| {
            AwsError::new(
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                format!("Function not found: {what}"),
            )
        };
        if !hub.has_task(&f.name) {
            return Err(not_found(&function_arn));
        }
        if let Some(q) = &qualifier {
            // The hub runs one version of each task: the deployed one.
            if q != "$LATEST" {
                return Err(not_found(&format!("{function_arn}:{q}")));
            }
        }
        let header = |name: &str| {
            req.parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if !req.body.is_empty() && serde_json::from_slice::<serde_json::Value>(&req.body).is_err() {
            return Err(AwsError::new(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContentException",
                "Could not parse request body into json: the payload must be a JSON document",
            ));
        }
        let tail = match header("x-amz-log-type").as_deref() {
            None | Some("None") => false,
            Some("Tail") => true,
            Some(other) => {
                return Err(bad_value(format!(
                    "1 validation error detected: Value '{other}' at 'logType' failed to satisfy constraint: Member must satisfy enum value set: [None, Tail]"
                )))
            }
        };
        let mut env = Vec::new();
        if let Some(cc) = header("x-amz-client-context") {
            env.push((CLIENT_CONTEXT_VAR.to_owned(), client_context(&cc)?));
        }
        match header("x-amz-invocation-type").as_deref() {
            None | Some("RequestResponse") => {
                invoke_sync(hub, caller, &f.name, req.body, env, tail).await
            }
            Some("Event") => {
                hub.call_async(caller, &f.name, req.body, env)
                    .await
                    .map_err(call_error)?;
                Ok(with_request_id(StatusCode::ACCEPTED, "application/json", Body::empty()))
            }
            Some("DryRun") => Ok(with_request_id(
                StatusCode::NO_CONTENT,
                "application/json",
                Body::empty(),
            )),
            Some(other) => Err(bad_value(format!(
                "1 validation error detected: Value '{other}' at 'invocationType' failed to satisfy constraint: Member must satisfy enum value set: [Event, RequestResponse, DryRun]"
            ))),
        }
    }
}

/// Lambda's limit on a ClientContext, base64 included.
const MAX_CLIENT_CONTEXT: usize = 3583;

/// The `X-Amz-Client-Context` header: base64 of a JSON object.
fn client_context(header: &str) -> Result<String, AwsError> {
    let bad = || {
        bad_value(format!(
            "Client context must be a valid Base64-encoded JSON object of at most {MAX_CLIENT_CONTEXT} bytes"
        ))
    };
    if header.len() > MAX_CLIENT_CONTEXT {
        return Err(bad());
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(header)
        .map_err(|_| bad())?;
    match serde_json::from_slice::<serde_json::Value>(&raw) {
        Ok(v) if v.is_object() => Ok(v.to_string()),
        _ => Err(bad()),
    }
}

async fn invoke_sync(
    hub: &dyn LocalHub,
    caller: &Principal,
    task: &str,
    input: bytes::Bytes,
    env: Vec<(String, String)>,
    tail: bool,
) -> Result<Response, AwsError> {
    let id = hub.new_call_id();
    let result = hub.call_sync(caller, id.clone(), task, input, env).await;
    let (body, function_error) = match result {
        Ok(out) => (out, None),
        Err(CallRefused::Failed(Failure {
            detail: Some(document),
            ..
        })) => (bytes::Bytes::from(document), Some("Unhandled")),
        Err(CallRefused::Failed(f)) => {
            // Lambda reports a failed function as 200 with the error
            // document and X-Amz-Function-Error, not as an HTTP error; a
            // task that wrote no document of its own gets one made here.
            let (kind, message) = match f.code {
                FailureCode::TaskError => ("Error".to_owned(), f.message.clone()),
                FailureCode::Timeout => ("Sandbox.Timedout".to_owned(), f.message.clone()),
                FailureCode::MemoryLimit | FailureCode::Crashed => {
                    ("Runtime.ExitError".to_owned(), f.message.clone())
                }
                other => (other.as_str().to_owned(), f.message.clone()),
            };
            let doc = serde_json::json!({ "errorMessage": message, "errorType": kind });
            (bytes::Bytes::from(doc.to_string()), Some("Unhandled"))
        }
        Err(e) => return Err(call_error(e)),
    };
    let mut r = with_request_id(StatusCode::OK, "application/json", Body::from(body));
    let h = r.headers_mut();
    h.insert(
        "X-Amz-Executed-Version",
        HeaderValue::from_static("$LATEST"),
    );
    if let Some(e) = function_error {
        h.insert("X-Amz-Function-Error", HeaderValue::from_static(e));
    }
    if tail {
        let name = roost_model::TaskName::parse(task).expect("a deployed task's name");
        let mut log = String::new();
        for line in hub.call_log(&name, id.as_str()) {
            log.push_str(&line);
            log.push('\n');
        }
        let bytes = log.as_bytes();
        let last = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
        let encoded = base64::engine::general_purpose::STANDARD.encode(last);
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            h.insert("X-Amz-Log-Result", v);
        }
    }
    Ok(r)
}

/// Errors of the call itself (not of the function) in Lambda's terms.
fn call_error(e: CallRefused) -> AwsError {
    match e {
        CallRefused::UnknownTask(t) => AwsError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("Function not found: {t}"),
        ),
        CallRefused::InputTooLarge { limit } => AwsError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            format!("Request must be smaller than {limit} bytes for the InvokeFunction operation"),
        ),
        CallRefused::Busy(r) => {
            let mut e = AwsError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                format!("Rate Exceeded: {r}"),
            );
            e.retry_after = Some(1);
            e
        }
        other => AwsError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            other.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_are_named_by_name_arn_or_qualifier() {
        let f = |s: &str| parse_function(s).map(|f| (f.name, f.qualifier));
        assert_eq!(f("echo"), Some(("echo".into(), None)));
        assert_eq!(
            f("echo:$LATEST"),
            Some(("echo".into(), Some("$LATEST".into())))
        );
        assert_eq!(f("000000000000:function:echo"), Some(("echo".into(), None)));
        assert_eq!(
            f("arn:aws:lambda:us-east-1:000000000000:function:echo:1"),
            Some(("echo".into(), Some("1".into())))
        );
        for bad in [
            "",
            ":",
            "echo:",
            "a:b:c",
            "arn:aws:s3:::bucket",
            "arn:aws:lambda:r:a:function:",
        ] {
            assert_eq!(f(bad), None, "{bad}");
        }
    }

    #[test]
    fn client_contexts_must_be_base64_json_objects_within_the_limit() {
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            client_context(&enc(r#"{"custom":{"k":"v"}}"#)).unwrap(),
            r#"{"custom":{"k":"v"}}"#
        );
        for bad in [
            "not base64!".to_owned(),
            enc("[1,2]"),
            enc("{oops"),
            enc(&format!(r#"{{"a":"{}"}}"#, "x".repeat(4000))),
        ] {
            assert!(client_context(&bad).is_err(), "{bad}");
        }
    }
}
