//! Matrix federation for mxcas, the parts that are pure logic over bytes: how a server signs
//! and checks JSON and requests, what its key document says, how a media response is framed,
//! and which addresses a remote may make us connect to. No async runtime, no sockets: the
//! edge does the I/O.
//!
//! - [`canonical`]: canonical JSON, the bytes every signature covers.
//! - [`signing`]: ed25519 keys and JSON signatures (the `signatures` member).
//! - [`x_matrix`]: the `Authorization: X-Matrix …` header of server-server requests.
//! - [`keys`]: `/_matrix/key/v2/server` documents, checked (self-signed, fresh) or made.
//! - [`multipart`]: the `multipart/mixed` body of federation media downloads.
//! - [`addresses`]: the address ranges a fetch of remote media must not reach.

pub mod addresses;
pub mod canonical;
pub mod keys;
pub mod multipart;
pub mod signing;
pub mod x_matrix;

pub use signing::{SignatureError, SigningKey};
