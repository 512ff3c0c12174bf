//! OwnTracks over MQTT (`--mqtt-url`): locus subscribes to the apps'
//! topics on a broker and stores each location through the path every
//! point takes (tracker registry, validation, the pipeline).
//!
//! The promise: a message is acknowledged to the broker (PUBACK) only once
//! its point is committed, or it was found to be no point for good (not a
//! location, a payload or a tracker that will never be one). Until then
//! it is held and tried again (database away, buffer full); if locus dies
//! first, the broker, which keeps locus's persistent session (fixed client
//! id, no clean start), delivers it again. So a message the broker took is
//! never lost, and one delivered twice is stored once (the dedup by
//! app_source, device and time).
//!
//! MQTT 5: the session's receive maximum (`--mqtt-inflight`) asks the
//! broker to send no more before locus acknowledges, and locus works on at
//! most that many at once; acknowledgements go in the order messages
//! arrived. Two tasks: the connection's event loop (reading, reconnecting
//! with backoff, subscribing on each connection, writing the acks), and
//! the processor, which stores messages concurrently and acknowledges them
//! in order. The event loop never waits for the processor: it also carries
//! the acks, so waiting would deadlock them. What a broker sends past the
//! receive maximum (Mosquitto 2.0.11 sends a resumed session's queue at
//! once) waits in memory, bounded by the broker's own queue.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{StreamExt, stream::FuturesOrdered};
use rumqttc::v5::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions,
    mqttbytes::{
        QoS,
        v5::{Filter, Packet, Publish, RetainForwardRule, SubscribeReasonCode},
    },
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{IngestError, Ingestor, WhenFull, unix_micros};
use crate::{
    auth::{Principal, Role},
    config::{ConfigError, LimitArgs, MqttArgs},
    metrics::{
        Call, MQTT_CONNECTED, MQTT_CONNECTION_ERRORS, MQTT_DROPPED, MQTT_IGNORED, MQTT_RECEIVED,
        MQTT_REDELIVERED, MQTT_RETRIED, MQTT_STORED,
    },
    proto,
    trackers::{
        Registry, TrackerError,
        owntracks::{self, Message},
    },
};

/// How long the broker keeps locus's session (its subscriptions and the
/// messages for it) while locus is away: a week.
pub const SESSION_EXPIRY: Duration = Duration::from_secs(7 * 86_400);
/// Keep-alive of the connection: a broker that stops answering is noticed
/// within about one and a half of it.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Reconnection backoff: from 250 ms, doubling, at most 30 s.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Backoff of a message held (database away, buffer full): from 100 ms,
/// doubling, at most 5 s (the writer itself already retries for
/// `--write-retry-deadline` before it reports a failure).
const HOLD_MIN: Duration = Duration::from_millis(100);
const HOLD_MAX: Duration = Duration::from_secs(5);
/// Topics of unknown trackers remembered, so that each is logged once.
const UNKNOWN_LOGGED: usize = 10_000;
/// At shutdown, the time the DISCONNECT is given to reach the broker.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);
/// Requests to the event loop (acks, subscriptions) beyond the inflight
/// bound.
const REQUEST_SLACK: usize = 64;
/// The labels of what MQTT ingest records.
const CALL: Call = Call::mqtt("OwnTracks");

/// Where the broker is, from `--mqtt-url`.
#[derive(Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// User and password, percent-decoded.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl Broker {
    /// Reads `mqtt://[user:password@]host[:port]` or `mqtts://...`. The
    /// error never repeats the URL, which may hold a password.
    pub fn parse(text: &str) -> Result<Broker, String> {
        let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
        let (tls, default_port) = match url.scheme() {
            "mqtt" => (false, 1883),
            "mqtts" => (true, 8883),
            other => {
                return Err(format!(
                    "the scheme must be mqtt:// or mqtts:// (TLS), not {other}://"
                ));
            }
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            _ => return Err("no host: mqtt://host[:port]".into()),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err("only mqtt[s]://[user:password@]host[:port]: no path or query".into());
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| "the user or password is not UTF-8 once percent-decoded".to_string())
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            ("", Some(_)) => return Err("a password without a user".into()),
            (user, password) => Some((decode(user)?, decode(password.unwrap_or_default())?)),
        };
        Ok(Broker {
            host,
            port: url.port().unwrap_or(default_port),
            tls,
            credentials,
        })
    }
}

