//! Conversions between the domain types and the prost types of `mxcas-proto`, one file per
//! type, plus the one mapping of errors to and from `tonic::Status`. Nothing else in mxcas
//! names prost types.

mod content;
mod error;
mod generations;
mod media;
mod quota;
mod thumbnail;

pub use error::{LEADER_METADATA, meta_error_from_status, status_from_command_error, status_from_storage_error};

/// A required message field was missing or malformed on the wire.
#[derive(Debug, thiserror::Error)]
#[error("malformed {0}")]
pub struct WireError(pub String);

impl From<WireError> for crate::error::MetaError {
    fn from(e: WireError) -> Self {
        crate::error::MetaError::Internal(format!("malformed answer from the metadata service: {e}"))
    }
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

pub fn cid_from_wire(bytes: &[u8]) -> Result<cid::Cid, WireError> {
    cid::Cid::try_from(bytes).map_err(|e| WireError(format!("cid: {e}")))
}
