//! Which blocks of a UnixFS file DAG a trustless gateway sends, in which order.
//!
//! The Trustless Gateway specification's CAR responses: `dag-scope=block` is the block
//! itself; `entity` (for a file: every block needed to read it) and `all` (the whole DAG
//! below it, the same for a file) walk depth first, left to right (`order=dfs`);
//! `entity-bytes=from:to` keeps only the blocks needed to verify that byte range, found by
//! each node's `blocksizes`. With `dups=n` a block linked twice is sent once. Identity CIDs are
//! never sent (their bytes are in the CID).
//!
//! The walk reads only dag-pb nodes (through the caller's look-up); leaves are named, not
//! read, so planning a CAR of a large file costs no I/O beyond its inner nodes.

use std::collections::HashSet;
use std::ops::Range;

use cid::Cid;

use crate::profile::{DAG_PB, RAW};
use crate::unixfs::FileNode;
use crate::verified::{IDENTITY, Limits};

/// `dag-scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Block,
    Entity,
    All,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "block" => Some(Scope::Block),
            "entity" => Some(Scope::Entity),
            "all" => Some(Scope::All),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Block => "block",
            Scope::Entity => "entity",
            Scope::All => "all",
        }
    }
}

/// `entity-bytes=from:to`: inclusive offsets; negative ones count from the end, `*` is the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntityBytes {
    pub from: i64,
    /// `None`: `*`.
    pub to: Option<i64>,
}

/// What `entity-bytes` resolves to for a file of a given size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// These bytes (half-open).
    Bytes(Range<u64>),
    /// A zero-length range within the file: the response is the block alone.
    Empty,
    /// The range starts past the end: nothing of it exists (a bad request).
    Outside,
}

impl EntityBytes {
    pub fn parse(s: &str) -> Option<Self> {
        let (from, to) = s.split_once(':')?;
        let int = |v: &str| -> Option<i64> {
            let digits = v.strip_prefix('-').unwrap_or(v);
            (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| v.parse().ok()).flatten()
        };
        let from = int(from)?;
        let to = if to == "*" { None } else { Some(int(to)?) };
        Some(Self { from, to })
    }

    pub fn resolve(self, size: u64) -> Resolved {
        let size = i128::from(size);
        let from = match i128::from(self.from) {
            f if f < 0 => (size + f).max(0),
            f => f,
        };
        let last = match self.to.map(i128::from) {
            None => size - 1,
            Some(t) if t < 0 => size + t,
            Some(t) => t.min(size - 1),
        };
        if from >= size {
            Resolved::Outside
        } else if last < from {
            Resolved::Empty
        } else {
            Resolved::Bytes(from as u64..last as u64 + 1)
        }
    }
}

/// Why a DAG cannot be walked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("block {0} of the DAG is not available")]
    Missing(Cid),
    #[error("block {cid} is not a UnixFS file node: {reason}")]
    NotAFile { cid: Cid, reason: String },
    #[error("block {0} has a codec a UnixFS file does not link")]
    Codec(Cid),
    #[error("the DAG is deeper than {0}")]
    TooDeep(usize),
    #[error("the walk needs more than {0} blocks")]
    TooManyBlocks(usize),
    #[error("entity-bytes starts past the end of the file ({size} bytes)")]
    Outside { size: u64 },
}

/// What to walk.
#[derive(Clone, Copy, Debug)]
pub struct Walk {
    pub scope: Scope,
    pub bytes: Option<EntityBytes>,
    /// Send a block each time it is linked (`dups=y`), or once (`dups=n`).
    pub dups: bool,
}

