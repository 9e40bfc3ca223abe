//! dag-pb (IPLD codec 0x70), decoded strictly and encoded canonically.
//!
//! A dag-pb block is a protobuf `PBNode { repeated PBLink Links = 2; optional bytes Data = 1; }`
//! with `PBLink { optional bytes Hash = 1; optional string Name = 2; optional uint64 Tsize = 3; }`.
//! Blocks come from other servers, so [`decode`] accepts exactly what the IPLD dag-pb
//! specification's strict decoders accept, and nothing a lenient parser would read another way:
//!
//! - only the fields above, each with its own wire type; every link before `Data`; `Data` at
//!   most once; a link's fields in order, each at most once, with a `Hash` that is a whole CID;
//! - varints in their shortest form, of at most 10 bytes that fit 64 bits; lengths within the
//!   block;
//! - `Name` in UTF-8.
//!
//! So a block that decodes has one meaning, and [`encode`] gives its bytes back exactly
//! (`encode(&decode(b)?) == b` for every `b` that decodes, the property the tests fuzz).

use cid::Cid;

/// One link of a dag-pb node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PbLink {
    pub hash: Cid,
    pub name: Option<String>,
    /// Cumulative size of the linked block and its descendants, as the writer claimed it.
    pub tsize: Option<u64>,
}

/// A decoded dag-pb node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PbNode {
    pub links: Vec<PbLink>,
    /// For UnixFS, the encoded [`crate::unixfs::Data`].
    pub data: Option<Vec<u8>>,
}

/// Why a block is not strict dag-pb.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("varint longer than 10 bytes or over 64 bits")]
    VarintOverflow,
    #[error("varint not in its shortest form")]
    NotMinimal,
    #[error("{0}")]
    Invalid(&'static str),
}

/// Protobuf wire types used here.
pub(crate) const VARINT: u64 = 0;
pub(crate) const LEN: u64 = 2;

