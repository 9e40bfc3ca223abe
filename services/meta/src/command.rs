//! The commands of the metadata state machine and their outputs.
//!
//! A command carries everything its result depends on, so applying it is deterministic on
//! every replica. Time (`now_ms`) is the leader's clock, stamped when the leader proposes the
//! command (never a caller's), and the state machine only lets it move forward: a caller with a
//! wrong clock cannot expire anything.

use cid::Cid;
use serde::{Deserialize, Serialize};

use crate::model::{ContentRecord, MediaKey, MediaRecord, Quota, ThumbnailRecord, ThumbnailSpec};

// Commands are built once per request and moved into the log; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Reserve `media` for an asynchronous upload by `user_id`, for `ttl_ms`.
    CreatePending { media: MediaKey, user_id: String, now_ms: u64, ttl_ms: u64, max_pending_per_user: u32 },
    /// Record a finished upload. `media_id == None` means a synchronous upload whose media ID
    /// is the CID. Idempotent by what it says: the same upload committed again (a retry whose
    /// first answer was lost) gets the same answer, whenever it arrives.
    CommitUpload {
        server_name: String,
        media_id: Option<String>,
        user_id: String,
        now_ms: u64,
        content: ContentRecord,
        content_type: String,
        filename: Option<String>,
        /// The caller found the stored copy under this key missing or corrupt: if the content
        /// record still points there, this upload's bytes replace it.
        lost_key: Option<String>,
    },
    /// Drop at most `limit` pending reservations that expired by `now_ms` (oldest first).
    Expire { now_ms: u64, limit: u32 },
    /// Start an orphan sweep: advance the reclaim generation (at most once per
    /// `min_interval_ms` of leader time) and seal every generation two behind it.
    BeginSweep { now_ms: u64, min_interval_ms: u64 },
    /// Records the blob store's identity (the number in its `mxcas/store-id` object) if none
    /// is recorded yet; answers the recorded one.
    RegisterStore { id: u64 },
    /// Several commands in one raft entry (one log append, one replication round and one apply
    /// transaction for all): applied in order, each with its own outcome, exactly as if they
    /// were entries of their own. Never nested.
    Batch(Vec<Command>),
    /// The stored bytes of `cid` under `blob_key` are missing or corrupt.
    ReportLost {
        #[serde(with = "crate::model::cid_bytes")]
        cid: Cid,
        blob_key: String,
    },
    /// Record a thumbnail made of `source`'s bytes as the content `content`. The first
    /// thumbnail recorded for (source, spec) stays; a later one of other bytes is a duplicate
    /// (its objects released), unless the recorded one's bytes are lost, when it replaces it.
    /// Idempotent like [`Command::CommitUpload`].
    CommitThumbnail {
        #[serde(with = "crate::model::cid_bytes")]
        source: Cid,
        spec: ThumbnailSpec,
        now_ms: u64,
        content: ContentRecord,
        content_type: String,
        width: u32,
        height: u32,
        animated: bool,
        /// The caller found the thumbnail's stored copy under this key missing or corrupt.
        lost_key: Option<String>,
    },
    /// `command` (a `CommitUpload` or `CreatePending`) within `quota` for `user` and `tenant`:
    /// an upload that would make a new media record over either quota of the current window is
    /// refused, one within them is counted; a reservation is refused once either is used up.
    /// A commit that makes no new record (a retry, the same bytes again) is neither.
    Limited { quota: Quota, user: String, tenant: String, command: Box<Command> },
    /// Records that the stored DAG of `root` holds `blocks` (its leaves and inner nodes), so
    /// the trustless gateway finds a block by its own CID. Idempotent; refused for a root
    /// with no content record, and for more than [`MAX_BLOCKS_PER_INDEX`] blocks at once.
    IndexBlocks {
        #[serde(with = "crate::model::cid_bytes")]
        root: Cid,
        #[serde(with = "crate::model::cid_list")]
        blocks: Vec<Cid>,
    },
}

/// Most blocks one [`Command::IndexBlocks`] may carry (a raft entry of about 600 KiB); a
/// larger DAG is indexed in several.
pub const MAX_BLOCKS_PER_INDEX: usize = 16_384;

impl Command {
    /// Stamps the proposing leader's clock on the command.
    pub fn stamp(&mut self, now: u64) {
        match self {
            Command::CreatePending { now_ms, .. }
            | Command::CommitUpload { now_ms, .. }
            | Command::Expire { now_ms, .. }
            | Command::BeginSweep { now_ms, .. }
            | Command::CommitThumbnail { now_ms, .. } => *now_ms = now,
            Command::Batch(cmds) => cmds.iter_mut().for_each(|c| c.stamp(now)),
            Command::Limited { command, .. } => command.stamp(now),
            Command::ReportLost { .. } | Command::RegisterStore { .. } | Command::IndexBlocks { .. } => {}
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutput {
    Pending(MediaRecord),
    Committed(CommitOutcome),
    Expired {
        removed: u64,
    },
    Sweep(Generations),
    Lost {
        /// False when the record no longer pointed at that key (already repaired or reported).
        marked: bool,
    },
    StoreId(u64),
    /// One outcome per command of a [`Command::Batch`], in order.
    Batch(Vec<Result<CommandOutput, crate::error::CommandError>>),
    /// A raft entry with no command (leader no-op, membership change).
    Nothing,
    Thumbnail(ThumbnailOutcome),
    /// [`Command::IndexBlocks`]: how many of its blocks were not indexed under that root yet.
    Indexed {
        added: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThumbnailOutcome {
    /// The thumbnail recorded for (source, spec): the caller's, or one recorded before.
    pub thumbnail: ThumbnailRecord,
    /// Its content record.
    pub content: ContentRecord,
    /// As in [`CommitOutcome::deduplicated`]: the caller's objects are released.
    pub deduplicated: bool,
    pub generation: u64,
}

/// The reclaim generations: uploads name their objects under `generation`; no commit may name
/// an object of a generation `<= sealed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    pub generation: u64,
    pub sealed: u64,
    /// The blob store's recorded identity (0: none yet).
    pub store_id: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOutcome {
    pub media: MediaRecord,
    /// The content record the mxc references now.
    pub content: ContentRecord,
    /// The caller's objects are not referenced, and no commit can ever reference them (the
    /// state machine tombstoned them in this same command): the caller may delete them.
    pub deduplicated: bool,
    /// The current reclaim generation, for the caller's next uploads.
    pub generation: u64,
}

/// A change to a mutable fact, as the change feed carries it (and the state keeps the recent
/// ones, by log index, so a watcher can resume where it stopped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Changed {
    /// The mxc has content now.
    Ready(MediaKey),
    /// The content record of this CID changed (repaired onto other objects, or found lost):
    /// cached copies of it are stale. Removal of media will be announced the same way.
    Content(#[serde(with = "crate::model::cid_bytes")] Cid),
}
