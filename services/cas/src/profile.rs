//! Content addressing: the CID of a file, exactly as IPFS tooling computes it with the
//! IPIP-499 `unixfs-v1-2025` profile.
//!
//! - CIDv1, sha2-256, base32 multibase.
//! - Fixed-size chunking into [`CHUNK_SIZE`] (1 MiB) raw leaves (codec `raw`, 0x55).
//! - A file of one chunk (at most 1 MiB, including the empty file) is that raw leaf: its CID is
//!   `bafkrei…`, the sha2-256 of the bytes.
//! - A larger file is a balanced UnixFS `File` DAG of dag-pb (0x70) nodes with at most
//!   [`MAX_LINKS`] links each: leaves are grouped 1024 at a time into nodes, those nodes 1024
//!   at a time into the next level, until one root remains (a trailing group of one is still
//!   wrapped in its own node, which keeps every leaf at the same depth).
//! - dag-pb nodes are encoded links-first, each link with an empty `Name`, and `Tsize` = the
//!   child's block size plus its descendants'; the UnixFS data carries `Type=File`,
//!   `filesize` and one non-packed `blocksizes` entry per child.
//!
//! [`DagBuilder`] computes all of this incrementally at constant memory (plus 32 bytes per
//! leaf for the block index) and is pure CPU work: run it on a blocking thread.

use cid::Cid;
use multihash::Multihash;
use sha2::{Digest, Sha256};

use crate::dag_pb::{self, PbLink, PbNode};
use crate::unixfs::{Data, DataType};

/// Leaf size of the profile (1 MiB).
pub const CHUNK_SIZE: usize = 1 << 20;
/// Most links in one dag-pb node.
pub const MAX_LINKS: usize = 1024;
/// Multicodec `raw`.
pub const RAW: u64 = 0x55;
/// Multicodec `dag-pb`.
pub const DAG_PB: u64 = 0x70;
/// Multihash `sha2-256`.
pub const SHA2_256: u64 = 0x12;

/// CIDv1 of `codec` over a sha2-256 digest.
pub fn cid_from_digest(codec: u64, digest: &[u8; 32]) -> Cid {
    // A 32-byte digest always fits the 64-byte multihash.
    let mh = Multihash::<64>::wrap(SHA2_256, digest).unwrap_or_default();
    Cid::new_v1(codec, mh)
}

/// The raw-leaf CID of `bytes`.
pub fn raw_cid(bytes: &[u8]) -> Cid {
    cid_from_digest(RAW, &Sha256::digest(bytes).into())
}

/// The sha2-256 digest a CID names, if it uses sha2-256.
pub fn sha256_digest(cid: &Cid) -> Option<[u8; 32]> {
    let mh = cid.hash();
    if mh.code() != SHA2_256 {
        return None;
    }
    mh.digest().try_into().ok()
}

#[derive(Clone, Debug)]
struct Link {
    cid: Cid,
    /// Cumulative size of the child's blocks (dag-pb `Tsize`).
    tsize: u64,
    /// Bytes of file content under the child (UnixFS `blocksizes`).
    filesize: u64,
}

/// The outcome of hashing a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dag {
    pub root: Cid,
    pub size: u64,
    /// sha2-256 of each leaf, in file order (leaf `i` covers `[i*CHUNK_SIZE, …)`).
    pub leaves: Vec<[u8; 32]>,
    /// Every dag-pb node (empty for a one-leaf file), children before parents.
    pub nodes: Vec<(Cid, Vec<u8>)>,
}

/// Streaming UnixFS importer (see the module docs for the exact layout).
pub struct DagBuilder {
    chunk: Vec<u8>,
    size: u64,
    leaves: Vec<[u8; 32]>,
    /// Pending links per level: `levels[0]` holds leaves, `levels[1]` nodes of leaves, …
    levels: Vec<Vec<Link>>,
    /// Whether a level has already been reduced into a node of the level above.
    emitted: Vec<bool>,
    nodes: Vec<(Cid, Vec<u8>)>,
}

