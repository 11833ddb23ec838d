//! A connected client as the rest of the relay sees it: a send queue bounded in bytes.
//!
//! Fan-out must never wait for a slow client, so sending only appends a frame to the client's
//! queue. The queue is bounded by the bytes it holds, not by a count of frames: a client that
//! falls that far behind is told to go (close code 4008) and can resume from its last event id,
//! while everybody else carries on. A [`Frame`] shares its text, so queuing one event for a
//! thousand clients copies no JSON.
//!
//! One event can be larger than the whole budget (a big row; see `max_event_bytes` in
//! `docs/dba.md`). Such a frame is not counted against the budget: the queue takes it as long as
//! no other such frame waits, so one big row reaches every member of its room without closing
//! anyone, and the frames around it are bounded as usual. A second big frame while the first
//! still waits means the client does not keep up: 4008. A queue therefore holds at most its
//! budget plus one frame.
//!
//! The queue is a `VecDeque` behind a mutex rather than a tokio `mpsc` channel: an unbounded
//! channel allocates a 32-slot block and a cache-padded header up front (about 1.6 KiB per
//! connection, 2.2 KiB once a second block was needed), which an idle connection keeps forever.
//! An empty `VecDeque` holds nothing, and the queue gives its memory back once drained.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

use crate::protocol::Frame;

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
    frames: Arc<Frames>,
    /// The bytes of the frames waiting, but for one larger than the budget ...
    queued_bytes: AtomicUsize,
    /// ... which is counted here.
    oversized: AtomicBool,
    max_queued_bytes: usize,
    closing: AtomicBool,
    close: watch::Sender<Option<CloseRequest>>,
    drained: tokio::sync::Notify,
}

/// The session's end of the queue.
pub struct ClientQueue {
    pub frames: FrameReceiver,
    pub close: watch::Receiver<Option<CloseRequest>>,
}

/// The frames waiting to be sent, shared by the handle (which queues) and the session (which
/// takes them).
#[derive(Default)]
struct Frames {
    queue: Mutex<VecDeque<Frame>>,
    /// A frame was queued, or the handle is gone.
    arrived: Notify,
    handle_dropped: AtomicBool,
    /// The session is gone: nobody will take frames any more.
    receiver_dropped: AtomicBool,
}

impl Frames {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Frame>> {
        // Pushing and popping cannot leave the deque inconsistent: keep going after a panic.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pop(&self) -> Option<Frame> {
        let mut queue = self.lock();
        let frame = queue.pop_front();
        give_back_if_drained(&mut queue);
        frame
    }
}

/// An idle connection should not keep the capacity a burst needed.
fn give_back_if_drained(queue: &mut VecDeque<Frame>) {
    if queue.is_empty() && queue.capacity() > IDLE_QUEUE_CAPACITY {
        queue.shrink_to_fit();
    }
}

/// Takes frames off a client's queue, in order.
pub struct FrameReceiver {
    frames: Arc<Frames>,
}

impl FrameReceiver {
    /// The next frame if one is waiting.
    pub fn try_recv(&mut self) -> Option<Frame> {
        self.frames.pop()
    }

    /// Moves up to `max` waiting frames, in order, onto `into`, under one lock.
    pub fn take(&mut self, max: usize, into: &mut Vec<Frame>) {
        let mut queue = self.frames.lock();
        let n = max.min(queue.len());
        into.extend(queue.drain(..n));
        give_back_if_drained(&mut queue);
    }

    /// The next frame, waiting for one; `None` once the handle is dropped and the queue is
    /// empty. Cancel-safe: a frame is only taken when it is returned.
    pub async fn recv(&mut self) -> Option<Frame> {
        let frames = &*self.frames;
        loop {
            // Registered before looking, so a frame queued in between still wakes us.
            let arrived = frames.arrived.notified();
            if let Some(frame) = frames.pop() {
                return Some(frame);
            }
            if frames.handle_dropped.load(Ordering::Acquire) {
                return frames.pop();
            }
            arrived.await;
        }
    }
}

impl Drop for FrameReceiver {
    fn drop(&mut self) {
        let mut queue = self.frames.lock();
        self.frames.receiver_dropped.store(true, Ordering::Relaxed);
        *queue = VecDeque::new();
    }
}

/// What a drained queue may keep (frames are 48 bytes each).
const IDLE_QUEUE_CAPACITY: usize = 4;