/// What MQTT ingest runs with, from the flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: Broker,
    pub client_id: String,
    /// The filters subscribed to, with the share group's prefix.
    pub filters: Vec<String>,
    pub app_source: String,
    pub inflight: u16,
    /// Larger packets the broker does not send (MQTT 5 maximum packet
    /// size): `--max-message-bytes`.
    pub max_packet_bytes: u32,
    /// mqtts://: the TLS client, its roots and certificate read at start.
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl Settings {
    /// `None` when MQTT ingest is off.
    pub fn from_args(args: &MqttArgs, limits: &LimitArgs) -> Result<Option<Settings>, ConfigError> {
        let Some(url) = &args.mqtt_url else {
            return Ok(None);
        };
        args.validate()?;
        let broker = Broker::parse(url)
            .map_err(|e| ConfigError::Inconsistent(format!("--mqtt-url: {e}")))?;
        let tls = if broker.tls {
            Some(Arc::new(
                tls_config(args).map_err(|e| ConfigError::Inconsistent(e.to_string()))?,
            ))
        } else {
            None
        };
        let filters = args
            .mqtt_topics
            .iter()
            .map(|t| match &args.mqtt_share_group {
                Some(g) => format!("$share/{g}/{t}"),
                None => t.clone(),
            })
            .collect();
        Ok(Some(Settings {
            broker,
            client_id: args
                .mqtt_client_id
                .clone()
                .unwrap_or_else(default_client_id),
            filters,
            app_source: args.mqtt_app_source.clone(),
            inflight: args.mqtt_inflight,
            max_packet_bytes: u32::try_from(limits.max_message_bytes).unwrap_or(u32::MAX),
            tls,
        }))
    }

    fn options(&self) -> Result<MqttOptions, MqttError> {
        let mut o = MqttOptions::new(&self.client_id, &self.broker.host, self.broker.port);
        o.set_keep_alive(KEEP_ALIVE)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(SESSION_EXPIRY.as_secs() as u32))
            .set_receive_maximum(Some(self.inflight))
            .set_max_packet_size(Some(self.max_packet_bytes))
            .set_manual_acks(true);
        if let Some((user, password)) = &self.broker.credentials {
            o.set_credentials(user, password);
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)),
            ));
        }
        Ok(o)
    }
}

/// `locus-<hostname>`: one session per host unless told otherwise.
fn default_client_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("locus-{host}")
}

/// Why MQTT ingest could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("TLS for --mqtt-url: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
    #[error("{flag} {path}: {why}")]
    Pem {
        flag: &'static str,
        path: String,
        why: String,
    },
}

