//! The `locus` binary as a new user meets it: a database that does not
//! exist yet, and `--database-url` wherever it is typed.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::process::{Command, Output};

use common::{TestDb, TestServer, admin_url, config};
use sqlx::{Connection, PgConnection};

fn locus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A URL naming a database that the server does not have: a test
/// database's name, dropped again.
async fn missing_database() -> TestDb {
    let db = TestDb::new().await;
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::Executor::execute(
        &mut admin,
        format!("DROP DATABASE {} WITH (FORCE)", db.name).as_str(),
    )
    .await
    .unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_is_said_once_with_what_to_do() {
    let db = missing_database().await;
    let serve = locus(&[
        "serve",
        "--database-url",
        &db.url,
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    for out in [serve, locus(&["setup", "--database-url", &db.url])] {
        assert!(!out.status.success());
        let err = stderr(&out);
        assert_eq!(err.matches("does not exist").count(), 1, "{err}");
        assert_eq!(err.lines().count(), 1, "said once: {err}");
        assert!(err.contains("createdb -h "), "{err}");
        assert!(
            err.contains(&db.name) && err.contains("--create-database"),
            "{err}"
        );
    }

    // `setup --create-database` makes it, says so, and sets it up.
    let made = locus(&["setup", "--create-database", "--database-url", &db.url]);
    assert!(made.status.success(), "{}", stderr(&made));
    let out = String::from_utf8_lossy(&made.stdout);
    assert!(
        out.contains(&format!("created database \"{}\"", db.name)),
        "{out}"
    );
    let again = locus(&["setup", "--create-database", "--database-url", &db.url]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to do"),
        "{again:?}"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_creates_a_missing_database_when_asked() {
    let db = missing_database().await;
    let mut c = config(&db);
    c.create_database = true;
    let server = TestServer::start(c).await;
    let ack = server
        .client()
        .await
        .write_locations(common::Device::new(common::now_secs() - 60).batch(1, 0, 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 5);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_url_is_taken_wherever_it_is_typed() {
    let db = TestDb::new().await;
    let url = db.url.as_str();
    assert!(locus(&["setup", "--database-url", url]).status.success());
    let create = |at_end: bool| {
        let mut args = vec!["token"];
        if !at_end {
            args.extend(["--database-url", url]);
        }
        args.extend(["create", "--name", "ops", "--role", "admin"]);
        if at_end {
            args.extend(["--database-url", url]);
        }
        locus(&args)
    };
    for at_end in [true, false] {
        let made = create(at_end);
        assert!(made.status.success(), "{}", stderr(&made));
    }
    for args in [
        vec!["token", "list", "--database-url", url],
        vec!["token", "--database-url", url, "list"],
        vec!["doctor", "--database-url", url],
        vec!["maintain", "--database-url", url],
        vec!["setup", "--dry-run", "--database-url", url],
    ] {
        let out = locus(&args);
        let err = stderr(&out);
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
        if args[0] == "token" {
            assert!(out.status.success(), "{args:?}: {err}");
            let list = String::from_utf8_lossy(&out.stdout);
            assert_eq!(list.matches("ops").count(), 2, "{list}");
        }
    }
    let none = locus(&["token", "list"]);
    assert!(!none.status.success());
    assert!(stderr(&none).contains("give --database-url URL or set DATABASE_URL"));
    db.drop_db().await;
}