impl ClientHandle {
    /// A client that sees presence and typing.
    pub fn websocket(max_queued_bytes: usize) -> (ClientHandle, ClientQueue) {
        let (mut handle, queue) = ClientHandle::new(max_queued_bytes);
        handle.sees_presence = true;
        (handle, queue)
    }

    pub fn new(max_queued_bytes: usize) -> (ClientHandle, ClientQueue) {
        let frames = Arc::new(Frames::default());
        let (close_tx, close_rx) = watch::channel(None);
        let handle = ClientHandle {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            sees_presence: false,
            frames: frames.clone(),
            queued_bytes: AtomicUsize::new(0),
            oversized: AtomicBool::new(false),
            max_queued_bytes,
            closing: AtomicBool::new(false),
            close: close_tx,
            drained: tokio::sync::Notify::new(),
        };
        (
            handle,
            ClientQueue {
                frames: FrameReceiver { frames },
                close: close_rx,
            },
        )
    }

    /// Queues a frame. Returns false, and asks the session to close with 4008, if the frame
    /// would take the bytes waiting past the budget (see [`ClientHandle::fits`]).
    pub fn send(&self, frame: Frame) -> bool {
        self.send_all([frame]) == 1
    }

    /// Queues frames in order, as [`ClientHandle::send`] would one by one, but takes the queue's
    /// lock and wakes the session once: the fan-out hands each client all its frames of a chunk
    /// together. Returns how many were queued; fewer than given means the client is closing.
    pub fn send_all(&self, frames: impl IntoIterator<Item = Frame>) -> usize {
        let mut queued = 0;
        {
            let mut queue = self.frames.lock();
            for frame in frames {
                if !self.admit(frame.len()) {
                    break;
                }
                // Checked under the lock the receiver sets it under: nothing is queued after it.
                if self.frames.receiver_dropped.load(Ordering::Relaxed) {
                    self.sent_charge(self.charge(std::slice::from_ref(&frame)));
                    break;
                }
                queue.push_back(frame);
                queued += 1;
            }
        }
        if queued > 0 {
            self.frames.arrived.notify_one();
        }
        queued
    }

    /// Counts `len` more bytes as queued, unless the client is closing or they would take it
    /// past its budget, which closes it (4008).
    fn admit(&self, len: usize) -> bool {
        if self.closing.load(Ordering::Relaxed) {
            return false;
        }
        let fits = if len > self.max_queued_bytes {
            !self.oversized.swap(true, Ordering::Relaxed)
        } else {
            let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
            let fits = self.fits(Charge::bytes(before), len);
            if !fits {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            }
            fits
        };
        if !fits {
            self.close_too_slow();
        }
        fits
    }

    /// The byte budget: a frame of `len` bytes fits behind what is `held` if the bytes stay
    /// within it, and an empty queue always takes one frame. A frame larger than the whole
    /// budget fits beside the others unless another such frame is held. So a single large
    /// event never closes a client that keeps up. Frames held back for a client (see
    /// [`crate::rooms`]) count the same way.
    pub fn fits(&self, held: Charge, len: usize) -> bool {
        if len > self.max_queued_bytes {
            !held.oversized
        } else {
            held.bytes == 0 || held.bytes + len <= self.max_queued_bytes
        }
    }

    /// What these frames count against the budget (see [`ClientHandle::fits`]); given back with
    /// [`ClientHandle::sent_charge`] once they have been handed to the socket.
    pub fn charge(&self, frames: &[Frame]) -> Charge {
        let mut charge = Charge::default();
        for frame in frames {
            charge.add(frame.len(), self.max_queued_bytes);
        }
        charge
    }

    pub fn max_queued_bytes(&self) -> usize {
        self.max_queued_bytes
    }

    /// Closes a client that fell further behind than its budget (4008): it resumes from its
    /// last event.
    pub fn close_too_slow(&self) -> bool {
        self.close(CloseRequest {
            code: crate::protocol::close::TOO_SLOW,
            reason: "too slow to keep up; resume with since",
        })
    }

    /// Called by the session once a frame has been handed to the socket.
    pub fn sent(&self, frame: &Frame) {
        self.sent_charge(self.charge(std::slice::from_ref(frame)));
    }

    /// Called by the session once frames have been handed to the socket, with their charge.
    pub fn sent_charge(&self, charge: Charge) {
        self.queued_bytes.fetch_sub(charge.bytes, Ordering::Relaxed);
        if charge.oversized {
            self.oversized.store(false, Ordering::Relaxed);
        }
        self.drained.notify_one();
    }

