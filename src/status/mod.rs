//! The one place where errors become gRPC statuses ([`grpc`]) and HTTP
//! answers ([`http`]). Database details stay in the log; clients learn only
//! what was wrong with their request, or whether and when to retry.

pub mod grpc;
pub mod http;

use std::time::Duration;

/// How long a client is told to wait before it retries a refused request.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
