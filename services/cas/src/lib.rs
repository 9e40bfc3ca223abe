//! Content addressing for mxcas: how bytes are named, so that IPFS tooling and mxcas give the
//! same bytes the same CID (MSC2706) and a media ID can be checked against its bytes
//! (MSC2846).
//!
//! - [`profile`]: the CIDs mxcas makes, by the IPIP-499 `unixfs-v1-2025` profile: raw leaves
//!   of 1 MiB, balanced dag-pb trees of 1024 links, CIDv1 sha2-256; [`DagBuilder`] computes
//!   them incrementally at constant memory.
//! - [`dag_pb`]: the dag-pb codec, strict on decoding (one meaning per block) and canonical on
//!   encoding; [`unixfs`]: the UnixFS data it carries, and [`unixfs::FileNode`], a file node
//!   whose sizes add up.
//! - [`verified`]: [`VerifiedBlock`], a block proven to be what its CID names (the only way
//!   remote bytes reach a reader), and the [`Limits`] on remote DAGs.
//! - [`range`]: [`FileRange`], which plans the blocks covering a byte range of any UnixFS file
//!   and checks each as it arrives, in any order, from any source.
//! - [`walk`]: which blocks of a file DAG a trustless gateway's CAR carries, in order.
//! - [`car`]: CARv1, written by the gateway and read, verified block by block, from others.
//!
//! Pure CPU work on bytes in memory: this crate must not depend on an async runtime, a blob
//! store or HTTP (the edge, the `cid` command and tests all use it).

pub mod car;
pub mod dag_pb;
pub mod profile;
pub mod range;
pub mod unixfs;
pub mod verified;
pub mod walk;

pub use profile::{
    CHUNK_SIZE, DAG_PB, Dag, DagBuilder, MAX_LINKS, RAW, SHA2_256, cid_from_digest, cid_of, raw_cid, sha256_digest,
};
pub use range::{FileRange, RangeError};
pub use verified::{IDENTITY, Limits, VerifiedBlock, VerifyError};
