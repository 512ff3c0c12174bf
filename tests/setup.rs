//! `locus setup` on plain PostgreSQL, and on TimescaleDB when
//! `TIMESCALEDB_URL` points at one.

mod common;

use std::time::Duration;

use common::{Device, TestDb, TestServer, config, count_rows, now_secs};
use locus::{
    config::StorageArgs,
    ingest::unix_micros,
    storage::setup::{self, SetupError, SetupOptions, Tier},
};

const DAY_US: i64 = 86_400_000_000;

fn opts() -> SetupOptions {
    SetupOptions {
        storage: StorageArgs::default(),
        require_tier: None,
    }
}

fn now_us() -> i64 {
    unix_micros(std::time::SystemTime::now())
}

#[tokio::test]
async fn setup_from_empty_then_nothing_to_do() {
    let db = TestDb::new().await;
    let mut conn = setup::connect(&db.url).await.unwrap();

    let dry = setup::run(&mut conn, &opts(), true, now_us())
        .await
        .unwrap();
    assert_eq!(dry.tier, Tier::Postgres);
    let printed = dry.to_string();
    assert!(printed.contains("PARTITION BY RANGE (time)"), "{printed}");
    assert!(
        printed.contains("CREATE UNIQUE INDEX location_events_device_id_time_key"),
        "{printed}"
    );
    // 30 days back, today, 7 ahead, and the default partition.
    assert_eq!(
        dry.steps
            .iter()
            .filter(|s| s.description.starts_with("create partition"))
            .count(),
        38
    );
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('location_events') IS NOT NULL")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "a dry run changes nothing");

    let applied = setup::run(&mut conn, &opts(), false, now_us())
        .await
        .unwrap();
    assert_eq!(
        applied.steps, dry.steps,
        "the dry run printed exactly what was applied"
    );
    let again = setup::run(&mut conn, &opts(), false, now_us())
        .await
        .unwrap();
    assert!(again.steps.is_empty(), "second run: {again}");
    assert!(again.to_string().contains("nothing to do"));

    // Two days later, the plan is exactly the two new partitions ahead.
    let later = setup::run(&mut conn, &opts(), true, now_us() + 2 * DAY_US)
        .await
        .unwrap();
    assert_eq!(later.steps.len(), 2, "{later}");
    assert!(
        later
            .steps
            .iter()
            .all(|s| s.description.starts_with("create partition"))
    );
    drop(conn);
    db.drop_db().await;
}

#[tokio::test]
async fn two_setups_at_once_do_not_collide() {
    let db = TestDb::new().await;
    let runs = (0..3).map(|_| {
        let url = db.url.clone();
        tokio::spawn(async move {
            let mut conn = setup::connect(&url).await.unwrap();
            setup::run(&mut conn, &opts(), false, now_us())
                .await
                .map(|p| p.steps.len())
        })
    });
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
async fn setup_refuses_to_touch_a_table_it_cannot_adopt() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    sqlx::query(
        "CREATE TABLE location_events (time timestamptz NOT NULL, device_id uuid NOT NULL, user_id uuid NOT NULL,
           app_source varchar(50) NOT NULL, latitude decimal(10,8) NOT NULL, longitude decimal(11,8) NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO location_events VALUES (now(), gen_random_uuid(), gen_random_uuid(), 'mextrack', 19.4, -99.1)")
        .execute(&pool)
        .await
        .unwrap();
    let mut conn = setup::connect(&db.url).await.unwrap();
    let err = setup::run(&mut conn, &opts(), false, now_us())
        .await
        .unwrap_err();
    assert!(matches!(err, SetupError::Refused(_)), "{err}");
    assert!(err.to_string().contains("will not touch it"), "{err}");
    assert_eq!(count_rows(&pool).await, 1, "the rows are still there");
    drop(conn);
    db.drop_db().await;
}

#[tokio::test]
async fn a_required_tier_that_is_missing_fails_and_says_why() {
    let db = TestDb::new().await;
    let mut conn = setup::connect(&db.url).await.unwrap();
    let plan = setup::plan(&mut conn, &opts(), now_us()).await.unwrap();
    if plan.tier != Tier::Postgres {
        println!("skipped: DATABASE_URL has TimescaleDB; this test needs plain PostgreSQL");
        return;
    }
    let o = SetupOptions {
        require_tier: Some(Tier::Timescale),
        ..opts()
    };
    let err = setup::run(&mut conn, &o, false, now_us())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("Timescale") && msg.contains("timescaledb"),
        "{msg}"
    );
    drop(conn);
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
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM location_events_default")
        .fetch_one(&db.pool().await)
        .await
        .unwrap();
    assert_eq!(in_default, 10);
    server.stop().await;
    db.drop_db().await;
}

/// TimescaleDB tiers: run only where `TIMESCALEDB_URL` names a server with
/// timescaledb preloaded (an admin URL, like DATABASE_URL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescaledb_setup_makes_a_hypertable_and_ingest_works() {
    let Ok(admin) = std::env::var("TIMESCALEDB_URL") else {
        println!(
            "skipped: TIMESCALEDB_URL is not set, so the TimescaleDB tiers are not tested here"
        );
        return;
    };
    let db = TestDb::on(&admin).await;
    let mut conn = setup::connect(&db.url).await.unwrap();
    let plan = setup::run(&mut conn, &opts(), false, now_us())
        .await
        .unwrap();
    assert!(plan.tier.is_timescale(), "{plan}");
    let interval: i64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM time_interval))::int8 FROM timescaledb_information.dimensions
         WHERE hypertable_name = 'location_events'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(interval, 86_400);
    assert!(
        setup::run(&mut conn, &opts(), false, now_us())
            .await
            .unwrap()
            .steps
            .is_empty()
    );

    let server = TestServer::start(config(&db)).await;
    let d = Device::new(now_secs() - 3 * 86_400);
    let mut client = server.client().await;
    let ack = client
        .write_locations(d.batch(1, 0, 1_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 1_000);
    let ack = client
        .write_locations(d.batch(2, 500, 1_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.accepted, ack.duplicates), (500, 500));
    assert_eq!(count_rows(&db.pool().await).await, 1_500);
    server.stop().await;
    drop(conn);
    db.drop_db().await;
}
