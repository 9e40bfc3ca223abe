//! CARv1: the content-addressed archive in which trustless gateways send a DAG.
//!
//! A CARv1 is a header, `varint(n) | n bytes of DAG-CBOR {roots: [CID], version: 1}`, then
//! sections, each `varint(n) | CID | n - len(CID) bytes of block`. [`header`] and [`section_head`]
//! write one (the block bytes follow a section's head unchanged, so large blocks are never
//! copied); [`CarReader`] reads one pushed in pieces as they arrive and hands out only
//! [`VerifiedBlock`]s: a section whose bytes do not hash to its CID ends the read.
//!
//! The reader is strict where a lenient one could be made to read a CAR two ways or to buffer
//! without bound: varints in their shortest form, a header with exactly the two keys of the
//! CARv1 specification (version 1; a CARv2 is refused by name), sections no larger than
//! [`Limits::max_block_size`] plus one CID, and nothing left over at the end. A CAR cut
//! between two sections is still a CAR (of fewer blocks): whether every block arrived is the
//! DAG's to say ([`crate::FileRange`]), not the archive's. A header with no roots is read
//! (the trustless gateway specification tells clients to ignore roots anyway).

use cid::Cid;

use crate::dag_pb::{DecodeError, Reader, put_varint};
use crate::verified::{Limits, VerifiedBlock, VerifyError};

/// Largest header read (its roots): a header is a few CIDs, never kilobytes of them.
pub const MAX_HEADER_SIZE: usize = 64 * 1024;
/// Longest CID accepted in a section (a CIDv1 of a 64-byte digest is 68 bytes).
const MAX_CID_SIZE: usize = 128;
/// DAG-CBOR tag of a CID.
const CID_TAG: u64 = 42;

