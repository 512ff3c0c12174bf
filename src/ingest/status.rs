//! The one place where errors become gRPC statuses. Database details stay in
//! the log; clients learn only whether and when to retry.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::IngestError;

/// How long a client is told to wait before it retries a refused request.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

impl From<IngestError> for Status {
    fn from(e: IngestError) -> Self {
        let retry = |code: Code, msg: String| {
            let mut status = Status::with_error_details(
                code,
                msg,
                ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
            );
            // The gRPC retry pushback header, for clients that honour it.
            status.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                RETRY_AFTER
                    .as_millis()
                    .to_string()
                    .parse()
                    .expect("digits are valid metadata"),
            );
            status
        };
        match &e {
            IngestError::BatchTooLarge { .. } => Status::invalid_argument(e.to_string()),
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
