//! Transport: the edges where frames reach clients. [`ws`] is the WebSocket session that drains a
//! client's send queue ([`crate::queue`]), [`sse`] the Server-Sent Events one.
//!
//! Both edges check a request the same way before anything opens (its origin, then its token) and
//! answer a refused join with the same codes; those checks and [`AppState`], what every handler
//! holds, live here.

pub mod cors;
pub mod limits;
pub mod sse;
pub mod ws;

use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::jwt::{Principal, Verifier};
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, ServerMessage};
use crate::rooms::Hub;
use crate::subscribe::{JoinError, Subscriptions};

/// Everything a request handler may need, cloned cheaply into each one.
#[derive(Clone)]
pub struct AppState {
    /// Joining rooms (see [`crate::subscribe`]).
    pub subscriptions: Subscriptions,
    pub hub: Arc<Hub>,
    pub verifier: Verifier,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub allowed_origins: Arc<Vec<String>>,
    pub connections_per_user: Arc<limits::ConnectionsPerUser>,
    /// SSE streams opened per user: each open asks the join policy for all its rooms.
    pub sse_opens: Arc<limits::BucketPerUser>,
    pub shutdown: CancellationToken,
    /// Cancelled when the relay starts draining (see [`crate::server::Relay::drain`]).
    pub draining: CancellationToken,
}

impl AppState {
    /// False for a browser request from an origin that is not allowed (requests without an
    /// `Origin` header come from non-browser clients and are not restricted).
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            Some(origin) if !self.allowed_origins.is_empty() => {
                self.allowed_origins.iter().any(|a| a == origin)
            }
            _ => true,
        }
    }

    /// What both edges check before a socket or stream opens: that the relay is not draining
    /// (503 with `Retry-After`: the load balancer, which sees `/readyz` fail too, sends the
    /// client's retry to another replica), the origin (403), then the token of the header or
    /// query, if there is one (401 if it does not verify).
    pub async fn check_request(
        &self,
        transport: &'static str,
        headers: &HeaderMap,
        query_token: Option<String>,
    ) -> Result<Option<Principal>, Box<Response>> {
        if self.draining.is_cancelled() {
            return Err(Box::new(
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "1")],
                    "relay draining: connect to another replica",
                )
                    .into_response(),
            ));
        }
        if !self.origin_allowed(headers) {
            return Err(Box::new(self.refuse(
                transport,
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "origin not allowed",
            )));
        }
        let Some(token) = token_from_request(headers, query_token) else {
            return Ok(None);
        };
        match self.verifier.authenticate(&token).await {
            Ok(principal) => Ok(Some(principal)),
            Err(err) => {
                self.metrics.auth_failures.inc();
                Err(Box::new(self.refuse(
                    transport,
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    &err.to_string(),
                )))
            }
        }
    }
}

impl AppState {
    /// [`refuse`], counted in the metrics by transport and code.
    pub fn refuse(
        &self,
        transport: &'static str,
        status: StatusCode,
        code: ErrorCode,
        message: &str,
    ) -> Response {
        self.metrics.errors_sent.inc([transport, code.as_str()]);
        refuse(status, code, message)
    }
}

/// The bearer token of the request, from `Authorization` or the `token` query parameter.
pub fn token_from_request(headers: &HeaderMap, query_token: Option<String>) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned());
    bearer.or(query_token).filter(|t| !t.is_empty())
}

/// How a refused join is answered: the HTTP status (for SSE, before the stream opens) and the
/// protocol's error code (both edges).
pub fn join_refusal(err: &JoinError) -> (StatusCode, ErrorCode) {
    match err {
        JoinError::BadPosition => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        JoinError::Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
        JoinError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Internal),
    }
}

/// An HTTP refusal (before any socket or stream exists) with the protocol's JSON `error` body.
pub fn refuse(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let body = ServerMessage::Error {
        code,
        message,
        reference: None,
    }
    .to_json();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
