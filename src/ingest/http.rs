//! `POST /v1/locations`: HTTP JSON ingest for phone apps, with the same
//! validation, pipeline and acknowledgement as gRPC. The body may be
//! gzip-compressed; both its size as sent and after decompression are capped.

use std::io::Read;

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{
    IngestError, Ingestor, WhenFull,
    validate::{Reason, Rejection, reject},
};
use crate::{
    auth::{Auth, Caller},
    proto,
    query::http::ErrorJson,
    status,
};

#[derive(Clone)]
struct App {
    ingestor: Ingestor,
    max_body: usize,
    max_decompressed: usize,
}

impl axum::extract::FromRef<App> for Auth {
    fn from_ref(app: &App) -> Auth {
        app.ingestor.auth.clone()
    }
}

pub fn router(ingestor: Ingestor, max_body: usize, max_decompressed: usize) -> Router {
    Router::new()
        .route("/v1/locations", post(post_locations))
        .with_state(App {
            ingestor,
            max_body,
            max_decompressed,
        })
}

/// A point as JSON: the proto's fields, `time` in RFC 3339, and the metadata
/// either as an object (`metadata`) or as text (`metadata_json`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = IngestLocationJson)]
struct JsonLocation {
    /// RFC 3339.
    time: String,
    device_id: String,
    user_id: String,
    app_source: String,
    latitude: f64,
    longitude: f64,
    accuracy: Option<f64>,
    altitude: Option<f64>,
    speed: Option<f64>,
    heading: Option<f64>,
    metadata: Option<Value>,
    metadata_json: Option<String>,
}

/// A batch as JSON. Each location is read on its own, so that a bad one is
/// rejected alone and its good neighbours are stored.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = IngestBatchJson)]
struct JsonBatch {
    /// Echoed in the ack.
    #[serde(default)]
    batch_id: u64,
    #[schema(value_type = Vec<JsonLocation>)]
    locations: Vec<Value>,
}

/// Sent once the batch's good points are committed.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AckJson)]
struct JsonAck {
    batch_id: u64,
    accepted: u32,
    duplicates: u32,
    rejected: Vec<JsonRejection>,
}

/// A point that was not stored, and why.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = RejectionJson)]
struct JsonRejection {
    /// Its position in `locations`.
    index: u32,
    reason: String,
    message: String,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    status::json_error(status, code, message, false)
}

fn retry_later(status: StatusCode, code: &str, message: String) -> Response {
    status::json_error(status, code, message, true)
}

/// The HTTP face of an ingest error.
fn ingest_error(e: IngestError) -> Response {
    match &e {
        IngestError::Auth(a) => status::auth_response(a.clone()),
        IngestError::BatchTooLarge { .. } => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            e.to_string(),
        ),
        IngestError::BufferFull | IngestError::TooManyStreams(_) => {
            retry_later(StatusCode::TOO_MANY_REQUESTS, "buffer_full", e.to_string())
        }
        IngestError::ShuttingDown => retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            e.to_string(),
        ),
        IngestError::Write(w) if w.is_retryable() => retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is unavailable; the batch was not stored, send it again".into(),
        ),
        IngestError::Write(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the batch could not be stored; it was not acknowledged",
        ),
    }
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the body is not valid gzip: {0}")]
    BadGzip(std::io::Error),
    #[error("the body is over {0} bytes once decompressed")]
    TooLarge(usize),
    #[error("Content-Encoding {0:?} is not supported; send identity or gzip")]
    Encoding(String),
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        let (status, code) = match self {
            BodyError::BadGzip(_) => (StatusCode::BAD_REQUEST, "bad_gzip"),
            BodyError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            BodyError::Encoding(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding"),
        };
        error(status, code, self.to_string())
    }
}

/// The body, decompressed if it says gzip, within the caps.
fn decode_body(
    headers: &HeaderMap,
    body: Bytes,
    max_decompressed: usize,
) -> Result<Bytes, BodyError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity");
    match encoding.trim().to_ascii_lowercase().as_str() {
        "identity" | "" => Ok(body),
        "gzip" => {
            let mut out = Vec::new();
            // Reading stops one byte past the cap: a gzip bomb costs at most that.
            let mut reader =
                flate2::read::GzDecoder::new(&body[..]).take(max_decompressed as u64 + 1);
            reader.read_to_end(&mut out).map_err(BodyError::BadGzip)?;
            if out.len() > max_decompressed {
                return Err(BodyError::TooLarge(max_decompressed));
            }
            Ok(Bytes::from(out))
        }
        other => Err(BodyError::Encoding(other.to_string())),
    }
}

