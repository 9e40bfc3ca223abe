//! Stored content as the IPFS trustless gateway serves it: any block of any stored DAG, found
//! by its own CID, and the blocks of a CAR response (MSC2706; the Trustless Gateway spec).
//!
//! A block is found as a root (its content record) or, for a leaf or inner node of a larger
//! file, through the metadata's block index (`FindBlock`: the roots whose DAG holds it), then
//! in that file's block index. Whatever is served is verified: roots and leaves are read
//! through the block cache, which checks each against its hash, and inner nodes come from a
//! block index that was checked against its root before use (`BlockIndex::verify`).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use cid::Cid;
use mxcas_cas::walk::{Walk, WalkError, walk};
use mxcas_cas::{DAG_PB, Limits, RAW, SHA2_256, sha256_digest};
use mxcas_meta::{ContentRecord, MetaError};

use crate::block_index::BlockIndex;
use crate::cache::{BlockCache, BlockError};
use crate::media::MediaService;

/// A stored file's DAG.
pub struct StoredDag {
    pub content: ContentRecord,
    /// `None` for a one-block file (its root is its only block).
    pub index: Option<Arc<BlockIndex>>,
}

/// Where one block of a [`StoredDag`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `index.nodes[i]`: a dag-pb node, in memory.
    Node(usize),
    /// Leaf `i` of the file, read from the store (leaf 0 of a one-block file is all of it).
    Leaf(u64),
}

/// A block found: the DAG it was found in, and where in it.
pub struct Located {
    pub dag: StoredDag,
    pub source: Source,
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// The form stored CIDs are in (CIDv1; a CIDv0 names the same dag-pb block).
pub fn as_v1(cid: &Cid) -> Cid {
    if cid.version() == cid::Version::V0 { Cid::new_v1(DAG_PB, *cid.hash()) } else { *cid }
}

impl StoredDag {
    async fn load(blocks: &BlockCache, content: ContentRecord) -> Result<Self, BlockError> {
        let index = match &content.index_key {
            Some(key) => Some(blocks.index(&content, key).await?),
            None => None,
        };
        Ok(Self { content, index })
    }

    /// Where `cid` (CIDv1) is in this DAG, if it is.
    fn find(&self, cid: &Cid) -> Option<Source> {
        self.lookup().source(cid)
    }

    /// The DAG's blocks by CID, for finding many.
    fn lookup(&self) -> Lookup<'_> {
        let (mut nodes, mut leaves) = (HashMap::new(), HashMap::new());
        if let Some(index) = &self.index {
            for (i, (c, _)) in index.nodes.iter().enumerate() {
                nodes.entry(*c).or_insert(i);
            }
            // Equal hashes are equal bytes: the first leaf of a hash serves all.
            for (i, l) in index.leaves.iter().enumerate() {
                leaves.entry(*l).or_insert(i as u64);
            }
        }
        Lookup { dag: self, nodes, leaves }
    }

    /// Bytes of the block at `source`, verified.
    pub async fn bytes(&self, blocks: &BlockCache, source: Source) -> Result<Bytes, BlockError> {
        match (source, &self.index) {
            (Source::Node(i), Some(index)) => Ok(index.nodes[i].1.clone()),
            (Source::Node(_), None) => {
                Err(BlockError::OutOfRange { cid: self.content.cid.to_string(), block: u64::MAX })
            }
            (Source::Leaf(i), _) => blocks.block(&self.content, i).await,
        }
    }

    /// Length of the block at `source`, without reading it.
    pub fn len(&self, source: Source) -> u64 {
        match (source, &self.index) {
            (Source::Node(i), Some(index)) => index.nodes[i].1.len() as u64,
            (Source::Node(_), None) => 0,
            (Source::Leaf(i), _) => {
                let r = BlockCache::block_range(&self.content, i);
                r.end - r.start
            }
        }
    }

