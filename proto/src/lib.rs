//! mxcas-proto: the wire API of the mxcas metadata service.
//!
//! Generated prost messages and tonic client/server stubs for `mxcas.meta.v1.Meta` (the
//! metadata API), `Raft` (traffic between metadata nodes) and `Cluster` (membership)
//! (see `proto/mxcas/meta/v1/meta.proto` for the semantics of every call and error).
//! Nothing outside this crate and the conversion modules of `mxcas-meta` should name these
//! types: the services work with their own domain types and convert at the boundary.

/// `mxcas.meta.v1`: the metadata service API.
pub mod meta {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("mxcas.meta.v1");
}
