//! The block index of a multi-block file, stored beside its blob (`<blob key>.idx`).
//!
//! It holds what is needed to serve or verify any single block of the file without reading
//! the rest: the sha2-256 of every 1 MiB leaf (leaf `i` is bytes `[i*chunk, (i+1)*chunk)` of
//! the blob) and the encoded dag-pb nodes of the DAG. Format (all integers little-endian):
//!
//! ```text
//! magic "MXCIDX01" | chunk_size u32 | size u64 | leaf_count u64 | leaf_count × [u8;32]
//! | node_count u32 | node_count × (len u32 | dag-pb bytes)
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use cid::Cid;
use sha2::{Digest, Sha256};

use mxcas_cas::unixfs::FileNode;
use mxcas_cas::{DAG_PB, Dag, RAW, cid_from_digest};

const MAGIC: &[u8; 8] = b"MXCIDX01";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockIndex {
    pub chunk_size: u32,
    pub size: u64,
    pub leaves: Vec<[u8; 32]>,
    pub nodes: Vec<(Cid, Bytes)>,
}

#[derive(Debug, thiserror::Error)]
#[error("corrupt block index: {0}")]
pub struct IndexError(&'static str);

impl BlockIndex {
    pub fn from_dag(dag: &Dag, chunk_size: u32) -> Self {
        Self {
            chunk_size,
            size: dag.size,
            leaves: dag.leaves.clone(),
            nodes: dag.nodes.iter().map(|(c, b)| (*c, Bytes::copy_from_slice(b))).collect(),
        }
    }

    pub fn encode(&self) -> Bytes {
        let nodes_len: usize = self.nodes.iter().map(|(_, b)| 4 + b.len()).sum();
        let mut out = BytesMut::with_capacity(32 + 32 * self.leaves.len() + nodes_len);
        out.put_slice(MAGIC);
        out.put_u32_le(self.chunk_size);
        out.put_u64_le(self.size);
        out.put_u64_le(self.leaves.len() as u64);
        for leaf in &self.leaves {
            out.put_slice(leaf);
        }
        out.put_u32_le(self.nodes.len() as u32);
        for (_, node) in &self.nodes {
            out.put_u32_le(node.len() as u32);
            out.put_slice(node);
        }
        out.freeze()
    }

    /// Parses and checks an index read back from the store; node CIDs are recomputed.
    pub fn decode(mut buf: Bytes) -> Result<Self, IndexError> {
        fn need(buf: &Bytes, n: usize) -> Result<(), IndexError> {
            if buf.remaining() < n { Err(IndexError("truncated")) } else { Ok(()) }
        }
        need(&buf, 28)?;
        if &buf[..8] != MAGIC {
            return Err(IndexError("bad magic"));
        }
        buf.advance(8);
        let chunk_size = buf.get_u32_le();
        let size = buf.get_u64_le();
        let leaf_count = usize::try_from(buf.get_u64_le()).map_err(|_| IndexError("leaf count"))?;
        if chunk_size == 0 || leaf_count as u64 != size.div_ceil(chunk_size as u64).max(1) {
            return Err(IndexError("leaf count does not match size"));
        }
        need(&buf, leaf_count.checked_mul(32).ok_or(IndexError("leaf count"))?)?;
        let mut leaves = Vec::with_capacity(leaf_count);
        for _ in 0..leaf_count {
            let mut leaf = [0u8; 32];
            buf.copy_to_slice(&mut leaf);
            leaves.push(leaf);
        }
        need(&buf, 4)?;
        let node_count = buf.get_u32_le() as usize;
        let mut nodes = Vec::with_capacity(node_count.min(1 << 16));
        for _ in 0..node_count {
            need(&buf, 4)?;
            let len = buf.get_u32_le() as usize;
            need(&buf, len)?;
            let node = buf.split_to(len);
            let cid = cid_from_digest(DAG_PB, &Sha256::digest(&node).into());
            nodes.push((cid, node));
        }
        if buf.has_remaining() {
            return Err(IndexError("trailing bytes"));
        }
        Ok(Self { chunk_size, size, leaves, nodes })
    }

    /// The CID of the DAG's root (the last node written).
    pub fn root(&self) -> Option<Cid> {
        self.nodes.last().map(|(c, _)| *c)
    }

    /// Checks that this index describes the content named `root` of `size` bytes: the DAG
    /// under `root` (from these nodes) links exactly these leaves, in order. Only then may the
    /// leaf hashes be trusted to verify blocks read from the store.
    pub fn verify(&self, root: &Cid, size: u64, chunk_size: u32) -> Result<(), IndexError> {
        if self.size != size || self.chunk_size != chunk_size {
            return Err(IndexError("size or chunk size differs from the content record"));
        }
        let nodes: std::collections::HashMap<Cid, &Bytes> = self.nodes.iter().map(|(c, b)| (*c, b)).collect();
        let mut leaves = Vec::with_capacity(self.leaves.len());
        let mut stack = vec![*root];
        while let Some(cid) = stack.pop() {
            if cid.codec() == RAW {
                leaves.push(cid);
                if leaves.len() > self.leaves.len() {
                    return Err(IndexError("the DAG links more leaves than the index lists"));
                }
                continue;
            }
            let block = nodes.get(&cid).ok_or(IndexError("the DAG links a node the index lacks"))?;
            // A file node of strict dag-pb whose sizes add up (mxcas_cas::unixfs).
            let node =
                FileNode::from_block(block).map_err(|_| IndexError("a DAG node is not a valid UnixFS file node"))?;
            // Depth first, left to right: push children in reverse.
            stack.extend(node.links.into_iter().rev().map(|l| l.hash));
        }
        if leaves.len() != self.leaves.len() {
            return Err(IndexError("the DAG links fewer leaves than the index lists"));
        }
        for (cid, digest) in leaves.iter().zip(&self.leaves) {
            if *cid != cid_from_digest(RAW, digest) {
                return Err(IndexError("a leaf hash differs from the DAG's link"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mxcas_cas::{CHUNK_SIZE, DagBuilder};

    #[test]
    fn round_trips_and_rejects_damage() {
        let mut b = DagBuilder::new();
        b.update(&vec![7u8; 2 * CHUNK_SIZE + 9]);
        let dag = b.finish();
        let index = BlockIndex::from_dag(&dag, CHUNK_SIZE as u32);
        let bytes = index.encode();
        let back = BlockIndex::decode(bytes.clone()).expect("decodes");
        assert_eq!(back, index);
        assert_eq!(back.root(), Some(dag.root));
        assert!(BlockIndex::decode(bytes.slice(..bytes.len() - 1)).is_err());
        let mut bad = bytes.to_vec();
        bad[0] = b'X';
        assert!(BlockIndex::decode(bad.into()).is_err());
        back.verify(&dag.root, dag.size, CHUNK_SIZE as u32).expect("a true index verifies");
    }

    #[test]
    fn verify_rejects_swapped_leaves_and_wrong_sizes() {
        let mut b = DagBuilder::new();
        let data: Vec<u8> = (0..3 * CHUNK_SIZE as u32 + 5).map(|i| (i % 253) as u8).collect();
        b.update(&data);
        let dag = b.finish();
        let good = BlockIndex::from_dag(&dag, CHUNK_SIZE as u32);
        let mut tampered = good.clone();
        tampered.leaves[0] = Sha256::digest(b"evil").into();
        assert!(tampered.verify(&dag.root, dag.size, CHUNK_SIZE as u32).is_err());
        let mut swapped = good.clone();
        swapped.leaves.swap(0, 1);
        assert!(swapped.verify(&dag.root, dag.size, CHUNK_SIZE as u32).is_err());
        assert!(good.verify(&dag.root, dag.size + 1, CHUNK_SIZE as u32).is_err());
        let other = mxcas_cas::cid_of(b"other");
        assert!(good.verify(&other, dag.size, CHUNK_SIZE as u32).is_err());
    }
}
