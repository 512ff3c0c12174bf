//! `POST /v1/locations`: HTTP JSON ingest for phone apps, with the same
//! validation, pipeline and acknowledgement as gRPC. The body may be
//! gzip-compressed; both its size as sent and after decompression are capped.

use std::{io::Read, sync::Arc};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
    routing::post,
};
use std::cell::Cell;

use serde::{
    Deserializer, Serialize,
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use serde_json::{Value, value::RawValue};
use tokio::sync::{Semaphore, SemaphorePermit};
use utoipa::ToSchema;

use super::{BodyError, Ingestor, PendingAck, WhenFull};
use crate::{
    auth::{Auth, Caller, Principal},
    config::LimitArgs,
    location::{Rejection, json},
    metrics::{Call, REQUESTS_REFUSED},
    proto,
    status::http::ErrorJson,
};

#[derive(Clone)]
struct IngestHttp {
    ingestor: Ingestor,
    body: BodyLimits,
}

/// How an HTTP body is read, shared by every ingest route: capped as sent
/// (`--max-message-bytes`) and once decompressed, and decoded within a
/// budget shared by all requests at once.
#[derive(Clone)]
pub struct BodyLimits {
    max_body: usize,
    max_decompressed: usize,
    /// Bytes of bodies being decompressed and parsed at once
    /// (`--max-decoding-bytes`): what many requests at once may cost.
    decoding: Arc<Semaphore>,
}

/// How long a body waits for its share of `--max-decoding-bytes`.
const DECODING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl BodyLimits {
    pub fn new(limits: &LimitArgs) -> Self {
        Self {
            max_body: limits.max_message_bytes,
            max_decompressed: limits.max_decompressed_bytes,
            decoding: Arc::new(Semaphore::new(limits.max_decoding_bytes)),
        }
    }

    /// The body as sent, refused past `--max-message-bytes`.
    pub async fn read(&self, body: Body) -> Result<Bytes, BodyError> {
        axum::body::to_bytes(body, self.max_body)
            .await
            .map_err(|_| BodyError::TooLargeAsSent(self.max_body))
    }

    /// The body decompressed, with its share of the decoding budget: hold
    /// the share until what is read from the body is built.
    pub async fn decode(
        &self,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<(Bytes, SemaphorePermit<'_>), BodyError> {
        // The most its decompressed body may take, or its size as sent.
        let share = if is_gzip(headers) {
            self.max_decompressed
        } else {
            body.len()
        };
        let share = u32::try_from(share.max(1)).unwrap_or(u32::MAX);
        let permit = tokio::time::timeout(DECODING_WAIT, self.decoding.acquire_many(share))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                metrics::counter!(REQUESTS_REFUSED, "reason" => "decoding_busy").increment(1);
                BodyError::DecodingBusy
            })?;
        Ok((decode_body(headers, body, self.max_decompressed)?, permit))
    }
}

impl axum::extract::FromRef<IngestHttp> for Auth {
    fn from_ref(app: &IngestHttp) -> Auth {
        app.ingestor.auth.clone()
    }
}

pub fn router(ingestor: Ingestor, body: BodyLimits) -> Router {
    Router::new()
        .route("/v1/locations", post(post_locations))
        .with_state(IngestHttp { ingestor, body })
}

/// A batch as JSON. Each location is read on its own, so that a bad one is
/// rejected alone and its good neighbours are stored. The schema only: the
/// body is read by [`parse_raw`].
#[allow(dead_code)]
#[derive(Debug, ToSchema)]
#[schema(as = IngestBatchJson)]
struct JsonBatch {
    /// Echoed in the ack.
    #[schema(default = 0)]
    batch_id: u64,
    #[schema(value_type = Vec<json::IngestLocationJson>)]
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

/// The body's `Content-Encoding`, trimmed and lower case; `identity` if none.
fn content_encoding(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase()
}

fn is_gzip(headers: &HeaderMap) -> bool {
    content_encoding(headers) == "gzip"
}

/// The body, decompressed if it says gzip (every member of it), within the caps.
fn decode_body(
    headers: &HeaderMap,
    body: Bytes,
    max_decompressed: usize,
) -> Result<Bytes, BodyError> {
    match content_encoding(headers).as_str() {
        "identity" | "" => Ok(body),
        "gzip" => {
            let mut out = Vec::new();
            // Reading stops one byte past the cap: a gzip bomb costs at most that.
            let mut reader =
                flate2::read::MultiGzDecoder::new(&body[..]).take(max_decompressed as u64 + 1);
            reader.read_to_end(&mut out).map_err(BodyError::BadGzip)?;
            if out.len() > max_decompressed {
                return Err(BodyError::TooLarge(max_decompressed));
            }
            Ok(Bytes::from(out))
        }
        other => Err(BodyError::Encoding(other.to_string())),
    }
}

/// A JSON body as read before its points are: its batch id and each
/// location as the text sent, borrowed from the body.
#[derive(Debug)]
pub struct RawBatch<'a> {
    pub batch_id: u64,
    pub locations: Vec<&'a RawValue>,
}

