//! The wake-up: a dedicated connection that `LISTEN`s on the `pgrelay` channel.
//!
//! A notification carries nothing; it only says "the outbox has something new". Postgres delivers
//! notifications only to sessions connected at the time, so a listener that was disconnected may
//! have missed some. That is harmless here: after every (re)connect the listener wakes the reader
//! once, and the reader catches up from its own position in the outbox.
//!
//! Wake-ups are coalesced by [`tokio::sync::Notify`]: a thousand notifications that arrive while
//! the reader is busy become one more read.
//!
//! Writers notify only while a relay sleeps (see [`super::wakeup`]). The reader announces its
//! sleep on this very connection, through [`Listening`], so that losing the connection (and with
//! it the notifications) also withdraws the announcement; the listener then wakes the reader at
//! once, and again when it listens anew.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client};

use crate::db::Database;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::metrics::Metrics;

/// The channel the triggers `NOTIFY` on.
pub const CHANNEL: &str = "pgrelay";

/// The LISTEN connection while it is listening, for the reader to announce its sleep on.
#[derive(Default)]
pub struct Listening(Mutex<Option<Arc<Client>>>);

impl Listening {
    /// The connection, if it is listening now.
    pub fn connection(&self) -> Option<Arc<Client>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .filter(|client| !client.is_closed())
    }

    fn set(&self, client: Option<Arc<Client>>) {
        *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = client;
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Keeps a `LISTEN` connection open until `shutdown`, reconnecting with backoff.
pub async fn run(
    db: Database,
    wake: Arc<Notify>,
    listening: Arc<Listening>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        let session = listen_once(&db, &wake, &listening, &metrics);
        let outcome = tokio::select! {
            outcome = session => outcome,
            () = shutdown.cancelled() => return,
        };
        listening.set(None);
        metrics.listener_connected.set(0);
        // Whatever the reader announced on that connection is gone: it must not wait for a
        // NOTIFY now, nor until it has announced its sleep on the next connection.
        wake.notify_one();
        if outcome.is_ok() {
            // The connection was up, then lost: reconnect quickly.
            backoff.reset();
        }
        let wait = backoff.next_wait();
        if let Err(err) = outcome {
            tracing::warn!(error = %err, "LISTEN connection failed; retrying in {wait:?}");
        }
        metrics.listener_reconnects.inc();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// One connection's life: connect, LISTEN, forward notifications until it breaks. An error means
/// it never got as far as listening.
async fn listen_once(
    db: &Database,
    wake: &Arc<Notify>,
    listening: &Listening,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<()> {
    let (client, mut connection) = db.connect().await?;
    // The connection object does the I/O and yields the notifications; it runs on its own task.
    let forward = wake.clone();
    let counted = metrics.clone();
    let io: tokio::task::JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    counted.notifications.inc();
                    forward.notify_one();
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(anyhow::Error::from(err)),
                None => return Err(anyhow::anyhow!("LISTEN connection closed")),
            }
        }
    });

    // The reader's sleep announcement waits for a writer's instant on the lock at most; the
    // timeout only guards against a writer session that somehow kept it.
    client
        .batch_execute(&format!("SET lock_timeout = '1s'; LISTEN {CHANNEL}"))
        .await?;
    let client = Arc::new(client);
    listening.set(Some(client.clone()));
    metrics.listener_connected.set(1);
    tracing::info!("listening for changes");
    // Anything committed while we were not listening is in the outbox: read it now.
    wake.notify_one();

    let ended = io.await;
    drop(client);
    if let Ok(Err(err)) = ended {
        tracing::warn!(error = %format!("{err:#}"), "LISTEN connection lost");
    }
    Ok(())
}
