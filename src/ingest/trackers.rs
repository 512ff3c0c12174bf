//! The tracking apps' own HTTP forms, on the HTTP address next to
//! `POST /v1/locations`: `/osmand` (Traccar Client and anything else that
//! speaks OsmAnd, GET or POST) and `/owntracks` (OwnTracks in HTTP mode).
//! Each request is read by its format's parser ([`crate::trackers`]), its
//! points bound to their registered trackers, and then it takes the path
//! every point takes: admission, validation, the pipeline, and an answer
//! once committed. Success is what the app counts as success (a 2xx); a
//! point refused is a 4xx, which the apps keep and send again.
//!
//! Credentials, in this order: `Authorization: Bearer <token>`, HTTP Basic
//! whose password is the token, a client certificate, and for OsmAnd the
//! token in place of the device identifier (`id=locus_...`), for apps
//! that can set nothing else.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use axum::{
    Router,
    body::Bytes,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::STANDARD};

use super::{Ingestor, WhenFull, http::BodyLimits, unix_micros};
use crate::{
    auth::{AuthError, Principal, Role, token::Token},
    location::Rejection,
    metrics::Call,
    proto,
    status::http::rejected_points,
    trackers::{
        Fix, Registry, Report, Tracker, TrackerError,
        osmand::{self, JsonError},
        owntracks::{self, Message},
    },
};

/// A report's point with the tracker it names (`None`: the caller's own).
type Named = (Option<String>, Result<Option<Fix>, Rejection>);

#[derive(Clone)]
struct TrackersHttp {
    ingestor: Ingestor,
    registry: Registry,
    body: BodyLimits,
}

pub fn router(ingestor: Ingestor, registry: Registry, body: BodyLimits) -> Router {
    Router::new()
        .route("/osmand", get(osmand).post(osmand))
        .route("/owntracks", post(owntracks))
        .with_state(TrackersHttp {
            ingestor,
            registry,
            body,
        })
}

/// The `Authorization` header as a bearer token: `Bearer` as sent, HTTP
/// Basic's password as the token (and its user, which OwnTracks names).
fn authorization(headers: &HeaderMap) -> Result<(Option<String>, Option<String>), AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok((None, None));
    };
    let text = value
        .to_str()
        .map_err(|_| AuthError::Unauthenticated("the authorization header is not text".into()))?;
    let Some(basic) = text
        .strip_prefix("Basic ")
        .or_else(|| text.strip_prefix("basic "))
    else {
        return Ok((Some(text.to_string()), None));
    };
    let bad = || {
        AuthError::Unauthenticated("HTTP Basic credentials must be base64 of \"user:token\"".into())
    };
    let decoded = STANDARD.decode(basic.trim()).map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (user, password) = decoded.split_once(':').ok_or_else(bad)?;
    Ok((Some(format!("Bearer {password}")), Some(user.to_string())))
}

/// The caller, from the headers or the connection's certificate; `None`
/// when the request carries neither.
async fn caller_of(
    auth: &crate::auth::Auth,
    parts: &Parts,
    authorization: Option<&str>,
) -> Result<Option<Arc<Principal>>, AuthError> {
    let cert = parts.extensions.get::<crate::tls::ClientCert>();
    if authorization.is_none() && cert.is_none() && auth.is_enabled() {
        return Ok(None);
    }
    auth.authenticate(authorization, cert.map(|c| c.0.as_slice()))
        .await
        .map(Some)
}

/// Refused before anything is stored: a caller, a tracker, a body.
enum Refusal {
    Auth(AuthError),
    Tracker(TrackerError),
    Other(Response),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Auth(e) => e.into_response(),
            Refusal::Tracker(e) => e.into_response(),
            Refusal::Other(r) => r,
        }
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        Refusal::Auth(e)
    }
}

impl From<TrackerError> for Refusal {
    fn from(e: TrackerError) -> Self {
        Refusal::Tracker(e)
    }
}

impl From<super::IngestError> for Refusal {
    fn from(e: super::IngestError) -> Self {
        Refusal::Other(e.into_response())
    }
}

