//! Reading a byte range of a UnixFS file from its root CID, one verified block at a time.
//!
//! [`FileRange`] plans which blocks cover the range and checks each one as it arrives. It does
//! no I/O: the caller asks it what it [`wants`](FileRange::wants) (every block known to be
//! needed, in file order, so a fetcher can ask several servers at once), hands it blocks with
//! [`add`](FileRange::add) in any order, and takes the range's bytes, in order, from
//! [`next_bytes`](FileRange::next_bytes) as soon as the blocks before them are in.
//!
//! It reads any UnixFS file DAG, not only mxcas's own: CIDv0 or v1, raw leaves or dag-pb
//! leaves with inline data, any chunk size, balanced or trickle layouts (a node's own data
//! comes before its children's), identity CIDs (resolved without fetching). A node's claimed
//! sizes must agree with its children's actual ones: a block whose size differs from what
//! its parent said fails the read ([`RangeError::Inconsistent`]), since no source can fix a
//! DAG that contradicts itself. Limits ([`Limits`]) bound depth, links and block sizes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use cid::Cid;

use crate::profile::RAW;
use crate::unixfs::FileNode;
use crate::verified::{Limits, VerifiedBlock, VerifyError};

/// Why a range cannot be read from this DAG.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A block that decodes as no UnixFS file node.
    #[error("block {cid} is not part of a UnixFS file: {why}")]
    NotAFile { cid: Cid, why: String },
    /// The DAG contradicts itself (a child's size is not what its parent claims).
    #[error("block {cid} holds {actual} bytes of the file where its parent says {claimed}")]
    Inconsistent { cid: Cid, claimed: u64, actual: u64 },
    #[error("the DAG is deeper than {0} levels")]
    TooDeep(usize),
    #[error("a node has {links} links, over the limit of {limit}")]
    TooManyLinks { links: usize, limit: usize },
    #[error("the range needs more than {0} blocks")]
    TooManyBlocks(usize),
    /// A link claiming zero bytes of the file: no importer writes one, and a reader could
    /// skip it or not (two meanings of one CID).
    #[error("block {0} links a child of zero bytes")]
    EmptyChild(Cid),
    /// An earlier block failed this read; it is over.
    #[error("the read failed earlier: {0}")]
    Failed(Box<RangeError>),
    /// `add` was given a block nothing asked for.
    #[error("block {0} was not wanted")]
    NotWanted(Cid),
}

/// A block the range needs, where it sits in the file.
#[derive(Clone, Copy, Debug)]
struct Pending {
    /// File offset of the block's first byte.
    offset: u64,
    /// Bytes of the file under it, as its parent claims (`None` for the root).
    claimed: Option<u64>,
    depth: usize,
}

pub struct FileRange {
    limits: Limits,
    /// Asked for; clamped to the file's size once the root is known.
    range: Range<u64>,
    /// Blocks still needed, by CID in its v1 form (one CID may sit at several offsets, and a
    /// DAG may name one block as CIDv0 and as CIDv1).
    pending: HashMap<Cid, Vec<Pending>>,
    /// The same blocks by their first offset in the file, for [`FileRange::first_wants`].
    order: BTreeSet<(u64, Cid)>,
    /// Bytes of the range ready to be taken, by file offset: views into the blocks (a block
    /// that sits at many offsets is held once).
    ready: BTreeMap<u64, (Arc<[u8]>, Range<usize>)>,
    /// The error that ended the read, answered to every later call.
    failed: Option<RangeError>,
    /// Next offset `next_bytes` gives.
    position: u64,
    /// The file's size, once the root is in.
    size: Option<u64>,
    /// Blocks wanted so far, for [`Limits::max_blocks`].
    planned: usize,
}

impl FileRange {
    /// Reads `range` (end exclusive; clamped to the file) of the file whose root is `root`.
    pub fn new(root: Cid, range: Range<u64>, limits: Limits) -> Result<Self, RangeError> {
        VerifiedBlock::supported(&root)?;
        let mut me = Self {
            limits,
            position: range.start,
            range,
            pending: HashMap::new(),
            order: BTreeSet::new(),
            ready: BTreeMap::new(),
            size: None,
            planned: 0,
            failed: None,
        };
        me.want(root, Pending { offset: 0, claimed: None, depth: 0 })?;
        Ok(me)
    }