/// The CIDs to send for `root`, in order. `node` gives the bytes of a dag-pb block of the DAG
/// (verified by the caller); raw leaves are never asked for.
pub fn walk<'a>(
    root: Cid,
    how: Walk,
    limits: &Limits,
    node: impl Fn(&Cid) -> Option<&'a [u8]>,
) -> Result<Vec<Cid>, WalkError> {
    let is_identity = |c: &Cid| c.hash().code() == IDENTITY;
    if is_identity(&root) {
        return Ok(Vec::new());
    }
    let scope = if how.bytes.is_some() { Scope::Entity } else { how.scope };
    if scope == Scope::Block || root.codec() == RAW {
        return Ok(vec![root]);
    }
    let file = |cid: &Cid| -> Result<FileNode, WalkError> {
        if cid.codec() != DAG_PB {
            return Err(WalkError::Codec(*cid));
        }
        let bytes = node(cid).ok_or(WalkError::Missing(*cid))?;
        FileNode::from_block(bytes).map_err(|e| WalkError::NotAFile { cid: *cid, reason: e.to_string() })
    };
    let top = file(&root)?;
    let range = match how.bytes.map(|b| b.resolve(top.filesize)) {
        None => 0..top.filesize,
        Some(Resolved::Bytes(r)) => r,
        Some(Resolved::Empty) => return Ok(vec![root]),
        Some(Resolved::Outside) => return Err(WalkError::Outside { size: top.filesize }),
    };
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut visits = 0usize;
    let mut parsed: std::collections::HashMap<Cid, std::rc::Rc<FileNode>> = std::collections::HashMap::new();
    let whole = how.bytes.is_none();
    // (block, offset of its first byte in the file, bytes its parent says it holds, depth),
    // depth first: children pushed in reverse.
    let mut stack = vec![(root, 0u64, top.filesize, 0usize)];
    while let Some((cid, offset, size, depth)) = stack.pop() {
        // Every visit counts, sent or not: a DAG linking one subtree many times cannot make
        // the walk long while its output stays short.
        visits += 1;
        if visits > limits.max_blocks {
            return Err(WalkError::TooManyBlocks(limits.max_blocks));
        }
        if is_identity(&cid) {
            continue;
        }
        let first = seen.insert(cid);
        if how.dups || first {
            out.push(cid);
        }
        // Without a range, a block seen before had all of its subtree sent after it then.
        if cid.codec() == RAW || (!first && whole && !how.dups) {
            continue;
        }
        if depth >= limits.max_depth {
            return Err(WalkError::TooDeep(limits.max_depth));
        }
        // Parsed once however often it is linked.
        let n = match parsed.get(&cid) {
            Some(n) => std::rc::Rc::clone(n),
            None => {
                let n = std::rc::Rc::new(if cid == root { top.clone() } else { file(&cid)? });
                parsed.insert(cid, std::rc::Rc::clone(&n));
                n
            }
        };
        if n.filesize != size {
            return Err(WalkError::NotAFile {
                cid,
                reason: format!("holds {} bytes, its parent says {size}", n.filesize),
            });
        }
        let overflow = || WalkError::NotAFile { cid, reason: "offsets overflow".into() };
        let mut start = offset.checked_add(n.inline.len() as u64).ok_or_else(overflow)?;
        let mut children = Vec::with_capacity(n.links.len());
        for (link, &size) in n.links.iter().zip(&n.blocksizes) {
            let end = start.checked_add(size).ok_or_else(overflow)?;
            // Without a range every child is sent (even one holding no bytes); with one, only
            // those holding some of its bytes.
            if whole || (start < range.end && end > range.start) {
                children.push((link.hash, start, size, depth + 1));
            }
            start = end;
        }
        stack.extend(children.into_iter().rev());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{CHUNK_SIZE, DagBuilder, raw_cid};
    use std::collections::HashMap;

    fn dag_of(data: &[u8]) -> (Cid, HashMap<Cid, Vec<u8>>) {
        let mut b = DagBuilder::new();
        b.update(data);
        let dag = b.finish();
        (dag.root, dag.nodes.into_iter().collect())
    }

    fn run(root: Cid, nodes: &HashMap<Cid, Vec<u8>>, how: Walk) -> Result<Vec<Cid>, WalkError> {
        walk(root, how, &Limits::default(), |c| nodes.get(c).map(Vec::as_slice))
    }

    const ALL: Walk = Walk { scope: Scope::All, bytes: None, dups: false };

    #[test]
    fn entity_bytes_resolve_like_the_specification_says() {
        let r = |s: &str, size| EntityBytes::parse(s).expect(s).resolve(size);
        assert_eq!(r("0:*", 100), Resolved::Bytes(0..100));
        assert_eq!(r("0:0", 100), Resolved::Bytes(0..1));
        assert_eq!(r("10:19", 100), Resolved::Bytes(10..20));
        assert_eq!(r("-10:*", 100), Resolved::Bytes(90..100));
        assert_eq!(r("-1000:*", 100), Resolved::Bytes(0..100));
        assert_eq!(r("49:-10", 100), Resolved::Bytes(49..91));
        assert_eq!(r("90:500", 100), Resolved::Bytes(90..100), "a range running past the end is cut");
        assert_eq!(r("60:-50", 100), Resolved::Empty);
        assert_eq!(r("100:*", 100), Resolved::Outside);
        assert_eq!(r("0:*", 0), Resolved::Outside);
        for bad in ["", ":", "1", "a:b", "1:", ":2", "--1:2", "1:+2", "1:2:3", "99999999999999999999:*"] {
            assert_eq!(EntityBytes::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_file_is_walked_depth_first_and_a_range_keeps_only_its_blocks() {
        let chunk = CHUNK_SIZE;
        let data: Vec<u8> = (0..5 * chunk + 7).map(|i| (i % 251) as u8).collect();
        let (root, nodes) = dag_of(&data);
        let leaves: Vec<Cid> = data.chunks(chunk).map(raw_cid).collect();
        let mut all = vec![root];
        all.extend(&leaves);
        assert_eq!(run(root, &nodes, ALL).expect("walk"), all);
        assert_eq!(run(root, &nodes, Walk { scope: Scope::Entity, ..ALL }).expect("walk"), all);
        assert_eq!(run(root, &nodes, Walk { scope: Scope::Block, ..ALL }).expect("walk"), vec![root]);
        let bytes = |s: &str| Walk { bytes: EntityBytes::parse(s), ..ALL };
        // A range inside leaf 1, across leaves 2..=3, and the last byte.
        let one = format!("{}:{}", chunk + 5, chunk + 10);
        assert_eq!(run(root, &nodes, bytes(&one)).expect("walk"), vec![root, leaves[1]]);
        let across = format!("{}:{}", 2 * chunk + 1, 3 * chunk);
        assert_eq!(run(root, &nodes, bytes(&across)).expect("walk"), vec![root, leaves[2], leaves[3]]);
        assert_eq!(run(root, &nodes, bytes("-1:*")).expect("walk"), vec![root, leaves[5]]);
        assert_eq!(run(root, &nodes, bytes("3:2")).expect("walk"), vec![root], "zero-length: the block alone");
        let past = format!("{}:*", data.len());
        assert_eq!(run(root, &nodes, bytes(&past)), Err(WalkError::Outside { size: data.len() as u64 }));
        // A raw root is its own entity.
        let raw = raw_cid(b"small");
        assert_eq!(run(raw, &nodes, ALL).expect("walk"), vec![raw]);
        // The empty identity CID (the gateway probe) sends no block at all.
        let probe: Cid = "bafkqaaa".parse().expect("cid");
        assert_eq!(run(probe, &nodes, ALL).expect("walk"), vec![]);
    }

    #[test]
    fn repeated_blocks_are_sent_once_unless_duplicates_are_asked_for() {
        let data = vec![0u8; 3 * CHUNK_SIZE];
        let (root, nodes) = dag_of(&data);
        let zero = raw_cid(&vec![0u8; CHUNK_SIZE]);
        assert_eq!(run(root, &nodes, ALL).expect("walk"), vec![root, zero]);
        assert_eq!(run(root, &nodes, Walk { dups: true, ..ALL }).expect("walk"), vec![root, zero, zero, zero]);
    }

    #[test]
    fn a_dag_linking_one_subtree_many_times_is_walked_within_its_bounds() {
        use crate::dag_pb::{PbLink, PbNode};
        use crate::unixfs::{Data, DataType};
        // Each level links the level below 1000 times: 1000^depth visits if walked naively.
        let leaf = raw_cid(&[1u8; 4]);
        let (mut child, mut size) = (leaf, 4u64);
        let mut nodes = HashMap::new();
        for _ in 0..6 {
            let mut data = Data::new(DataType::File);
            data.blocksizes = vec![size; 1000];
            data.filesize = Some(size * 1000);
            let links =
                (0..1000).map(|_| PbLink { hash: child, name: Some(String::new()), tsize: Some(size) }).collect();
            let block = crate::dag_pb::encode(&PbNode { links, data: Some(data.encode()) });
            child = crate::cid_from_digest(DAG_PB, &<sha2::Sha256 as sha2::Digest>::digest(&block).into());
            nodes.insert(child, block);
            size *= 1000;
        }
        // dups=n: each node once; its repeats are not descended into.
        assert_eq!(run(child, &nodes, ALL).expect("walk").len(), 7);
        // dups=y or a range must descend, and meet the bound.
        assert_eq!(
            run(child, &nodes, Walk { dups: true, ..ALL }),
            Err(WalkError::TooManyBlocks(Limits::default().max_blocks))
        );
        let ranged = Walk { bytes: EntityBytes::parse("0:*"), ..ALL };
        assert_eq!(run(child, &nodes, ranged), Err(WalkError::TooManyBlocks(Limits::default().max_blocks)));
    }

    #[test]
    fn deep_dags_are_walked_through_every_level_and_bounded() {
        // More than 1024 leaves: a root over two inner nodes (leaves named, never read).
        let mut b = DagBuilder::new();
        for i in 0..1025u32 {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&i.to_le_bytes());
            b.push_leaf(digest, CHUNK_SIZE as u64);
        }
        let dag = b.finish_leaves();
        let nodes: HashMap<Cid, Vec<u8>> = dag.nodes.iter().cloned().collect();
        let got = run(dag.root, &nodes, Walk { dups: true, ..ALL }).expect("walk");
        assert_eq!(got.len(), 1 + 2 + 1025, "root, two inner nodes, every leaf");
        assert_eq!(got.iter().filter(|c| c.codec() == DAG_PB).count(), 3);
        let small = Limits { max_blocks: 100, ..Limits::default() };
        let bounded = walk(dag.root, Walk { dups: true, ..ALL }, &small, |c| nodes.get(c).map(Vec::as_slice));
        assert_eq!(bounded, Err(WalkError::TooManyBlocks(100)));
        let shallow = Limits { max_depth: 1, ..Limits::default() };
        let deep = walk(dag.root, ALL, &shallow, |c| nodes.get(c).map(Vec::as_slice));
        assert_eq!(deep, Err(WalkError::TooDeep(1)));
        // A node the caller cannot give is an error, not a shorter CAR.
        let inner = got[1];
        let partial = walk(dag.root, ALL, &Limits::default(), |c| {
            (*c != inner).then(|| nodes.get(c).map(Vec::as_slice)).flatten()
        });
        assert_eq!(partial, Err(WalkError::Missing(inner)));
    }
}
