//! Transport: how frames reach clients. [`client`] is the bounded send queue every connection
//! has; [`ws`] is the WebSocket session that drains it, [`sse`] the Server-Sent Events one.

pub mod client;
pub mod limits;
pub mod sse;
pub mod ws;
