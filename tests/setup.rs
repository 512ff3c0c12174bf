//! The storage lifecycle on plain PostgreSQL (tier 3): setup, reconcile,
//! adoption, partitions ahead and retention, the hourly rollup and doctor.
//! TimescaleDB tiers are in `tests/timescale.rs`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Device, TestDb, TestServer, config, count_rows, now_secs, now_us, setup_opts};
use locus::storage::{
    SetupError, Tier, adopt, doctor, maintain,
    partitions::{self, DEFAULT_PARTITION},
    setup::{self, SetupOptions},
};
use sqlx::PgPool;

const DAY_US: i64 = 86_400_000_000;

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A fresh database set up with every default, and the time it was set up at.
async fn set_up() -> (TestDb, i64) {
    let db = TestDb::new().await;
    let now = now_us();
    setup::run(&db.url, &setup_opts(), false, now)
        .await
        .unwrap();
    (db, now)
}

#[tokio::test]
async fn setup_from_empty_then_nothing_to_do() {
    let db = TestDb::new().await;
    let dry = setup::run(&db.url, &setup_opts(), true, now_us())
        .await
        .unwrap();
    assert_eq!(dry.tier, Tier::Postgres);
    let printed = dry.to_string();
    assert!(printed.contains("PARTITION BY RANGE (time)"), "{printed}");
    assert!(
        printed.contains("CREATE UNIQUE INDEX location_events_app_source_device_id_time_key ON location_events (app_source, device_id, time DESC)"),
        "{printed}"
    );
    assert!(
        printed.contains("CREATE TABLE location_hourly"),
        "{printed}"
    );
    // 30 days back, today, 7 ahead.
    assert_eq!(
        dry.steps
            .iter()
            .filter(|s| s.description.starts_with("create partition"))
            .count(),
        38
    );
    let pool = db.pool().await;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('location_events') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!exists, "a dry run changes nothing");

    let applied = setup::run(&db.url, &setup_opts(), false, now_us())
        .await
        .unwrap();
    assert_eq!(
        applied.steps, dry.steps,
        "the dry run printed exactly what was applied"
    );
    let again = setup::run(&db.url, &setup_opts(), false, now_us())
        .await
        .unwrap();
    assert!(again.steps.is_empty(), "second run: {again}");
    assert!(again.to_string().contains("nothing to do"));

    // Two days later, the plan is exactly the two new partitions ahead.
    let later = setup::run(&db.url, &setup_opts(), true, now_us() + 2 * DAY_US)
        .await
        .unwrap();
    assert_eq!(later.steps.len(), 2, "{later}");
    assert!(
        later
            .steps
            .iter()
            .all(|s| s.description.starts_with("create partition"))
    );
    db.drop_db().await;
}

#[tokio::test]
async fn two_setups_at_once_do_not_collide() {
    let db = TestDb::new().await;
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move {
                setup::run(&url, &setup_opts(), false, now_us())
                    .await
                    .map(|p| p.steps.len())
            })
        })
        .collect();
    let mut applied = Vec::new();
    for r in runs {
        applied.push(r.await.unwrap().expect("no setup fails"));
    }
    applied.sort();
    assert_eq!(
        applied[..2],
        [0, 0],
        "the lock lets one apply and the others find nothing to do"
    );
    assert!(applied[2] > 0);
    db.drop_db().await;
}

#[tokio::test]
async fn reconcile_after_settings_change() {
    let (db, now) = set_up().await;
    // Longer retention: the partitions for the 30 extra days are made.
    let mut longer = setup_opts();
    longer.storage.raw_retention = Duration::from_secs(60 * 86_400);
    let plan = setup::run(&db.url, &longer, false, now).await.unwrap();
    assert_eq!(plan.steps.len(), 30, "{plan}");
    // A 6-hour interval: new partitions only where none exists, no overlap, no gap.
    let mut finer = longer.clone();
    finer.storage.chunk_interval = Duration::from_secs(6 * 3600);
    finer.storage.partitions_ahead = 40; // 10 days of 6-hour partitions
    let plan = setup::run(&db.url, &finer, false, now).await.unwrap();
    assert!(
        plan.steps.iter().all(|s| s.description.contains("_0000")
            || s.description.contains("_0600")
            || s.description.contains("_1200")
            || s.description.contains("_1800")),
        "{plan}"
    );
    assert!(
        setup::run(&db.url, &finer, false, now)
            .await
            .unwrap()
            .steps
            .is_empty()
    );
    let mut conn = setup::connect(&db.url).await.unwrap();
    let mut ranges: Vec<_> = partitions::list(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| r)
        .collect();
    ranges.sort_by_key(|r| r.start_us);
    assert!(
        ranges.windows(2).all(|p| p[0].end_us == p[1].start_us),
        "contiguous, no overlap"
    );
    db.drop_db().await;
}

