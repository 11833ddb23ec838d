//! The pipeline: what the relay does with each chunk of changes capture reads.
//!
//! The reader ([`crate::capture::reader`]) only reads: it hands chunks, in commit order, to a
//! [`Consumer`]. This is the relay's: it numbers batches in the hub (so joins line up with
//! deliveries, see [`crate::rooms`]), authorizes each chunk and fans it out ([`crate::fanout`]),
//! and closes every client when retention removed changes before they were read.

use std::sync::Arc;
use std::time::Instant;

use crate::authorize::Authorizer;
use crate::capture::outbox::Change;
use crate::capture::position::{PositionCodec, Snapshot};
use crate::capture::reader::{BatchRef, Consumer, Delivered};
use crate::fanout;
use crate::metrics::Metrics;
use crate::protocol::close;
use crate::queue::CloseRequest;
use crate::rooms::Hub;

/// Authorize, then fan out: from the reader to the rooms.
pub struct Pipeline {
    pub hub: Arc<Hub>,
    pub authorizer: Authorizer,
    pub metrics: Arc<Metrics>,
    /// Seals the positions events carry.
    pub codec: PositionCodec,
}

impl Consumer for Pipeline {
    fn start_at(&self, snapshot: Snapshot) {
        self.hub.start_at(snapshot);
    }

    fn changes_lost(&self) {
        // Their streams have a hole: they resume, and learn from the position that it is lost.
        self.hub.close_all(CloseRequest {
            code: close::TOO_SLOW,
            reason: "relay fell behind; resume with since",
        });
    }

    fn begin_batch(&self, upto: &Snapshot) -> u64 {
        self.hub.begin_batch(upto)
    }

    async fn deliver(&self, batch: &BatchRef<'_>, changes: &[Change]) -> anyhow::Result<Delivered> {
        let delivering = Instant::now();
        let delivered = fanout::deliver(
            &self.hub,
            &self.authorizer,
            &self.metrics,
            &self.codec,
            batch,
            changes,
        )
        .await?;
        self.metrics.fanout_seconds.add(delivering.elapsed());
        Ok(delivered)
    }

    fn end_batch(&self, upto: Snapshot) {
        self.hub.end_batch(upto);
    }
}
