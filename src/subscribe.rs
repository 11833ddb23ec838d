//! Joining rooms, live or resuming: the steps WebSocket `join` and SSE share.
//!
//! Access is checked with the join policy first (so a refused client learns nothing about
//! positions). A `since` position is then resolved ([`crate::resume`]): resumable positions join in
//! replay mode and start a [`Replay`]; lost ones join live with `recovered: false`.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Notify;

use crate::authorize::Authorizer;
use crate::capture::position::{Position, PositionCodec, Snapshot};
use crate::jwt::Principal;
use crate::metrics::Metrics;
use crate::protocol::{Room, ServerMessage};
use crate::queue::ClientHandle;
use crate::resume::{Replay, Replays, Resolution, ResolveError};
use crate::rooms::{Hub, NotReady};

/// How long a resume waits for this relay to catch up with a position issued by another one.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Why a join was refused; the messages are safe to show.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("`since`: not a valid position")]
    BadPosition,
    #[error("you may not join {0}")]
    Forbidden(String),
    #[error("{0}")]
    Unavailable(String),
}

/// What joining needs: the join policy, the outbox (to resolve and replay positions), the hub.
#[derive(Clone)]
pub struct Subscriptions {
    /// For short statements: they time out after the statement timeout.
    pub pool: Pool,
    /// Seals the positions clients see.
    pub codec: PositionCodec,
    /// Wakes the reader (a resume waiting for this relay to catch up nudges it).
    pub wake: Arc<Notify>,
    pub hub: Arc<Hub>,
    pub authorizer: Authorizer,
    pub metrics: Arc<Metrics>,
    /// Serves resuming clients what they missed, on a budget of their own.
    pub replays: Arc<Replays>,
}

/// Joins `rooms` (all or none), replying `joined` (with `ref` = `reference`) for each, and starts
/// the replay when resuming. Returns once the client is registered; the replay runs on its own.
pub async fn join(
    app: &Subscriptions,
    client: &Arc<ClientHandle>,
    principal: &Arc<Principal>,
    rooms: &[Room],
    since: Option<&str>,
    reference: Option<&str>,
) -> Result<(), JoinError> {
    for room in rooms {
        match app.authorizer.can_join(principal, room).await {
            Ok(true) => {}
            Ok(false) => {
                app.metrics.joins_forbidden.inc();
                return Err(JoinError::Forbidden(room.as_str().to_owned()));
            }
            Err(err) => {
                tracing::warn!(room = room.as_str(), error = %format!("{err:#}"), "join policy failed");
                return Err(JoinError::Unavailable(
                    "could not check access to the room; try again".into(),
                ));
            }
        }
    }

    let seen = match since {
        None => None,
        Some(text) => {
            let position: Position = app.codec.open(text).map_err(|_| JoinError::BadPosition)?;
            match app.replays.resolve(&position).await {
                Ok(Resolution::Resumable(seen)) => Some(seen),
                Ok(Resolution::Lost) => None,
                Err(ResolveError::Invalid) => return Err(JoinError::BadPosition),
                Err(ResolveError::Database(err)) => {
                    tracing::warn!(error = %format!("{err:#}"), "resolving a position failed");
                    return Err(JoinError::Unavailable(
                        "could not check the position; try again".into(),
                    ));
                }
            }
        }
    };
    let recovered = since.map(|_| seen.is_some());
    // Live delivery must start where the client's position ends.
    let resume_from: Option<Snapshot> = seen.as_ref().map(|s| match &s.within {
        Some((upto, _)) => upto.clone(),
        None => s.since.clone(),
    });

    let deadline = tokio::time::Instant::now() + CATCH_UP;
    let (until, join_id) = loop {
        let joined = app.hub.join(
            rooms,
            client,
            principal,
            resume_from.as_ref(),
            |room, position| {
                ServerMessage::Joined {
                    room: room.as_str(),
                    position: app.codec.seal(position),
                    recovered,
                    reference,
                }
                .to_frame()
            },
        );
        match joined {
            Ok(joined) => break joined,
            Err(NotReady::Behind) if tokio::time::Instant::now() < deadline => {
                app.wake.notify_one();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => return Err(JoinError::Unavailable(format!("{err}; try again"))),
        }
    };
    app.metrics.joins.add(rooms.len() as u64);

    if let Some(seen) = seen {
        app.replays.start(Replay {
            client: client.clone(),
            principal: principal.clone(),
            rooms: rooms.to_vec(),
            seen,
            until,
            join_id,
        });
    }
    Ok(())
}
