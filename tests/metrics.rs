//! `/metrics` serves Prometheus text with the ingest metrics, and no label
//! whose cardinality grows with the fleet.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{Device, TestDb, TestServer, config, now_secs, scrape};
use locus::metrics::{
    ACK_LATENCY, BATCH_ROWS, BATCHES_FLUSHED, BUFFER_POINTS, FLUSH_DURATION, POINTS_ACCEPTED,
    POINTS_DUPLICATE, POINTS_RECEIVED, POINTS_REJECTED,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let d = Device::new(now_secs() - 100);
    let mut batch = d.batch(1, 0, 10);
    batch.locations[3].latitude = 100.0;
    let mut client = server.client().await;
    client.write_locations(batch.clone()).await.unwrap();
    client.write_locations(batch).await.unwrap(); // all duplicates now

    let text = scrape(&server).await;
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
    };
    assert_eq!(value(&format!("{} ", POINTS_RECEIVED)), 20.0);
    assert_eq!(value(&format!("{} ", POINTS_ACCEPTED)), 9.0);
    assert_eq!(value(&format!("{} ", POINTS_DUPLICATE)), 9.0);
    assert_eq!(
        value(&format!(
            "{}{{reason=\"latitude_out_of_range\"}}",
            POINTS_REJECTED
        )),
        2.0
    );
    assert_eq!(value(&format!("{}{{path=\"copy\"}}", BATCHES_FLUSHED)), 1.0);
    assert_eq!(
        value(&format!("{}{{path=\"dedup\"}}", BATCHES_FLUSHED)),
        1.0
    );
    assert_eq!(value(&format!("{}_count", BATCH_ROWS)), 2.0);
    assert_eq!(value(&format!("{}_count", FLUSH_DURATION)), 2.0);
    assert_eq!(
        value(&format!(
            "{}_count{{rpc=\"WriteLocations\",transport=\"grpc\"}}",
            ACK_LATENCY
        )),
        2.0
    );
    assert!(
        text.contains(&format!("{}_bucket{{le=\"0.005\"}}", FLUSH_DURATION)),
        "histograms have buckets"
    );
    assert_eq!(
        value(&format!("{} ", BUFFER_POINTS)),
        0.0,
        "nothing left buffered"
    );
    assert!(text.contains(&format!("# HELP {} ", POINTS_ACCEPTED)));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((_, labels)) = line.split_once('{') {
            for forbidden in ["device_id=", "user_id="] {
                assert!(
                    !labels.contains(forbidden),
                    "no metric is labelled by {forbidden}: {line}"
                );
            }
        }
    }
    server.stop().await;
    db.drop_db().await;
}

/// Health and reflection are served beside Ingest, so grpcurl and load
/// balancers work without the proto files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["locus.v1.Ingest", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    server.stop().await;
    db.drop_db().await;
}
