//! Transport: how frames reach clients. [`client`] is the bounded send queue every connection
//! has; [`ws`] is the WebSocket session that drains it.

pub mod client;
pub mod ws;
