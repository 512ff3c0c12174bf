//! `locus-bench --suite track`: a day's track page (8,640 points, one every
//! 10 s, 5% with metadata) in process, in its parts: the query with its
//! rows read into locations (`query::track::track`, against the database),
//! the answer built as locus builds it (each point encoded straight into
//! one buffer, `LocationPage`) and as it did before (a `proto::Location`
//! each, encoded by prost), and the answer decoded as a client does. What the queries suite times on top of these is the
//! answer's way through gRPC.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use locus::{
    auth::Auth,
    config::{QueryArgs, StorageArgs},
    location::SELECT_COLUMNS,
    query::{
        QueryState,
        encoded::{LocationPage, to_proto},
        track::{TrackRequest, track},
    },
    storage::setup::{self, SetupOptions},
};
use prost::Message;

use crate::queries::ProstPage;
use sqlx::PgPool;
use uuid::Uuid;

const CALLS: usize = 50;

pub async fn run(url: &str) -> anyhow::Result<()> {
    let now_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64;
    let opts = SetupOptions {
        storage: StorageArgs::default(),
        require_tier: None,
    };
    setup::run(url, &opts, false, now_us).await?;
    let pool = PgPool::connect(url).await?;
    let device = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO location_events (time, device_id, user_id, app_source, latitude, longitude,
             accuracy, altitude, speed, heading, metadata)
         SELECT now() - interval '1 day' + i * interval '10 seconds', $1, $2, 'mextrack',
             19.4 + i * 1e-5, -99.1 + i * 1e-5, 5, 2240, 30, 90,
             CASE WHEN i % 20 = 0 THEN '{\"battery\": 0.8}'::jsonb END
         FROM generate_series(0, 8639) i",
    )
    .bind(device)
    .bind(Uuid::new_v4())
    .execute(&pool)
    .await?;
    // As autovacuum would have by the time a dashboard asks.
    sqlx::query("ANALYZE location_events")
        .execute(&pool)
        .await?;
    let state = QueryState::new(pool.clone(), QueryArgs::default(), Auth::disabled());
    state.latest.load(&pool).await?;
    // Authentication off: the caller is the anonymous admin.
    let caller = state.auth.authenticate(None, None).await?;

    let (mut query, mut prost, mut direct, mut decode) = (vec![], vec![], vec![], vec![]);
    let mut fetched = vec![];
    let sql = format!(
        "SELECT {SELECT_COLUMNS} FROM location_events
         WHERE app_source = 'mextrack' AND device_id = $1 AND time >= $2 AND time < $3
         ORDER BY time LIMIT 10001"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut bytes = 0;
    for _ in 0..CALLS {
        let t = Instant::now();
        let rows = sqlx::query(&sql)
            .bind(device)
            .bind(chrono::DateTime::from_timestamp_micros(
                now_us - 2 * 86_400_000_000,
            ))
            .bind(chrono::DateTime::from_timestamp_micros(now_us + 1))
            .fetch_all(&pool)
            .await?;
        fetched.push(ms(t.elapsed()));
        anyhow::ensure!(rows.len() == 8_640);

        let t = Instant::now();
        let page = track(
            &state,
            &caller,
            TrackRequest {
                device_id: &device.to_string(),
                app_source: "mextrack",
                from_us: Ok(now_us - 2 * 86_400_000_000),
                to_us: Ok(now_us + 1),
                limit: Ok(Some(10_000)),
                cursor: None,
            },
        )
        .await?;
        query.push(ms(t.elapsed()));
        anyhow::ensure!(page.points.len() == 8_640, "{} points", page.points.len());

        let t = Instant::now();
        let answer = LocationPage {
            locations: page.points.iter().collect(),
            next_cursor: String::new(),
        }
        .encode_to_vec();
        direct.push(ms(t.elapsed()));

        let t = Instant::now();
        let wire = ProstPage {
            locations: page.points.into_iter().map(to_proto).collect(),
            next_cursor: String::new(),
        }
        .encode_to_vec();
        prost.push(ms(t.elapsed()));
        anyhow::ensure!(wire == answer, "the two answers differ");
        bytes = wire.len();

        let t = Instant::now();
        let back = ProstPage::decode(wire.as_slice())?;
        decode.push(ms(t.elapsed()));
        anyhow::ensure!(back.locations.len() == 8_640);
    }
    println!(
        "A day's track page (8,640 points, {bytes} bytes as protobuf) in process, {CALLS} calls:"
    );
    println!();
    println!("| part | p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    for (part, v) in [
        ("the query's rows fetched, not read", fetched),
        ("query and rows read (`track`)", query),
        (
            "answer: each point encoded into one buffer (as locus does)",
            direct,
        ),
        (
            "answer: a proto::Location each, encoded by prost (locus before 2026-12-03)",
            prost,
        ),
        ("the client's decoding", decode),
    ] {
        let (p50, p99) = crate::queries::p50_p99(v);
        println!("| {part} | {p50:.3} | {p99:.3} |");
    }
    Ok(())
}
