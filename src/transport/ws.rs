//! `GET /ws`: one WebSocket session per client.
//!
//! A session is one task that waits on four things at once: a frame from the client, a frame in
//! its send queue (events from the fan-out, replies from itself), a request to close (slow client,
//! shutdown), and its deadline (authentication within 10 s, then the token's `exp`). Replies go
//! through the same queue as events, so a client always sees `joined` before the room's first
//! event and `left` after its last.
//!
//! Every malformed message is answered with an `error` carrying its `ref`; the session goes on.
//! Only an invalid token (4001), an oversized message (1009), a full queue (4008) or shutdown
//! (1001) ends it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::time::Instant;

use super::limits::TokenBucket;
use super::AppState;
use crate::jwt::Principal;
use crate::presence::PresenceError;
use crate::protocol::{self, close, ClientMessage, ErrorCode, Frame, Room, ServerMessage};
use crate::queue::{ClientHandle, ClientQueue, CloseRequest};
use crate::subscribe::{self, JoinError};

/// What each connection's reader starts with (tungstenite allocates it up front).
const READ_BUFFER_BYTES: usize = 1024;
/// Frames are gathered up to this many bytes before tungstenite writes them to the socket (a
/// flush writes the rest). With 0 every frame was its own `send` system call, and those calls
/// were half of the relay's CPU under fan-out; a connection keeps at most about this much
/// buffer once it has received a burst.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

#[derive(Deserialize)]
pub struct WsParams {
    token: Option<String>,
}

/// The upgrade: a token in the header or query is checked before the socket opens (401 if bad).
pub async fn upgrade(
    ws: WebSocketUpgrade,
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<WsParams>,
) -> Response {
    let principal = match app.check_request(&headers, params.token).await {
        Ok(principal) => principal,
        Err(refused) => return *refused,
    };
    let limits = app.limits.clone();
    ws.max_message_size(limits.max_message_bytes)
        .max_frame_size(limits.max_message_bytes)
        // Small buffers: an idle connection should cost kilobytes, not the 128 KiB defaults.
        // Client messages are small; a bigger one grows the buffer as it arrives.
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| Session::run(app, socket, principal))
}

struct Session {
    app: AppState,
    client: Arc<ClientHandle>,
    principal: Option<Arc<Principal>>,
    rooms: Vec<Room>,
    deadline: Instant,
    /// When the client was last heard from (any frame, pongs included).
    heard: Instant,
    messages: TokenBucket,
    joins: TokenBucket,
    /// Messages dropped in a row for exceeding the rate.
    strikes: u32,
}

/// Rate-limited messages in a row after which the connection is closed (4029).
const MAX_STRIKES: u32 = 20;

/// What to do after handling a client message.
enum Flow {
    Continue,
    Close(CloseRequest),
}

impl Session {
    async fn run(app: AppState, socket: WebSocket, principal: Option<Principal>) {
        app.metrics.connections.inc();
        let (client, queue) = ClientHandle::websocket(app.limits.max_queued_bytes);
        let limits = &app.limits;
        let mut session = Session {
            deadline: Instant::now() + limits.auth_timeout,
            heard: Instant::now(),
            messages: TokenBucket::new(limits.messages_per_second, limits.message_burst),
            joins: TokenBucket::new(limits.joins_per_second, limits.join_burst),
            strikes: 0,
            app: app.clone(),
            client: Arc::new(client),
            principal: None,
            rooms: Vec::new(),
        };
        if let Some(principal) = principal {
            if let Err(refused) = session.authenticate(principal, None) {
                session.client.close(refused);
            }
        }
        session.serve(socket, queue).await;
        app.hub.disconnect(session.client.id, &session.rooms);
        if let Some(principal) = &session.principal {
            app.connections_per_user.release(&principal.user);
        }
        app.metrics.connections.dec();
    }

