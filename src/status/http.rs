//! Errors as HTTP answers: a status, the body `{"error": {"code",
//! "message"}}` ([`ErrorJson`]), and `Retry-After` (or `WWW-Authenticate`)
//! where the client should come back (or authenticate).

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

use super::{QUERY_FAILED, RETRY_AFTER, WRITE_FAILED, WRITE_RETRY};
use crate::{
    auth::AuthError,
    ingest::{BodyError, IngestError},
    query::QueryError,
};

// The HTTP error body every route answers with. (No doc comment: it would
// become the schema's description in the OpenAPI document.)
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorJson {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable: `invalid_argument`, `not_found`, `too_many_subscribers`,
    /// `unauthenticated`, `permission_denied`, `rate_limited`,
    /// `auth_unavailable`, `internal`; and from `POST /v1/locations`:
    /// `bad_json`, `bad_gzip`, `body_too_large`, `unsupported_encoding`,
    /// `batch_too_large`, `buffer_full`, `shutting_down`,
    /// `database_unavailable`.
    pub code: String,
    pub message: String,
}

/// `status` with an [`ErrorJson`] body, and `Retry-After` if `retry`.
fn json_error(status: StatusCode, code: &str, message: String, retry: bool) -> Response {
    let body = ErrorJson {
        error: ErrorDetail {
            code: code.to_string(),
            message,
        },
    };
    let mut r = (status, Json(body)).into_response();
    if retry {
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(RETRY_AFTER.as_secs()),
        );
    }
    r
}

/// 401 (with `WWW-Authenticate`), 403, 429 or 503 (with `Retry-After`).
impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match self {
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
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        let (status, code, retry) = match self {
            IngestError::Auth(a) => return a.into_response(),
            IngestError::BatchTooLarge { .. } | IngestError::BatchOverLimit { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large", false)
            }
            IngestError::BufferFull | IngestError::TooManyStreams(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "buffer_full", true)
            }
            IngestError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down", true),
            IngestError::Write(w) if w.is_retryable() => {
                return json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    WRITE_RETRY.into(),
                    true,
                );
            }
            IngestError::Write(_) => {
                return json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    WRITE_FAILED.into(),
                    false,
                );
            }
        };
        json_error(status, code, msg, retry)
    }
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        let (status, code, retry) = match self {
            BodyError::TooLargeAsSent(_) | BodyError::TooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", false)
            }
            BodyError::DecodingBusy => (StatusCode::SERVICE_UNAVAILABLE, "decoding_busy", true),
            BodyError::BadGzip(_) => (StatusCode::BAD_REQUEST, "bad_gzip", false),
            BodyError::Encoding(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                false,
            ),
            BodyError::BadJson(_) => (StatusCode::BAD_REQUEST, "bad_json", false),
        };
        json_error(status, code, self.to_string(), retry)
    }
}

/// Database details stay in the log.
impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let (status, code, retry) = match &self {
            QueryError::Auth(a) => return a.clone().into_response(),
            QueryError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument", false),
            QueryError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", false),
            QueryError::TooManySubscribers(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_subscribers", true)
            }
            QueryError::TooManySubscribersForToken(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_subscribers_for_token",
                false,
            ),
            QueryError::Database(db) => {
                tracing::error!(error = %db, "query failed");
                return json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "internal",
                    QUERY_FAILED.into(),
                    true,
                );
            }
        };
        json_error(status, code, self.to_string(), retry)
    }
}