/// TLS with the system's roots, webpki's and `--mqtt-ca`'s, through ring;
/// with `--mqtt-client-cert` and `--mqtt-client-key`, a client certificate.
fn tls_config(args: &MqttArgs) -> Result<tokio_rustls::rustls::ClientConfig, MqttError> {
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let pem = |flag: &'static str, path: &std::path::Path| {
        let path = path.display().to_string();
        move |e: rustls::pki_types::pem::Error| MqttError::Pem {
            flag,
            path,
            why: e.to_string(),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(system_roots = added, "MQTT TLS roots");
    if let Some(path) = &args.mqtt_ca {
        let cas = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(pem("--mqtt-ca", path))?;
        if cas.is_empty() {
            return Err(MqttError::Pem {
                flag: "--mqtt-ca",
                path: path.display().to_string(),
                why: "no certificate in it".into(),
            });
        }
        for ca in cas {
            roots.add(ca)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&args.mqtt_client_cert, &args.mqtt_client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(pem("--mqtt-client-cert", cert))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(pem("--mqtt-client-key", key))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// What the event loop hands to the processor, in the order it happened.
#[derive(Debug)]
enum Received {
    /// A new connection (the broker may now deliver again what the last
    /// one did not acknowledge).
    Connected(u64),
    /// A message, on connection so many.
    Publish(u64, Box<Publish>),
}

/// What became of a message.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Committed (new or a duplicate): acknowledged.
    Stored,
    /// No location: acknowledged.
    Ignored,
    /// Never a point (bad payload, bad topic, refused by validation):
    /// acknowledged and counted by reason.
    Dropped { reason: String, why: String },
    /// Its topic names no registered tracker: acknowledged.
    UnknownTracker,
    /// Not stored, and not to be acknowledged: locus is stopping; the
    /// broker delivers it again.
    Held,
}

/// What every message's handling shares.
struct Context {
    ingestor: Ingestor,
    registry: Registry,
    caller: Principal,
    app_source: String,
    stop: CancellationToken,
    /// Whether messages are being held, so that the start and the end of
    /// an outage are logged once each.
    holding: AtomicBool,
}

/// Starts MQTT ingest; the task returned ends after `stop`, once the
/// messages in flight are committed and acknowledged (or `grace` passed),
/// and the session is disconnected.
pub fn start(
    settings: Settings,
    ingestor: Ingestor,
    registry: Registry,
    stop: CancellationToken,
    grace: Duration,
) -> Result<JoinHandle<()>, MqttError> {
    let options = settings.options()?;
    let inflight = usize::from(settings.inflight);
    let (client, eventloop) = AsyncClient::new(options, inflight + REQUEST_SLACK);
    // Unbounded: the broker's receive maximum bounds it, and the event
    // loop must never wait on the processor (it also sends the acks).
    let (tx, rx) = mpsc::unbounded_channel();
    let finished = CancellationToken::new();
    tracing::info!(
        broker = ?settings.broker,
        client_id = %settings.client_id,
        filters = ?settings.filters,
        app_source = %settings.app_source,
        "MQTT: subscribing"
    );
    let poller = tokio::spawn(poll(
        eventloop,
        client.clone(),
        settings.filters.clone(),
        tx,
        finished.clone(),
    ));
    let context = Arc::new(Context {
        ingestor,
        registry,
        caller: Principal {
            token_id: None,
            name: format!("mqtt {}", settings.client_id),
            role: Role::Gateway,
            app_source: Some(settings.app_source.clone()),
            devices: Default::default(),
        },
        app_source: settings.app_source,
        stop,
        holding: AtomicBool::new(false),
    });
    Ok(tokio::spawn(async move {
        process(context, rx, &client, inflight, grace).await;
        // What was acknowledged is in the request queue, before this.
        let _ = client.try_disconnect();
        let mut poller = poller;
        if tokio::time::timeout(DISCONNECT_WAIT, &mut poller)
            .await
            .is_err()
        {
            // No broker to say goodbye to.
            finished.cancel();
            let _ = poller.await;
        }
        metrics::gauge!(MQTT_CONNECTED).set(0.0);
        tracing::info!("MQTT: stopped");
    }))
}

/// The connection: polls the event loop, which reconnects when polled
/// again after an error; subscribes on each connection; hands messages to
/// the processor. Ends when the DISCONNECT went out, or `finished`.
async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    tx: mpsc::UnboundedSender<Received>,
    finished: CancellationToken,
) {
    let mut connection = 0u64;
    let mut backoff = RECONNECT_MIN;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            _ = finished.cancelled() => return,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connection += 1;
                backoff = RECONNECT_MIN;
                failing = false;
                metrics::gauge!(MQTT_CONNECTED).set(1.0);
                tracing::info!(
                    session_present = ack.session_present,
                    "MQTT: connected to the broker"
                );
                // On every connection: a session the broker lost (or
                // never had) has no subscriptions. Retained messages only
                // for a new subscription.
                let filters = filters.iter().map(|f| Filter {
                    path: f.clone(),
                    qos: QoS::AtLeastOnce,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::OnNewSubscribe,
                });
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(error = %e, "MQTT: cannot subscribe");
                }
                if tx.send(Received::Connected(connection)).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                for (filter, code) in filters.iter().zip(&ack.return_codes) {
                    match code {
                        SubscribeReasonCode::Success(_) => {
                            tracing::debug!(%filter, "MQTT: subscribed")
                        }
                        refused => tracing::error!(
                            %filter,
                            reason = ?refused,
                            "MQTT: the broker refused the subscription; nothing arrives from it"
                        ),
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                metrics::counter!(MQTT_RECEIVED).increment(1);
                if p.dup {
                    metrics::counter!(MQTT_REDELIVERED).increment(1);
                }
                if tx.send(Received::Publish(connection, Box::new(p))).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!(reason = ?d.reason_code, "MQTT: the broker disconnected locus");
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                metrics::gauge!(MQTT_CONNECTED).set(0.0);
                metrics::counter!(MQTT_CONNECTION_ERRORS).increment(1);
                let refused = matches!(e, ConnectionError::ConnectionRefused(_));
                if refused {
                    tracing::error!(error = %e, retry_in = ?backoff, "MQTT: the broker refused the connection (credentials, client id?)");
                } else if !failing {
                    tracing::warn!(error = %e, "MQTT: connection to the broker lost; reconnecting with backoff");
                } else {
                    tracing::debug!(error = %e, retry_in = ?backoff, "MQTT: still no broker");
                }
                failing = true;
                tokio::select! {
                    _ = finished.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// Stores messages, at most `inflight` at once, and acknowledges each in
/// the order received once its outcome is known; after `stop`, takes no
/// more and lets those in flight finish, for at most `grace`.
async fn process(
    context: Arc<Context>,
    mut rx: mpsc::UnboundedReceiver<Received>,
    client: &AsyncClient,
    inflight: usize,
    grace: Duration,
) {
    let mut pending = FuturesOrdered::new();
    let mut connection = 0u64;
    let mut logged = HashSet::new();
    let mut overfull = false;
    let stop = context.stop.clone();
    let deadline = stop.clone().cancelled_owned();
    let deadline = async move {
        deadline.await;
        tokio::time::sleep(grace).await;
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            biased;
            Some((of, publish, outcome)) = pending.next() => {
                let publish: Box<Publish> = publish;
                settle(of == connection, client, &publish, outcome, &mut logged).await;
            }
            _ = &mut deadline => {
                if !pending.is_empty() {
                    tracing::warn!(
                        messages = pending.len(),
                        "MQTT: shutdown deadline passed; messages not acknowledged go again to the next session"
                    );
                }
                return;
            }
            received = rx.recv(), if !stop.is_cancelled() && pending.len() < inflight => {
                match received {
                    Some(Received::Connected(n)) => connection = n,
                    Some(Received::Publish(n, p)) => {
                        if rx.len() >= inflight && !overfull {
                            // Seen with Mosquitto 2.0.11 on a resumed
                            // session: its queue, bounded by its
                            // max_queued_messages, comes at once.
                            overfull = true;
                            tracing::info!(
                                inflight,
                                queued = rx.len(),
                                "MQTT: the broker sent more than the receive maximum \
                                 (--mqtt-inflight); the rest waits in memory for its turn"
                            );
                        }
                        let context = Arc::clone(&context);
                        pending.push_back(async move {
                            let outcome = handle(&context, &p).await;
                            (n, p, outcome)
                        });
                    }
                    None => return,
                }
            }
            _ = stop.cancelled(), if pending.is_empty() => return,
        }
    }
}

/// Counts an outcome, and acknowledges the message unless it is held or
/// came on an earlier connection (the broker delivers that one again; its
/// packet id belongs to the last connection).
async fn settle(
    current: bool,
    client: &AsyncClient,
    publish: &Publish,
    outcome: Outcome,
    logged: &mut HashSet<String>,
) {
    let topic = String::from_utf8_lossy(&publish.topic);
    match &outcome {
        Outcome::Stored => metrics::counter!(MQTT_STORED).increment(1),
        Outcome::Ignored => metrics::counter!(MQTT_IGNORED).increment(1),
        Outcome::Dropped { reason, why } => {
            metrics::counter!(MQTT_DROPPED, "reason" => reason.clone()).increment(1);
            tracing::warn!(%topic, %reason, %why, "MQTT: message not stored");
        }
        Outcome::UnknownTracker => {
            metrics::counter!(MQTT_DROPPED, "reason" => "unknown_tracker").increment(1);
            if logged.len() < UNKNOWN_LOGGED && logged.insert(topic.to_string()) {
                tracing::warn!(
                    %topic,
                    "MQTT: the topic names no registered tracker; its messages are dropped \
                     (register it: locus token create --role device --tracker-id <user>/<device> ...)"
                );
            }
        }
        Outcome::Held => return,
    }
    if !current {
        return;
    }
    if let Err(e) = client.ack(publish).await {
        tracing::warn!(error = %e, "MQTT: acknowledgement not sent; the broker delivers the message again");
    }
}

/// One message: its tracker from the topic's last two levels, its point
/// from the payload, then stored; held and tried again while it cannot be.
async fn handle(context: &Context, publish: &Publish) -> Outcome {
    let dropped = |reason: &str, why: String| Outcome::Dropped {
        reason: reason.to_string(),
        why,
    };
    let Ok(topic) = std::str::from_utf8(&publish.topic) else {
        return dropped("bad_topic", "the topic is not UTF-8".into());
    };
    let Some(tracker_id) = owntracks::tracker_of_topic(topic) else {
        return dropped(
            "bad_topic",
            "the topic names no <user>/<device> in its last two levels".into(),
        );
    };
    let fix = match owntracks::parse(&publish.payload) {
        Ok(Message::Ignored) => return Outcome::Ignored,
        Ok(Message::Location { fix, .. }) => fix,
        Err(r) => return dropped(r.reason.code(), r.message),
    };
    let mut backoff = HOLD_MIN;
    let tracker = loop {
        match context
            .registry
            .resolve(Some(&context.app_source), &tracker_id)
            .await
        {
            Ok(t) => break t,
            Err(TrackerError::Unknown(_)) => return Outcome::UnknownTracker,
            Err(e) => {
                if !context.hold(&mut backoff, &e).await {
                    return Outcome::Held;
                }
            }
        }
    };
    loop {
        let location = fix
            .clone()
            .into_location(&tracker, unix_micros(SystemTime::now()));
        match context.store(location).await {
            Ok(ack) => {
                context.released();
                return match ack.rejected.into_iter().next() {
                    None => Outcome::Stored,
                    Some(r) => dropped(&r.reason, r.message),
                };
            }
            Err(IngestError::ShuttingDown) => return Outcome::Held,
            Err(e) => {
                if !context.hold(&mut backoff, &e).await {
                    return Outcome::Held;
                }
            }
        }
    }
}

impl Context {
    /// One point, as a gateway of the app_source: waits for room in the
    /// buffer, then for the commit.
    async fn store(&self, location: proto::Location) -> Result<proto::BatchAck, IngestError> {
        let admitted = self.ingestor.admit(&self.caller, 1, WhenFull::Wait)?;
        self.ingestor
            .ingest_admitted(admitted, &self.caller, 0, vec![Ok(location)], CALL)
            .await?
            .resolve()
            .await
    }

    /// Waits before the next try; `false` once locus is stopping.
    async fn hold(&self, backoff: &mut Duration, why: &(dyn std::fmt::Display + Sync)) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        metrics::counter!(MQTT_RETRIED).increment(1);
        if !self.holding.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %why, "MQTT: messages held, unacknowledged, until they can be stored");
        }
        let wait = *backoff;
        *backoff = (*backoff * 2).min(HOLD_MAX);
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    fn released(&self) {
        if self.holding.swap(false, Ordering::Relaxed) {
            tracing::info!("MQTT: messages are being stored again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_read_and_bad_ones_refused_without_the_password() {
        let b = Broker::parse("mqtts://jane:p%40ss%3Aw@broker.example.com").unwrap();
        assert_eq!(
            b,
            Broker {
                host: "broker.example.com".into(),
                port: 8883,
                tls: true,
                credentials: Some(("jane".into(), "p@ss:w".into())),
            }
        );
        assert!(!format!("{b:?}").contains("p@ss"));
        let b = Broker::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("127.0.0.1", 1884, false));
        assert_eq!(b.credentials, None);
        assert_eq!(Broker::parse("mqtt://[::1]").unwrap().host, "::1");
        for (bad, says) in [
            ("tcp://u:secret@host:1883", "scheme"),
            ("http://host", "scheme"),
            ("mqtt://", "host"),
            ("mqtt://host/owntracks", "no path"),
            ("mqtt://:secret@host", "password without a user"),
            ("host:1883", "scheme"),
            ("not a url", "not a URL"),
        ] {
            let e = Broker::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }

    /// mqtts:// makes a rustls client (ring) with webpki's roots at least;
    /// no broker with a certificate those roots vouch for is reachable
    /// here, so the handshake itself is not tested.
    #[test]
    fn mqtts_builds_a_tls_client_with_roots() {
        let config = tls_config(&MqttArgs::default()).expect("a TLS client config");
        assert!(config.crypto_provider().cipher_suites.len() > 1);
        let mut args = MqttArgs {
            mqtt_url: Some("mqtts://u:p@broker.example.com".into()),
            ..MqttArgs::default()
        };
        args.mqtt_client_id = Some("locus-test".into());
        let s = Settings::from_args(&args, &LimitArgs::default())
            .unwrap()
            .unwrap();
        let o = s.options().expect("options with TLS");
        assert_eq!(o.broker_address(), ("broker.example.com".to_string(), 8883));
        assert!(matches!(o.transport(), rumqttc::Transport::Tls(_)));
    }

    #[test]
    fn flags_become_settings_with_the_share_group_and_a_default_client_id() {
        let limits = LimitArgs::default();
        let mut args = MqttArgs::default();
        assert!(Settings::from_args(&args, &limits).unwrap().is_none());
        args.mqtt_url = Some("mqtt://localhost".into());
        let s = Settings::from_args(&args, &limits).unwrap().unwrap();
        assert_eq!(s.filters, ["owntracks/+/+"]);
        assert_eq!(s.app_source, "owntracks");
        assert!(s.client_id.starts_with("locus-"), "{}", s.client_id);
        args.mqtt_share_group = Some("locus".into());
        args.mqtt_topics = vec!["owntracks/+/+".into(), "ot/#".into()];
        let s = Settings::from_args(&args, &limits).unwrap().unwrap();
        assert_eq!(
            s.filters,
            ["$share/locus/owntracks/+/+", "$share/locus/ot/#"]
        );
        for (field, value, says) in [
            ("topics", "owntracks/a+/b", "--mqtt-topics"),
            ("topics", "owntracks/#/x", "--mqtt-topics"),
            ("topics", "$share/g/owntracks/+/+", "--mqtt-topics"),
            ("group", "a/b", "--mqtt-share-group"),
            ("url", "ws://host", "--mqtt-url"),
        ] {
            let mut a = args.clone();
            match field {
                "topics" => a.mqtt_topics = vec![value.into()],
                "group" => a.mqtt_share_group = Some(value.into()),
                _ => a.mqtt_url = Some(value.into()),
            }
            let e = Settings::from_args(&a, &limits).unwrap_err().to_string();
            assert!(e.contains(says), "{value}: {e}");
        }
        args.mqtt_inflight = 0;
        assert!(
            Settings::from_args(&args, &limits)
                .unwrap_err()
                .to_string()
                .contains("--mqtt-inflight")
        );
    }
}