impl TrackersHttp {
    /// The tracker a point names, or the caller's own: a device token
    /// registered for one tracker. Refused unless the caller may write it.
    async fn tracker(
        &self,
        caller: &Principal,
        named: Option<&str>,
        cache: &mut HashMap<Option<String>, Tracker>,
    ) -> Result<Tracker, Refusal> {
        let key = named.map(str::to_string);
        if let Some(t) = cache.get(&key) {
            return Ok(t.clone());
        }
        let tracker = match named {
            Some(id) => {
                self.registry
                    .resolve(caller.app_source.as_deref(), id)
                    .await?
            }
            None => {
                let own = match (caller.role, caller.devices.len()) {
                    (Role::Device, 1) => caller.devices.iter().next().copied(),
                    _ => None,
                };
                match own {
                    Some(device) => self
                        .registry
                        .by_device(device)
                        .await?
                        .ok_or(TrackerError::Missing)?,
                    None => return Err(TrackerError::Missing.into()),
                }
            }
        };
        if let Some(why) = caller.forbids(&tracker.device_id, &tracker.app_source) {
            return Err(AuthError::PermissionDenied(format!(
                "tracker {:?}: {why}",
                tracker.tracker_id
            ))
            .into());
        }
        cache.insert(key, tracker.clone());
        Ok(tracker)
    }

    /// Binds each report to its tracker, admits and queues the points, and
    /// waits until they are committed. Reports without a position are no
    /// points. The body is dropped before the wait.
    async fn store(
        &self,
        caller: &Principal,
        reports: Vec<Named>,
        call: Call,
    ) -> Result<proto::BatchAck, Refusal> {
        let now_us = unix_micros(SystemTime::now());
        let mut trackers = HashMap::new();
        let mut points = Vec::with_capacity(reports.len());
        for (named, fix) in reports {
            let tracker = self
                .tracker(caller, named.as_deref(), &mut trackers)
                .await?;
            match fix {
                Ok(Some(f)) => points.push(Ok(f.into_location(&tracker, now_us))),
                Ok(None) => {}
                Err(r) => points.push(Err(r)),
            }
        }
        if points.is_empty() {
            return Ok(proto::BatchAck::default());
        }
        let admitted = self
            .ingestor
            .admit(caller, points.len(), WhenFull::Refuse)?;
        let pending = self
            .ingestor
            .ingest_admitted(admitted, caller, 0, points, call)
            .await?;
        Ok(pending.resolve().await?)
    }
}

/// What answers a request whose points were all stored (or were no
/// points); a 400 listing those refused otherwise.
fn answer(ack: Result<proto::BatchAck, Refusal>, ok: impl FnOnce() -> Response) -> Response {
    match ack {
        Ok(ack) if ack.rejected.is_empty() => ok(),
        Ok(ack) => rejected_points(&ack),
        Err(r) => r.into_response(),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim_start().starts_with("application/json"))
}

