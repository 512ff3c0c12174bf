//! A committed batch as it travels between instances: one NATS message per
//! app_source of a flush, on the subject `<prefix>.<app_source>` (each '.'
//! of the app_source written '~', so that an app is one subject token and
//! `<prefix>.*` is every app), holding the newly stored rows as they were
//! committed: PostgreSQL binary COPY tuples of `location::COLUMNS`, one
//! after another, without COPY's header or trailer. Headers name the
//! instance that committed them, the format and the count of points.
//!
//! A message on `<prefix>.control.resync` holds no points: its instance
//! could not publish some batches it committed, and every other instance
//! refills its view from the database.

use std::ops::Range;

use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};

use crate::pipeline::{PointKey, Submission, copy_encoder};

/// The instance that committed the batch (a UUID, new at each start).
pub const INSTANCE: &str = "Locus-Instance";
/// What the payload is; a message with another format is skipped.
pub const FORMAT: &str = "Locus-Format";
/// The payload's format: rows of binary COPY, in the order of
/// `location::COLUMNS`.
pub const ROWS_FORMAT: &str = "pgcopy-rows/1";
/// How many points the message holds.
pub const POINTS: &str = "Locus-Points";
/// JetStream's own header: a message published twice (a retry after a
/// lost acknowledgement) is stored once.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Bytes kept free in a message for its subject and headers.
const HEADROOM: usize = 1024;

/// The subject of `app_source`'s batches.
pub fn subject(prefix: &str, app_source: &str) -> String {
    format!("{prefix}.{}", app_source.replace('.', "~"))
}

/// The subject of the resync message.
pub fn resync_subject(prefix: &str) -> String {
    format!("{prefix}.control.resync")
}

/// The subjects the stream holds.
pub fn stream_subjects(prefix: &str) -> Vec<String> {
    vec![format!("{prefix}.>")]
}

/// A message to publish, without the headers the publisher adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    pub payload: Bytes,
    pub points: u32,
}

/// The newly stored rows of a committed flush (`inserted`: the keys newly
/// stored, `None` when all were), grouped by app_source into messages of
/// at most `max_payload` bytes.
pub fn batches(
    subs: &[Submission],
    inserted: Option<&foldhash::HashSet<PointKey>>,
    prefix: &str,
    max_payload: usize,
) -> Vec<Outgoing> {
    let rows = subs.iter().flat_map(|s| {
        s.rows()
            .filter(|(_, key)| inserted.is_none_or(|i| i.contains(*key)))
            .map(|(range, key)| (&s.rows[range], &*key.0))
    });
    grouped(rows, |app| subject(prefix, app), max_payload)
}

/// Rows grouped by a key of each (its subject is `subject(key)`), in their
/// order within a group, into messages of at most `max_payload` bytes.
/// Each message's buffer is sized before its rows are copied in: growing
/// it row by row cost more than the copy itself. `rows` is gone through
/// twice (collecting it instead cost as much again).
pub fn grouped<'a, K: PartialEq + Copy>(
    rows: impl Iterator<Item = (&'a [u8], K)> + Clone,
    subject: impl Fn(K) -> String,
    max_payload: usize,
) -> Vec<Outgoing> {
    let limit = max_payload.saturating_sub(HEADROOM).max(1);
    // Rows hold one key or a few: short lists beat maps. Of each key: its
    // bytes not yet copied, and its open message (buffer, points).
    let mut left: Vec<(K, usize)> = Vec::new();
    for (row, key) in rows.clone() {
        match left.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += row.len(),
            None => left.push((key, row.len())),
        }
    }
    let mut open: Vec<(BytesMut, u32)> = left.iter().map(|_| (BytesMut::new(), 0)).collect();
    let mut done = Vec::new();
    for (row, key) in rows {
        let i = left
            .iter()
            .position(|(k, _)| *k == key)
            .expect("every key counted above");
        let (buf, n) = &mut open[i];
        if *n > 0 && buf.len() + row.len() > limit {
            done.push(Outgoing {
                subject: subject(key),
                payload: buf.split().freeze(),
                points: std::mem::take(n),
            });
        }
        if *n == 0 {
            buf.reserve(left[i].1.min(limit).max(row.len()));
        }
        buf.extend_from_slice(row);
        left[i].1 -= row.len();
        *n += 1;
    }
    done.extend(left.into_iter().zip(open).filter(|(_, (_, n))| *n > 0).map(
        |((key, _), (buf, n))| Outgoing {
            subject: subject(key),
            payload: buf.freeze(),
            points: n,
        },
    ));
    done
}

/// The headers of a message of `instance`'s, its `serial`th.
pub fn headers(instance: &str, serial: u64, points: Option<u32>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(INSTANCE, instance);
    h.insert(MSG_ID, format!("{instance}-{serial}").as_str());
    if let Some(points) = points {
        h.insert(FORMAT, ROWS_FORMAT);
        h.insert(POINTS, points.to_string().as_str());
    }
    h
}

/// A message read from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Rows committed by `instance`, each row's range in `rows`.
    Batch {
        instance: String,
        rows: Bytes,
        ranges: Vec<Range<u32>>,
    },
    /// `instance` lost some of its batches: refill from the database.
    Resync { instance: String },
    /// Not a message of locus's: why.
    Unreadable(&'static str),
}

