//! The dashboard: files under `crates/api/assets/`, compiled into the binary, served at
//! `/` (`index.html`, with `api.tile_url` filled in) and `/assets/<path>`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorBody};
use crate::AppState;

/// The embedded dashboard files.
#[derive(rust_embed::RustEmbed)]
#[folder = "assets/"]
struct Assets;

/// The dashboard's entry page.
#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    security(()),
    responses((status = 200, description = "The dashboard.", content_type = "text/html", body = String))
)]
pub async fn index(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if st.tile_url.is_empty() {
        return file("index.html", &headers);
    }
    let Some(f) = Assets::get("index.html") else {
        return Err(ApiError::NotFound("no asset \"index.html\"".into()));
    };
    // `api.tile_url` goes into the page's tile meta tag, so a deployment sets it in its
    // config rather than by rebuilding the dashboard.
    let page = String::from_utf8_lossy(&f.data).replacen(
        TILE_META_EMPTY,
        &format!(
            "<meta name=\"fleetpipe-tile-url\" content=\"{}\">",
            escape_attribute(&st.tile_url)
        ),
        1,
    );
    let mut h = DefaultHasher::new();
    (f.metadata.sha256_hash(), &*st.tile_url).hash(&mut h);
    let etag = format!("\"{:016x}\"", h.finish());
    Ok(respond(page.into_bytes(), "text/html", &etag, &headers))
}

/// The dashboard's tile URL meta tag as shipped (empty: no tiles).
const TILE_META_EMPTY: &str = "<meta name=\"fleetpipe-tile-url\" content=\"\">";

fn escape_attribute(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A dashboard file (script, style sheet, image…).
#[utoipa::path(
    get,
    path = "/assets/{path}",
    tag = "dashboard",
    security(()),
    params(("path" = String, Path, description = "File path under the dashboard's assets.", example = "app.js")),
    responses(
        (status = 200, description = "The file, with its content type.", body = String),
        (status = 304, description = "Unchanged since the `ETag` in `If-None-Match`."),
        (status = 404, description = "No such file.", body = ErrorBody),
    )
)]
pub async fn asset(
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    match path {
        Ok(Path(p)) => file(&p, &headers),
        Err(_) => Err(ApiError::NotFound("no such asset".into())),
    }
}

fn file(path: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let Some(f) = Assets::get(path) else {
        return Err(ApiError::NotFound(format!(
            "no asset {:?}",
            crate::params::truncate(path)
        )));
    };
    let hash = f.metadata.sha256_hash();
    let etag = format!(
        "\"{}\"",
        hash[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    Ok(respond(
        f.data.into_owned(),
        f.metadata.mimetype(),
        &etag,
        headers,
    ))
}

/// The file with its type and `ETag`, or a 304 when the client's copy is current.
fn respond(body: Vec<u8>, mime: &str, etag: &str, headers: &HeaderMap) -> Response {
    let etag = HeaderValue::from_str(etag).unwrap_or(HeaderValue::from_static("\"0\""));
    // Names are not content-hashed, so clients revalidate each time (cheap: a 304).
    let cache = HeaderValue::from_static("no-cache");
    if headers.get(header::IF_NONE_MATCH) == Some(&etag) {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag), (header::CACHE_CONTROL, cache)],
        )
            .into_response();
    }
    (
        [
            (header::CONTENT_TYPE, content_type(mime)),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache),
        ],
        body,
    )
        .into_response()
}

/// The content type of a file, with `charset=utf-8` for text (the dashboard's files are
/// UTF-8).
fn content_type(mime: &str) -> HeaderValue {
    let textual = mime.starts_with("text/")
        || matches!(
            mime,
            "application/javascript" | "application/json" | "image/svg+xml"
        );
    let value = if textual {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let cases = [
            ("text/html", "text/html; charset=utf-8"),
            ("text/javascript", "text/javascript; charset=utf-8"),
            (
                "application/javascript",
                "application/javascript; charset=utf-8",
            ),
            ("image/png", "image/png"),
            ("font/woff2", "font/woff2"),
        ];
        for (mime, want) in cases {
            assert_eq!(content_type(mime), want);
        }
    }
}