/// A body decoded as a form's or a query string's pairs.
fn pairs(text: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(text)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// OsmAnd: the parameters of the query string, or of a form body when the
/// query string has none (Traccar's rule); JSON when the body says so.
async fn osmand(State(app): State<TrackersHttp>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    match osmand_inner(&app, &parts, body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn osmand_inner(
    app: &TrackersHttp,
    parts: &Parts,
    body: axum::body::Body,
) -> Result<Response, Response> {
    let auth = &app.ingestor.auth;
    let refuse = |e: Refusal| e.into_response();
    let (authorization, _) = authorization(&parts.headers).map_err(|e| refuse(e.into()))?;
    let mut caller = caller_of(auth, parts, authorization.as_deref())
        .await
        .map_err(|e| refuse(e.into()))?;
    let body = app
        .body
        .read(body)
        .await
        .map_err(IntoResponse::into_response)?;
    let query = parts.uri.query().unwrap_or_default();
    let (body, _decoding) = app
        .body
        .decode(&parts.headers, body)
        .await
        .map_err(IntoResponse::into_response)?;
    let reports: Vec<Report> = if is_json(&parts.headers) {
        match osmand::parse_json(&body, app.ingestor.max_batch_points()) {
            Ok(r) => r,
            Err(JsonError::TooMany(_)) => {
                return Err(app.ingestor.over_limit().into_response());
            }
            Err(JsonError::Json(e)) => {
                return Err(crate::ingest::BodyError::BadJson(e).into_response());
            }
        }
    } else {
        let source: &[u8] = if query.is_empty() {
            &body
        } else {
            query.as_bytes()
        };
        let pairs = pairs(source);
        vec![osmand::parse_params(
            pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )]
    };
    drop(body);
    // The token in place of the identifier: it names the caller, and the
    // caller's own tracker.
    let mut in_id = None;
    let reports: Vec<_> = reports
        .into_iter()
        .map(|r| match r.tracker_id.as_deref().and_then(Token::parse) {
            Some(t) => {
                in_id.get_or_insert(t);
                (None, r.fix)
            }
            None => (r.tracker_id, r.fix),
        })
        .collect();
    if caller.is_none() {
        let Some(token) = in_id else {
            return Err(AuthError::Unauthenticated(
                "no credentials: send \"Authorization: Bearer <token>\", or the token as the \
                 device identifier (id=locus_...)"
                    .into(),
            )
            .into_response());
        };
        caller = Some(
            auth.authenticate(Some(&format!("Bearer {token}")), None)
                .await
                .map_err(IntoResponse::into_response)?,
        );
    }
    let caller = caller.ok_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response())?;
    app.ingestor
        .admit_unparsed(&caller)
        .map_err(IntoResponse::into_response)?;
    let ack = app.store(&caller, reports, Call::http("OsmAnd")).await;
    Ok(answer(ack, || StatusCode::OK.into_response()))
}

/// OwnTracks in HTTP mode: one JSON payload; answered `[]` (no friends,
/// no commands) once stored.
async fn owntracks(State(app): State<TrackersHttp>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    match owntracks_inner(&app, &parts, body).await {
        Ok(r) | Err(r) => r,
    }
}

/// `<user>/<device>`: from `X-Limit-U` and `X-Limit-D`, else the query's
/// `u` and `d` (as the Recorder reads them), the user else from HTTP Basic;
/// else the payload's `topic`.
fn owntracks_tracker(
    headers: &HeaderMap,
    query: &str,
    basic_user: Option<&str>,
    topic: Option<&str>,
) -> Option<String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let params = pairs(query.as_bytes());
    let param = |name: &str| {
        params
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let user = header("x-limit-u")
        .or_else(|| param("u"))
        .or_else(|| basic_user.map(str::to_string));
    let device = header("x-limit-d").or_else(|| param("d"));
    match (user, device) {
        (Some(u), Some(d)) if !u.is_empty() && !d.is_empty() => Some(owntracks::tracker_id(&u, &d)),
        _ => topic.and_then(owntracks::tracker_of_topic),
    }
}

async fn owntracks_inner(
    app: &TrackersHttp,
    parts: &Parts,
    body: axum::body::Body,
) -> Result<Response, Response> {
    let auth = &app.ingestor.auth;
    let refuse = |e: Refusal| e.into_response();
    let (authorization, basic_user) =
        authorization(&parts.headers).map_err(|e| refuse(e.into()))?;
    let caller = caller_of(auth, parts, authorization.as_deref())
        .await
        .map_err(|e| refuse(e.into()))?
        .ok_or_else(|| {
            AuthError::Unauthenticated(
                "no credentials: set the app's password to the token (HTTP Basic)".into(),
            )
            .into_response()
        })?;
    app.ingestor
        .admit_unparsed(&caller)
        .map_err(IntoResponse::into_response)?;
    let body: Bytes = app
        .body
        .read(body)
        .await
        .map_err(IntoResponse::into_response)?;
    let (body, _decoding) = app
        .body
        .decode(&parts.headers, body)
        .await
        .map_err(IntoResponse::into_response)?;
    let message = owntracks::parse(&body);
    drop(body);
    let ok = || {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "[]",
        )
            .into_response()
    };
    let (fix, topic) = match message {
        Ok(Message::Ignored) => return Ok(ok()),
        Ok(Message::Location { fix, topic }) => (Ok(Some(fix)), topic),
        Err(r) => (Err(r), None),
    };
    let named = owntracks_tracker(
        &parts.headers,
        parts.uri.query().unwrap_or_default(),
        basic_user.as_deref(),
        topic.as_deref(),
    );
    let ack = app
        .store(&caller, vec![(named, fix)], Call::http("OwnTracks"))
        .await;
    Ok(answer(ack, ok))
}