/// The instance that published a message, read from its headers alone.
pub fn sender(headers: Option<&HeaderMap>) -> Option<&str> {
    headers.and_then(|h| h.get(INSTANCE)).map(|v| v.as_str())
}

/// Whether a message holds rows, by its headers alone.
pub fn holds_rows(headers: Option<&HeaderMap>) -> bool {
    headers.and_then(|h| h.get(FORMAT)).map(|v| v.as_str()) == Some(ROWS_FORMAT)
}

/// Reads a message of the stream.
pub fn read(subject: &str, prefix: &str, headers: Option<&HeaderMap>, payload: Bytes) -> Incoming {
    let Some(instance) = sender(headers).map(str::to_string) else {
        return Incoming::Unreadable("no Locus-Instance header");
    };
    if subject == resync_subject(prefix) {
        return Incoming::Resync { instance };
    }
    if !holds_rows(headers) {
        return Incoming::Unreadable("not of the format pgcopy-rows/1");
    }
    match copy_encoder::split_rows(&payload) {
        Some(ranges) => Incoming::Batch {
            instance,
            rows: payload,
            ranges,
        },
        None => Incoming::Unreadable("rows that do not read back as locations"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::oneshot;
    use uuid::Uuid;

    use super::*;
    use crate::{location::ValidLocation, pipeline::Budget};

    fn submission(points: &[(&str, i64)]) -> Submission {
        let mut rows = BytesMut::new();
        let mut keys = Vec::new();
        let mut row_ends = Vec::new();
        for (app, t) in points {
            let loc = ValidLocation {
                app_source: app.to_string(),
                time_us: *t,
                device_id: Uuid::from_u128(7),
                ..ValidLocation::example()
            };
            copy_encoder::encode_row(&mut rows, &loc);
            keys.push((Arc::from(*app), loc.device_id, *t));
            row_ends.push(rows.len() as u32);
        }
        let budget = Budget::new(1_000, 1 << 20);
        Submission {
            rows: rows.freeze(),
            keys,
            row_ends,
            reply: oneshot::channel().0,
            reservation: budget
                .try_reserve(points.len(), 0)
                .expect("room in a new budget"),
        }
    }

    fn times(m: &Outgoing) -> Vec<i64> {
        match read(
            &m.subject,
            "p",
            Some(&headers("i", 1, Some(m.points))),
            m.payload.clone(),
        ) {
            Incoming::Batch { rows, ranges, .. } => ranges
                .iter()
                .map(|r| {
                    copy_encoder::decode_row(&rows[r.start as usize..r.end as usize])
                        .expect("a row")
                        .time_us
                })
                .collect(),
            other => panic!("not a batch: {other:?}"),
        }
    }

    /// Rows go out grouped by app, only those newly stored, each app on a
    /// subject of one token, and read back as they were.
    #[test]
    fn batches_group_new_rows_by_app_and_read_back() {
        let subs = [
            submission(&[("a.b", 1), ("c", 2), ("a.b", 3)]),
            submission(&[("c", 4)]),
        ];
        let inserted: foldhash::HashSet<PointKey> = subs
            .iter()
            .flat_map(|s| s.keys.iter().cloned())
            .filter(|k| k.2 != 3)
            .collect();
        let out = batches(&subs, Some(&inserted), "p", 1 << 20);
        assert_eq!(
            out.iter()
                .map(|m| (m.subject.as_str(), m.points))
                .collect::<Vec<_>>(),
            [("p.a~b", 1), ("p.c", 2)]
        );
        assert_eq!(times(&out[0]), [1]);
        assert_eq!(times(&out[1]), [2, 4]);
        let all = batches(&subs, None, "p", 1 << 20);
        assert_eq!(times(&all[0]), [1, 3]);
    }

    /// A flush larger than a message is cut at row boundaries.
    #[test]
    fn batches_fit_the_servers_largest_message() {
        let points: Vec<(&str, i64)> = (0..100).map(|t| ("a", t)).collect();
        let subs = [submission(&points)];
        let row = subs[0].row_ends[0] as usize;
        let out = batches(&subs, None, "p", HEADROOM + 10 * row);
        assert_eq!(out.len(), 10);
        assert!(
            out.iter()
                .all(|m| m.points == 10 && m.payload.len() == 10 * row)
        );
        assert_eq!(
            out.iter().flat_map(times).collect::<Vec<_>>(),
            (0..100).collect::<Vec<_>>()
        );
    }

    #[test]
    fn what_is_not_a_batch_is_unreadable() {
        let m = &batches(&[submission(&[("a", 1)])], None, "p", 1 << 20)[0];
        assert!(matches!(
            read(&m.subject, "p", None, m.payload.clone()),
            Incoming::Unreadable(_)
        ));
        assert!(matches!(
            read(
                &m.subject,
                "p",
                Some(&headers("i", 1, None)),
                m.payload.clone()
            ),
            Incoming::Unreadable(_)
        ));
        let cut = m.payload.slice(..m.payload.len() - 1);
        assert!(matches!(
            read(&m.subject, "p", Some(&headers("i", 1, Some(1))), cut),
            Incoming::Unreadable(_)
        ));
        assert_eq!(
            read(
                "p.control.resync",
                "p",
                Some(&headers("i", 2, None)),
                Bytes::new()
            ),
            Incoming::Resync {
                instance: "i".into()
            }
        );
    }
}
