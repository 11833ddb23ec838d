//! `GET /sse?rooms=R1,R2`: the same events over Server-Sent Events, for clients that cannot use
//! WebSocket.
//!
//! Authentication is the same (`Authorization: Bearer` or `?token=`), and so is joining: all the
//! rooms are joined at once, at one position, with the same policies. Every change arrives as an
//! SSE message whose `data` is the WebSocket `event` JSON and whose `id` is its position, so the
//! browser's `EventSource` resumes by itself after a drop: it sends `Last-Event-ID` and the relay
//! replays what was missed (see [`crate::resume`]). A new `EventSource` cannot set that header, so
//! `?since=P` resumes too; when both are present, `Last-Event-ID` wins: the browser only sends it
//! once the stream opened with that URL has delivered events past it.
//!
//! Only change events carry an `id`. A browser remembers the last `id` of any message, named or
//! not, so an `id` on `joined` would make a stream that drops right after it resume from the join
//! position and skip the replay it was owed. `joined` is a named event (`event: joined`) without
//! one; `left` (revoked, replay failed) is an unnamed message like the events, so `onmessage`
//! handlers see a room go away (its `data` has `"type":"left"`). A comment line every so often (15 s by
//! default) keeps proxies from closing an idle stream.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use tokio::time::Instant;

use super::AppState;
use crate::jwt::Principal;
use crate::protocol::{ErrorCode, Frame, Kind, Room};
use crate::queue::{ClientHandle, ClientQueue};
use crate::subscribe;

#[derive(Deserialize)]
pub struct SseParams {
    rooms: String,
    token: Option<String>,
    /// Resume from this position (as `Last-Event-ID` does).
    since: Option<String>,
}

pub async fn stream(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<SseParams>,
) -> Response {
    let principal = match app.check_request("sse", &headers, params.token).await {
        Ok(Some(principal)) => {
            // The user and the expiry, never the token or its claims.
            tracing::debug!(
                user = %principal.user,
                expires_at = principal.expires_at,
                transport = "sse",
                "authenticated"
            );
            Arc::new(principal)
        }
        Ok(None) => {
            return app.refuse(
                "sse",
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing token",
            )
        }
        Err(refused) => return *refused,
    };
    let rooms: Option<Vec<Room>> = params.rooms.split(',').map(Room::parse).collect();
    let rooms = rooms.map(|mut rooms| {
        rooms.sort();
        rooms.dedup();
        rooms
    });
    let rooms = match rooms {
        Some(rooms) if !rooms.is_empty() && rooms.len() <= app.limits.max_rooms_per_connection => {
            rooms
        }
        _ => {
            let message = format!(
                "rooms must be 1 to {} valid room names separated by commas",
                app.limits.max_rooms_per_connection
            );
            return app.refuse(
                "sse",
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                &message,
            );
        }
    };
    // The header is what the browser sends once this stream delivered events: it is newer than
    // the `since` of the URL it keeps reconnecting to.
    let since = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|id| !id.is_empty())
        .or(params.since.filter(|since| !since.is_empty()));

    // A stream's rooms are joined at once, so opening streams is what join attempts are for
    // WebSocket: limited per user, since every open starts a new connection.
    if !app.sse_opens.take(&principal.user) {
        return app.refuse(
            "sse",
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "too many streams opened; retry in a second",
        );
    }
    let max = app.limits.max_connections_per_user;
    if !app.connections_per_user.acquire(&principal.user, max) {
        let message = format!("at most {max} connections per user");
        return app.refuse(
            "sse",
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            &message,
        );
    }
    // From here on the session (or this guard, if joining fails) releases the slot.
    let slot = UserSlot {
        app: app.clone(),
        user: principal.user.clone(),
    };
    let (client, queue) = ClientHandle::new(app.limits.max_queued_bytes);
    let client = Arc::new(client);
    let joined = subscribe::join(
        &app.subscriptions,
        &client,
        &principal,
        &rooms,
        since.as_deref(),
        None,
    )
    .await;
    if let Err(err) = joined {
        let (status, code) = super::join_refusal(&err);
        return app.refuse("sse", status, code, &err.to_string());
    }

    app.metrics.connections.inc();
    app.metrics.connections_opened.inc(["sse"]);
    let session_keepalive = app.limits.sse_keepalive;
    let session = SseSession {
        _slot: slot,
        ended: None,
        deadline: Instant::now() + principal.remaining(),
        app,
        client,
        principal,
        rooms,
    };
    Sse::new(session.events(queue))
        .keep_alive(
            KeepAlive::new()
                .interval(session_keepalive)
                .text("keep-alive"),
        )
        .into_response()
}

/// Leaves the rooms when the stream ends, however it ends (the client went away, expiry, shutdown).
struct SseSession {
    _slot: UserSlot,
    app: AppState,
    client: Arc<ClientHandle>,
    #[allow(dead_code)] // held for the session's lifetime, like the WebSocket session's
    principal: Arc<Principal>,
    rooms: Vec<Room>,
    deadline: Instant,
    /// Why the relay ended the stream, as the WebSocket close code of the same reason; `None`:
    /// the client went away.
    ended: Option<u16>,
}

impl Drop for SseSession {
    fn drop(&mut self) {
        let code = self
            .ended
            .unwrap_or(super::ws::ABNORMAL_CLOSURE)
            .to_string();
        self.app.metrics.connections_closed.inc(["sse", &code]);
        // Nothing may wait on this client any more (a replay, say).
        self.client.close(crate::queue::CloseRequest {
            code: crate::protocol::close::GOING_AWAY,
            reason: "stream ended",
        });
        self.app.hub.disconnect(self.client.id, &self.rooms);
        self.app.metrics.connections.dec();
    }
}

/// One of the user's connection slots, given back when dropped.
struct UserSlot {
    app: AppState,
    user: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.app.connections_per_user.release(&self.user);
    }
}

impl SseSession {
    /// Records why the relay ends the stream (for the metrics, when it is dropped).
    fn end(&mut self, code: Option<u16>) {
        self.ended = code;
    }

    fn events(self, queue: ClientQueue) -> impl Stream<Item = Result<Event, Infallible>> {
        futures_util::stream::unfold((self, queue), |(mut session, mut queue)| async move {
            use crate::protocol::close;
            let shutdown = session.app.shutdown.clone();
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => Err(Some(close::GOING_AWAY)),
                // Too slow, say: the client resumes with Last-Event-ID.
                Ok(()) = queue.close.changed() => Err(queue.close.borrow().map(|r| r.code)),
                () = tokio::time::sleep_until(session.deadline) => Err(Some(close::UNAUTHORIZED)),
                frame = queue.frames.recv() => Ok(frame),
            };
            let frame = match next {
                Ok(frame) => frame?,
                Err(code) => {
                    session.end(code);
                    return None;
                }
            };
            session.client.sent(&frame);
            if let Some(written) = frame.outbox_time() {
                // Handed to the HTTP stream: as close to the socket as SSE lets us see.
                if let Ok(latency) = std::time::SystemTime::now().duration_since(written) {
                    session.app.metrics.event_latency_seconds.observe(latency);
                }
            }
            Some((Ok(sse_event(&frame)), (session, queue)))
        })
    }
}

/// Events (with their position as `id`) and `left` become unnamed messages; other notices
/// (`joined`) become named events without an `id`.
fn sse_event(frame: &Frame) -> Event {
    let data = Event::default();
    let data = match (frame.kind(), frame.position()) {
        (Kind::Event, Some(id)) => data.id(id),
        (Kind::Left, _) => data,
        (kind, _) => data.event(kind.as_str()),
    };
    data.data(frame.as_str())
}