    /// The file's size, once the root block is in.
    pub fn file_size(&self) -> Option<u64> {
        self.size
    }

    /// The range as it will be read (clamped once the file's size is known).
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// Every block needed and not yet added, in file order (CIDv1 form).
    pub fn wants(&self) -> Vec<Cid> {
        self.first_wants(usize::MAX)
    }

    /// The first `n` of [`wants`](Self::wants), without going through the rest (a fetcher
    /// asks for the blocks nearest the reader first, and no more than it can hold).
    pub fn first_wants(&self, n: usize) -> Vec<Cid> {
        if self.failed.is_some() {
            return Vec::new();
        }
        self.order.iter().take(n).map(|(_, cid)| *cid).collect()
    }

    /// True once every byte of the range has been taken (never after a failure).
    pub fn is_done(&self) -> bool {
        self.failed.is_none()
            && self.pending.is_empty()
            && self.ready.is_empty()
            && (self.size.is_some() && self.position == self.range.end)
    }

    /// Adds a wanted block; its file bytes in the range become ready, its children wanted.
    /// An error ends the read: later calls answer it again ([`RangeError::Failed`]), except
    /// [`RangeError::NotWanted`], which changes nothing.
    pub fn add(&mut self, block: VerifiedBlock) -> Result<(), RangeError> {
        if let Some(e) = &self.failed {
            return Err(RangeError::Failed(Box::new(e.clone())));
        }
        let key = v1(block.cid());
        if !self.pending.contains_key(&key) {
            return Err(RangeError::NotWanted(*block.cid()));
        }
        let added = self.place_block(key, block);
        if let Err(e) = &added {
            self.failed = Some(e.clone());
        }
        added
    }

    fn place_block(&mut self, key: Cid, block: VerifiedBlock) -> Result<(), RangeError> {
        let cid = *block.cid();
        let at = self.pending.remove(&key).unwrap_or_default();
        if let Some(first) = at.iter().map(|p| p.offset).min() {
            self.order.remove(&(first, key));
        }
        let place = |p: &Pending, actual: u64| match p.claimed {
            Some(claimed) if claimed != actual => Err(RangeError::Inconsistent { cid, claimed, actual }),
            _ => Ok(()),
        };
        if cid.codec() == RAW {
            let bytes: Arc<[u8]> = block.into_bytes().into();
            for p in &at {
                place(p, bytes.len() as u64)?;
                self.root_size(p, bytes.len() as u64);
                self.take(p.offset, &bytes, 0..bytes.len());
            }
            return Ok(());
        }
        let node = FileNode::from_block(block.bytes()).map_err(|e| RangeError::NotAFile { cid, why: e.to_string() })?;
        if node.links.len() > self.limits.max_links {
            return Err(RangeError::TooManyLinks { links: node.links.len(), limit: self.limits.max_links });
        }
        if node.blocksizes.contains(&0) {
            return Err(RangeError::EmptyChild(cid));
        }
        let inline: Arc<[u8]> = node.inline.into();
        for p in &at {
            place(p, node.filesize)?;
            self.root_size(p, node.filesize);
            self.take(p.offset, &inline, 0..inline.len());
            let mut offset = p.offset + inline.len() as u64;
            for (link, &size) in node.links.iter().zip(&node.blocksizes) {
                let child = Pending { offset, claimed: Some(size), depth: p.depth + 1 };
                offset += size;
                if self.overlaps(child.offset, size) {
                    self.want(link.hash, child)?;
                }
            }
        }
        Ok(())
    }

    /// The next bytes of the range, in order, once the blocks holding them are in.
    pub fn next_bytes(&mut self) -> Option<Vec<u8>> {
        let entry = self.ready.first_entry()?;
        if *entry.key() != self.position {
            return None;
        }
        let (block, part) = entry.remove();
        self.position += part.len() as u64;
        Some(block[part].to_vec())
    }

