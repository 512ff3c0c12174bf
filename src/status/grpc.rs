//! Errors as gRPC statuses, with `RetryInfo` and the retry pushback header
//! when the client should come back.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::{QUERY_FAILED, RETRY_AFTER, WRITE_FAILED, WRITE_RETRY};
use crate::{
    auth::AuthError, ingest::IngestError, ingest_log::append::LogError, query::QueryError,
};

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
            IngestError::Log(LogError::Full(_)) => retry(Code::ResourceExhausted, e.to_string()),
            IngestError::Log(LogError::Unavailable(_)) => retry(Code::Unavailable, e.to_string()),
            IngestError::Write(w) if w.is_retryable() => {
                retry(Code::Unavailable, WRITE_RETRY.into())
            }
            IngestError::Write(_) => Status::internal(WRITE_FAILED),
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
                Status::unavailable(QUERY_FAILED)
            }
        }
    }
}
