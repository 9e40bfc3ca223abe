//! mxcas-meta: the metadata service.
//!
//! Maps Matrix media IDs (`mxc://server/media_id`) to content, and content (named by its CID)
//! to the blob that holds its bytes. The service is a deterministic state machine
//! ([`state_machine::StateMachine`]) that applies [`command::Command`]s in order and persists
//! every result in redb; [`raft`] replicates the commands with openraft (log and state in
//! redb, RPCs over tonic) so a command is acknowledged only once a majority has it durably.
//! [`server`] exposes the service over the tonic API in `mxcas-proto` and
//! [`client::MetaClient`] is what edges use to talk to it (following the leader).
//!
//! Must not depend on: the edge (HTTP, blob store, caches). Only [`pb`] names prost types.

pub mod claims;
pub mod client;
pub mod command;
pub mod error;
pub mod model;
pub mod pb;
pub mod raft;
pub mod server;
pub mod state_machine;
pub mod tls;

pub use client::MetaClient;
pub use command::{Command, CommandOutput};
pub use error::{CommandError, MetaError, StorageError};
pub use model::{ContentRecord, MediaKey, MediaRecord, MediaState};
pub use state_machine::StateMachine;