    fn root_size(&mut self, p: &Pending, size: u64) {
        if p.claimed.is_none() {
            self.size = Some(size);
            let end = self.range.end.min(size);
            self.range = self.range.start.min(end)..end;
            self.position = self.range.start;
        }
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.range.end && offset.saturating_add(len) > self.range.start
    }

    /// The part of `block[part]` (at file `offset`) inside the range, made ready.
    fn take(&mut self, offset: u64, block: &Arc<[u8]>, part: Range<usize>) {
        let end = offset + part.len() as u64;
        let (from, to) = (offset.max(self.range.start), end.min(self.range.end));
        if from < to {
            let view = part.start + (from - offset) as usize..part.start + (to - offset) as usize;
            self.ready.insert(from, (block.clone(), view));
        }
    }

    fn want(&mut self, cid: Cid, p: Pending) -> Result<(), RangeError> {
        if p.depth > self.limits.max_depth {
            return Err(RangeError::TooDeep(self.limits.max_depth));
        }
        VerifiedBlock::supported(&cid)?;
        self.planned += 1;
        if self.planned > self.limits.max_blocks {
            return Err(RangeError::TooManyBlocks(self.limits.max_blocks));
        }
        let key = v1(&cid);
        let at = self.pending.entry(key).or_default();
        match at.iter().map(|q| q.offset).min() {
            Some(first) if first <= p.offset => {}
            Some(first) => {
                self.order.remove(&(first, key));
                self.order.insert((p.offset, key));
            }
            None => {
                self.order.insert((p.offset, key));
            }
        }
        at.push(p);
        match VerifiedBlock::from_identity(&cid, &self.limits) {
            Some(block) => self.place_block(key, block?),
            None => Ok(()),
        }
    }
}

