//! Errors of the metadata service, split by who caused them.
//!
//! [`CommandError`] is a deterministic rejection of a command by the state machine (the
//! caller's fault or a conflict): every replica reaches the same one. [`StorageError`] is a
//! failure of this node's disk or database: not the caller's fault, and a node that sees one
//! while applying must stop serving. [`MetaError`] is what a client sees, with retry advice.

/// A command the state machine refused. Deterministic: same state + command → same error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum CommandError {
    #[error("media not found")]
    NotFound,
    #[error("media already has content")]
    AlreadyExists,
    #[error("media was reserved by another user")]
    PermissionDenied,
    #[error("too many pending uploads for this user (limit {limit})")]
    PendingLimit { limit: u32 },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The upload names an object the sweeper may have reclaimed (its generation is sealed,
    /// or it was released): store the bytes again under `generation` and commit that.
    #[error("the uploaded object may have been reclaimed; store it again under generation {generation}")]
    Reclaimed { generation: u64 },
    /// The account's (or its tenant's) upload quota for this period is used up.
    #[error("upload quota of the {scope:?} exceeded for this period")]
    QuotaExceeded { scope: crate::model::QuotaScope },
}

/// This node's storage failed. Fatal for a state machine: stop and let an operator look.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("metadata database: {0}")]
    Database(String),
    #[error("corrupt record in table {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error("metadata writer has stopped")]
    WriterStopped,
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self { StorageError::Database(e.to_string()) }
        }
    )*};
}
storage_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// What a client of the metadata service sees.
#[derive(Clone, Debug, thiserror::Error)]
pub enum MetaError {
    /// The service refused the command (not retryable).
    #[error(transparent)]
    Rejected(#[from] CommandError),
    /// The service cannot answer now (no leader, overloaded, node down): retry with backoff.
    #[error("metadata service unavailable: {0}")]
    Unavailable(String),
    /// The service failed internally (storage): retrying the same node will not help soon.
    #[error("metadata service internal error: {0}")]
    Internal(String),
}

impl MetaError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, MetaError::Unavailable(_))
    }
}