    /// Reads client messages until something ends the session. Frames are written by a task of
    /// their own, so a client that stops reading (its TCP window full, a write stuck) cannot keep
    /// this loop from noticing its token expiring, the relay shutting down, or a close request.
    async fn serve(&mut self, socket: WebSocket, queue: ClientQueue) {
        let (sink, mut stream) = socket.split();
        let mut close = queue.close.clone();
        let ping_every = self.app.limits.ping_interval;
        let mut writer = tokio::spawn(write_frames(sink, queue, self.client.clone(), ping_every));
        let shutdown = self.app.shutdown.clone();
        let request = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Some(CloseRequest { code: close::GOING_AWAY, reason: "relay shutting down" }),
                Ok(()) = close.changed() => {
                    if let Some(request) = *close.borrow() {
                        break Some(request);
                    }
                }
                _ = &mut writer => break None, // the socket failed
                incoming = stream.next() => match incoming {
                    None => break None,
                    Some(Ok(message)) => {
                        if let Flow::Close(request) = self.on_message(message).await {
                            break Some(request);
                        }
                    }
                    Some(Err(err)) if is_too_big(&err) => {
                        break Some(CloseRequest { code: close::MESSAGE_TOO_BIG, reason: "message too big" });
                    }
                    Some(Err(err)) => {
                        tracing::debug!(error = %format!("{err:#}"), "websocket read failed");
                        break None;
                    }
                },
                () = tokio::time::sleep_until(self.heard + self.app.limits.idle_timeout) => {
                    break Some(CloseRequest { code: close::NORMAL, reason: "idle timeout" });
                }
                () = tokio::time::sleep_until(self.deadline) => {
                    let reason = if self.principal.is_some() { "token expired" } else { "authentication timeout" };
                    break Some(CloseRequest { code: close::UNAUTHORIZED, reason });
                }
            }
        };
        let Some(request) = request else {
            // The socket is gone: mark the client closed so nothing waits on it (a replay).
            self.client.close(CloseRequest {
                code: close::GOING_AWAY,
                reason: "connection lost",
            });
            writer.abort();
            return;
        };
        // The first close request wins; the writer says goodbye with it.
        self.client.close(request);
        if close.borrow().is_some_and(|r| r.code == close::TOO_SLOW) {
            self.app.metrics.slow_consumer_disconnects.inc();
        }
        // A client that does not read cannot receive the close frame either: give it 5 s.
        if tokio::time::timeout(Duration::from_secs(5), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }

    async fn on_message(&mut self, message: Message) -> Flow {
        self.heard = Instant::now();
        if matches!(message, Message::Text(_) | Message::Binary(_)) && !self.messages.take() {
            self.strikes += 1;
            if self.strikes >= MAX_STRIKES {
                return Flow::Close(CloseRequest {
                    code: close::RATE_LIMITED,
                    reason: "rate limited",
                });
            }
            if self.strikes == 1 {
                self.error(ErrorCode::RateLimited, "too many messages; slow down", None);
            }
            return Flow::Continue;
        }
        self.strikes = 0;
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                self.error(
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text frames",
                    None,
                );
                return Flow::Continue;
            }
            // Pings are answered by the WebSocket layer; a close ends the stream next.
            _ => return Flow::Continue,
        };
        let (message, reference) = match protocol::parse(text.as_str()) {
            Ok(parsed) => parsed,
            Err(bad) => {
                self.error(
                    ErrorCode::BadRequest,
                    &bad.message,
                    bad.reference.as_deref(),
                );
                return Flow::Continue;
            }
        };
        let reference = reference.as_deref();
        match message {
            ClientMessage::Auth { token } => self.on_auth(&token, reference).await,
            ClientMessage::Ping => {
                self.reply(ServerMessage::Pong { reference });
                Flow::Continue
            }
            _ if self.principal.is_none() => {
                self.error(
                    ErrorCode::Unauthorized,
                    "authenticate first: {\"type\":\"auth\",\"token\":...}",
                    reference,
                );
                Flow::Continue
            }
            ClientMessage::Join { .. } if !self.joins.take() => {
                self.error(
                    ErrorCode::RateLimited,
                    "too many joins; slow down",
                    reference,
                );
                Flow::Continue
            }
            ClientMessage::Join { room, since } => {
                // Boxed: the join's future (policy check, resume lookup) is several KiB, and
                // inline it would make every idle session's task that much bigger.
                Box::pin(self.on_join(room, since, reference)).await;
                Flow::Continue
            }
            ClientMessage::Leave { room } => {
                self.on_leave(room, reference);
                Flow::Continue
            }
            ClientMessage::Presence { room, meta } => {
                let presence = self.app.hub.presence();
                let done = presence.set_meta(&room, self.client.id, meta);
                self.presence_reply(done, reference);
                Flow::Continue
            }
            ClientMessage::Sync { room, position } => {
                if let Err(err) = crate::sync::request(
                    &self.app.subscriptions,
                    &self.client,
                    &room,
                    &position,
                    reference,
                ) {
                    let code = match err {
                        crate::sync::SyncError::BadPosition => ErrorCode::BadRequest,
                        crate::sync::SyncError::NotJoined => ErrorCode::NotJoined,
                        crate::sync::SyncError::TooMany => ErrorCode::RateLimited,
                    };
                    self.error(code, &err.to_string(), reference);
                }
                Flow::Continue
            }
            ClientMessage::Typing { room, typing } => {
                let presence = self.app.hub.presence();
                let done = presence.typing(&room, self.client.id, typing);
                self.presence_reply(done, reference);
                Flow::Continue
            }
        }
    }

    async fn on_auth(&mut self, token: &str, reference: Option<&str>) -> Flow {
        let principal = match self.app.verifier.authenticate(token).await {
            Ok(principal) => principal,
            Err(err) => {
                self.app.metrics.auth_failures.inc();
                self.error(ErrorCode::Unauthorized, &err.to_string(), reference);
                return Flow::Close(CloseRequest {
                    code: close::UNAUTHORIZED,
                    reason: "invalid token",
                });
            }
        };
        if let Some(current) = &self.principal {
            if current.user != principal.user {
                self.app.metrics.auth_failures.inc();
                self.error(
                    ErrorCode::Unauthorized,
                    "a refreshed token must have the same `sub`",
                    reference,
                );
                return Flow::Continue;
            }
        }
        match self.authenticate(principal, reference) {
            Ok(()) => Flow::Continue,
            Err(refused) => Flow::Close(refused),
        }
    }

    /// Takes a verified token; on the first one, counts the connection against the user's limit
    /// (the error is the close to send if it is over).
    fn authenticate(
        &mut self,
        principal: Principal,
        reference: Option<&str>,
    ) -> Result<(), CloseRequest> {
        if self.principal.is_none() {
            let max = self.app.limits.max_connections_per_user;
            if !self.app.connections_per_user.acquire(&principal.user, max) {
                self.error(
                    ErrorCode::RateLimited,
                    &format!("at most {max} connections per user"),
                    reference,
                );
                return Err(CloseRequest {
                    code: close::RATE_LIMITED,
                    reason: "too many connections",
                });
            }
        }
        let principal = Arc::new(principal);
        let claims_changed = self.principal.as_ref().is_some_and(|before| {
            crate::recheck::claims_changed(&before.claims, &principal.claims)
        });
        self.deadline = Instant::now() + principal.remaining();
        self.reply(ServerMessage::Ready {
            user: &principal.user,
            expires_at: principal.expires_at_iso(),
            reference,
        });
        self.app
            .hub
            .update_principal(self.client.id, &self.rooms, &principal);
        self.principal = Some(principal);
        if claims_changed {
            // Other claims may mean other rooms: ask again about every room of this connection
            // (events are judged with the new claims from now on anyway).
            let app = self.app.clone();
            let client = self.client.id;
            tokio::spawn(async move {
                let mine = app.hub.memberships_of(client);
                crate::recheck::recheck_or_log(
                    &app.hub,
                    &app.subscriptions.authorizer,
                    &app.metrics,
                    &mine,
                    "refresh",
                )
                .await;
            });
        }
        Ok(())
    }

    async fn on_join(&mut self, room: Room, since: Option<String>, reference: Option<&str>) {
        let Some(principal) = self.principal.clone() else {
            return;
        };
        // Rooms the relay removed us from (revoked, failed replay) no longer count.
        self.rooms = self.app.hub.still_in(self.client.id, &self.rooms);
        let already_joined = self.rooms.contains(&room);
        let limit = self.app.limits.max_rooms_per_connection;
        if !already_joined && self.rooms.len() >= limit {
            let message = format!("at most {limit} rooms per connection");
            self.error(ErrorCode::TooManyRooms, &message, reference);
            return;
        }
        let rooms = [room];
        let joined = subscribe::join(
            &self.app.subscriptions,
            &self.client,
            &principal,
            &rooms,
            since.as_deref(),
            reference,
        )
        .await;
        let [room] = rooms;
        match joined {
            Ok(()) if !already_joined => self.rooms.push(room),
            Ok(()) => {}
            Err(err) => {
                let (_, code) = super::join_refusal(&err);
                let message = match err {
                    // The client named the room: no need to repeat it.
                    JoinError::Forbidden(_) => "you may not join this room".to_owned(),
                    err => err.to_string(),
                };
                self.error(code, &message, reference)
            }
        }
    }

    fn on_leave(&mut self, room: Room, reference: Option<&str>) {
        let left = self.app.hub.leave(&room, &self.client, || {
            ServerMessage::Left {
                room: room.as_str(),
                reason: "requested",
                reference,
            }
            .to_frame()
        });
        self.rooms.retain(|r| r != &room);
        if !left {
            self.error(ErrorCode::NotJoined, "not in this room", reference);
        }
    }

    /// Presence and typing are fire-and-forget: only a refusal is answered.
    fn presence_reply(&self, done: Result<(), PresenceError>, reference: Option<&str>) {
        match done {
            Ok(()) => {}
            Err(err @ PresenceError::NotJoined) => {
                self.error(ErrorCode::NotJoined, &err.to_string(), reference)
            }
            Err(err @ PresenceError::MetaTooLarge) => {
                self.error(ErrorCode::BadRequest, &err.to_string(), reference)
            }
        }
    }

    fn reply(&self, message: ServerMessage<'_>) {
        self.client.send(message.to_frame());
    }

    fn error(&self, code: ErrorCode, message: &str, reference: Option<&str>) {
        self.app.metrics.client_errors.inc();
        self.reply(ServerMessage::Error {
            code,
            message,
            reference,
        });
    }
}