/// The CIDv1 of a CID (a CIDv0 is dag-pb by definition; anything else is v1 already).
fn v1(cid: &Cid) -> Cid {
    cid.into_v1().unwrap_or(*cid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dag_pb::{self, PbLink, PbNode};
    use crate::profile::{CHUNK_SIZE, DAG_PB, DagBuilder, SHA2_256, raw_cid};
    use crate::unixfs::{Data, DataType};
    use multihash::Multihash;
    use sha2::{Digest, Sha256};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Reads `range` with blocks from `store`, handed over in `order`'s way (reversed or not).
    fn read(root: Cid, range: Range<u64>, store: &HashMap<Cid, Vec<u8>>, reverse: bool) -> Result<Vec<u8>, RangeError> {
        let l = Limits::default();
        // Wants come as CIDv1, whatever form the DAG links them in.
        let store: HashMap<Cid, &Vec<u8>> = store.iter().map(|(k, v)| (v1(k), v)).collect();
        let mut r = FileRange::new(root, range, l)?;
        let mut out = Vec::new();
        loop {
            while let Some(b) = r.next_bytes() {
                out.extend(b);
            }
            let mut wants = r.wants();
            if wants.is_empty() {
                break;
            }
            if reverse {
                wants.reverse();
            }
            for cid in wants {
                let bytes = (*store.get(&cid).expect("the store has every block")).clone();
                r.add(VerifiedBlock::verify(cid, bytes, &l)?)?;
            }
        }
        assert!(r.is_done());
        Ok(out)
    }

    fn builder_dag(data: &[u8]) -> (Cid, HashMap<Cid, Vec<u8>>) {
        let mut b = DagBuilder::new();
        b.update(data);
        let dag = b.finish();
        let mut store: HashMap<Cid, Vec<u8>> = dag.nodes.into_iter().collect();
        for chunk in data.chunks(CHUNK_SIZE) {
            store.insert(raw_cid(chunk), chunk.to_vec());
        }
        if data.is_empty() {
            store.insert(raw_cid(b""), Vec::new());
        }
        (dag.root, store)
    }

    #[test]
    fn ranges_of_mxcas_dags_read_back_in_any_block_order() {
        let data = pattern(3 * CHUNK_SIZE + 12_345, 1);
        let (root, store) = builder_dag(&data);
        let n = data.len() as u64;
        let c = CHUNK_SIZE as u64;
        for range in [0..n, 0..1, c - 1..c + 1, 2 * c..3 * c, n - 5..n, 10..u64::MAX, n..n + 10, 5..5] {
            let want = &data[range.start.min(n) as usize..range.end.min(n) as usize];
            for reverse in [false, true] {
                assert_eq!(read(root, range.clone(), &store, reverse).expect("read"), want, "{range:?}");
            }
        }
        // Only the blocks that cover the range are asked for: the root, then one leaf.
        let mut r = FileRange::new(root, c + 10..c + 20, Limits::default()).expect("plan");
        assert_eq!(r.wants(), [root]);
        r.add(VerifiedBlock::verify(root, store[&root].clone(), &Limits::default()).expect("root")).expect("add");
        assert_eq!(r.wants(), [raw_cid(&data[CHUNK_SIZE..2 * CHUNK_SIZE])]);
        assert_eq!(r.file_size(), Some(n));
        // The first wants are the wanted blocks nearest the reader, in file order, and stay so
        // as blocks arrive out of order (leaves made distinct: the pattern repeats per chunk).
        let mut data = data;
        for (k, chunk) in data.chunks_mut(CHUNK_SIZE).enumerate() {
            chunk[0] = k as u8 ^ 0x5a;
        }
        let (root, store) = builder_dag(&data);
        let mut r = FileRange::new(root, 0..n, Limits::default()).expect("plan");
        r.add(VerifiedBlock::verify(root, store[&root].clone(), &Limits::default()).expect("root")).expect("add");
        let leaves: Vec<Cid> = data.chunks(CHUNK_SIZE).map(raw_cid).collect();
        assert_eq!(r.first_wants(2), leaves[..2]);
        assert_eq!(r.wants(), leaves);
        r.add(VerifiedBlock::verify(leaves[1], store[&leaves[1]].clone(), &Limits::default()).expect("leaf"))
            .expect("add");
        assert_eq!(r.first_wants(2), [leaves[0], leaves[2]]);
        assert_eq!(r.first_wants(0), []);
        // A single-block file is its raw leaf.
        let (root, store) = builder_dag(b"small");
        assert_eq!(read(root, 1..3, &store, false).expect("read"), b"ma");
    }

    fn v0(block: &[u8]) -> Cid {
        Cid::new_v0(Multihash::wrap(SHA2_256, &Sha256::digest(block)).expect("digest")).expect("v0")
    }

    fn file_node(inline: &[u8], children: &[(Cid, u64)]) -> Vec<u8> {
        let data = Data {
            data: (!inline.is_empty()).then(|| inline.to_vec()),
            filesize: Some(inline.len() as u64 + children.iter().map(|(_, s)| s).sum::<u64>()),
            blocksizes: children.iter().map(|(_, s)| *s).collect(),
            ..Data::new(DataType::File)
        };
        let links = children.iter().map(|(c, _)| PbLink { hash: *c, name: None, tsize: None }).collect();
        dag_pb::encode(&PbNode { links, data: Some(data.encode()) })
    }

    /// A DAG as go-ipfs's defaults write it (CIDv0, dag-pb leaves of UnixFS `Raw` with inline
    /// data, 256 KiB chunks), and one in a trickle-like shape: a node's own data before its
    /// children, children of unequal depth, an identity leaf and a repeated leaf.
    #[test]
    fn foreign_layouts_read_back() {
        let chunk = 256 * 1024;
        let data = pattern(3 * chunk + 100, 7);
        let mut store = HashMap::new();
        let mut children = Vec::new();
        for piece in data.chunks(chunk) {
            let leaf = dag_pb::encode(&PbNode {
                links: vec![],
                data: Some(
                    Data { data: Some(piece.to_vec()), filesize: Some(piece.len() as u64), ..Data::new(DataType::Raw) }
                        .encode(),
                ),
            });
            let cid = v0(&leaf);
            store.insert(cid, leaf);
            children.push((cid, piece.len() as u64));
        }
        let root = file_node(&[], &children);
        let root_cid = v0(&root);
        store.insert(root_cid, root);
        let n = data.len() as u64;
        for range in [0..n, 100..chunk as u64 + 5, n - 1..n] {
            let want = &data[range.start as usize..range.end as usize];
            assert_eq!(read(root_cid, range.clone(), &store, true).expect("read"), want, "{range:?}");
        }

        // Trickle-like: root = inline "ab" + [leaf "cd", node(inline "ef", [identity "gh", leaf "cd"])].
        let mut store = HashMap::new();
        let leaf = b"cd".to_vec();
        store.insert(raw_cid(&leaf), leaf.clone());
        let identity = Cid::new_v1(RAW, Multihash::wrap(0x00, b"gh").expect("digest"));
        let inner = file_node(b"ef", &[(identity, 2), (raw_cid(&leaf), 2)]);
        let inner_cid = Cid::new_v1(DAG_PB, Multihash::wrap(SHA2_256, &Sha256::digest(&inner)).expect("digest"));
        store.insert(inner_cid, inner);
        let root = file_node(b"ab", &[(raw_cid(&leaf), 2), (inner_cid, 6)]);
        let root_cid = v0(&root);
        store.insert(root_cid, root);
        assert_eq!(read(root_cid, 0..100, &store, false).expect("read"), b"abcdefghcd");
        assert_eq!(read(root_cid, 3..9, &store, true).expect("read"), b"defghc");
        // An identity root needs nothing fetched.
        let id_root = Cid::new_v1(RAW, Multihash::wrap(0x00, b"whole file").expect("digest"));
        let mut r = FileRange::new(id_root, 6..100, Limits::default()).expect("plan");
        assert!(r.wants().is_empty());
        assert_eq!(r.next_bytes().as_deref(), Some(&b"file"[..]));
        assert!(r.is_done());
    }

    #[test]
    fn dags_that_contradict_themselves_or_exceed_the_limits_are_refused() {
        let l = Limits::default();
        let leaf = b"12345".to_vec();
        // The parent claims 4 bytes under a 5-byte leaf.
        let root = file_node(&[], &[(raw_cid(&leaf), 4)]);
        let root_cid = v0(&root);
        let mut r = FileRange::new(root_cid, 0..10, l).expect("plan");
        r.add(VerifiedBlock::verify(root_cid, root, &l).expect("root")).expect("root adds");
        let err = r.add(VerifiedBlock::verify(raw_cid(&leaf), leaf.clone(), &l).expect("leaf")).expect_err("sizes");
        assert!(matches!(err, RangeError::Inconsistent { claimed: 4, actual: 5, .. }), "{err}");
        // The failure ends the read: it is never reported done with bytes missing.
        assert!(!r.is_done());
        assert!(r.wants().is_empty());
        // More blocks than a read may need.
        let few = Limits { max_blocks: 1, ..l };
        let mut r = FileRange::new(root_cid, 0..10, few).expect("plan");
        let root = file_node(&[], &[(raw_cid(&leaf), 4)]);
        assert_eq!(r.add(VerifiedBlock::verify(root_cid, root, &l).expect("root")), Err(RangeError::TooManyBlocks(1)));
        // A block nothing asked for.
        let mut r = FileRange::new(raw_cid(b"a"), 0..1, l).expect("plan");
        let stray = VerifiedBlock::verify(raw_cid(b"b"), b"b".to_vec(), &l).expect("verified");
        assert_eq!(r.add(stray), Err(RangeError::NotWanted(raw_cid(b"b"))));
        // A chain deeper than the limit.
        let mut child = (raw_cid(&leaf), 5u64);
        let mut store = HashMap::from([(raw_cid(&leaf), leaf.clone())]);
        for _ in 0..=l.max_depth {
            let node = file_node(&[], &[child]);
            let cid = v0(&node);
            store.insert(cid, node);
            child = (cid, 5);
        }
        assert_eq!(read(child.0, 0..5, &store, false), Err(RangeError::TooDeep(l.max_depth)));
        // Not a file, and codecs that cannot be proven.
        let dir = dag_pb::encode(&PbNode { links: vec![], data: Some(Data::new(DataType::Directory).encode()) });
        let dir_cid = v0(&dir);
        let mut r = FileRange::new(dir_cid, 0..1, l).expect("plan");
        assert!(matches!(
            r.add(VerifiedBlock::verify(dir_cid, dir, &l).expect("verified")),
            Err(RangeError::NotAFile { .. })
        ));
        let cbor = Cid::new_v1(0x71, *raw_cid(b"x").hash());
        assert!(matches!(FileRange::new(cbor, 0..1, l), Err(RangeError::Verify(VerifyError::UnsupportedCodec(0x71)))));
    }

    /// One block linked many times is held once, however many times the range repeats it; a
    /// child of zero bytes is refused (a reader could skip it or not); CIDv0 and CIDv1 names
    /// of one block are one block.
    #[test]
    fn repeated_blocks_are_held_once_and_names_of_one_block_agree() {
        let l = Limits::default();
        let leaf = vec![9u8; 64 << 10];
        let x = file_node(&[], &vec![(raw_cid(&leaf), leaf.len() as u64); 1000]);
        let x_cid = v0(&x);
        let root = file_node(&[], &vec![(x_cid, 1000 * leaf.len() as u64); 16]);
        let root_cid = Cid::new_v1(DAG_PB, *v0(&root).hash());
        let mut r = FileRange::new(root_cid, 0..u64::MAX, l).expect("plan");
        r.add(VerifiedBlock::verify(root_cid, root, &l).expect("root")).expect("root");
        // The root names X as CIDv0; a source answers it as CIDv1.
        let x_v1 = Cid::new_v1(DAG_PB, *x_cid.hash());
        assert_eq!(r.wants(), [x_v1]);
        r.add(VerifiedBlock::verify(x_v1, x, &l).expect("x")).expect("x");
        r.add(VerifiedBlock::verify(raw_cid(&leaf), leaf.clone(), &l).expect("leaf")).expect("leaf");
        // 16 000 × 64 KiB ready, one 64 KiB block held: take them without keeping them.
        let mut taken = 0u64;
        while let Some(b) = r.next_bytes() {
            assert_eq!(b.len(), leaf.len());
            taken += b.len() as u64;
        }
        assert_eq!(taken, 16_000 * leaf.len() as u64);
        assert!(r.is_done());

        let empty = file_node(&[], &[(raw_cid(&leaf), 0), (raw_cid(b"abc"), 3)]);
        let empty_cid = v0(&empty);
        let mut r = FileRange::new(empty_cid, 0..3, l).expect("plan");
        assert!(matches!(
            r.add(VerifiedBlock::verify(empty_cid, empty, &l).expect("root")),
            Err(RangeError::EmptyChild(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any file, chunked at any size into balanced trees of any fanout, with raw or dag-pb
        /// leaves: every range reads back as the same slice of the file.
        #[test]
        fn any_balanced_layout_reads_any_range(
            len in 0usize..5000, chunk in 1usize..700, fanout in 2usize..9, raw_leaves in proptest::prelude::any::<bool>(),
            a in 0u64..6000, b in 0u64..6000, reverse in proptest::prelude::any::<bool>(),
        ) {
            let data = pattern(len, 3);
            let mut store = HashMap::new();
            let mut level: Vec<(Cid, u64)> = data
                .chunks(chunk)
                .map(|piece| {
                    if raw_leaves {
                        store.insert(raw_cid(piece), piece.to_vec());
                        (raw_cid(piece), piece.len() as u64)
                    } else {
                        let leaf = file_node(piece, &[]);
                        let cid = v0(&leaf);
                        store.insert(cid, leaf);
                        (cid, piece.len() as u64)
                    }
                })
                .collect();
            if level.is_empty() {
                let leaf = file_node(&[], &[]);
                store.insert(v0(&leaf), leaf.clone());
                level.push((v0(&leaf), 0));
            }
            while level.len() > 1 {
                level = level
                    .chunks(fanout)
                    .map(|group| {
                        let node = file_node(&[], group);
                        let cid = v0(&node);
                        store.insert(cid, node);
                        (cid, group.iter().map(|(_, s)| s).sum())
                    })
                    .collect();
            }
            let (from, to) = (a.min(b), a.max(b));
            let want = &data[(from as usize).min(len)..(to as usize).min(len)];
            proptest::prop_assert_eq!(read(level[0].0, from..to, &store, reverse).expect("read"), want);
        }
    }
}