/// The seed's layout (004): DECIMAL coordinates, varchar app_source, its own
/// index names, rows in it.
async fn seed_table(pool: &PgPool, rows: i64) {
    exec(
        pool,
        "CREATE TABLE location_events (
           time TIMESTAMPTZ NOT NULL, device_id UUID NOT NULL, user_id UUID NOT NULL,
           app_source VARCHAR(50) NOT NULL, latitude DECIMAL(10, 8) NOT NULL, longitude DECIMAL(11, 8) NOT NULL,
           accuracy DECIMAL(6, 2), altitude DECIMAL(8, 2), speed DECIMAL(6, 2), heading DECIMAL(5, 2), metadata JSONB);
         CREATE INDEX idx_location_device ON location_events (device_id, time DESC);
         CREATE INDEX idx_location_user ON location_events (user_id, time DESC);
         CREATE INDEX idx_location_app ON location_events (app_source, time DESC);",
    )
    .await;
    sqlx::query(
        "INSERT INTO location_events
         SELECT now() - (i || ' minutes')::interval, md5((i % 10)::text)::uuid, md5('u')::uuid, 'mextrack',
                19.43260812 + i * 0.00001, -99.13320845, 5.5, 2240.25, 40.5, 180.25, '{\"seed\": true}'
         FROM generate_series(1, $1) AS i",
    )
    .bind(rows)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn adopts_a_seed_layout_table_with_rows_and_keeps_them() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    seed_table(&pool, 5_000).await;
    // An index whose name needs quoting (renamed, as every old index is, to
    // free its name for the new table).
    exec(
        &pool,
        r#"CREATE INDEX "Idx ""Speed""" ON location_events (speed)"#,
    )
    .await;
    let dry = setup::run(&db.url, &setup_opts(), true, now_us())
        .await
        .unwrap();
    assert!(
        dry.steps[0]
            .description
            .starts_with("adopt the existing location_events"),
        "{dry}"
    );
    assert!(
        dry.steps[0].sql.contains("latitude::double precision"),
        "{dry}"
    );
    setup::run(&db.url, &setup_opts(), false, now_us())
        .await
        .unwrap();

    assert_eq!(count_rows(&pool).await, 5_000);
    let kept: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", adopt::KEPT_AS))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kept, 5_000, "the old table is kept for the operator");
    let renamed: Option<String> =
        sqlx::query_scalar(r#"SELECT to_regclass('"Idx ""Speed""_pre_locus"')::text"#)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(renamed.is_some(), "the quoted index was renamed as itself");
    let (lat_type, lat): (String, f64) = sqlx::query_as(
        "SELECT pg_typeof(latitude)::text, latitude FROM location_events ORDER BY time DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(lat_type, "double precision");
    assert!((lat - 19.43261812).abs() < 1e-9, "{lat}");
    assert!(
        setup::run(&db.url, &setup_opts(), false, now_us())
            .await
            .unwrap()
            .steps
            .is_empty(),
        "adopted for good"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn adoption_refuses_when_rows_would_be_lost() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    seed_table(&pool, 100).await;
    // The same (app_source, device_id, time) twice: locus's unique key
    // would merge them. The same (device_id, time) of another app_source
    // is another point (one phone, two apps), not a repeat.
    exec(
        &pool,
        "INSERT INTO location_events SELECT * FROM location_events LIMIT 1;
         INSERT INTO location_events SELECT time, device_id, user_id, 'pshop', latitude, longitude,
             accuracy, altitude, speed, heading, metadata FROM location_events LIMIT 1",
    )
    .await;
    let err = setup::run(&db.url, &setup_opts(), false, now_us())
        .await
        .unwrap_err();
    assert!(matches!(err, SetupError::Refused(_)), "{err}");
    assert!(err.to_string().contains("1 rows that repeat"), "{err}");
    // A column locus does not keep.
    exec(
        &pool,
        "DELETE FROM location_events WHERE ctid IN (SELECT ctid FROM location_events LIMIT 1)",
    )
    .await;
    exec(
        &pool,
        "ALTER TABLE location_events ADD COLUMN vehicle_plate text",
    )
    .await;
    let err = setup::run(&db.url, &setup_opts(), false, now_us())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("vehicle_plate"), "{err}");
    assert_eq!(count_rows(&pool).await, 101, "nothing was touched");
    db.drop_db().await;
}

#[tokio::test]
async fn a_required_tier_that_is_missing_fails_and_says_why() {
    let db = TestDb::new().await;
    let o = SetupOptions {
        require_tier: Some(Tier::Timescale),
        ..setup_opts()
    };
    let plan = setup::run(&db.url, &setup_opts(), true, now_us())
        .await
        .unwrap();
    if plan.tier != Tier::Postgres {
        println!("skipped: DATABASE_URL has TimescaleDB; this test needs plain PostgreSQL");
        return;
    }
    let err = setup::run(&db.url, &o, false, now_us()).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("Timescale") && msg.contains("timescaledb"),
        "{msg}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn partitions_past_retention_are_dropped_and_defaults_moved() {
    let (db, now) = set_up().await;
    let pool = db.pool().await;
    // A row beyond every partition lands in the default partition...
    exec(&pool, "INSERT INTO location_events (time, device_id, user_id, app_source, latitude, longitude)
                 VALUES (now() + interval '20 days', gen_random_uuid(), gen_random_uuid(), 'x', 1, 1)")
        .await;
    // ...and when that day's partition is made, 13 days later, the row moves into it.
    let plan = setup::run(&db.url, &setup_opts(), false, now + 13 * DAY_US)
        .await
        .unwrap();
    assert!(
        plan.steps
            .iter()
            .any(|s| s.description.contains("move its rows out of the default")),
        "{plan}"
    );
    let in_default: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {DEFAULT_PARTITION}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((in_default, count_rows(&pool).await), (0, 1));

    // Three days on, the three oldest partitions are past retention.
    let mut conn = setup::connect(&db.url).await.unwrap();
    let before = partitions::list(&mut conn).await.unwrap().len();
    let done = maintain::raw_retention(
        &mut conn,
        Tier::Postgres,
        &setup_opts().storage,
        now + 3 * DAY_US,
    )
    .await
    .unwrap();
    assert!(done.starts_with("dropped 3 partitions"), "{done}");
    assert_eq!(partitions::list(&mut conn).await.unwrap().len(), before - 3);
    let cutoff = now + 3 * DAY_US - 30 * DAY_US;
    assert!(
        partitions::list(&mut conn)
            .await
            .unwrap()
            .iter()
            .filter_map(|(_, r)| *r)
            .all(|r| r.end_us > cutoff)
    );
    db.drop_db().await;
}

/// Retention writes names read from the catalog into SQL: a partition
/// named "Archive2020" must be dropped as itself, never as the unrelated
/// table archive2020 that its unquoted name would fold to.
#[tokio::test]
async fn retention_drops_the_partition_it_names_and_no_other() {
    let (db, now) = set_up().await;
    let pool = db.pool().await;
    exec(&pool, "CREATE TABLE archive2020 (note text)").await;
    exec(&pool, "INSERT INTO archive2020 VALUES ('keep me')").await;
    exec(
        &pool,
        r#"CREATE TABLE "Archive2020" PARTITION OF location_events
           FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-01-02 00:00:00+00')"#,
    )
    .await;
    exec(
        &pool,
        r#"CREATE TABLE "odd ""name"" 2019" PARTITION OF location_events
           FOR VALUES FROM ('2019-01-01 00:00:00+00') TO ('2019-01-02 00:00:00+00')"#,
    )
    .await;

    let mut conn = setup::connect(&db.url).await.unwrap();
    let done = maintain::raw_retention(&mut conn, Tier::Postgres, &setup_opts().storage, now)
        .await
        .unwrap();
    assert!(done.starts_with("dropped 2 partitions"), "{done}");
    let exists = |name: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
                .bind(name)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(
        exists("archive2020").await,
        "the unrelated table was dropped"
    );
    assert!(
        !exists(r#""Archive2020""#).await,
        "the old partition is still there"
    );
    assert!(!exists(r#""odd ""name"" 2019""#).await);
    let kept: String = sqlx::query_scalar("SELECT note FROM archive2020")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kept, "keep me");
    db.drop_db().await;
}

async fn hourly_rows(pool: &PgPool, device: uuid::Uuid) -> Vec<(i64, i64, f64, Option<f32>)> {
    sqlx::query_as(
        "SELECT (extract(epoch FROM hour))::int8, point_count, avg_latitude, max_speed FROM location_hourly
         WHERE device_id = $1 ORDER BY hour",
    )
    .bind(device)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_points_recompute_their_hours_and_retention_keeps_the_aggregate() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let pool = db.pool().await;
    // Yesterday, hour-aligned: 600 points, one every 6 s, make exactly one hour.
    let hour = (now_secs() - 86_400) / 3600 * 3600;
    let d = Device::new(hour);
    let mut client = server.client().await;
    let first: Vec<_> = (0..300)
        .map(|i| {
            let mut p = d.point(i * 6);
            p.speed = Some(10.0);
            p
        })
        .collect();
    client
        .write_locations(locus::proto::LocationBatch {
            batch_id: 1,
            locations: first,
        })
        .await
        .unwrap();
    let mut conn = setup::connect(&db.url).await.unwrap();
    maintain::rollup(&mut conn).await.unwrap();
    let rows = hourly_rows(&pool, d.device_id).await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].0, rows[0].1, rows[0].3), (hour, 300, Some(10.0)));

    // The device was offline: the rest of that hour arrives a day late.
    let late: Vec<_> = (300..600)
        .map(|i| {
            let mut p = d.point(i * 6);
            p.speed = Some(50.0);
            p
        })
        .collect();
    client
        .write_locations(locus::proto::LocationBatch {
            batch_id: 2,
            locations: late,
        })
        .await
        .unwrap();
    maintain::rollup(&mut conn).await.unwrap();
    let rows = hourly_rows(&pool, d.device_id).await;
    assert_eq!(
        (rows.len(), rows[0].1, rows[0].3),
        (1, 600, Some(50.0)),
        "the hour was recomputed"
    );
    let raw_avg: f64 =
        sqlx::query_scalar("SELECT avg(latitude) FROM location_events WHERE device_id = $1")
            .bind(d.device_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!((rows[0].2 - raw_avg).abs() < 1e-12);
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM locus_rollup_pending")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 0);

    // 31 days on, retention drops the raw points: the hourly row stays, even
    // when a refresh of that hour runs over the emptied range.
    maintain::raw_retention(
        &mut conn,
        Tier::Postgres,
        &setup_opts().storage,
        now_us() + 31 * DAY_US,
    )
    .await
    .unwrap();
    let raw_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM location_events WHERE device_id = $1")
            .bind(d.device_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(raw_left, 0);
    exec(
        &pool,
        &format!("INSERT INTO locus_rollup_pending VALUES (to_timestamp({hour}))"),
    )
    .await;
    maintain::rollup(&mut conn).await.unwrap();
    assert_eq!(
        hourly_rows(&pool, d.device_id).await[0].1,
        600,
        "the aggregate survives raw retention"
    );
    // And the hourly retention removes it a year later.
    maintain::hourly_retention(&mut conn, &setup_opts().storage, now_us() + 366 * DAY_US)
        .await
        .unwrap();
    assert!(hourly_rows(&pool, d.device_id).await.is_empty());
    server.stop().await;
    db.drop_db().await;
}

/// A database set up before the key held the app_source: setup creates the
/// new key, then drops the old one (the new is strictly weaker, so nothing
/// can fail on the rows); doctor reports the old key until then.
#[tokio::test]
async fn the_old_device_time_key_is_replaced_by_the_app_source_one() {
    let (db, now) = set_up().await;
    let pool = db.pool().await;
    exec(
        &pool,
        "DROP INDEX location_events_app_source_device_id_time_key;
         CREATE UNIQUE INDEX location_events_device_id_time_key ON location_events (device_id, time DESC);
         INSERT INTO location_events (time, device_id, user_id, app_source, latitude, longitude)
         SELECT now() - make_interval(secs => i % 200), md5((i / 200)::text)::uuid, gen_random_uuid(),
                CASE WHEN i % 400 < 200 THEN 'mextrack' ELSE 'pshop' END, 19.4, -99.1
         FROM generate_series(0, 19999) i;
         ANALYZE location_events",
    )
    .await;
    let indexes = || async {
        let mut v: Vec<String> = sqlx::query_scalar(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'location_events' ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        v.sort();
        v
    };
    let old_indexes = indexes().await;
    let new_key = "location_events_app_source_device_id_time_key";
    let old_key = "location_events_device_id_time_key";

    let report = doctor::examine(&db.url, &setup_opts(), now).await.unwrap();
    assert_eq!(report.drift.len(), 2, "{:?}", report.drift);
    assert_eq!(report.drift[0], format!("create index {new_key}"));
    assert!(report.drift[1].starts_with(&format!("drop the old unique key {old_key}")));
    assert!(!report.attention.is_empty());

    let dry = setup::run(&db.url, &setup_opts(), true, now).await.unwrap();
    let printed = dry.to_string();
    let create = printed
        .find(&format!(
            "CREATE UNIQUE INDEX {new_key} ON location_events (app_source, device_id, time DESC);"
        ))
        .unwrap_or_else(|| panic!("{printed}"));
    let drop = printed
        .find(&format!("DROP INDEX {old_key};"))
        .unwrap_or_else(|| panic!("{printed}"));
    assert!(
        create < drop,
        "created before the old one is dropped: {printed}"
    );
    assert_eq!(indexes().await, old_indexes, "a dry run changes nothing");

    let applied = setup::run(&db.url, &setup_opts(), false, now)
        .await
        .unwrap();
    assert_eq!(applied.steps, dry.steps);
    let after = indexes().await;
    assert!(after.iter().any(|i| i == new_key), "{after:?}");
    assert!(!after.iter().any(|i| i == old_key), "{after:?}");
    let report = doctor::examine(&db.url, &setup_opts(), now).await.unwrap();
    assert!(report.drift.is_empty(), "{:?}", report.drift);
    assert!(report.attention.is_empty(), "{:?}", report.attention);
    let again = setup::run(&db.url, &setup_opts(), false, now)
        .await
        .unwrap();
    assert!(again.steps.is_empty(), "{again}");

    // One device id in two apps at one time: two points now.
    let (device, time): (uuid::Uuid, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT device_id, time FROM location_events WHERE app_source = 'mextrack' LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let insert = |app: &'static str| {
        sqlx::query(
            "INSERT INTO location_events (time, device_id, user_id, app_source, latitude, longitude)
             VALUES ($1, $2, gen_random_uuid(), $3, 1, 1) ON CONFLICT DO NOTHING",
        )
        .bind(time)
        .bind(device)
        .bind(app)
    };
    assert_eq!(
        insert("pshop")
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected(),
        1
    );
    assert_eq!(
        insert("mextrack")
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected(),
        0
    );

    // A track is read by the key, not a scan.
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT * FROM location_events
         WHERE app_source = 'mextrack' AND device_id = $1 AND time >= now() - interval '1 hour'
           AND time < now() ORDER BY time LIMIT 1000",
    )
    .bind(device)
    .fetch_all(&pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("Index Scan"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    db.drop_db().await;
}

#[tokio::test]
async fn doctor_reports_a_dropped_index_and_a_stalled_rollup() {
    let (db, now) = set_up().await;
    let report = doctor::examine(&db.url, &setup_opts(), now).await.unwrap();
    assert!(report.attention.is_empty(), "{:?}", report.attention);
    assert_eq!(report.tier, Tier::Postgres);
    assert_eq!(report.raw.chunks, 39);
    assert!(report.compression.is_none());

    let pool = db.pool().await;
    exec(&pool, "DROP INDEX location_events_user_id_time_idx").await;
    exec(&pool, "INSERT INTO locus_rollup_pending VALUES (now())").await;
    let report = doctor::examine(&db.url, &setup_opts(), now).await.unwrap();
    assert_eq!(
        report.drift,
        ["create index location_events_user_id_time_idx"]
    );
    assert!(
        report
            .attention
            .iter()
            .any(|a| a.contains("setup steps are needed")),
        "{:?}",
        report.attention
    );
    assert!(
        report
            .attention
            .iter()
            .any(|a| a.contains("never been refreshed")),
        "{:?}",
        report.attention
    );
    let text = doctor::render(&report);
    assert!(text.contains("ATTENTION"), "{text}");

    // The binary exits non-zero and prints JSON on request.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(["doctor", "--json", "--database-url", &db.url])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["tier"], "postgres");
    assert_eq!(
        json["drift"][0],
        "create index location_events_user_id_time_idx"
    );

    setup::run(&db.url, &setup_opts(), false, now)
        .await
        .unwrap();
    let mut conn = setup::connect(&db.url).await.unwrap();
    maintain::run_all(&mut conn, Tier::Postgres, &setup_opts().storage, now)
        .await
        .unwrap();
    let report = doctor::examine(&db.url, &setup_opts(), now).await.unwrap();
    assert!(report.attention.is_empty(), "{:?}", report.attention);
    assert!(
        report.jobs.iter().all(|j| j.last_ok == Some(true)),
        "{:?}",
        report.jobs
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_outside_every_partition_land_in_the_default_one() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.storage.partitions_ahead = 0;
    cfg.validation.max_future_skew = Duration::from_secs(2 * 86_400); // past today's partition
    let server = TestServer::start(cfg).await;
    let d = Device::new(now_secs() + 86_400 + 60);
    let ack = server
        .client()
        .await
        .write_locations(d.batch(1, 0, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 10);
    let in_default: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {DEFAULT_PARTITION}"))
        .fetch_one(&db.pool().await)
        .await
        .unwrap();
    assert_eq!(in_default, 10);
    server.stop().await;
    db.drop_db().await;
}

/// Instances on one database take turns at the storage jobs: while another
/// session runs them (holds their lock), a run does nothing and says so;
/// once it is done, the next run drops what is past retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_jobs_run_on_one_instance_at_a_time() {
    let db = TestDb::new().await;
    let now = now_us();
    setup::run(&db.url, &setup_opts(), false, now)
        .await
        .unwrap();
    let mut other = setup::connect(&db.url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(maintain::JOBS_LOCK_KEY)
        .execute(&mut other)
        .await
        .unwrap();
    let mut conn = setup::connect(&db.url).await.unwrap();
    let before = partitions::list(&mut conn).await.unwrap().len();
    let later = now + 3 * DAY_US;
    let storage = &setup_opts().storage;
    let turn = maintain::run_all(&mut conn, Tier::Postgres, storage, later).await;
    assert_eq!(turn.unwrap(), maintain::Turn::Busy);
    assert_eq!(
        maintain::rollup_in_turn(&mut conn).await.unwrap(),
        maintain::Turn::Busy
    );
    assert_eq!(partitions::list(&mut conn).await.unwrap().len(), before);
    let busy = std::process::Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(["maintain", "--database-url", &db.url])
        .output()
        .unwrap();
    assert_eq!(busy.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&busy.stdout).contains("another instance is running"));

    // The other instance ends its run.
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(maintain::JOBS_LOCK_KEY)
        .execute(&mut other)
        .await
        .unwrap();
    let turn = maintain::run_all(&mut conn, Tier::Postgres, storage, later).await;
    assert_eq!(turn.unwrap(), maintain::Turn::Ran);
    assert_eq!(partitions::list(&mut conn).await.unwrap().len(), before - 3);
    db.drop_db().await;
}