/// A cursor over protobuf bytes.
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for (i, &byte) in self.bytes.iter().enumerate().take(10) {
            let bits = u64::from(byte & 0x7f);
            // The tenth byte may only carry the 64th bit.
            if i == 9 && bits > 1 {
                return Err(DecodeError::VarintOverflow);
            }
            v |= bits << (7 * i);
            if byte < 0x80 {
                // A last byte of zero after others is a second spelling of a shorter varint.
                if i > 0 && byte == 0 {
                    return Err(DecodeError::NotMinimal);
                }
                self.bytes = &self.bytes[i + 1..];
                return Ok(v);
            }
        }
        if self.bytes.len() >= 10 { Err(DecodeError::VarintOverflow) } else { Err(DecodeError::Truncated(what)) }
    }

    /// A field's number and wire type.
    pub(crate) fn tag(&mut self) -> Result<(u64, u64), DecodeError> {
        let tag = self.varint("field tag")?;
        Ok((tag >> 3, tag & 7))
    }

    /// A length-delimited value.
    pub(crate) fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.varint(what)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::Truncated(what))?;
        if len > self.bytes.len() {
            return Err(DecodeError::Truncated(what));
        }
        let (value, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(value)
    }
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_tag(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_tag(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn decode_link(bytes: &[u8]) -> Result<PbLink, DecodeError> {
    let mut r = Reader::new(bytes);
    let (mut hash, mut name, mut tsize) = (None, None, None);
    let mut last = 0;
    while !r.is_empty() {
        let (field, wire) = r.tag()?;
        if field <= last {
            return Err(DecodeError::Invalid("PBLink fields out of order or repeated"));
        }
        last = field;
        match (field, wire) {
            (1, LEN) => {
                let raw = r.bytes("link hash")?;
                let cid = Cid::read_bytes(raw).map_err(|_| DecodeError::Invalid("link hash is not a CID"))?;
                if cid.encoded_len() != raw.len() {
                    return Err(DecodeError::Invalid("link hash has bytes after its CID"));
                }
                hash = Some(cid);
            }
            (2, LEN) => {
                let raw = r.bytes("link name")?;
                name =
                    Some(String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Invalid("link name is not UTF-8"))?);
            }
            (3, VARINT) => tsize = Some(r.varint("link size")?),
            (1..=3, _) => return Err(DecodeError::Invalid("PBLink field with the wrong wire type")),
            _ => return Err(DecodeError::Invalid("unknown PBLink field")),
        }
    }
    let hash = hash.ok_or(DecodeError::Invalid("link without a hash"))?;
    Ok(PbLink { hash, name, tsize })
}

/// Decodes a dag-pb block strictly (see the module docs).
pub fn decode(block: &[u8]) -> Result<PbNode, DecodeError> {
    let mut r = Reader::new(block);
    let mut node = PbNode::default();
    while !r.is_empty() {
        match r.tag()? {
            (2, LEN) => {
                if node.data.is_some() {
                    return Err(DecodeError::Invalid("PBNode link after Data"));
                }
                node.links.push(decode_link(r.bytes("link")?)?);
            }
            (1, LEN) => {
                if node.data.is_some() {
                    return Err(DecodeError::Invalid("PBNode Data twice"));
                }
                node.data = Some(r.bytes("data")?.to_vec());
            }
            (1 | 2, _) => return Err(DecodeError::Invalid("PBNode field with the wrong wire type")),
            _ => return Err(DecodeError::Invalid("unknown PBNode field")),
        }
    }
    Ok(node)
}

/// Encodes `node` canonically: links first, in order, each as Hash, Name, Tsize; then Data.
pub fn encode(node: &PbNode) -> Vec<u8> {
    let mut out = Vec::new();
    let mut link = Vec::new();
    for l in &node.links {
        link.clear();
        put_bytes(&mut link, 1, &l.hash.to_bytes());
        if let Some(name) = &l.name {
            put_bytes(&mut link, 2, name.as_bytes());
        }
        if let Some(tsize) = l.tsize {
            put_tag(&mut link, 3, VARINT);
            put_varint(&mut link, tsize);
        }
        put_bytes(&mut out, 2, &link);
    }
    if let Some(data) = &node.data {
        put_bytes(&mut out, 1, data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{CHUNK_SIZE, DagBuilder};

    fn cid(n: u8) -> Cid {
        crate::profile::cid_from_digest(crate::profile::RAW, &[n; 32])
    }

    #[test]
    fn the_builders_nodes_decode_and_encode_back_exactly() {
        let mut b = DagBuilder::new();
        let chunk = vec![7u8; CHUNK_SIZE];
        for _ in 0..3 {
            b.update(&chunk);
        }
        let dag = b.finish();
        let (_, root) = dag.nodes.iter().find(|(c, _)| *c == dag.root).expect("a multi-chunk file has a root block");
        let node = decode(root).expect("the builder writes strict dag-pb");
        assert_eq!(node.links.len(), 3);
        assert!(node.links.iter().all(|l| l.name.as_deref() == Some("") && l.tsize == Some(CHUNK_SIZE as u64)));
        assert_eq!(&encode(&node), root);
    }

    #[test]
    fn what_a_lenient_parser_would_read_another_way_is_refused() {
        let link = encode(&PbNode { links: vec![PbLink { hash: cid(1), name: None, tsize: Some(5) }], data: None });
        let data = encode(&PbNode { links: vec![], data: Some(vec![8, 2]) });
        let cases: Vec<(Vec<u8>, &str)> = vec![
            ([data.clone(), link.clone()].concat(), "after Data"),
            ([data.clone(), data.clone()].concat(), "Data twice"),
            (vec![0x1a, 0x00], "unknown PBNode field"),
            (vec![0x10, 0x01], "wrong wire type"),
            (vec![0x12, 0x05, 0x0a], "truncated"),
            (vec![0x12, 0x02, 0x18, 0x01], "without a hash"),
            (vec![0x12, 0x04, 0x18, 0x01, 0x18, 0x01], "out of order"),
            (vec![0x12, 0x02, 0x22, 0x00], "unknown PBLink field"),
            (vec![0x12, 0x03, 0x0a, 0x01, 0x00], "not a CID"),
            (vec![0xff; 11], "varint"),
            ([&[0x12u8, 0x04, 0x0a, 0x02][..], &[0x00, 0x00]].concat(), "not a CID"),
        ];
        for (bytes, why) in cases {
            let err = decode(&bytes).expect_err(why).to_string();
            assert!(err.contains(why), "{bytes:02x?}: {err} (want {why})");
        }
        // A hash with a byte after its CID.
        let mut hash = cid(1).to_bytes();
        hash.push(0);
        let mut link = Vec::new();
        put_bytes(&mut link, 1, &hash);
        let mut block = Vec::new();
        put_bytes(&mut block, 2, &link);
        assert!(decode(&block).expect_err("trailing").to_string().contains("after its CID"));
        // Name in UTF-8 only.
        let mut link = Vec::new();
        put_bytes(&mut link, 1, &cid(1).to_bytes());
        put_bytes(&mut link, 2, &[0xff]);
        let mut block = Vec::new();
        put_bytes(&mut block, 2, &link);
        assert!(decode(&block).expect_err("utf-8").to_string().contains("UTF-8"));
    }

    #[test]
    fn varints_are_bounded_to_64_bits() {
        assert_eq!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).varint("v"),
            Ok(u64::MAX)
        );
        assert_eq!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]).varint("v"),
            Err(DecodeError::VarintOverflow)
        );
        assert_eq!(Reader::new(&[0x80, 0x80]).varint("v"), Err(DecodeError::Truncated("v")));
        assert_eq!(Reader::new(&[0x85, 0x00]).varint("v"), Err(DecodeError::NotMinimal));
        assert_eq!(Reader::new(&[0x00]).varint("v"), Ok(0));
        assert_eq!(Reader::new(&[0x80, 0x01]).varint("v"), Ok(128));
        assert_eq!(Reader::new(&[]).varint("v"), Err(DecodeError::Truncated("v")));
    }

    fn arb_node() -> impl proptest::strategy::Strategy<Value = PbNode> {
        use proptest::prelude::*;
        let link = (any::<u8>(), proptest::option::of("[a-zé]{0,8}"), proptest::option::of(any::<u64>()))
            .prop_map(|(n, name, tsize)| PbLink { hash: cid(n), name, tsize });
        (proptest::collection::vec(link, 0..6), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)))
            .prop_map(|(links, data)| PbNode { links, data })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Fuzzing: arbitrary bytes never panic, and whatever decodes has exactly one encoding.
        #[test]
        fn arbitrary_bytes_decode_to_one_meaning_or_are_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            if let Ok(node) = decode(&bytes) {
                proptest::prop_assert_eq!(encode(&node), bytes);
            }
        }

        /// Mutations of real nodes (a byte changed, cut or inserted) decode to their one
        /// meaning or are refused, never read another way.
        #[test]
        fn mutated_nodes_round_trip_or_are_refused(node in arb_node(), at in 0usize..400, byte in proptest::prelude::any::<u8>(), how in 0u8..3) {
            let mut bytes = encode(&node);
            let at = at % (bytes.len() + 1);
            match how {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.truncate(at),
                _ => bytes.insert(at, byte),
            }
            if let Ok(decoded) = decode(&bytes) {
                proptest::prop_assert_eq!(encode(&decoded), bytes);
            }
        }

        #[test]
        fn nodes_encode_and_decode_back(node in arb_node()) {
            proptest::prop_assert_eq!(decode(&encode(&node)).expect("canonical bytes decode"), node);
        }
    }
}
