//! The one place where metadata errors meet gRPC statuses.

use tonic::{Code, Status};

use crate::error::{CommandError, MetaError, StorageError};

/// gRPC metadata on an `UNAVAILABLE` status naming the leader's address (`host:port`).
pub const LEADER_METADATA: &str = "x-mxcas-leader";

/// Key of the binary status detail that carries a [`CommandError`] across the wire exactly.
const DETAIL_PENDING_LIMIT: &str = "pending-limit:";
const DETAIL_RECLAIMED: &str = "reclaimed:";
const DETAIL_QUOTA_USER: &str = "quota:user:";
const DETAIL_QUOTA_TENANT: &str = "quota:tenant:";

pub fn status_from_command_error(e: &CommandError) -> Status {
    match e {
        CommandError::NotFound => Status::not_found(e.to_string()),
        CommandError::AlreadyExists => Status::already_exists(e.to_string()),
        CommandError::PermissionDenied => Status::permission_denied(e.to_string()),
        CommandError::PendingLimit { limit } => {
            Status::resource_exhausted(format!("{DETAIL_PENDING_LIMIT}{limit}: {e}"))
        }
        CommandError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
        CommandError::Reclaimed { generation } => {
            Status::failed_precondition(format!("{DETAIL_RECLAIMED}{generation}: {e}"))
        }
        CommandError::QuotaExceeded { scope } => {
            let detail = match scope {
                crate::model::QuotaScope::User => DETAIL_QUOTA_USER,
                crate::model::QuotaScope::Tenant => DETAIL_QUOTA_TENANT,
            };
            Status::resource_exhausted(format!("{detail} {e}"))
        }
    }
}

pub fn status_from_storage_error(e: &StorageError) -> Status {
    match e {
        StorageError::WriterStopped => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// How a client reads a status: rejections are final, `UNAVAILABLE`-like codes retryable.
pub fn meta_error_from_status(s: &Status) -> MetaError {
    let msg = s.message().to_owned();
    match s.code() {
        Code::NotFound => CommandError::NotFound.into(),
        Code::AlreadyExists => CommandError::AlreadyExists.into(),
        Code::PermissionDenied => CommandError::PermissionDenied.into(),
        Code::ResourceExhausted if msg.starts_with(DETAIL_QUOTA_USER) => {
            CommandError::QuotaExceeded { scope: crate::model::QuotaScope::User }.into()
        }
        Code::ResourceExhausted if msg.starts_with(DETAIL_QUOTA_TENANT) => {
            CommandError::QuotaExceeded { scope: crate::model::QuotaScope::Tenant }.into()
        }
        Code::ResourceExhausted if msg.starts_with(DETAIL_PENDING_LIMIT) => {
            let limit = msg[DETAIL_PENDING_LIMIT.len()..].split(':').next().and_then(|n| n.parse().ok()).unwrap_or(0);
            CommandError::PendingLimit { limit }.into()
        }
        // Anything else out of resources (a transport's own overload signal) is retryable.
        Code::ResourceExhausted => MetaError::Unavailable(msg),
        Code::InvalidArgument => CommandError::InvalidArgument(msg).into(),
        Code::FailedPrecondition if msg.starts_with(DETAIL_RECLAIMED) => {
            match msg[DETAIL_RECLAIMED.len()..].split(':').next().and_then(|n| n.parse().ok()) {
                Some(generation) => CommandError::Reclaimed { generation }.into(),
                None => MetaError::Internal(format!("malformed reclaimed status: {msg}")),
            }
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted | Code::Unknown => {
            MetaError::Unavailable(msg)
        }
        _ => MetaError::Internal(format!("{:?}: {msg}", s.code())),
    }
}
