//! The console: a few pages in the browser, served at `/` and
//! `/console/{file}` on the HTTP listener, that read the query API as any
//! client does (a live map of an app_source's fleet, a device's track,
//! hourly stats). The files are part of the binary: no build step, and
//! nothing fetched from elsewhere but the map tiles of `--map-tiles`.

use std::sync::Arc;

use axum::{
    Router,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use sha2::{Digest, Sha256};

/// One file of the console, as served.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// One entry of [`ASSETS`]: the file `assets/<name>`, built in.
macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!("assets/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file the console serves; `index.html` is also `/`.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("map.js", JS),
    asset!("live.js", JS),
    asset!("track.js", JS),
    asset!("stats.js", JS),
];

/// What every answer of the console carries, and what the pages learn.
struct Console {
    /// `Content-Security-Policy`: this origin only, and the tiles' for images.
    csp: HeaderValue,
    /// `/console/config.json`.
    config: Vec<u8>,
    /// Each asset's ETag, by its index in [`ASSETS`].
    etags: Vec<HeaderValue>,
}

/// The console's routes. `map_tiles` is `--map-tiles`, and `tile_origin`
/// its origin (both checked by the configuration).
pub fn router(map_tiles: Option<&str>, tile_origin: Option<&str>) -> Router {
    let img = match tile_origin {
        Some(o) => format!("'self' {o}"),
        None => "'self'".to_string(),
    };
    let csp = format!(
        "default-src 'self'; img-src {img}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    );
    let console = Console {
        csp: HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static("default-src 'self'")),
        config: serde_json::to_vec(&serde_json::json!({ "map_tiles": map_tiles }))
            .unwrap_or_default(),
        etags: ASSETS
            .iter()
            .map(|a| {
                let hash = Sha256::digest(a.body);
                let hex: String = hash[..12].iter().map(|b| format!("{b:02x}")).collect();
                HeaderValue::from_str(&format!("\"{hex}\""))
                    .unwrap_or(HeaderValue::from_static("\"\""))
            })
            .collect(),
    };
    Router::new()
        .route("/", get(index))
        .route("/console/", get(index))
        .route("/console/{file}", get(file))
        .with_state(Arc::new(console))
}

async fn index(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    asset(&c, 0, &headers)
}

async fn file(
    State(c): State<Arc<Console>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if name == "config.json" {
        let mut resp = c.config.clone().into_response();
        set(&mut resp, &c, "application/json", "no-store");
        return resp;
    }
    match ASSETS.iter().position(|a| a.name == name) {
        Some(i) => asset(&c, i, &headers),
        None => {
            let mut resp = (StatusCode::NOT_FOUND, "no such file in the console\n").into_response();
            set(&mut resp, &c, "text/plain; charset=utf-8", "no-store");
            resp
        }
    }
}

/// Asset `i`, or 304 if the browser holds this version (`If-None-Match`).
/// `no-cache`: browsers keep the files but ask each time, so that a new
/// binary's console is never mixed with an old one's files.
fn asset(c: &Console, i: usize, headers: &HeaderMap) -> Response {
    let (a, etag) = (&ASSETS[i], &c.etags[i]);
    let fresh = headers.get(header::IF_NONE_MATCH).is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == etag.as_bytes())
    });
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        a.body.into_response()
    };
    set(&mut resp, c, a.content_type, "no-cache");
    resp.headers_mut().insert(header::ETAG, etag.clone());
    resp
}

fn set(resp: &mut Response, c: &Console, content_type: &'static str, cache: &'static str) {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::CONTENT_SECURITY_POLICY, c.csp.clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    async fn get(app: &Router, path: &str, etag: Option<&HeaderValue>) -> Response {
        let mut req = axum::http::Request::get(path);
        if let Some(e) = etag {
            req = req.header(header::IF_NONE_MATCH, e);
        }
        app.clone()
            .oneshot(req.body(Body::empty()).expect("a request"))
            .await
            .expect("infallible")
    }

    /// Each file with its type, the policy, and a 304 for a version held.
    #[tokio::test]
    async fn files_are_served_with_their_type_policy_and_cache_headers() {
        let app = router(
            Some("https://tile.example.org/{z}/{x}/{y}.png"),
            Some("https://tile.example.org"),
        );
        let root = get(&app, "/", None).await;
        assert_eq!(root.status(), StatusCode::OK);
        assert_eq!(
            root.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let csp = root.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap_or_default();
        assert!(csp.starts_with("default-src 'self';"), "{csp}");
        assert!(
            csp.contains("img-src 'self' https://tile.example.org;"),
            "{csp}"
        );
        assert_eq!(root.headers()[header::CACHE_CONTROL], "no-cache");
        let etag = root.headers()[header::ETAG].clone();
        assert_eq!(
            get(&app, "/", Some(&etag)).await.status(),
            StatusCode::NOT_MODIFIED
        );
        for a in ASSETS {
            let r = get(&app, &format!("/console/{}", a.name), None).await;
            assert_eq!(r.status(), StatusCode::OK, "{}", a.name);
            assert_eq!(r.headers()[header::CONTENT_TYPE], a.content_type);
        }
        let config = get(&app, "/console/config.json", None).await;
        assert_eq!(config.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(config.into_body(), 4096)
            .await
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(v["map_tiles"], "https://tile.example.org/{z}/{x}/{y}.png");
        assert_eq!(
            get(&app, "/console/nothing.js", None).await.status(),
            StatusCode::NOT_FOUND
        );
        let plain = get(&router(None, None), "/", None).await;
        let csp = plain.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap_or_default();
        assert!(csp.contains("img-src 'self';"), "{csp}");
    }
}