    /// Waits until a frame of `len` bytes can be queued without going over the byte budget (the
    /// queue is empty, or the frame fits), or the client is closing. Replays pace themselves
    /// with this, so replaying to a slow reader never closes it.
    pub async fn wait_for_room(&self, len: usize) {
        loop {
            let held = Charge {
                bytes: self.queued_bytes.load(Ordering::Relaxed),
                oversized: self.oversized.load(Ordering::Relaxed),
            };
            if self.fits(held, len) || self.is_closing() {
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

/// What frames count against a client's byte budget: their bytes, but for one frame larger than
/// the whole budget, which counts apart (see [`ClientHandle::fits`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub bytes: usize,
    pub oversized: bool,
}

impl Charge {
    fn bytes(bytes: usize) -> Charge {
        Charge {
            bytes,
            oversized: false,
        }
    }

    /// Counts one more frame of `len` bytes against a budget of `max`.
    pub fn add(&mut self, len: usize, max: usize) {
        if len > max {
            self.oversized = true;
        } else {
            self.bytes += len;
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.frames.handle_dropped.store(true, Ordering::Release);
        self.frames.arrived.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_closes_the_client_with_4008_and_drops_the_frame() {
        let (client, mut queue) = ClientHandle::new(10);
        assert!(client.send(Frame::from("123456")));
        assert!(!client.send(Frame::from("123456")), "over the byte budget");
        assert_eq!(queue.close.borrow_and_update().map(|r| r.code), Some(4008));
        assert!(
            !client.send(Frame::from("1")),
            "a closing client takes nothing more"
        );
        let first = queue.frames.try_recv().expect("the first frame was queued");
        client.sent(&first);
        assert!(
            queue.frames.try_recv().is_none(),
            "the overflowing frame was not queued"
        );
    }

    #[test]
    fn frames_queued_together_stop_at_the_budget_and_are_taken_in_order() {
        let (client, mut queue) = ClientHandle::new(10);
        let frames = ["1234", "5678", "90ab", "cd"].map(Frame::from);
        assert_eq!(
            client.send_all(frames),
            2,
            "the third frame would pass 10 bytes"
        );
        assert_eq!(queue.close.borrow_and_update().map(|r| r.code), Some(4008));
        assert_eq!(client.send_all([Frame::from("x")]), 0, "closing");
        let mut taken_frames = Vec::new();
        queue.frames.take(64, &mut taken_frames);
        let taken: Vec<&str> = taken_frames.iter().map(|f| f.as_str()).collect();
        assert_eq!(taken, ["1234", "5678"]);
        client.sent_charge(client.charge(&taken_frames));
        assert_eq!(client.queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn one_frame_larger_than_the_budget_waits_beside_the_others() {
        let (client, mut queue) = ClientHandle::new(10);
        let big = || Frame::from("0123456789abcdef");
        assert!(client.send(Frame::from("small")));
        assert!(client.send(big()), "taken although the queue is not empty");
        assert!(
            client.send(Frame::from("after")),
            "the big frame does not count against the budget"
        );
        assert!(!client.is_closing());
        let mut taken = Vec::new();
        queue.frames.take(64, &mut taken);
        client.sent_charge(client.charge(&taken));
        assert!(client.send(big()), "the first big frame is gone");
        assert!(!client.send(big()), "a second one while the first waits");
        assert_eq!(queue.close.borrow_and_update().map(|r| r.code), Some(4008));
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_the_queue_ends_with_its_handle() {
        let (client, mut queue) = ClientHandle::new(1 << 20);
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(frame) = queue.frames.recv().await {
                got.push(frame.as_str().to_owned());
            }
            got
        });
        for n in 0..100 {
            assert!(client.send(Frame::from(n.to_string().as_str())));
            if n % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(client);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("recv ends once the handle is gone")
            .expect("receiver");
        let expected: Vec<String> = (0..100).map(|n| n.to_string()).collect();
        assert_eq!(got, expected, "every frame, in order, then the end");
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let (client, mut queue) = ClientHandle::new(1 << 20);
        for _ in 0..100 {
            client.send(Frame::from("x"));
        }
        while queue.frames.try_recv().is_some() {}
        assert!(client.frames.lock().capacity() <= IDLE_QUEUE_CAPACITY);
    }
}
