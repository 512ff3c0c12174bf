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
    ingest_log::append::LogError,
    proto,
    query::QueryError,
    trackers::TrackerError,
};

// The HTTP error body every route answers with. (No doc comment: it would
// become the schema's description in the OpenAPI document.)
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorJson {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable. From any route: `unauthenticated`, `permission_denied`,
    /// `rate_limited`, `auth_unavailable`, `internal`; from the queries:
    /// `invalid_argument`, `not_found`, `too_many_subscribers`,
    /// `too_many_subscribers_for_token`; from `POST /v1/locations`:
    /// `bad_json`, `bad_gzip`, `body_too_large`, `unsupported_encoding`,
    /// `batch_too_large`, `buffer_full`, `decoding_busy`, `shutting_down`,
    /// `database_unavailable`, and with `--ack-after log` `log_full`,
    /// `log_unavailable`; from the tracking apps' routes (`/osmand`,
    /// `/owntracks`) also `unknown_tracker`, `tracker_ambiguous`,
    /// `tracker_missing`, `tracker_lookup_unavailable`, `point_rejected`.
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
            IngestError::Log(LogError::Full(_)) => {
                (StatusCode::TOO_MANY_REQUESTS, "log_full", true)
            }
            IngestError::Log(LogError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "log_unavailable", true)
            }
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

/// 404 for a tracker never registered, 400 where the request names none
/// (or one several app_sources have), 503 when they cannot be looked up.
impl IntoResponse for TrackerError {
    fn into_response(self) -> Response {
        let (status, code, retry) = match &self {
            TrackerError::Unknown(_) => (StatusCode::NOT_FOUND, "unknown_tracker", false),
            TrackerError::Ambiguous(_) => (StatusCode::BAD_REQUEST, "tracker_ambiguous", false),
            TrackerError::Missing => (StatusCode::BAD_REQUEST, "tracker_missing", false),
            TrackerError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "tracker_lookup_unavailable",
                true,
            ),
        };
        json_error(status, code, self.to_string(), retry)
    }
}

