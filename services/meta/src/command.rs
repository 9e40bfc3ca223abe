//! The commands of the metadata state machine and their outputs.
//!
//! A command carries everything its result depends on (including the time, `now_ms`, chosen
//! by the proposer) so that applying it is deterministic on every replica.

use serde::{Deserialize, Serialize};

use crate::model::{ContentRecord, MediaKey, MediaRecord};

// Commands are built once per request and moved into the log; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Reserve `media` for an asynchronous upload by `user_id`.
    CreatePending { media: MediaKey, user_id: String, now_ms: u64, expires_at_ms: u64, max_pending_per_user: u32 },
    /// Record a finished upload. `media.media_id == None` means a synchronous upload whose
    /// media ID is the CID.
    CommitUpload {
        upload_id: String,
        server_name: String,
        media_id: Option<String>,
        user_id: String,
        now_ms: u64,
        content: ContentRecord,
        content_type: String,
        filename: Option<String>,
    },
    /// Drop pending reservations that expired before `now_ms`, and idempotency records older
    /// than a day.
    ExpirePending { now_ms: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutput {
    Pending(MediaRecord),
    Committed(CommitOutcome),
    Expired {
        removed: u64,
    },
    /// A raft entry with no command (leader no-op, membership change).
    Nothing,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOutcome {
    pub media: MediaRecord,
    /// The content record the mxc references now.
    pub content: ContentRecord,
    /// The caller's blob is not referenced (the content was already stored elsewhere).
    pub deduplicated: bool,
}
