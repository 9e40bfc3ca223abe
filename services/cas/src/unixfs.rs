//! The UnixFS `Data` message a dag-pb file node carries, decoded strictly.
//!
//! `Data { required DataType Type = 1; optional bytes Data = 2; optional uint64 filesize = 3;
//! repeated uint64 blocksizes = 4; optional uint64 hashType = 5; optional uint64 fanout = 6;
//! optional uint32 mode = 7; optional UnixTime mtime = 8; }`. Files are what mxcas reads:
//! [`FileNode::from_block`] takes a dag-pb block and answers what part of a file it holds,
//! refusing a node whose sizes do not add up (a writer's claim mxcas would otherwise trust).
//!
//! Known fields must have their wire type and appear at most once (but `blocksizes`, which is
//! repeated, packed or not); unknown fields are refused too, since what they would mean to
//! their writer cannot be checked.

use crate::dag_pb::{self, DecodeError, LEN, PbLink, Reader, VARINT, put_bytes, put_tag, put_varint};

/// UnixFS node types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    Raw,
    Directory,
    File,
    Metadata,
    Symlink,
    HamtShard,
}

impl DataType {
    fn from_wire(v: u64) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => Self::Raw,
            1 => Self::Directory,
            2 => Self::File,
            3 => Self::Metadata,
            4 => Self::Symlink,
            5 => Self::HamtShard,
            _ => return Err(DecodeError::Invalid("unknown UnixFS type")),
        })
    }

    fn to_wire(self) -> u64 {
        match self {
            Self::Raw => 0,
            Self::Directory => 1,
            Self::File => 2,
            Self::Metadata => 3,
            Self::Symlink => 4,
            Self::HamtShard => 5,
        }
    }
}

/// A decoded UnixFS `Data` message (`mtime` kept as its encoded bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data {
    pub kind: DataType,
    pub data: Option<Vec<u8>>,
    pub filesize: Option<u64>,
    pub blocksizes: Vec<u64>,
    pub hash_type: Option<u64>,
    pub fanout: Option<u64>,
    pub mode: Option<u64>,
    pub mtime: Option<Vec<u8>>,
}

impl Data {
    /// A message of `kind` with no other field set.
    pub fn new(kind: DataType) -> Self {
        Self {
            kind,
            data: None,
            filesize: None,
            blocksizes: Vec::new(),
            hash_type: None,
            fanout: None,
            mode: None,
            mtime: None,
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let mut kind = None;
        let mut d = Self::new(DataType::Raw);
        let mut seen = 0u16;
        while !r.is_empty() {
            let (field, wire) = r.tag()?;
            let bit = 1u16 << field.min(15);
            if field != 4 && seen & bit != 0 {
                return Err(DecodeError::Invalid("UnixFS field repeated"));
            }
            seen |= bit;
            match (field, wire) {
                (1, VARINT) => kind = Some(DataType::from_wire(r.varint("UnixFS type")?)?),
                (2, LEN) => d.data = Some(r.bytes("UnixFS data")?.to_vec()),
                (3, VARINT) => d.filesize = Some(r.varint("UnixFS filesize")?),
                (4, VARINT) => d.blocksizes.push(r.varint("UnixFS blocksize")?),
                (4, LEN) => {
                    let mut packed = Reader::new(r.bytes("UnixFS blocksizes")?);
                    while !packed.is_empty() {
                        d.blocksizes.push(packed.varint("UnixFS blocksize")?);
                    }
                }
                (5, VARINT) => d.hash_type = Some(r.varint("UnixFS hashType")?),
                (6, VARINT) => d.fanout = Some(r.varint("UnixFS fanout")?),
                (7, VARINT) => d.mode = Some(r.varint("UnixFS mode")?),
                (8, LEN) => d.mtime = Some(r.bytes("UnixFS mtime")?.to_vec()),
                (1..=8, _) => return Err(DecodeError::Invalid("UnixFS field with the wrong wire type")),
                _ => return Err(DecodeError::Invalid("unknown UnixFS field")),
            }
        }
        d.kind = kind.ok_or(DecodeError::Invalid("UnixFS data without a type"))?;
        Ok(d)
    }

    /// Encodes in field order, `blocksizes` not packed (as the IPFS importers write them).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let varint = |out: &mut Vec<u8>, field: u64, v: u64| {
            put_tag(out, field, VARINT);
            put_varint(out, v);
        };
        varint(&mut out, 1, self.kind.to_wire());
        if let Some(data) = &self.data {
            put_bytes(&mut out, 2, data);
        }
        if let Some(n) = self.filesize {
            varint(&mut out, 3, n);
        }
        for &n in &self.blocksizes {
            varint(&mut out, 4, n);
        }
        for (field, v) in [(5, self.hash_type), (6, self.fanout), (7, self.mode)] {
            if let Some(v) = v {
                varint(&mut out, field, v);
            }
        }
        if let Some(mtime) = &self.mtime {
            put_bytes(&mut out, 8, mtime);
        }
        out
    }
}

/// A dag-pb node of a UnixFS file: the bytes it holds itself, then its children in order,
/// each holding `blocksizes[i]` bytes of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileNode {
    pub links: Vec<PbLink>,
    /// File bytes inline in this node, before its children's.
    pub inline: Vec<u8>,
    pub blocksizes: Vec<u64>,
    /// Bytes of the file under this node: `inline` plus every child's.
    pub filesize: u64,
}