/// A tracking app's request with points that were not stored: 400, the
/// app's notion of a failure (it keeps them and sends them again), with
/// each point's reason. Its other points are stored.
pub fn rejected_points(ack: &proto::BatchAck) -> Response {
    let reasons: Vec<String> = ack
        .rejected
        .iter()
        .map(|r| format!("point {}: {} ({})", r.index, r.message, r.reason))
        .collect();
    json_error(
        StatusCode::BAD_REQUEST,
        "point_rejected",
        format!(
            "{} stored, {} already stored, {} refused: {}",
            ack.accepted,
            ack.duplicates,
            ack.rejected.len(),
            reasons.join("; ")
        ),
        false,
    )
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, time::Duration};

    use crate::ingest_log::append::LogError;

    use axum::response::IntoResponse;
    use utoipa::OpenApi;

    use crate::{
        auth::AuthError,
        ingest::{BodyError, IngestError},
        pipeline::WriteError,
        query::QueryError,
        trackers::TrackerError,
    };

    /// The `code` of an error's answer.
    async fn code(e: impl IntoResponse) -> String {
        let body = axum::body::to_bytes(e.into_response().into_body(), usize::MAX)
            .await
            .expect("a body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
        json["error"]["code"].as_str().expect("a code").to_string()
    }

    /// Names every kind of each error: a kind added fails to compile here,
    /// as a reminder to add it to [`answered`].
    #[expect(dead_code, reason = "a check of the compiler's, never run")]
    fn every_kind(a: &AuthError, i: &IngestError, b: &BodyError, q: &QueryError, t: &TrackerError) {
        use AuthError as A;
        use BodyError as B;
        use IngestError as I;
        use QueryError as Q;
        use TrackerError as T;
        match a {
            A::Unauthenticated(_) | A::PermissionDenied(_) | A::RateLimited { .. } => {}
            A::Unavailable | A::Busy => {}
        }
        match i {
            I::BatchTooLarge { .. } | I::BatchOverLimit { .. } | I::BufferFull => {}
            I::TooManyStreams(_) | I::ShuttingDown | I::Write(_) | I::Auth(_) => {}
            I::Log(LogError::Full(_)) | I::Log(LogError::Unavailable(_)) => {}
        }
        match b {
            B::TooLargeAsSent(_) | B::DecodingBusy | B::BadGzip(_) | B::TooLarge(_) => {}
            B::Encoding(_) | B::BadJson(_) => {}
        }
        match q {
            Q::InvalidArgument(_) | Q::NotFound(_) | Q::TooManySubscribers(_) => {}
            Q::TooManySubscribersForToken(_) | Q::Database(_) | Q::Auth(_) => {}
        }
        match t {
            T::Unknown(_) | T::Ambiguous(_) | T::Missing | T::Unavailable => {}
        }
    }

    async fn answered() -> BTreeSet<String> {
        let auth = || {
            [
                AuthError::Unauthenticated(String::new()),
                AuthError::PermissionDenied(String::new()),
                AuthError::RateLimited {
                    token: String::new(),
                    retry_after: Duration::from_secs(1),
                },
                AuthError::Unavailable,
                AuthError::Busy,
            ]
        };
        let mut codes = BTreeSet::new();
        for e in auth() {
            codes.insert(code(e.clone()).await);
            codes.insert(code(IngestError::Auth(e.clone())).await);
            codes.insert(code(QueryError::Auth(e)).await);
        }
        for e in [
            IngestError::BatchTooLarge {
                points: 2,
                limit: 1,
            },
            IngestError::BatchOverLimit { limit: 1 },
            IngestError::BufferFull,
            IngestError::TooManyStreams(1),
            IngestError::ShuttingDown,
            IngestError::Write(WriteError::Unavailable(String::new())),
            IngestError::Write(WriteError::Other(String::new())),
            IngestError::Log(LogError::Full(String::new())),
            IngestError::Log(LogError::Unavailable(String::new())),
        ] {
            codes.insert(code(e).await);
        }
        let bad_json = serde_json::from_str::<serde_json::Value>("{").expect_err("not JSON");
        for e in [
            BodyError::TooLargeAsSent(1),
            BodyError::DecodingBusy,
            BodyError::BadGzip(std::io::Error::other("not gzip")),
            BodyError::TooLarge(1),
            BodyError::Encoding("br".into()),
            BodyError::BadJson(bad_json),
        ] {
            codes.insert(code(e).await);
        }
        for e in [
            QueryError::InvalidArgument(String::new()),
            QueryError::NotFound(String::new()),
            QueryError::TooManySubscribers(1),
            QueryError::TooManySubscribersForToken(1),
            QueryError::Database(sqlx::Error::PoolTimedOut),
        ] {
            codes.insert(code(e).await);
        }
        for e in [
            TrackerError::Unknown(String::new()),
            TrackerError::Ambiguous(String::new()),
            TrackerError::Missing,
            TrackerError::Unavailable,
        ] {
            codes.insert(code(e).await);
        }
        codes.insert(code(super::rejected_points(&Default::default())).await);
        codes
    }

    /// The codes `ErrorDetail` lists, as the OpenAPI document has them.
    fn documented() -> BTreeSet<String> {
        let doc = serde_json::to_value(crate::openapi::ApiDoc::openapi()).expect("a document");
        let text = doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["description"]
            .as_str()
            .expect("a description of code")
            .to_string();
        text.split('`')
            .skip(1)
            .step_by(2)
            .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .map(str::to_string)
            .collect()
    }

    /// The OpenAPI document lists exactly the codes the errors answer
    /// with, and the README names each.
    #[tokio::test]
    async fn the_codes_documented_are_those_answered() {
        let answered = answered().await;
        assert_eq!(documented(), answered);
        let readme = include_str!("../../README.md");
        let unnamed: Vec<_> = answered
            .iter()
            .filter(|c| !readme.contains(&format!("`{c}`")))
            .collect();
        assert!(unnamed.is_empty(), "not in the README: {unnamed:?}");
    }
}
