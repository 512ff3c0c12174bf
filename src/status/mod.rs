//! The one place where errors become gRPC statuses ([`grpc`]) and HTTP
//! answers ([`http`]). Database details stay in the log; clients learn only
//! what was wrong with their request, or whether and when to retry.

pub mod grpc;
pub mod http;

use std::time::Duration;

/// How long a client is told to wait before it retries a refused request.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

// What a client is told when the database failed it, the same over gRPC
// and HTTP; the details stay in the log.
const WRITE_RETRY: &str = "the database is unavailable; the batch was not stored, send it again";
const WRITE_FAILED: &str = "the batch could not be stored; it was not acknowledged";
const QUERY_FAILED: &str = "the query could not be answered; retry later";
