//! The HTTP API's OpenAPI document (`GET /v1/openapi.json`), assembled from
//! the routes of every room that serves HTTP: ingest and queries.

use axum::{Json, Router, routing::get};
use utoipa::OpenApi;

// The query routes are named bare, as they were when the document was
// written beside them: a route's tag is the path it is named by here, and
// the document's tags stay as clients have them.
use crate::{
    location::json::LocationJson,
    query::{
        http::{
            __path_device_latest, __path_device_track, __path_hourly_stats, __path_latest,
            __path_live, HourlyJson, LatestJson, TrackJson,
        },
        stats,
    },
    status::http::{ErrorDetail, ErrorJson},
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "locus",
        description = "GPS telemetry: ingest, latest positions, tracks, hourly stats and a live feed."
    ),
    paths(
        crate::ingest::http::post_locations,
        device_latest,
        latest,
        device_track,
        hourly_stats,
        live
    ),
    components(schemas(
        LocationJson,
        LatestJson,
        TrackJson,
        stats::HourStats,
        HourlyJson,
        ErrorJson,
        ErrorDetail
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The route that serves the document.
pub fn router() -> Router {
    Router::new().route(
        "/v1/openapi.json",
        get(|| async { Json(ApiDoc::openapi()) }),
    )
}

/// Every route wants `Authorization: Bearer <token>` (a reader or admin).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        openapi.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}
