//! Transport: how frames reach clients. [`client`] is the bounded send queue every connection
//! has; [`ws`] is the WebSocket session that drains it, [`sse`] the Server-Sent Events one.

pub mod client;
pub mod cors;
pub mod limits;
pub mod sse;
pub mod ws;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::protocol::{ErrorCode, ServerMessage};

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
