//! A connected client as the rest of the relay sees it: a send queue bounded in bytes.
//!
//! Fan-out must never wait for a slow client, so sending only appends a frame to the client's
//! queue. The queue is bounded by the bytes it holds, not by a count of frames: a client that
//! falls that far behind is told to go (close code 4008) and can resume from its last event id,
//! while everybody else carries on. Frames are shared `Utf8Bytes`, so queuing one event for a
//! thousand clients copies no JSON.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, watch};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Why the relay ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
}

pub struct ClientHandle {
    pub id: u64,
    /// Whether the transport shows presence and typing (WebSocket does, SSE does not).
    pub sees_presence: bool,
    frames: mpsc::UnboundedSender<Utf8Bytes>,
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    closing: AtomicBool,
    close: watch::Sender<Option<CloseRequest>>,
    drained: tokio::sync::Notify,
}

/// The session's end of the queue.
pub struct ClientQueue {
    pub frames: mpsc::UnboundedReceiver<Utf8Bytes>,
    pub close: watch::Receiver<Option<CloseRequest>>,
}

impl ClientHandle {
    /// A client that sees presence and typing.
    pub fn websocket(max_queued_bytes: usize) -> (ClientHandle, ClientQueue) {
        let (mut handle, queue) = ClientHandle::new(max_queued_bytes);
        handle.sees_presence = true;
        (handle, queue)
    }

    pub fn new(max_queued_bytes: usize) -> (ClientHandle, ClientQueue) {
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let (close_tx, close_rx) = watch::channel(None);
        let handle = ClientHandle {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            sees_presence: false,
            frames: frames_tx,
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes,
            closing: AtomicBool::new(false),
            close: close_tx,
            drained: tokio::sync::Notify::new(),
        };
        (
            handle,
            ClientQueue {
                frames: frames_rx,
                close: close_rx,
            },
        )
    }

    /// Queues a frame. Returns false, and asks the session to close with 4008, if the frame
    /// would take the bytes waiting past the budget (an empty queue always takes one frame, so
    /// a single large event never closes a client that keeps up).
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        if self.closing.load(Ordering::Relaxed) {
            return false;
        }
        let len = frame.as_str().len();
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(CloseRequest {
                code: crate::protocol::close::TOO_SLOW,
                reason: "too slow to keep up; resume with since",
            });
            return false;
        }
        self.frames.send(frame).is_ok()
    }

    /// Called by the session once a frame has been handed to the socket.
    pub fn sent(&self, frame: &Utf8Bytes) {
        self.queued_bytes
            .fetch_sub(frame.as_str().len(), Ordering::Relaxed);
        self.drained.notify_one();
    }

    pub fn max_queued_bytes(&self) -> usize {
        self.max_queued_bytes
    }

    /// Waits until a frame of `len` bytes can be queued without going over the byte budget (the
    /// queue is empty, or the frame fits), or the client is closing. Replays pace themselves
    /// with this, so replaying to a slow reader never closes it.
    pub async fn wait_for_room(&self, len: usize) {
        loop {
            let queued = self.queued_bytes.load(Ordering::Relaxed);
            if queued == 0 || queued + len <= self.max_queued_bytes || self.is_closing() {
                return;
            }
            let wait = self.drained.notified();
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), wait).await;
        }
    }

    /// Asks the session to close the connection (the first request wins).
    pub fn close(&self, request: CloseRequest) -> bool {
        if self.closing.swap(true, Ordering::Relaxed) {
            return false;
        }
        self.close.send_replace(Some(request));
        true
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_closes_the_client_with_4008_and_drops_the_frame() {
        let (client, mut queue) = ClientHandle::new(10);
        assert!(client.send(Utf8Bytes::from("123456")));
        assert!(
            !client.send(Utf8Bytes::from("123456")),
            "over the byte budget"
        );
        assert_eq!(queue.close.borrow_and_update().map(|r| r.code), Some(4008));
        assert!(
            !client.send(Utf8Bytes::from("1")),
            "a closing client takes nothing more"
        );
        let first = queue.frames.try_recv().expect("the first frame was queued");
        client.sent(&first);
        assert!(
            queue.frames.try_recv().is_err(),
            "the overflowing frame was not queued"
        );
    }
}
