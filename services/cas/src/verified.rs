//! Blocks proven to be what their CID names.
//!
//! [`VerifiedBlock`] can only be made by [`VerifiedBlock::verify`] (the bytes hash to the CID's
//! digest) or, for identity CIDs, from the CID itself (its digest is the bytes). Code that
//! holds one never checks again, and code that needs proof takes one: bytes from another
//! server cannot reach a reader or a cache without passing through here.
//!
//! Accepted: CIDv0 and CIDv1; codecs raw (0x55) and dag-pb (0x70); multihashes sha2-256
//! (0x12, 32 bytes) and identity (0x00, up to [`Limits::max_identity_size`]). Anything else is
//! refused: mxcas cannot prove it.

use cid::Cid;
use sha2::{Digest, Sha256};

use crate::profile::{DAG_PB, RAW, SHA2_256};

/// Multihash `identity`: the digest is the data.
pub const IDENTITY: u64 = 0x00;

/// Bounds on what a remote DAG may cost to read.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest block accepted (IPFS peers exchange blocks of at most 2 MiB).
    pub max_block_size: usize,
    /// Largest identity CID payload (the `cid` crate holds digests of at most 64 bytes, so a
    /// longer one never decodes whatever this says).
    pub max_identity_size: usize,
    /// Deepest a file's DAG may be (the root is depth 0).
    pub max_depth: usize,
    /// Most links one node may have.
    pub max_links: usize,
    /// Most blocks one read may need (bounds the planner's memory whatever the DAG's shape).
    pub max_blocks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_block_size: 2 << 20, max_identity_size: 64, max_depth: 32, max_links: 16_384, max_blocks: 1 << 20 }
    }
}

/// Why bytes are not the block a CID names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("codec {0:#x} is not read here (raw and dag-pb are)")]
    UnsupportedCodec(u64),
    #[error("multihash {0:#x} is not checked here (sha2-256 and identity are)")]
    UnsupportedHash(u64),
    #[error("block of {size} bytes is over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("the bytes do not hash to the CID")]
    Mismatch,
    #[error("a sha2-256 digest of {0} bytes, not 32: no bytes can match it")]
    TruncatedDigest(u8),
}

/// A block whose bytes are what its CID names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedBlock {
    cid: Cid,
    bytes: Vec<u8>,
}

fn check_codec(cid: &Cid) -> Result<(), VerifyError> {
    match cid.codec() {
        RAW | DAG_PB => Ok(()),
        other => Err(VerifyError::UnsupportedCodec(other)),
    }
}

impl VerifiedBlock {
    /// Checks `bytes` against `cid`.
    pub fn verify(cid: Cid, bytes: Vec<u8>, limits: &Limits) -> Result<Self, VerifyError> {
        check_codec(&cid)?;
        if bytes.len() > limits.max_block_size {
            return Err(VerifyError::TooLarge { size: bytes.len(), limit: limits.max_block_size });
        }
        let mh = cid.hash();
        let matches = match mh.code() {
            SHA2_256 => mh.size() == 32 && Sha256::digest(&bytes).as_slice() == mh.digest(),
            IDENTITY => mh.digest() == bytes.as_slice(),
            other => return Err(VerifyError::UnsupportedHash(other)),
        };
        if !matches {
            return Err(VerifyError::Mismatch);
        }
        Ok(Self { cid, bytes })
    }

    /// The block an identity CID carries, without fetching anything; `None` for other CIDs.
    pub fn from_identity(cid: &Cid, limits: &Limits) -> Option<Result<Self, VerifyError>> {
        let mh = cid.hash();
        (mh.code() == IDENTITY).then(|| {
            if mh.digest().len() > limits.max_identity_size {
                return Err(VerifyError::TooLarge { size: mh.digest().len(), limit: limits.max_identity_size });
            }
            Self::verify(*cid, mh.digest().to_vec(), limits)
        })
    }

    /// Whether a CID names something this module can prove (its codec and hash).
    pub fn supported(cid: &Cid) -> Result<(), VerifyError> {
        check_codec(cid)?;
        match cid.hash().code() {
            // A truncated sha2-256 digest can never be matched: no block proves it.
            SHA2_256 if cid.hash().size() != 32 => Err(VerifyError::TruncatedDigest(cid.hash().size())),
            SHA2_256 | IDENTITY => Ok(()),
            other => Err(VerifyError::UnsupportedHash(other)),
        }
    }

    pub fn cid(&self) -> &Cid {
        &self.cid
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{cid_from_digest, raw_cid};
    use multihash::Multihash;

    #[test]
    fn only_bytes_that_hash_to_the_cid_are_verified() {
        let l = Limits::default();
        let cid = raw_cid(b"hello");
        assert_eq!(VerifiedBlock::verify(cid, b"hello".to_vec(), &l).expect("verified").bytes(), b"hello");
        assert_eq!(VerifiedBlock::verify(cid, b"hellO".to_vec(), &l), Err(VerifyError::Mismatch));
        // CIDv0: dag-pb and sha2-256 implied.
        let block = crate::dag_pb::encode(&crate::dag_pb::PbNode { links: vec![], data: Some(vec![8, 2]) });
        let v0 = Cid::new_v0(Multihash::wrap(SHA2_256, &Sha256::digest(&block)).expect("digest")).expect("v0");
        assert!(VerifiedBlock::verify(v0, block.clone(), &l).is_ok());
        // Other codecs and hashes cannot be proven here.
        let cbor = Cid::new_v1(0x71, *cid.hash());
        assert_eq!(VerifiedBlock::verify(cbor, b"hello".to_vec(), &l), Err(VerifyError::UnsupportedCodec(0x71)));
        let blake3 = Cid::new_v1(RAW, Multihash::wrap(0x1e, &[0; 32]).expect("digest"));
        assert_eq!(VerifiedBlock::verify(blake3, b"x".to_vec(), &l), Err(VerifyError::UnsupportedHash(0x1e)));
        // A sha2-256 multihash with a short digest never matches, and is not even asked for.
        let short = Cid::new_v1(RAW, Multihash::wrap(SHA2_256, &Sha256::digest(b"x")[..16]).expect("digest"));
        assert_eq!(VerifiedBlock::supported(&short), Err(VerifyError::TruncatedDigest(16)));
        assert_eq!(VerifiedBlock::verify(short, b"x".to_vec(), &l), Err(VerifyError::Mismatch));
        let small = Limits { max_block_size: 4, ..l };
        assert!(matches!(VerifiedBlock::verify(cid, b"hello".to_vec(), &small), Err(VerifyError::TooLarge { .. })));
        assert!(VerifiedBlock::verify(cid_from_digest(RAW, &[0; 32]), Vec::new(), &l).is_err());
    }

    #[test]
    fn identity_cids_carry_their_block() {
        let l = Limits::default();
        let id = Cid::new_v1(RAW, Multihash::wrap(IDENTITY, b"inline").expect("digest"));
        assert_eq!(VerifiedBlock::from_identity(&id, &l).expect("identity").expect("ok").bytes(), b"inline");
        assert!(VerifiedBlock::from_identity(&raw_cid(b"x"), &l).is_none());
        let tight = Limits { max_identity_size: 3, ..l };
        assert!(matches!(VerifiedBlock::from_identity(&id, &tight), Some(Err(VerifyError::TooLarge { .. }))));
        // The probe CID of the trustless gateway spec, bafkqaaa: the empty identity block.
        let probe: Cid = "bafkqaaa".parse().expect("cid");
        assert_eq!(VerifiedBlock::from_identity(&probe, &l).expect("identity").expect("ok").bytes(), b"");
    }
}
