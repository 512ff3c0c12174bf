//! The one place where errors become gRPC statuses and HTTP responses.
//! Database details stay in the log; clients learn only what was wrong with
//! their request, or whether and when to retry.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{auth::AuthError, ingest::IngestError, query::QueryError};

/// How long a client is told to wait before it retries a refused request.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A status that tells the client to retry after `after`: in the standard
/// `RetryInfo` detail, and in the gRPC retry pushback header.
fn retry_status(code: Code, msg: String, after: Duration) -> Status {
    let mut status =
        Status::with_error_details(code, msg, ErrorDetails::with_retry_info(Some(after)));
    status.metadata_mut().insert(
        "grpc-retry-pushback-ms",
        after
            .as_millis()
            .to_string()
            .parse()
            .expect("digits are valid metadata"),
    );
    status
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated(m) => Status::unauthenticated(m),
            AuthError::PermissionDenied(m) => Status::permission_denied(m),
            AuthError::RateLimited { retry_after, .. } => {
                retry_status(Code::ResourceExhausted, e.to_string(), retry_after)
            }
            AuthError::Unavailable | AuthError::Busy => {
                retry_status(Code::Unavailable, e.to_string(), RETRY_AFTER)
            }
        }
    }
}

/// The HTTP face of an auth error: 401 (with `WWW-Authenticate`), 403, 429
/// or 503 (with `Retry-After`).
pub fn auth_response(e: AuthError) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode, header};
    let msg = e.to_string();
    match e {
        AuthError::Unauthenticated(_) => {
            let mut r = json_error(StatusCode::UNAUTHORIZED, "unauthenticated", msg, false);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"locus\""),
            );
            r
        }
        AuthError::PermissionDenied(_) => {
            json_error(StatusCode::FORBIDDEN, "permission_denied", msg, false)
        }
        AuthError::RateLimited { retry_after, .. } => {
            let mut r = json_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", msg, false);
            // Whole seconds, rounded up: never earlier than the limiter allows.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            r
        }
        AuthError::Unavailable | AuthError::Busy => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "auth_unavailable",
            msg,
            true,
        ),
    }
}

impl From<IngestError> for Status {
    fn from(e: IngestError) -> Self {
        let retry = |code: Code, msg: String| retry_status(code, msg, RETRY_AFTER);
        match &e {
            IngestError::Auth(a) => a.clone().into(),
            IngestError::BatchTooLarge { .. } | IngestError::BatchOverLimit { .. } => {
                Status::invalid_argument(e.to_string())
            }
            IngestError::BufferFull | IngestError::TooManyStreams(_) => {
                retry(Code::ResourceExhausted, e.to_string())
            }
            IngestError::ShuttingDown => retry(Code::Unavailable, e.to_string()),
            IngestError::Write(w) if w.is_retryable() => retry(
                Code::Unavailable,
                "the database is unavailable; the batch was not stored, send it again".into(),
            ),
            IngestError::Write(_) => {
                Status::internal("the batch could not be stored; it was not acknowledged")
            }
        }
    }
}

impl From<QueryError> for Status {
    fn from(e: QueryError) -> Self {
        match &e {
            QueryError::Auth(a) => a.clone().into(),
            QueryError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            QueryError::NotFound(m) => Status::not_found(m.clone()),
            QueryError::TooManySubscribers(_) | QueryError::TooManySubscribersForToken(_) => {
                Status::resource_exhausted(e.to_string())
            }
            QueryError::Database(db) => {
                tracing::error!(error = %db, "query failed");
                Status::unavailable("the query could not be answered; retry later")
            }
        }
    }
}

/// The HTTP status of a query error; the body is `{"error": {"code", "message"}}`.
pub fn http_status(e: &QueryError) -> u16 {
    match e {
        QueryError::Auth(AuthError::Unauthenticated(_)) => 401,
        QueryError::Auth(AuthError::PermissionDenied(_)) => 403,
        QueryError::Auth(AuthError::RateLimited { .. }) => 429,
        QueryError::Auth(AuthError::Unavailable | AuthError::Busy) => 503,
        QueryError::InvalidArgument(_) => 400,
        QueryError::NotFound(_) => 404,
        QueryError::TooManySubscribers(_) | QueryError::TooManySubscribersForToken(_) => 429,
        QueryError::Database(_) => 503,
    }
}

/// What a client sees of a query error: database details stay in the log.
pub fn public_message(e: &QueryError) -> String {
    match e {
        QueryError::Database(db) => {
            tracing::error!(error = %db, "query failed");
            "the query could not be answered; retry later".into()
        }
        other => other.to_string(),
    }
}

/// The HTTP error body every route answers with:
/// `{"error": {"code": "...", "message": "..."}}`, with `Retry-After` when
/// the client should come back.
pub fn json_error(
    status: axum::http::StatusCode,
    code: &str,
    message: impl Into<String>,
    retry: bool,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    let mut r = (status, axum::Json(body)).into_response();
    if retry {
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(RETRY_AFTER.as_secs()),
        );
    }
    r
}