    /// The sections of a CAR of the DAG below `start` (a block of this DAG, as the request
    /// named it), in order, each with where its bytes are.
    pub fn plan(&self, start: Cid, how: Walk, limits: &Limits) -> Result<Vec<(Cid, Source)>, WalkError> {
        // One block: nothing to walk.
        if how.bytes.is_none() && (how.scope == mxcas_cas::walk::Scope::Block || start.codec() == RAW) {
            let source = self.find(&as_v1(&start)).ok_or(WalkError::Missing(start))?;
            return Ok(vec![(start, source)]);
        }
        let lookup = self.lookup();
        let cids = walk(start, how, limits, |c| lookup.node(&as_v1(c)))?;
        cids.into_iter()
            .map(|cid| lookup.source(&as_v1(&cid)).map(|s| (cid, s)).ok_or(WalkError::Missing(cid)))
            .collect()
    }
}

/// Where each block of a [`StoredDag`] is, by CID.
struct Lookup<'a> {
    dag: &'a StoredDag,
    nodes: HashMap<Cid, usize>,
    leaves: HashMap<[u8; 32], u64>,
}

impl<'a> Lookup<'a> {
    /// Where the block `v1` (CIDv1) is.
    fn source(&self, v1: &Cid) -> Option<Source> {
        if self.dag.index.is_none() {
            return (*v1 == self.dag.content.cid).then_some(Source::Leaf(0));
        }
        match v1.codec() {
            DAG_PB => self.nodes.get(v1).map(|&i| Source::Node(i)),
            RAW => sha256_digest(v1).and_then(|d| self.leaves.get(&d).copied()).map(Source::Leaf),
            _ => None,
        }
    }

    /// The bytes of the dag-pb node `v1`, held in the block index.
    fn node(&self, v1: &Cid) -> Option<&'a [u8]> {
        let index = self.dag.index.as_ref()?;
        self.nodes.get(v1).map(|&i| index.nodes[i].1.as_ref())
    }
}

/// Finds blocks: the metadata's block index, with the roots found for each block kept (a
/// block's roots only grow, so a root found stays right; misses are never kept).
pub struct Gateway {
    roots: moka::future::Cache<Cid, Cid>,
}

impl Default for Gateway {
    fn default() -> Self {
        Self::new()
    }
}

impl Gateway {
    pub fn new() -> Self {
        Self { roots: moka::future::Cache::builder().max_capacity(100_000).build() }
    }

    /// Finds the stored block `cid` names (any CID form). `None`: no stored DAG holds it.
    /// A DAG whose stored bytes are reported lost is tried after the others.
    pub async fn locate(&self, media: &MediaService, cid: &Cid) -> Result<Option<Located>, LocateError> {
        let v1 = as_v1(cid);
        if v1.hash().code() != SHA2_256 || !matches!(v1.codec(), RAW | DAG_PB) {
            return Ok(None);
        }
        let mut lost = Vec::new();
        // The root found before, the block itself as a root, then the roots the index names.
        let cached = self.roots.get(&v1).await;
        for root in cached.iter().copied().chain([v1]) {
            if let Some(found) = self.try_root(media, &root, &v1, &mut lost).await? {
                return Ok(Some(found));
            }
        }
        for root in media.meta.find_block(&v1).await? {
            if Some(root) == cached {
                continue;
            }
            if let Some(found) = self.try_root(media, &root, &v1, &mut lost).await? {
                return Ok(Some(found));
            }
        }
        for content in lost {
            if let Some(found) = self.found_in(media, content, &v1).await? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Looks for `v1` in the DAG of `root`; a DAG reported lost is put aside for last.
    async fn try_root(
        &self,
        media: &MediaService,
        root: &Cid,
        v1: &Cid,
        lost: &mut Vec<ContentRecord>,
    ) -> Result<Option<Located>, LocateError> {
        let Some(content) = media.meta.get_content(root).await? else { return Ok(None) };
        if content.lost {
            lost.push(content);
            return Ok(None);
        }
        self.found_in(media, content, v1).await
    }

    async fn found_in(
        &self,
        media: &MediaService,
        content: ContentRecord,
        v1: &Cid,
    ) -> Result<Option<Located>, LocateError> {
        let root = content.cid;
        let dag = match StoredDag::load(&media.blocks, content).await {
            Ok(dag) => dag,
            // Another file holding the block may still be readable.
            Err(e) if e.is_data_loss() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(dag.find(v1).map(|source| {
            if root != *v1 {
                let roots = self.roots.clone();
                let key = *v1;
                tokio::spawn(async move { roots.insert(key, root).await });
            }
            Located { dag, source }
        }))
    }
}