impl Default for DagBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl DagBuilder {
    pub fn new() -> Self {
        Self {
            chunk: Vec::with_capacity(CHUNK_SIZE),
            size: 0,
            leaves: Vec::new(),
            levels: vec![Vec::new()],
            emitted: vec![false],
            nodes: Vec::new(),
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (CHUNK_SIZE - self.chunk.len()).min(data.len());
            self.chunk.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.chunk.len() == CHUNK_SIZE {
                self.flush_leaf();
            }
        }
    }

    fn flush_leaf(&mut self) {
        let digest: [u8; 32] = Sha256::digest(&self.chunk).into();
        let len = self.chunk.len() as u64;
        self.chunk.clear();
        self.add_leaf(digest, len);
    }

    /// Adds the next leaf by its sha2-256 and length, for callers that chunk and hash
    /// themselves (every leaf but the last must be exactly [`CHUNK_SIZE`]). Do not mix with
    /// [`Self::update`] on one builder.
    pub fn push_leaf(&mut self, digest: [u8; 32], len: u64) {
        self.size += len;
        self.add_leaf(digest, len);
    }

    /// Links the next leaf (its bytes are already counted in `size`).
    fn add_leaf(&mut self, digest: [u8; 32], len: u64) {
        let link = Link { cid: cid_from_digest(RAW, &digest), tsize: len, filesize: len };
        self.leaves.push(digest);
        self.push(0, link);
    }

    fn push(&mut self, level: usize, link: Link) {
        self.levels[level].push(link);
        if self.levels[level].len() == MAX_LINKS {
            self.reduce(level);
        }
    }

    /// Turns the pending links of `level` into one node pushed to `level + 1`.
    fn reduce(&mut self, level: usize) {
        let links = std::mem::take(&mut self.levels[level]);
        let node = self.encode_node(&links);
        if self.levels.len() == level + 1 {
            self.levels.push(Vec::new());
            self.emitted.push(false);
        }
        self.emitted[level] = true;
        self.push(level + 1, node);
    }

    fn encode_node(&mut self, links: &[Link]) -> Link {
        let filesize: u64 = links.iter().map(|l| l.filesize).sum();
        // Type File, filesize, one non-packed blocksizes entry per child; links with an empty
        // Name and their Tsize, links first (dag_pb's canonical form).
        let data = Data {
            filesize: Some(filesize),
            blocksizes: links.iter().map(|l| l.filesize).collect(),
            ..Data::new(DataType::File)
        };
        let node = PbNode {
            links: links
                .iter()
                .map(|l| PbLink { hash: l.cid, name: Some(String::new()), tsize: Some(l.tsize) })
                .collect(),
            data: Some(data.encode()),
        };
        let block = dag_pb::encode(&node);
        let cid = cid_from_digest(DAG_PB, &Sha256::digest(&block).into());
        let tsize = block.len() as u64 + links.iter().map(|l| l.tsize).sum::<u64>();
        self.nodes.push((cid, block));
        Link { cid, tsize, filesize }
    }

    /// Finishes the DAG and returns its root and blocks.
    pub fn finish(mut self) -> Dag {
        if !self.chunk.is_empty() || self.leaves.is_empty() {
            self.flush_leaf();
        }
        self.finish_tree()
    }

    /// Finishes a DAG built with [`Self::push_leaf`]; with no leaf pushed, the empty file's.
    pub fn finish_leaves(mut self) -> Dag {
        if self.leaves.is_empty() {
            self.push_leaf(Sha256::digest(b"").into(), 0);
        }
        self.finish_tree()
    }

    fn finish_tree(mut self) -> Dag {
        if self.leaves.len() == 1 {
            let root = self.levels[0][0].cid;
            return Dag { root, size: self.size, leaves: self.leaves, nodes: Vec::new() };
        }
        let mut level = 0;
        let root = loop {
            let pending = self.levels[level].len();
            if level > 0 && !self.emitted[level] && pending == 1 {
                break self.levels[level][0].cid;
            }
            if pending > 0 {
                self.reduce(level);
            }
            level += 1;
        };
        Dag { root, size: self.size, leaves: self.leaves, nodes: self.nodes }
    }
}