impl FileNode {
    /// Reads a dag-pb block as a file node (UnixFS `File` or `Raw`), refusing one whose sizes
    /// do not add up: one `blocksizes` entry per link, and `filesize` (when given) equal to the
    /// inline bytes plus the children's.
    pub fn from_block(block: &[u8]) -> Result<Self, DecodeError> {
        let node = dag_pb::decode(block)?;
        let data = Data::decode(node.data.as_deref().ok_or(DecodeError::Invalid("dag-pb node without UnixFS data"))?)?;
        if !matches!(data.kind, DataType::File | DataType::Raw) {
            return Err(DecodeError::Invalid("UnixFS node is not part of a file"));
        }
        if data.blocksizes.len() != node.links.len() {
            return Err(DecodeError::Invalid("UnixFS blocksizes do not match the node's links"));
        }
        let inline = data.data.unwrap_or_default();
        let total = data
            .blocksizes
            .iter()
            .try_fold(inline.len() as u64, |sum, &n| sum.checked_add(n))
            .ok_or(DecodeError::Invalid("UnixFS sizes overflow"))?;
        if data.filesize.is_some_and(|f| f != total) {
            return Err(DecodeError::Invalid("UnixFS filesize is not the sum of its parts"));
        }
        Ok(Self { links: node.links, inline, blocksizes: data.blocksizes, filesize: total })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dag_pb::PbNode;
    use crate::profile::{CHUNK_SIZE, DagBuilder, RAW, cid_from_digest};

    #[test]
    fn the_builders_file_nodes_read_back_with_their_sizes() {
        let mut b = DagBuilder::new();
        b.update(&vec![1u8; 2 * CHUNK_SIZE + 10]);
        let dag = b.finish();
        let (_, root) = dag.nodes.iter().find(|(c, _)| *c == dag.root).expect("root block");
        let node = FileNode::from_block(root).expect("a file node");
        assert_eq!(node.filesize, 2 * CHUNK_SIZE as u64 + 10);
        assert_eq!(node.blocksizes, [CHUNK_SIZE as u64, CHUNK_SIZE as u64, 10]);
        assert!(node.inline.is_empty());
        let data = Data::decode(dag_pb::decode(root).expect("dag-pb").data.as_deref().expect("data")).expect("unixfs");
        assert_eq!(Data::decode(&data.encode()).expect("again"), data);
    }

    fn block(links: usize, data: Data) -> Vec<u8> {
        let links = (0..links)
            .map(|i| PbLink { hash: cid_from_digest(RAW, &[i as u8; 32]), name: Some(String::new()), tsize: Some(1) })
            .collect();
        dag_pb::encode(&PbNode { links, data: Some(data.encode()) })
    }

    fn file(filesize: Option<u64>, blocksizes: Vec<u64>, inline: Option<Vec<u8>>) -> Data {
        Data { data: inline, filesize, blocksizes, ..Data::new(DataType::File) }
    }

    #[test]
    fn file_nodes_whose_sizes_do_not_add_up_are_refused() {
        // Inline data and children: 3 + 5 + 7.
        let ok = FileNode::from_block(&block(2, file(Some(15), vec![5, 7], Some(b"abc".to_vec())))).expect("valid");
        assert_eq!((ok.filesize, ok.inline.as_slice()), (15, &b"abc"[..]));
        // Without filesize the parts are the size.
        assert_eq!(FileNode::from_block(&block(1, file(None, vec![9], None))).expect("valid").filesize, 9);
        let bad = [
            (block(2, file(Some(15), vec![5], None)), "do not match"),
            (block(1, file(Some(10), vec![5], None)), "not the sum"),
            (block(2, file(None, vec![u64::MAX, 1], None)), "overflow"),
            (block(0, Data { kind: DataType::Directory, ..file(None, vec![], None) }), "not part of a file"),
            (dag_pb::encode(&PbNode { links: vec![], data: None }), "without UnixFS data"),
        ];
        for (b, why) in bad {
            let err = FileNode::from_block(&b).expect_err(why).to_string();
            assert!(err.contains(why), "{err} (want {why})");
        }
    }

    #[test]
    fn unixfs_fields_are_strict() {
        for (bytes, why) in [
            (vec![0x18, 0x01], "without a type"),
            (vec![0x08, 0x02, 0x08, 0x02], "repeated"),
            (vec![0x08, 0x09], "unknown UnixFS type"),
            (vec![0x08, 0x02, 0x48, 0x01], "unknown UnixFS field"),
            (vec![0x0a, 0x00], "wrong wire type"),
        ] {
            let err = Data::decode(&bytes).expect_err(why).to_string();
            assert!(err.contains(why), "{bytes:02x?}: {err} (want {why})");
        }
        // blocksizes packed and not packed read the same.
        let packed = Data::decode(&[0x08, 0x02, 0x22, 0x02, 0x05, 0x07]).expect("packed");
        let unpacked = Data::decode(&[0x08, 0x02, 0x20, 0x05, 0x20, 0x07]).expect("unpacked");
        assert_eq!((packed.blocksizes.clone(), unpacked.blocksizes.clone()), (vec![5, 7], vec![5, 7]));
        assert_eq!(packed, unpacked);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Fuzzing: arbitrary bytes never panic as UnixFS data or as a file node.
        #[test]
        fn arbitrary_bytes_are_read_or_refused_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            if let Ok(d) = Data::decode(&bytes) {
                proptest::prop_assert_eq!(Data::decode(&d.encode()).expect("its encoding decodes"), d);
            }
            let _ = FileNode::from_block(&bytes);
        }
    }
}
