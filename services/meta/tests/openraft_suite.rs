//! openraft's own storage test suite, run against the redb log store and the state machine
//! store exactly as a metadata node builds them.

// openraft's StorageError is large by design.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use mxcas_meta::StateMachine;
use mxcas_meta::raft::log_store::LogStore;
use mxcas_meta::raft::sm_store::SmStore;
use mxcas_meta::raft::{NodeId, TypeConfig};
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct RedbStores;

fn err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    openraft::StorageIOError::new(
        openraft::ErrorSubject::Store,
        openraft::ErrorVerb::Write,
        openraft::AnyError::error(e.to_string()),
    )
    .into()
}

impl StoreBuilder<TypeConfig, LogStore, SmStore, tempfile::TempDir> for RedbStores {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, SmStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(err)?;
        let log = LogStore::open(&dir.path().join("log.redb")).map_err(err)?;
        let sm = Arc::new(StateMachine::open(&dir.path().join("state.redb")).map_err(err)?);
        let sm = SmStore::open(sm, dir.path().join("snapshots")).await.map_err(err)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_redb_stores() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(RedbStores)
}