fn to_proto(index: usize, v: Value) -> Result<proto::Location, Rejection> {
    let l: JsonLocation = serde_json::from_value(v)
        .map_err(|e| reject(Reason::PointMalformed, format!("location {index}: {e}")))?;
    let time = chrono::DateTime::parse_from_rfc3339(&l.time).map_err(|e| {
        reject(
            Reason::TimeInvalid,
            format!("time {:?} is not RFC 3339: {e}", l.time),
        )
    })?;
    let metadata_json = match (l.metadata, l.metadata_json) {
        (Some(_), Some(_)) => {
            return Err(reject(
                Reason::PointMalformed,
                "give metadata or metadata_json, not both",
            ));
        }
        (Some(Value::Null), None) | (None, None) => String::new(),
        (Some(m), None) => m.to_string(),
        (None, Some(text)) => text,
    };
    Ok(proto::Location {
        time: Some(prost_types::Timestamp {
            seconds: time.timestamp(),
            nanos: time.timestamp_subsec_nanos() as i32,
        }),
        device_id: l.device_id,
        user_id: l.user_id,
        app_source: l.app_source,
        latitude: l.latitude,
        longitude: l.longitude,
        accuracy: l.accuracy,
        altitude: l.altitude,
        speed: l.speed,
        heading: l.heading,
        metadata_json,
    })
}

/// A JSON body as its batch id and its points, each already a
/// [`proto::Location`] or the reason it is not one. Public for the fuzzer.
pub type ParsedBatch = (u64, Vec<Result<proto::Location, Rejection>>);

pub fn parse_batch(body: &[u8]) -> Result<ParsedBatch, serde_json::Error> {
    let batch: JsonBatch = serde_json::from_slice(body)?;
    let points = batch
        .locations
        .into_iter()
        .enumerate()
        .map(|(i, v)| to_proto(i, v))
        .collect();
    Ok((batch.batch_id, points))
}

/// Stores a batch of points; answers once they are committed.
#[utoipa::path(post, path = "/v1/locations", request_body = JsonBatch,
    responses((status = 200, description = "committed; bad points listed in `rejected`", body = JsonAck),
              (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
              (status = 403, body = ErrorJson), (status = 413, body = ErrorJson),
              (status = 415, body = ErrorJson),
              (status = 429, description = "buffer full or rate limited; retry after `Retry-After`", body = ErrorJson),
              (status = 503, description = "shutting down or the database is unavailable; retry after `Retry-After`", body = ErrorJson)))]
async fn post_locations(
    State(app): State<App>,
    Caller(caller): Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match axum::body::to_bytes(body, app.max_body).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the body is over {} bytes (--max-message-bytes)",
                    app.max_body
                ),
            );
        }
    };
    // Refused under overload before the body is decompressed and parsed.
    if let Err(e) = app.ingestor.admit_unparsed(&caller) {
        return ingest_error(e);
    }
    let body = match decode_body(&headers, body, app.max_decompressed) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let (batch_id, points) = match parse_batch(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!(
                    "the body must be a JSON object {{\"batch_id\", \"locations\": [...]}}: {e}"
                ),
            );
        }
    };
    let pending = match app
        .ingestor
        .ingest_points(&caller, batch_id, points, WhenFull::Refuse, "http")
        .await
    {
        Ok(p) => p,
        Err(e) => return ingest_error(e),
    };
    match pending.resolve().await {
        Ok(ack) => Json(JsonAck {
            batch_id: ack.batch_id,
            accepted: ack.accepted,
            duplicates: ack.duplicates,
            rejected: ack
                .rejected
                .into_iter()
                .map(|r| JsonRejection {
                    index: r.index,
                    reason: r.reason,
                    message: r.message,
                })
                .collect(),
        })
        .into_response(),
        Err(e) => ingest_error(e),
    }
}
