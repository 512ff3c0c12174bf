//! The query API over HTTP JSON, its errors, the SSE live feed, and the
//! OpenAPI document checked against what the server really answers.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Device, TestDb, TestServer, config, conforms, get_json as get, now_secs};
use futures::StreamExt;
use locus::{
    location::json::rfc3339,
    storage::{maintain, setup},
};
use serde_json::Value;

/// `field` of every location of every page of `path` (which ends in a
/// query parameter), following next_cursor, and how many pages; each page
/// checked against `schema` of the OpenAPI document.
async fn walk(
    server: &TestServer,
    doc: &Value,
    (schema, field): (&str, &str),
    path: &str,
) -> (Vec<String>, usize) {
    let (mut values, mut pages, mut cursor) = (Vec::new(), 0, String::new());
    loop {
        let (status, page) = get(server, &format!("{path}{cursor}").replace('+', "%2B")).await;
        assert_eq!(status, 200, "{page}");
        conforms(doc, schema, &page);
        pages += 1;
        values.extend(
            page["locations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l[field].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return (values, pages),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_queries_answer_json_and_match_the_openapi_document() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let hour = (now_secs() - 7_200) / 3600 * 3600;
    let d = Device::new(hour);
    server
        .client()
        .await
        .write_locations(d.batch(1, 0, 250))
        .await
        .unwrap();
    let mut conn = setup::connect(&db.url).await.unwrap();
    maintain::rollup(&mut conn).await.unwrap();
    let (_, doc) = get(&server, "/v1/openapi.json").await;
    let mut paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/v1/devices/{device_id}/latest",
            "/v1/devices/{device_id}/track",
            "/v1/latest",
            "/v1/live",
            "/v1/locations",
            "/v1/stats/hourly"
        ]
    );

    let (status, latest) = get(
        &server,
        &format!("/v1/devices/{}/latest?app_source=mextrack", d.device_id),
    )
    .await;
    assert_eq!(status, 200, "{latest}");
    assert_eq!(latest["time"], rfc3339((hour + 249) * 1_000_000 + 250_000));
    conforms(&doc, "LocationJson", &latest);
    let (_, by_app) = get(&server, "/v1/latest?app_source=mextrack").await;
    assert_eq!(by_app["locations"].as_array().unwrap().len(), 1);
    assert!(by_app.get("next_cursor").is_none(), "{by_app}");
    conforms(&doc, "LatestJson", &by_app);

    // An app's devices in pages of 2, in device_id order: 6 devices, 3 pages.
    let others: Vec<Device> = (0..5).map(|_| Device::new(hour)).collect();
    for o in &others {
        server
            .client()
            .await
            .write_locations(o.batch(1, 0, 1))
            .await
            .unwrap();
    }
    let mut want: Vec<String> = others
        .iter()
        .chain([&d])
        .map(|d| d.device_id.to_string())
        .collect();
    want.sort();
    let (seen, pages) = walk(
        &server,
        &doc,
        ("LatestJson", "device_id"),
        "/v1/latest?app_source=mextrack&limit=2",
    )
    .await;
    assert_eq!((seen, pages), (want, 3));

    // Pages of 100 over the 250 points: 100, 100, 50, no repeats.
    let (from, to) = (
        rfc3339(hour * 1_000_000),
        rfc3339((hour + 3600) * 1_000_000),
    );
    let (times, pages) = walk(
        &server,
        &doc,
        ("TrackJson", "time"),
        &format!(
            "/v1/devices/{}/track?app_source=mextrack&from={from}&to={to}&limit=100",
            d.device_id
        ),
    )
    .await;
    assert_eq!((times.len(), pages), (250, 3));
    assert!(times.windows(2).all(|w| w[0] < w[1]), "in time order");

    let (status, stats) = get(
        &server,
        &format!(
            "/v1/stats/hourly?device_id={}&app_source=mextrack&from={from}&to={to}",
            d.device_id
        )
        .replace('+', "%2B"),
    )
    .await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["hours"][0]["point_count"], 250);
    assert_eq!(stats["hours"][0]["hour"], rfc3339(hour * 1_000_000));
    assert_eq!(
        stats["hours"][0]["first_event"],
        rfc3339(hour * 1_000_000 + 250_000)
    );
    assert_eq!(
        stats["hours"][0]["last_event"],
        rfc3339((hour + 249) * 1_000_000 + 250_000)
    );
    conforms(&doc, "HourlyJson", &stats);
    conforms(&doc, "HourJson", &stats["hours"][0]);

    // Errors: JSON with a stable code.
    let unknown = uuid::Uuid::new_v4();
    for (path, want, code) in [
        (
            format!("/v1/devices/{unknown}/latest?app_source=mextrack"),
            404,
            "not_found",
        ),
        // Of another app_source: as unknown.
        (
            format!("/v1/devices/{}/latest?app_source=pshop", d.device_id),
            404,
            "not_found",
        ),
        // An admin (authentication is off) names the device's app_source.
        (
            format!("/v1/devices/{}/latest", d.device_id),
            400,
            "invalid_argument",
        ),
        (
            format!("/v1/devices/{}/track?from={from}&to={to}", d.device_id),
            400,
            "invalid_argument",
        ),
        (
            format!("/v1/latest?device_ids={}", d.device_id),
            400,
            "invalid_argument",
        ),
        (
            format!(
                "/v1/stats/hourly?device_id={}&from={from}&to={to}",
                d.device_id
            ),
            400,
            "invalid_argument",
        ),
        (
            format!("/v1/devices/{}/latest", "truck-7"),
            400,
            "invalid_argument",
        ),
        (
            format!(
                "/v1/devices/{}/track?app_source=mextrack&from={to}&to={from}",
                d.device_id
            ),
            400,
            "invalid_argument",
        ),
        (
            format!(
                "/v1/devices/{}/track?app_source=mextrack&from=yesterday&to={to}",
                d.device_id
            ),
            400,
            "invalid_argument",
        ),
        (
            format!(
                "/v1/devices/{}/track?app_source=mextrack&from={from}&to={to}&cursor=zzz",
                d.device_id
            ),
            400,
            "invalid_argument",
        ),
        (
            "/v1/stats/hourly?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z".to_string(),
            400,
            "invalid_argument",
        ),
        ("/v1/latest".to_string(), 400, "invalid_argument"),
        (
            "/v1/latest?app_source=mextrack&cursor=zzz".to_string(),
            400,
            "invalid_argument",
        ),
        (
            "/v1/latest?app_source=mextrack&limit=ten".to_string(),
            400,
            "invalid_argument",
        ),
    ] {
        let (status, body) = get(&server, &path.replace('+', "%2B")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str().unwrap()),
            (want, code),
            "{path}: {body}"
        );
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
        conforms(&doc, "ErrorJson", &body);
    }
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sse_live_feed_carries_points_as_they_commit() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let d = Device::new(now_secs() - 100);
    let resp = reqwest::get(format!(
        "http://{}/v1/live?app_source=mextrack&bbox=-90,-180,90,180",
        server.http
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    server
        .client()
        .await
        .write_locations(d.batch(1, 0, 3))
        .await
        .unwrap();
    let mut text = String::new();
    while text.matches("event: location").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let first = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let first: Value = serde_json::from_str(first).unwrap();
    assert_eq!(first["device_id"], d.device_id.to_string());
    let (status, body) = {
        let r = reqwest::get(format!("http://{}/v1/live?bbox=1,2,3", server.http))
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    server.stop().await;
    db.drop_db().await;
}
