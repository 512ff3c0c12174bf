//! locus: GPS telemetry ingestion into PostgreSQL and TimescaleDB.
//!
//! A point travels: receive ([`ingest`]), validate ([`ingest::validate`]),
//! batch ([`pipeline::batcher`]), encode for COPY ([`pipeline::copy_encoder`]),
//! write ([`pipeline::writer`]) and acknowledge. The point itself, as
//! every stage sees it, is [`location`]: its type, its columns, how a SQL
//! row is read back into one, its JSON forms and the reasons a point is
//! rejected; it reaches up into no stage. The schema is owned by
//! [`storage`].
//!
//! Once committed, a point reaches the reads ([`query`]): the newest
//! position of its device ([`query::latest`], read a page at a time) and
//! the live feed's subscribers ([`query::live`]). Who may write and read
//! is [`auth`]'s, and for reads it is decided in the shared query logic,
//! whatever the transport. Every error becomes a gRPC status or an HTTP
//! answer in [`status`]. The HTTP listeners are served by [`http_server`],
//! with certificates loaded by [`tls`]; the HTTP API is described by
//! [`openapi`]; the console, pages in the browser that read that API, is
//! [`console`]. Several instances share the latest map and the live feed
//! through NATS JetStream in [`cluster`] (with `--nats-url`).

#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod connections;
pub mod console;
pub mod health;
pub mod http_server;
pub mod ingest;
pub mod ingest_log;
pub mod location;
pub mod metrics;
pub mod openapi;
pub mod pipeline;
pub mod proto;
pub mod query;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod storage;
pub mod tls;
pub mod trackers;
