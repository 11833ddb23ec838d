//! Cross-origin access to `/sse` for browsers on the allowed origins.
//!
//! A web app is usually served from another origin than the relay (app on :3000, relay on :8080),
//! and a browser opens an `EventSource` to another origin only if the response names the page's
//! origin in `Access-Control-Allow-Origin`; without it the stream is refused and `onerror` fires
//! with no detail. A reconnecting `EventSource` sends `Last-Event-ID`, which is not a
//! CORS-safelisted header, so the browser may first ask with a preflight `OPTIONS` request.
//!
//! The origins are those of `PGRELAY_ALLOWED_ORIGINS` (every origin when it is empty, as for the
//! WebSocket upgrade). The relay names the request's own origin rather than `*`, with
//! `Vary: Origin` so caches keep answers apart. Only listed origins may send credentials
//! (`withCredentials`): the relay needs none (tokens travel in the URL or a header), and an
//! open relay should not invite them.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::server::AppState;

/// How long a browser may reuse a preflight answer.
const PREFLIGHT_MAX_AGE_SECONDS: &str = "600";

/// The request's origin if it is one the relay lets read its responses.
fn allowed_origin(app: &AppState, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    app.origin_allowed(headers).then(|| origin.clone())
}

fn add_allow_headers(app: &AppState, origin: HeaderValue, response: &mut Response) {
    let out = response.headers_mut();
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    out.append(header::VARY, HeaderValue::from_static("origin"));
    if !app.allowed_origins.is_empty() {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// Middleware: answers of an allowed cross-origin request (events or refusals, so a page can
/// tell a 401 from a network failure where the API lets it) carry the CORS headers.
pub async fn allow(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let origin = allowed_origin(&app, request.headers());
    let mut response = next.run(request).await;
    if let Some(origin) = origin {
        add_allow_headers(&app, origin, &mut response);
    }
    response
}

/// `OPTIONS /sse`: the preflight. An origin that is not allowed gets 403 and no CORS headers.
pub async fn preflight(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let Some(origin) = allowed_origin(&app, &headers) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    let mut response = StatusCode::NO_CONTENT.into_response();
    add_allow_headers(&app, origin, &mut response);
    let out = response.headers_mut();
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    out.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, last-event-id, cache-control, accept"),
    );
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECONDS),
    );
    response
}