/// Why a body is not a batch.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// More locations than the limit: reading stopped there.
    #[error("more than {0} locations")]
    TooManyPoints(usize),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Reads a body's `batch_id` and its `locations` without parsing them, and
/// stops at the `max_points + 1`st location: what a request costs before
/// it is refused is its bytes and a pointer a location, up to the limit.
pub fn parse_raw(body: &[u8], max_points: usize) -> Result<RawBatch<'_>, ParseError> {
    let over = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let batch = de
        .deserialize_map(BatchVisitor {
            max_points,
            over: &over,
        })
        .and_then(|b| de.end().map(|()| b));
    match batch {
        Err(_) if over.get() => Err(ParseError::TooManyPoints(max_points)),
        other => Ok(other?),
    }
}

struct BatchVisitor<'o> {
    max_points: usize,
    over: &'o Cell<bool>,
}

impl<'de> Visitor<'de> for BatchVisitor<'_> {
    type Value = RawBatch<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object {\"batch_id\", \"locations\": [...]}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawBatch<'de>, A::Error> {
        let (mut batch_id, mut locations) = (None, None);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "batch_id" if batch_id.is_none() => batch_id = Some(map.next_value()?),
                "locations" if locations.is_none() => {
                    locations = Some(map.next_value_seed(LocationsSeed {
                        max_points: self.max_points,
                        over: self.over,
                    })?);
                }
                "batch_id" | "locations" => {
                    return Err(de::Error::custom(format!("duplicate field `{key}`")));
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(RawBatch {
            batch_id: batch_id.unwrap_or(0),
            locations: locations.ok_or_else(|| de::Error::missing_field("locations"))?,
        })
    }
}

struct LocationsSeed<'o> {
    max_points: usize,
    over: &'o Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for LocationsSeed<'_> {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for LocationsSeed<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of locations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        loop {
            if out.len() == self.max_points {
                // One more is one too many: skipped, not kept.
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    self.over.set(true);
                    return Err(de::Error::custom(format!(
                        "more than {} locations",
                        self.max_points
                    )));
                }
                return Ok(out);
            }
            match seq.next_element::<&'de RawValue>()? {
                Some(raw) => out.push(raw),
                None => return Ok(out),
            }
        }
    }
}

/// A JSON body as its batch id and its points, each already a
/// [`proto::Location`] or the reason it is not one. Public for the fuzzer.
pub type ParsedBatch = (u64, Vec<Result<proto::Location, Rejection>>);

/// [`parse_raw`], then each location on its own.
pub fn parse_batch(body: &[u8], max_points: usize) -> Result<ParsedBatch, ParseError> {
    let raw = parse_raw(body, max_points)?;
    Ok((raw.batch_id, to_protos(&raw)))
}

fn to_protos(raw: &RawBatch<'_>) -> Vec<Result<proto::Location, Rejection>> {
    raw.locations
        .iter()
        .enumerate()
        .map(|(i, v)| json::to_proto(i, v))
        .collect()
}

/// Decompresses and reads the body, counts its points (refusing past the
/// limit before building more), admits them, reads each and queues the
/// good ones. The body is freed before the ack is awaited.
async fn read_and_queue(
    app: &IngestHttp,
    caller: &Principal,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<PendingAck, Response> {
    let (body, _decoding) = app
        .body
        .decode(headers, body)
        .await
        .map_err(IntoResponse::into_response)?;
    let raw = match parse_raw(&body, app.ingestor.max_batch_points()) {
        Ok(raw) => raw,
        Err(ParseError::TooManyPoints(_)) => return Err(app.ingestor.over_limit().into_response()),
        Err(ParseError::Json(e)) => return Err(BodyError::BadJson(e).into_response()),
    };
    let admitted = app
        .ingestor
        .admit(caller, raw.locations.len(), WhenFull::Refuse)
        .map_err(IntoResponse::into_response)?;
    let points = to_protos(&raw);
    let batch_id = raw.batch_id;
    drop(raw);
    drop(body);
    app.ingestor
        .ingest_admitted(
            admitted,
            caller,
            batch_id,
            points,
            Call::http("WriteLocations"),
        )
        .await
        .map_err(IntoResponse::into_response)
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
    State(app): State<IngestHttp>,
    Caller(caller): Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match app.body.read(body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    // Refused under overload before the body is decompressed and parsed.
    if let Err(e) = app.ingestor.admit_unparsed(&caller) {
        return e.into_response();
    }
    let pending = match read_and_queue(&app, &caller, &headers, body).await {
        Ok(p) => p,
        Err(r) => return r,
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
        Err(e) => e.into_response(),
    }
}