/// Why bytes are not a CARv1 this reader accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CarError {
    #[error("CAR header: {0}")]
    Header(&'static str),
    #[error("CAR version {0} is not read here (CARv1 is)")]
    Version(u64),
    #[error("CAR section of {size} bytes is over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("CAR section: {0}")]
    Section(&'static str),
    #[error("CAR block {cid}: {error}")]
    Block { cid: Cid, error: VerifyError },
    #[error("CAR ends inside a {0}")]
    Truncated(&'static str),
    #[error("CAR varint: {0}")]
    Varint(DecodeError),
}

/// The header of a CARv1 with these roots, with its length prefix.
pub fn header(roots: &[Cid]) -> Vec<u8> {
    let mut cbor = Vec::with_capacity(16 + roots.len() * 40);
    // Keys in DAG-CBOR's canonical order (shorter first): "roots", then "version".
    put_head(&mut cbor, 5, 2);
    put_text(&mut cbor, "roots");
    put_head(&mut cbor, 4, roots.len() as u64);
    for root in roots {
        let bytes = root.to_bytes();
        put_head(&mut cbor, 6, CID_TAG);
        // A DAG-CBOR CID is a byte string: the multibase identity prefix 0x00, then the CID.
        put_head(&mut cbor, 2, bytes.len() as u64 + 1);
        cbor.push(0);
        cbor.extend_from_slice(&bytes);
    }
    put_text(&mut cbor, "version");
    put_head(&mut cbor, 0, 1);
    let mut out = Vec::with_capacity(cbor.len() + 4);
    put_varint(&mut out, cbor.len() as u64);
    out.extend_from_slice(&cbor);
    out
}

/// The head of a section carrying `cid`'s block of `block_len` bytes: its length prefix and
/// CID. The block's bytes follow it.
pub fn section_head(cid: &Cid, block_len: usize) -> Vec<u8> {
    let cid = cid.to_bytes();
    let mut out = Vec::with_capacity(cid.len() + 10);
    put_varint(&mut out, (cid.len() + block_len) as u64);
    out.extend_from_slice(&cid);
    out
}

fn put_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    match arg {
        0..=23 => out.push(m | arg as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, arg as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(arg as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(arg as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&arg.to_be_bytes());
        }
    }
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    put_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A DAG-CBOR cursor over the header, reading only the shapes a CARv1 header has.
struct Cbor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cbor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CarError> {
        if self.bytes.len() < n {
            return Err(CarError::Header("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// A data item's major type and argument, in DAG-CBOR's shortest form.
    fn head(&mut self) -> Result<(u8, u64), CarError> {
        let first = self.take(1)?[0];
        let (major, info) = (first >> 5, first & 0x1f);
        let (arg, min) = match info {
            0..=23 => return Ok((major, info as u64)),
            24 => (self.take(1)?[0] as u64, 24),
            25 => (u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")) as u64, 0x100),
            26 => (u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")) as u64, 0x1_0000),
            27 => (u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")), 0x1_0000_0000),
            _ => return Err(CarError::Header("indefinite lengths and simple values are not DAG-CBOR here")),
        };
        if arg < min {
            return Err(CarError::Header("integer not in its shortest form"));
        }
        Ok((major, arg))
    }

    fn expect(&mut self, major: u8, what: &'static str) -> Result<u64, CarError> {
        match self.head()? {
            (m, arg) if m == major => Ok(arg),
            _ => Err(CarError::Header(what)),
        }
    }

    fn text(&mut self) -> Result<&'a str, CarError> {
        let len = self.expect(3, "map key is not a string")?;
        let bytes = self.take(usize::try_from(len).map_err(|_| CarError::Header("truncated"))?)?;
        std::str::from_utf8(bytes).map_err(|_| CarError::Header("key is not UTF-8"))
    }

    fn cid(&mut self) -> Result<Cid, CarError> {
        if self.expect(6, "root is not a CID")? != CID_TAG {
            return Err(CarError::Header("root is not a CID"));
        }
        let len = self.expect(2, "root is not a CID")?;
        let bytes = self.take(usize::try_from(len).map_err(|_| CarError::Header("truncated"))?)?;
        let Some((0, cid)) = bytes.split_first() else {
            return Err(CarError::Header("root CID lacks the identity multibase prefix"));
        };
        let mut cursor = std::io::Cursor::new(cid);
        let parsed = Cid::read_bytes(&mut cursor).map_err(|_| CarError::Header("root is not a valid CID"))?;
        if cursor.position() as usize != cid.len() {
            return Err(CarError::Header("root CID has trailing bytes"));
        }
        Ok(parsed)
    }
}

/// Parses a header's DAG-CBOR: `{roots: [CID...], version: 1}`, nothing else.
fn parse_header(bytes: &[u8]) -> Result<Vec<Cid>, CarError> {
    let mut c = Cbor { bytes };
    let entries = c.expect(5, "not a map")?;
    let (mut roots, mut version) = (None, None);
    let mut last: Option<&str> = None;
    for _ in 0..entries {
        let key = c.text()?;
        // DAG-CBOR's one order: shorter keys first ("roots" before "version").
        if last.is_some_and(|l| (l.len(), l) >= (key.len(), key)) {
            return Err(CarError::Header("keys out of DAG-CBOR order, or repeated"));
        }
        last = Some(key);
        match key {
            "roots" if roots.is_none() => {
                let n = c.expect(4, "roots is not a list")?;
                // Each root takes at least 4 bytes: a count beyond that is a lie.
                if n > c.bytes.len() as u64 / 4 {
                    return Err(CarError::Header("truncated"));
                }
                roots = Some((0..n).map(|_| c.cid()).collect::<Result<Vec<_>, _>>()?);
            }
            "version" if version.is_none() => version = Some(c.expect(0, "version is not an integer")?),
            _ => return Err(CarError::Header("unknown key (a CARv1 header has roots and version)")),
        }
    }
    if !c.bytes.is_empty() {
        return Err(CarError::Header("trailing bytes"));
    }
    match (version, roots) {
        (Some(1), Some(roots)) => Ok(roots),
        (Some(1), None) => Err(CarError::Header("no roots")),
        (Some(v), _) => Err(CarError::Version(v)),
        (None, _) => Err(CarError::Header("no version")),
    }
}

/// Reads a CARv1 pushed in pieces of any size, verifying each block.
pub struct CarReader {
    limits: Limits,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
    roots: Option<Vec<Cid>>,
    /// The first error, answered again by every later call.
    failed: Option<CarError>,
}

impl CarReader {
    pub fn new(limits: Limits) -> Self {
        Self { limits, buf: Vec::new(), pos: 0, roots: None, failed: None }
    }

    /// Appends the next bytes of the CAR. Call [`Self::next_block`] until it answers `None`
    /// after each push: then at most one unfinished frame and one push are ever held.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The header's roots, once the header has been read.
    pub fn roots(&self) -> Option<&[Cid]> {
        self.roots.as_deref()
    }

    /// Reads the header if needed, then the next block: `Ok(None)` until more bytes are pushed.
    pub fn next_block(&mut self) -> Result<Option<VerifiedBlock>, CarError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.step();
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// Checks that the CAR ended where it should: after the header and a whole section.
    pub fn finish(&self) -> Result<(), CarError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match (&self.roots, self.pos == self.buf.len()) {
            (None, _) => Err(CarError::Truncated("header")),
            (Some(_), false) => Err(CarError::Truncated("section")),
            (Some(_), true) => Ok(()),
        }
    }

    fn step(&mut self) -> Result<Option<VerifiedBlock>, CarError> {
        if self.roots.is_none() {
            let Some(header) = self.frame(MAX_HEADER_SIZE as u64)? else { return Ok(None) };
            let roots = parse_header(&header);
            if let Err(CarError::Header(_)) = &roots {
                // A CARv2 starts with a pragma that is a header of version 2: say so.
                if header.starts_with(&[0xa1, 0x67]) && header.ends_with(b"version\x02") {
                    return Err(CarError::Version(2));
                }
            }
            self.roots = Some(roots?);
        }
        let limit = (self.limits.max_block_size + MAX_CID_SIZE) as u64;
        let Some(section) = self.frame(limit)? else { return Ok(None) };
        let mut cursor = std::io::Cursor::new(section.as_slice());
        let cid = Cid::read_bytes(&mut cursor).map_err(|_| CarError::Section("does not start with a valid CID"))?;
        let data = section[cursor.position() as usize..].to_vec();
        VerifiedBlock::verify(cid, data, &self.limits).map(Some).map_err(|error| CarError::Block { cid, error })
    }

    /// The next length-prefixed frame, if all of it is here.
    fn frame(&mut self, limit: u64) -> Result<Option<Vec<u8>>, CarError> {
        let rest = &self.buf[self.pos..];
        if rest.is_empty() {
            return Ok(None);
        }
        let mut r = Reader::new(rest);
        let len = match r.varint("length") {
            Ok(len) => len,
            // An unfinished varint may still complete; a complete one that is wrong never will.
            Err(DecodeError::Truncated(_)) if rest.len() < 10 => return Ok(None),
            Err(e) => return Err(CarError::Varint(e)),
        };
        if len > limit {
            return Err(CarError::TooLarge { size: len, limit });
        }
        if len == 0 {
            return Err(CarError::Section("empty"));
        }
        let head = rest.len() - r.bytes.len();
        let len = len as usize;
        if r.bytes.len() < len {
            return Ok(None);
        }
        let frame = r.bytes[..len].to_vec();
        self.pos += head + len;
        Ok(Some(frame))
    }
}

/// A whole CARv1 in memory: its roots and verified blocks, in order.
pub fn read(bytes: &[u8], limits: Limits) -> Result<(Vec<Cid>, Vec<VerifiedBlock>), CarError> {
    let mut reader = CarReader::new(limits);
    reader.push(bytes);
    let mut blocks = Vec::new();
    while let Some(block) = reader.next_block()? {
        blocks.push(block);
    }
    reader.finish()?;
    Ok((reader.roots().unwrap_or_default().to_vec(), blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{DagBuilder, raw_cid};
    use proptest::prelude::*;

    fn write(roots: &[Cid], blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
        let mut out = header(roots);
        for (cid, data) in blocks {
            out.extend_from_slice(&section_head(cid, data.len()));
            out.extend_from_slice(data);
        }
        out
    }

    fn sample() -> (Cid, Vec<(Cid, Vec<u8>)>) {
        let blocks: Vec<(Cid, Vec<u8>)> =
            [b"one".as_slice(), b"two", &[7u8; 300]].iter().map(|b| (raw_cid(b), b.to_vec())).collect();
        (blocks[0].0, blocks)
    }

    #[test]
    fn what_is_written_reads_back_verified_in_any_pieces() {
        let (root, blocks) = sample();
        let car = write(&[root], &blocks);
        for piece in [1, 2, 3, 7, 64, car.len()] {
            let mut reader = CarReader::new(Limits::default());
            let mut got = Vec::new();
            for chunk in car.chunks(piece) {
                reader.push(chunk);
                while let Some(block) = reader.next_block().expect("valid CAR") {
                    got.push((*block.cid(), block.into_bytes()));
                }
            }
            reader.finish().expect("complete");
            assert_eq!(reader.roots(), Some(&[root][..]));
            assert_eq!(got, blocks, "pieces of {piece}");
        }
    }

    #[test]
    fn the_header_is_the_canonical_dag_cbor_other_tools_write() {
        // @ipld/car's writer, for a header with the one root bafkreiab2rek7wjiazkfrt3hbnqpljmu24226alszdlh6ivic2abgjubzi
        // ("abc" as a raw block): a2 65 "roots" 81 d8 2a 58 25 00 <36-byte CID> 67 "version" 01.
        let root = raw_cid(b"abc");
        let h = header(&[root]);
        let mut expected = vec![0x3a, 0xa2, 0x65];
        expected.extend_from_slice(b"roots");
        expected.extend_from_slice(&[0x81, 0xd8, 0x2a, 0x58, 0x25, 0x00]);
        expected.extend_from_slice(&root.to_bytes());
        expected.push(0x67);
        expected.extend_from_slice(b"version");
        expected.push(0x01);
        assert_eq!(h, expected);
        assert_eq!(parse_header(&h[1..]), Ok(vec![root]));
    }

    #[test]
    fn a_dag_reads_back_from_its_car_including_cidv0_sections() {
        let mut b = DagBuilder::new();
        b.update(&vec![3u8; crate::CHUNK_SIZE * 2 + 5]);
        let dag = b.finish();
        let mut blocks: Vec<(Cid, Vec<u8>)> = dag.nodes.iter().map(|(c, n)| (*c, n.clone())).collect();
        let v0 = Cid::new_v0(*dag.nodes[0].0.hash()).expect("sha2-256 dag-pb has a CIDv0");
        blocks.push((v0, dag.nodes[0].1.clone()));
        let car = write(&[dag.root], &blocks);
        let (roots, got) = read(&car, Limits::default()).expect("valid");
        assert_eq!(roots, vec![dag.root]);
        assert_eq!(got.iter().map(|b| *b.cid()).collect::<Vec<_>>(), blocks.iter().map(|b| b.0).collect::<Vec<_>>());
    }

    #[test]
    fn a_block_that_is_not_what_its_cid_names_ends_the_read() {
        let (root, mut blocks) = sample();
        blocks[1].1 = b"tw0".to_vec();
        let mut reader = CarReader::new(Limits::default());
        reader.push(&write(&[root], &blocks));
        assert!(reader.next_block().expect("first block is good").is_some());
        let err = reader.next_block().expect_err("second is a lie");
        assert_eq!(err, CarError::Block { cid: blocks[1].0, error: VerifyError::Mismatch });
        // The read stays failed: no later block is handed out.
        assert_eq!(reader.next_block(), Err(err.clone()));
        assert_eq!(reader.finish(), Err(err));
    }

    #[test]
    fn headers_other_than_carv1s_are_refused() {
        let root = raw_cid(b"abc");
        let framed = |cbor: &[u8]| {
            let mut out = Vec::new();
            put_varint(&mut out, cbor.len() as u64);
            out.extend_from_slice(cbor);
            out
        };
        // The CARv2 pragma.
        let v2 = [0x0a, 0xa1, 0x67, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x02];
        assert_eq!(read(&v2, Limits::default()).map(|_| ()), Err(CarError::Version(2)));
        let mut version_2 = header(&[root]);
        *version_2.last_mut().expect("version") = 0x02;
        assert_eq!(read(&version_2, Limits::default()).map(|_| ()), Err(CarError::Version(2)));
        let refused = |cbor: &[u8]| read(&framed(cbor), Limits::default()).is_err();
        let good = header(&[root])[1..].to_vec();
        assert!(!refused(&good));
        // Keys out of DAG-CBOR order.
        let mut swapped = vec![0xa2, 0x67];
        swapped.extend_from_slice(b"version");
        swapped.push(0x01);
        swapped.push(0x65);
        swapped.extend_from_slice(b"roots");
        swapped.extend_from_slice(&good[7..good.len() - 9]);
        assert!(refused(&swapped));
        let mut reordered_ok = vec![0xa2, 0x65];
        reordered_ok.extend_from_slice(&good[2..]);
        assert!(!refused(&reordered_ok), "the canonical order reads");
        // Not a map; one key; an extra key; a version not in its shortest form; trailing bytes.
        assert!(refused(&[0x80]));
        assert!(refused(&[0xa1, 0x67, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x01]));
        let mut extra = good.clone();
        extra[0] = 0xa3;
        extra.extend_from_slice(&[0x61, b'x', 0x00]);
        assert!(refused(&extra));
        let mut long_version = good.clone();
        *long_version.last_mut().expect("version") = 0x18;
        long_version.push(0x01);
        assert!(refused(&long_version));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(refused(&trailing));
        // A root without the 0x00 prefix, and a roots count that the bytes cannot hold.
        let mut unprefixed = good.clone();
        let at = unprefixed.iter().position(|&b| b == 0x58).expect("bytes head");
        unprefixed[at + 2] = 0x01;
        assert!(refused(&unprefixed));
        let mut many = good;
        many[7] = 0x9b;
        assert!(refused(&many));
    }

    #[test]
    fn sections_are_bounded_minimal_and_whole() {
        let (root, blocks) = sample();
        let car = write(&[root], &blocks);
        // A prefix cut inside a frame is refused; one cut between frames is a CAR of fewer
        // blocks (CARv1 cannot tell), which is why readers check the DAG is complete.
        let mut ends = vec![header(&[root]).len()];
        for (cid, data) in &blocks {
            ends.push(ends.last().expect("end") + section_head(cid, data.len()).len() + data.len());
        }
        for cut in 0..car.len() {
            match (read(&car[..cut], Limits::default()), ends.iter().position(|&e| e == cut)) {
                (Ok((_, got)), Some(n)) => assert_eq!(got.len(), n, "prefix of {cut}"),
                (Err(_), None) => {}
                (other, _) => panic!("prefix of {cut}: {:?}", other.map(|(_, b)| b.len())),
            }
        }
        // A section longer than a block can be is refused before it is buffered.
        let mut huge = header(&[root]);
        put_varint(&mut huge, 1 << 40);
        let mut reader = CarReader::new(Limits::default());
        reader.push(&huge);
        assert!(matches!(reader.next_block(), Err(CarError::TooLarge { .. })));
        // A length varint padded with a continuation byte.
        let mut padded = header(&[root]);
        padded.extend_from_slice(&[0x80 | 0x03, 0x00]);
        assert!(matches!(read(&padded, Limits::default()), Err(CarError::Varint(DecodeError::NotMinimal))));
        let mut tight = CarReader::new(Limits { max_block_size: 100, ..Limits::default() });
        tight.push(&car);
        assert!(tight.next_block().is_ok() && tight.next_block().is_ok());
        assert!(matches!(tight.next_block(), Err(CarError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_are_refused_or_read_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read(&bytes, Limits::default());
        }

        #[test]
        fn arbitrary_sections_after_a_valid_header_are_read_without_panicking(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
            // The section path, which random bytes rarely reach past a header.
            let mut car = header(&[raw_cid(b"abc")]);
            car.extend_from_slice(&tail);
            let mut reader = CarReader::new(Limits::default());
            reader.push(&car);
            while let Ok(Some(_)) = reader.next_block() {}
        }

        #[test]
        fn a_mutated_car_yields_only_its_own_blocks(at in 0usize..500, byte in any::<u8>()) {
            let (root, blocks) = sample();
            let mut car = write(&[root], &blocks);
            let at = at % car.len();
            car[at] = byte;
            let mut reader = CarReader::new(Limits::default());
            reader.push(&car);
            while let Ok(Some(block)) = reader.next_block() {
                let pair = (*block.cid(), block.bytes().to_vec());
                // One of the blocks written; or the bytes of one under another codec (a CID's
                // codec byte changed: the hash still names those bytes, so they verify); or one
                // whose CID is its bytes (a mutated CID can turn into an identity CID over the
                // rest of its section).
                let same_bytes = blocks.iter().any(|(c, b)| c.hash() == block.cid().hash() && *b == pair.1);
                prop_assert!(
                    blocks.contains(&pair) || same_bytes || block.cid().hash().code() == crate::verified::IDENTITY,
                    "{pair:?}"
                );
            }
        }
    }
}