/// Drains the client's queue into the socket until a close is requested, then says why:
/// the replies still queued (unless the client is being dropped for slowness), then the close frame.
async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: ClientQueue,
    client: Arc<ClientHandle>,
    ping_every: Duration,
) {
    let mut pings = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    loop {
        tokio::select! {
            biased;
            Ok(()) = queue.close.changed() => {
                let Some(request) = *queue.close.borrow() else { continue };
                if request.code != close::TOO_SLOW {
                    while let Some(frame) = queue.frames.try_recv() {
                        if sink.feed(Message::Text(frame.into_text())).await.is_err() {
                            return;
                        }
                    }
                }
                let frame = CloseFrame { code: request.code, reason: Utf8Bytes::from_static(request.reason) };
                let _ = sink.send(Message::Close(Some(frame))).await;
                return;
            }
            _ = pings.tick() => {
                // Liveness: the client's pong (or anything else) resets its idle timer.
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            frame = queue.frames.recv() => {
                let Some(frame) = frame else { return };
                // Let the tasks already running queue theirs first, so one send carries them
                // all. Tokio runs a task woken by the running one next (its LIFO slot), so
                // without this a session that joins a room woke its writer for the `joined`
                // alone, then again for each presence frame of every other join in the burst:
                // one system call each.
                tokio::task::yield_now().await;
                if write_batch(&mut sink, &client, &mut queue, frame).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes `first` and whatever else is already queued (up to 64 frames), flushes once, then
/// counts them as sent.
async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    client: &ClientHandle,
    queue: &mut ClientQueue,
    first: Frame,
) -> Result<(), axum::Error> {
    let mut frames = vec![first];
    queue.frames.take(63, &mut frames);
    let charge = client.charge(&frames);
    for frame in frames {
        sink.feed(Message::Text(frame.into_text())).await?;
    }
    sink.flush().await?;
    client.sent_charge(charge);
    Ok(())
}

fn is_too_big(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(tungstenite::Error::Capacity(_)) = e.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}