/// The CID of a whole byte slice (tests and small inputs).
pub fn cid_of(bytes: &[u8]) -> Cid {
    let mut b = DagBuilder::new();
    b.update(bytes);
    b.finish().root
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte `i` = (31 i + 7) mod 251: the pattern the JS oracle was run on.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i as u64 * 31 + 7) % 251) as u8).collect()
    }

    // Root CIDs from ipfs-unixfs-importer 17.1.1 with `{ profile: 'unixfs-v1-2025' }`
    // (tests/oracle/cid.mjs). The end-to-end oracle test re-checks these against the live tool.
    #[test]
    fn matches_ipfs_unixfs_importer_at_boundary_sizes() {
        let cases = [
            (0, "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"),
            (1, "bafkreigkgwdvr5wspzwpiutssn4xpj2i7wedshnwphhnu7ohx4pqaxxipe"),
            (CHUNK_SIZE, "bafkreia4lg4goabhhbaug6a2rkf76lz3is6yqggq6u5rhmdeyi3vugx6ha"),
            (CHUNK_SIZE + 1, "bafybeiaqfhzf4fft5arkdimw7quirxuglvotfah44yawdjg6zujvn6lidu"),
            (3 * CHUNK_SIZE + 5, "bafybeigtlftshrpahrqasmumkdoqzk74iy3ewg4scyl3r774e4a6imijsy"),
        ];
        for (len, want) in cases {
            assert_eq!(cid_of(&pattern(len)).to_string(), want, "size {len}");
        }
    }

    #[test]
    fn root_node_bytes_match_the_oracle() {
        let mut b = DagBuilder::new();
        b.update(&pattern(CHUNK_SIZE + 1));
        let dag = b.finish();
        assert_eq!(dag.nodes.len(), 1);
        let hex: String = dag.nodes[0].1.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "122c0a24015512201c59b8670027384143781a8a8bff2f3b44bd8818d0f53b13b064c2375a1afe38120018808040\
             122a0a2401551220acac86c0e609ca906f632b0e2dacccb2b77d22b0621f20ebece1a4835b93f6f0120018010a0c\
             080218818040208080402001"
        );
        assert_eq!(dag.leaves.len(), 2);
    }

    #[test]
    fn trailing_single_leaf_gets_its_own_node() {
        // 1025 zero leaves of 1 MiB + 1 byte: the oracle's root for 1 GiB + 1 zero bytes.
        let mut b = DagBuilder::new();
        let zeros = vec![0u8; CHUNK_SIZE];
        for _ in 0..MAX_LINKS {
            b.update(&zeros);
        }
        b.update(&[0]);
        let dag = b.finish();
        assert_eq!(dag.root.to_string(), "bafybeigx4uyebjbq65346xh6cjrt6yshbdudzudhnqecwbzvymslxj7gje");
        // 1024-link node, 1-link node, root.
        assert_eq!(dag.nodes.len(), 3);
        assert_eq!(dag.nodes[1].0.to_string(), "bafybeiatqrf5qpcdvxj4bh574zy2fjx6u373pnxb3jhnus4mtodpg4w4f4");
        let (leaves, _, filesize) = leaves_of(&dag);
        assert_eq!(leaves, dag.leaves);
        assert_eq!(filesize, (MAX_LINKS * CHUNK_SIZE + 1) as u64);
    }

    #[test]
    fn chunking_does_not_depend_on_how_the_input_is_split() {
        let data = pattern(2 * CHUNK_SIZE + 12345);
        let whole = cid_of(&data);
        for step in [1usize << 10, 65_537, CHUNK_SIZE - 1, CHUNK_SIZE + 3] {
            let mut b = DagBuilder::new();
            for piece in data.chunks(step) {
                b.update(piece);
            }
            assert_eq!(b.finish().root, whole, "step {step}");
        }
    }

    #[test]
    fn pushing_leaf_digests_gives_the_same_dag_as_update() {
        for len in [0, 1, CHUNK_SIZE, 2 * CHUNK_SIZE + 3] {
            let data = pattern(len);
            let mut pushed = DagBuilder::new();
            let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[]] } else { data.chunks(CHUNK_SIZE).collect() };
            for c in chunks {
                pushed.push_leaf(Sha256::digest(c).into(), c.len() as u64);
            }
            let mut b = DagBuilder::new();
            b.update(&data);
            assert_eq!(pushed.finish_leaves(), b.finish(), "size {len}");
        }
    }

    #[test]
    fn leaves_pushed_or_not_make_the_same_dag() {
        assert_eq!(DagBuilder::new().finish_leaves().root, cid_of(b""));
        let mut b = DagBuilder::new();
        b.push_leaf(Sha256::digest(b"abc").into(), 3);
        assert_eq!(b.finish_leaves().root, cid_of(b"abc"));
    }

    #[test]
    fn single_block_cid_is_sha256_of_the_bytes() {
        let cid = cid_of(b"hello");
        assert_eq!(cid.codec(), RAW);
        assert_eq!(sha256_digest(&cid), Some(Sha256::digest(b"hello").into()));
    }

    /// Walks the DAG from the root; returns (leaf digests in order, Tsize of the root).
    fn leaves_of(dag: &Dag) -> (Vec<[u8; 32]>, u64, u64) {
        let nodes: std::collections::HashMap<Vec<u8>, &Vec<u8>> =
            dag.nodes.iter().map(|(c, b)| (c.to_bytes(), b)).collect();
        fn go(cid: &[u8], nodes: &std::collections::HashMap<Vec<u8>, &Vec<u8>>, out: &mut Vec<[u8; 32]>) -> (u64, u64) {
            let cid = Cid::try_from(cid).expect("valid cid in link");
            if cid.codec() == RAW {
                out.push(sha256_digest(&cid).expect("sha256"));
                return (0, 0);
            }
            let block = nodes[&cid.to_bytes()];
            // Strict dag-pb whose sizes add up, or this panics.
            let node = crate::unixfs::FileNode::from_block(block).expect("a UnixFS file node");
            assert!(node.links.len() <= MAX_LINKS);
            let mut tsize = block.len() as u64;
            for (link, bs) in node.links.iter().zip(&node.blocksizes) {
                let (hash, t) = (link.hash.to_bytes(), &link.tsize.expect("Tsize written"));
                let before = out.len();
                let (child_tsize, child_filesize) = go(&hash, nodes, out);
                let child = link.hash;
                if child.codec() == RAW {
                    assert_eq!(out.len(), before + 1);
                    assert_eq!(*t, *bs, "a raw leaf's Tsize is its size");
                } else {
                    assert_eq!(*t, child_tsize);
                    assert_eq!(*bs, child_filesize);
                }
                tsize += t;
            }
            assert_eq!(node.filesize, node.blocksizes.iter().sum::<u64>());
            (tsize, node.filesize)
        }
        let mut out = Vec::new();
        let (tsize, filesize) = go(&dag.root.to_bytes(), &nodes, &mut out);
        (out, tsize, filesize)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn dag_walks_back_to_its_leaves(
            size in proptest::prop_oneof![
                proptest::prelude::Just(0usize), proptest::prelude::Just(1), proptest::prelude::Just(CHUNK_SIZE - 1),
                proptest::prelude::Just(CHUNK_SIZE), proptest::prelude::Just(CHUNK_SIZE + 1),
                proptest::prelude::Just(2 * CHUNK_SIZE), 0usize..3 * CHUNK_SIZE + 7
            ],
            step in 1usize..200_000,
        ) {
            let data = pattern(size);
            let mut b = DagBuilder::new();
            for piece in data.chunks(step) {
                b.update(piece);
            }
            let dag = b.finish();
            proptest::prop_assert_eq!(dag.size, size as u64);
            proptest::prop_assert_eq!(dag.leaves.len(), size.div_ceil(CHUNK_SIZE).max(1));
            for (i, chunk) in data.chunks(CHUNK_SIZE).enumerate() {
                proptest::prop_assert_eq!(dag.leaves[i], <[u8; 32]>::from(Sha256::digest(chunk)));
            }
            if dag.leaves.len() == 1 {
                proptest::prop_assert_eq!(dag.root.codec(), RAW);
                proptest::prop_assert!(dag.nodes.is_empty());
            } else {
                let (leaves, _, filesize) = leaves_of(&dag);
                proptest::prop_assert_eq!(&leaves, &dag.leaves);
                proptest::prop_assert_eq!(filesize, size as u64);
                proptest::prop_assert_eq!(dag.nodes.last().map(|(c, _)| *c), Some(dag.root));
            }
        }
    }
}
