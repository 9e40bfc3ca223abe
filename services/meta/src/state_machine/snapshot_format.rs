//! The byte forms of a state snapshot (see [`StateMachine::export`](super::StateMachine::export)).
//!
//! A snapshot is a sequence of [`SnapshotRecord`]s ending in `End`. Two forms exist:
//!
//! - **Canonical** (version 1): each record as a little-endian `u32` length and the record in
//!   postcard, values as the state tables hold them. Snapshots and backups of earlier versions
//!   are in this form, and the state digest (`Status`, backup headers) is the sha2-256 of it, so
//!   digests stay comparable whatever form a snapshot travels in.
//! - **Compact** (version 2, written now): [`MAGIC`], then each record as a LEB128 length and a
//!   postcard [`Compact`] record. The same facts without repeating them: a media record does
//!   not repeat its key, a media ID that is its content's CID is not spelled out, a content
//!   record does not repeat its CID, blob keys are a generation and the bytes of their hex
//!   name, and strings that recur (server names, uploaders, content types) are sent once and
//!   then referred to by number. Translating back gives exactly the canonical records.
//!
//! A record whose translation would not give back exactly its canonical bytes (a value that
//! does not decode, or decodes to something that encodes differently, or names another key)
//! is carried as it is (`Compact::Raw`), so an odd record never stops a snapshot and the
//! digest always holds.
//!
//! A reader tells the two apart by the first four bytes: [`MAGIC`]'s are a zero length, which
//! no canonical record has (so an earlier version, reading a compact snapshot, fails at once
//! on an empty record rather than allocating for a huge one).

use std::collections::HashMap;
use std::io::{Read, Write};

use cid::Cid;
use serde::{Deserialize, Serialize};

use super::{SnapshotRecord, decode, encode, snapshot_err};
use crate::error::StorageError;
use crate::model::{ContentRecord, MediaKey, MediaRecord, MediaState, blob_key};
use crate::raft::backup::hex;

/// First bytes of a compact snapshot.
pub(super) const MAGIC: [u8; 8] = *b"\0\0\0\0mxs2";

/// Longest record either form may hold. Real records are far smaller (keys and names are
/// bounded by the API); the bound keeps a damaged length from allocating gigabytes.
const MAX_RECORD: usize = 16 << 20;

/// At most this many strings are shared by number in one snapshot, each at most
/// [`MAX_SHARED_LEN`] bytes and [`MAX_SHARED_BYTES`] in all; others are written where they are
/// used. Bounds a reader's memory.
const MAX_SHARED: usize = 1 << 18;
const MAX_SHARED_LEN: usize = 256;
const MAX_SHARED_BYTES: usize = 16 << 20;

/// One compact record. postcard is positional: variants and fields keep their order.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Compact {
    /// Defines the next shared string (numbered from 0 in order of appearance).
    Shared(String),
    Media {
        server: Text,
        id: MediaId,
        uploader: Text,
        created_at_ms: u64,
        state: State,
    },
    Content(CompactContent),
    Pending {
        user: Text,
        server: Text,
        id: String,
        expires_at_ms: u64,
    },
    Tombstone {
        key: Key,
    },
    Meta {
        key: String,
        value: u64,
    },
    End {
        records: u64,
    },
    /// A record as it is, when translating it would not be exact.
    Raw(SnapshotRecord),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct CompactContent {
    cid: Vec<u8>,
    size: u64,
    chunk_size: u32,
    blob: Key,
    index: Index,
    refcount: u64,
    created_at_ms: u64,
    lost: bool,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Text {
    Inline(String),
    Shared(u32),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum MediaId {
    /// The media ID is the string form of the record's CID (only for `Ready`).
    OfCid,
    Other(String),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum State {
    Pending {
        expires_at_ms: u64,
    },
    /// `uploaded_at_ms` is `created_at_ms` plus `uploaded_after_ms` (usually small).
    Ready {
        cid: Vec<u8>,
        content_type: Text,
        filename: Option<String>,
        uploaded_after_ms: i64,
    },
}

/// An object key.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Key {
    /// `blob_key::new(generation, name)`.
    Blob {
        generation: u64,
        name: Name,
    },
    Other(String),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Name {
    /// Lower-case hex of these bytes.
    Hex(Vec<u8>),
    Other(String),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Index {
    None,
    /// `blob_key::index_of(blob)`.
    OfBlob,
    Other(String),
}

/// Writes records in the canonical form (for the digest and for tests).
pub(super) fn write_canonical(out: &mut impl Write, rec: &SnapshotRecord) -> Result<(), StorageError> {
    let bytes = encode(rec)?;
    out.write_all(&(bytes.len() as u32).to_le_bytes()).map_err(super::io_err)?;
    out.write_all(&bytes).map_err(super::io_err)
}

/// Writes records in the compact form.
pub(super) struct CompactWriter<W> {
    out: W,
    shared: HashMap<String, u32>,
    shared_bytes: usize,
    buf: Vec<u8>,
}

impl<W: Write> CompactWriter<W> {
    pub fn new(mut out: W) -> Result<Self, StorageError> {
        out.write_all(&MAGIC).map_err(super::io_err)?;
        Ok(Self { out, shared: HashMap::new(), shared_bytes: 0, buf: Vec::new() })
    }

    pub fn put(&mut self, rec: &SnapshotRecord) -> Result<(), StorageError> {
        let compact = match rec {
            SnapshotRecord::Media { server, id, value } => match exact::<MediaRecord>(value) {
                Some(media) if media.key.server_name == *server && media.key.media_id == *id => self.media(media)?,
                _ => Compact::Raw(rec.clone()),
            },
            SnapshotRecord::Content { cid, value } => match exact::<ContentRecord>(value) {
                Some(c) if c.cid.to_bytes() == *cid => self.content(c),
                _ => Compact::Raw(rec.clone()),
            },
            SnapshotRecord::Pending { user, server, id, expires_at_ms } => Compact::Pending {
                user: self.text(user)?,
                server: self.text(server)?,
                id: id.clone(),
                expires_at_ms: *expires_at_ms,
            },
            SnapshotRecord::Tombstone { key } => Compact::Tombstone { key: Key::of(key) },
            SnapshotRecord::Meta { key, value } => Compact::Meta { key: key.clone(), value: *value },
            SnapshotRecord::End { records } => Compact::End { records: *records },
            SnapshotRecord::Thumbnail { .. } | SnapshotRecord::Usage { .. } | SnapshotRecord::Block { .. } => {
                Compact::Raw(rec.clone())
            }
        };
        self.write(&compact)
    }

    fn media(&mut self, media: MediaRecord) -> Result<Compact, StorageError> {
        let id = match &media.state {
            MediaState::Ready { cid, .. } if cid.to_string() == media.key.media_id => MediaId::OfCid,
            _ => MediaId::Other(media.key.media_id.clone()),
        };
        let state = match media.state {
            MediaState::Pending { expires_at_ms } => State::Pending { expires_at_ms },
            MediaState::Ready { cid, content_type, filename, uploaded_at_ms } => State::Ready {
                cid: cid.to_bytes(),
                content_type: self.text(&content_type)?,
                filename,
                uploaded_after_ms: uploaded_at_ms.wrapping_sub(media.created_at_ms) as i64,
            },
        };
        Ok(Compact::Media {
            server: self.text(&media.key.server_name)?,
            id,
            uploader: self.text(&media.uploader)?,
            created_at_ms: media.created_at_ms,
            state,
        })
    }

    fn content(&mut self, c: ContentRecord) -> Compact {
        let index = match &c.index_key {
            None => Index::None,
            Some(i) if *i == blob_key::index_of(&c.blob_key) => Index::OfBlob,
            Some(i) => Index::Other(i.clone()),
        };
        Compact::Content(CompactContent {
            cid: c.cid.to_bytes(),
            size: c.size,
            chunk_size: c.chunk_size,
            blob: Key::of(&c.blob_key),
            index,
            refcount: c.refcount,
            created_at_ms: c.created_at_ms,
            lost: c.lost,
        })
    }

    /// `s` by number if it is (or now becomes) shared, else inline.
    fn text(&mut self, s: &str) -> Result<Text, StorageError> {
        if let Some(n) = self.shared.get(s) {
            return Ok(Text::Shared(*n));
        }
        if s.len() > MAX_SHARED_LEN || self.shared.len() >= MAX_SHARED || self.shared_bytes + s.len() > MAX_SHARED_BYTES
        {
            return Ok(Text::Inline(s.to_owned()));
        }
        self.shared_bytes += s.len();
        let n = self.shared.len() as u32;
        self.write(&Compact::Shared(s.to_owned()))?;
        self.shared.insert(s.to_owned(), n);
        Ok(Text::Shared(n))
    }

    fn write(&mut self, rec: &Compact) -> Result<(), StorageError> {
        self.buf.clear();
        let bytes = postcard::to_extend(rec, std::mem::take(&mut self.buf))
            .map_err(|e| StorageError::Database(format!("cannot encode snapshot record: {e}")))?;
        let mut len = [0u8; 10];
        let n = leb128(bytes.len() as u64, &mut len);
        self.out.write_all(&len[..n]).map_err(super::io_err)?;
        self.out.write_all(&bytes).map_err(super::io_err)?;
        self.buf = bytes;
        Ok(())
    }
}

impl Key {
    fn of(key: &str) -> Key {
        let Some(generation) = blob_key::generation(key) else { return Key::Other(key.to_owned()) };
        let Some(name) = key.rsplit_once('/').map(|(_, name)| name) else { return Key::Other(key.to_owned()) };
        if blob_key::new(generation, name) != key {
            // The old layout, `blobs/<name>`, or a `.idx` key.
            return Key::Other(key.to_owned());
        }
        let name = match from_hex(name) {
            Some(bytes) => Name::Hex(bytes),
            None => Name::Other(name.to_owned()),
        };
        Key::Blob { generation, name }
    }

    fn into_string(self) -> String {
        match self {
            Key::Blob { generation, name: Name::Hex(bytes) } => blob_key::new(generation, &hex(&bytes)),
            Key::Blob { generation, name: Name::Other(name) } => blob_key::new(generation, &name),
            Key::Other(key) => key,
        }
    }
}

/// Reads either form, giving canonical records.
pub(super) struct Reader<R> {
    input: R,
    compact: bool,
    /// The first length of a canonical snapshot, already read while telling the forms apart.
    first_len: Option<usize>,
    shared: Vec<String>,
    shared_bytes: usize,
    buf: Vec<u8>,
}

impl<R: Read> Reader<R> {
    pub fn new(mut input: R) -> Result<Self, StorageError> {
        let mut head = [0u8; 4];
        input.read_exact(&mut head).map_err(truncated)?;
        let (compact, first_len) = if head == MAGIC[..4] {
            let mut rest = [0u8; 4];
            input.read_exact(&mut rest).map_err(truncated)?;
            if rest != MAGIC[4..] {
                return Err(snapshot_err("not a snapshot: unknown format".into()));
            }
            (true, None)
        } else {
            (false, Some(u32::from_le_bytes(head) as usize))
        };
        Ok(Self { input, compact, first_len, shared: Vec::new(), shared_bytes: 0, buf: Vec::new() })
    }

    pub fn next(&mut self) -> Result<SnapshotRecord, StorageError> {
        if !self.compact {
            let len = match self.first_len.take() {
                Some(len) => len,
                None => {
                    let mut len = [0u8; 4];
                    self.input.read_exact(&mut len).map_err(truncated)?;
                    u32::from_le_bytes(len) as usize
                }
            };
            self.read_body(len)?;
            return decode("snapshot", &self.buf);
        }
        loop {
            let len = self.read_leb128()?;
            self.read_body(len)?;
            let rec: Compact = decode("snapshot", &self.buf)?;
            match rec {
                Compact::Shared(s) => {
                    self.shared_bytes += s.len();
                    if s.len() > MAX_SHARED_LEN
                        || self.shared.len() >= MAX_SHARED
                        || self.shared_bytes > MAX_SHARED_BYTES
                    {
                        return Err(snapshot_err("snapshot shares more or longer strings than allowed".into()));
                    }
                    self.shared.push(s);
                }
                other => return self.canonical(other),
            }
        }
    }

    fn canonical(&self, rec: Compact) -> Result<SnapshotRecord, StorageError> {
        Ok(match rec {
            Compact::Shared(_) => unreachable!("shared strings are consumed by next"),
            Compact::Media { server, id, uploader, created_at_ms, state } => {
                let server = self.text(server)?;
                let (state, cid) = match state {
                    State::Pending { expires_at_ms } => (MediaState::Pending { expires_at_ms }, None),
                    State::Ready { cid, content_type, filename, uploaded_after_ms } => {
                        let cid = cid_of(&cid)?;
                        let ready = MediaState::Ready {
                            cid,
                            content_type: self.text(content_type)?,
                            filename,
                            uploaded_at_ms: created_at_ms.wrapping_add(uploaded_after_ms as u64),
                        };
                        (ready, Some(cid))
                    }
                };
                let id = match (id, cid) {
                    (MediaId::OfCid, Some(cid)) => cid.to_string(),
                    (MediaId::OfCid, None) => return Err(snapshot_err("a pending media record names no CID".into())),
                    (MediaId::Other(id), _) => id,
                };
                let media = MediaRecord {
                    key: MediaKey::new(server.clone(), id.clone()),
                    uploader: self.text(uploader)?,
                    created_at_ms,
                    state,
                };
                SnapshotRecord::Media { server, id, value: encode(&media)? }
            }
            Compact::Content(c) => {
                let blob_key = c.blob.into_string();
                let index_key = match c.index {
                    Index::None => None,
                    Index::OfBlob => Some(blob_key::index_of(&blob_key)),
                    Index::Other(i) => Some(i),
                };
                let record = ContentRecord {
                    cid: cid_of(&c.cid)?,
                    size: c.size,
                    chunk_size: c.chunk_size,
                    blob_key,
                    index_key,
                    refcount: c.refcount,
                    created_at_ms: c.created_at_ms,
                    lost: c.lost,
                };
                SnapshotRecord::Content { cid: c.cid, value: encode(&record)? }
            }
            Compact::Pending { user, server, id, expires_at_ms } => {
                SnapshotRecord::Pending { user: self.text(user)?, server: self.text(server)?, id, expires_at_ms }
            }
            Compact::Tombstone { key } => SnapshotRecord::Tombstone { key: key.into_string() },
            Compact::Meta { key, value } => SnapshotRecord::Meta { key, value },
            Compact::End { records } => SnapshotRecord::End { records },
            Compact::Raw(SnapshotRecord::End { .. }) => {
                return Err(snapshot_err("a raw record cannot be the trailer".into()));
            }
            Compact::Raw(rec) => rec,
        })
    }

    fn text(&self, t: Text) -> Result<String, StorageError> {
        match t {
            Text::Inline(s) => Ok(s),
            Text::Shared(n) => self
                .shared
                .get(n as usize)
                .cloned()
                .ok_or_else(|| snapshot_err(format!("snapshot refers to shared string {n} before defining it"))),
        }
    }

    fn read_body(&mut self, len: usize) -> Result<(), StorageError> {
        if len > MAX_RECORD {
            return Err(snapshot_err(format!("a snapshot record of {len} bytes is over the {MAX_RECORD}-byte limit")));
        }
        self.buf.resize(len, 0);
        self.input.read_exact(&mut self.buf).map_err(truncated)
    }

    fn read_leb128(&mut self) -> Result<usize, StorageError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8; 1];
            self.input.read_exact(&mut b).map_err(truncated)?;
            value |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                return usize::try_from(value).map_err(|_| snapshot_err("snapshot record length overflows".into()));
            }
        }
        Err(snapshot_err("snapshot record length overflows".into()))
    }
}

fn truncated(e: std::io::Error) -> StorageError {
    snapshot_err(format!("truncated snapshot: {e}"))
}

/// The CID whose binary form is exactly `bytes` (no trailing bytes: the table key is these
/// bytes and the record holds the parsed CID, so they must agree).
fn cid_of(bytes: &[u8]) -> Result<Cid, StorageError> {
    let cid = Cid::try_from(bytes).map_err(|e| snapshot_err(format!("snapshot holds a malformed CID: {e}")))?;
    if cid.to_bytes() != bytes {
        return Err(snapshot_err("snapshot holds a CID with trailing bytes".into()));
    }
    Ok(cid)
}

/// `value` decoded, if encoding it again gives exactly `value`.
fn exact<T: serde::de::DeserializeOwned + Serialize>(value: &[u8]) -> Option<T> {
    let decoded: T = postcard::from_bytes(value).ok()?;
    (encode(&decoded).ok()? == value).then_some(decoded)
}

/// Writes `v` as LEB128 into `out`; returns the length.
fn leb128(mut v: u64, out: &mut [u8; 10]) -> usize {
    let mut n = 0;
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out[n] = b;
            return n + 1;
        }
        out[n] = b | 0x80;
        n += 1;
    }
}

/// The bytes whose lower-case hex is `s`, if it is exactly that (non-empty, even length).
fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use multihash::Multihash;

    fn cid(n: u8) -> Cid {
        Cid::new_v1(0x55, Multihash::<64>::wrap(0x12, &[n; 32]).expect("digest fits"))
    }

    fn media(server: &str, id: &str, uploader: &str, state: MediaState) -> SnapshotRecord {
        let record = MediaRecord {
            key: MediaKey::new(server, id),
            uploader: uploader.into(),
            created_at_ms: 1_700_000_000_000,
            state,
        };
        SnapshotRecord::Media { server: server.into(), id: id.into(), value: encode(&record).expect("encode") }
    }

    fn ready(cid: Cid, uploaded_at_ms: u64, filename: Option<&str>) -> MediaState {
        MediaState::Ready { cid, content_type: "image/png".into(), filename: filename.map(Into::into), uploaded_at_ms }
    }

    fn content(cid: Cid, blob_key: &str, index_key: Option<&str>) -> SnapshotRecord {
        let record = ContentRecord {
            cid,
            size: 12_345,
            chunk_size: 1 << 20,
            blob_key: blob_key.into(),
            index_key: index_key.map(Into::into),
            refcount: 3,
            created_at_ms: 1_700_000_000_001,
            lost: true,
        };
        SnapshotRecord::Content { cid: cid.to_bytes(), value: encode(&record).expect("encode") }
    }

    /// Every shape a record can take, the unusual ones included.
    fn records() -> Vec<SnapshotRecord> {
        let hex_key = blob_key::new(7, "0123456789abcdef0123456789abcdef");
        vec![
            media("hs", &cid(1).to_string(), "@a:hs", ready(cid(1), 1_700_000_000_050, None)),
            media("hs", &cid(2).to_string(), "@a:hs", ready(cid(2), 1_699_000_000_000, Some("cat.png"))),
            media("other.hs", "legacyOpaqueId", "@b:other.hs", ready(cid(3), 1_700_000_000_000, None)),
            media("hs", &cid(9).to_string(), "@a:hs", ready(cid(4), 1_700_000_000_000, None)),
            media("hs", "pendingId", "@a:hs", MediaState::Pending { expires_at_ms: 1_800_000_000_000 }),
            media(&"h".repeat(MAX_SHARED_LEN + 1), "x", "@a:hs", ready(cid(5), 0, None)),
            content(cid(1), &hex_key, None),
            content(cid(2), &hex_key, Some(&blob_key::index_of(&hex_key))),
            content(cid(3), &blob_key::new(1, "benchNotHex"), Some("somewhere/else")),
            content(cid(4), "blobs/0123abc", Some("blobs/0123abc.idx")),
            content(cid(5), &blob_key::new(2, "ABCDEF"), None),
            content(cid(6), &blob_key::new(2, "abc"), None),
            SnapshotRecord::Pending {
                user: "@a:hs".into(),
                server: "hs".into(),
                id: "pendingId".into(),
                expires_at_ms: 9,
            },
            SnapshotRecord::Tombstone { key: hex_key.clone() },
            SnapshotRecord::Tombstone { key: "blobs/0123abc".into() },
            SnapshotRecord::Meta { key: "last_applied".into(), value: 42 },
            SnapshotRecord::End { records: 16 },
        ]
    }

    fn compact(records: &[SnapshotRecord]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = CompactWriter::new(&mut out).expect("magic");
        for rec in records {
            w.put(rec).expect("write");
        }
        out
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<SnapshotRecord>, StorageError> {
        let mut r = Reader::new(bytes)?;
        let mut out = Vec::new();
        loop {
            let rec = r.next()?;
            let end = matches!(rec, SnapshotRecord::End { .. });
            out.push(rec);
            if end {
                return Ok(out);
            }
        }
    }

    #[test]
    fn the_compact_form_reads_back_as_exactly_the_canonical_records() {
        let records = records();
        let bytes = compact(&records);
        assert_eq!(read_all(&bytes).expect("read"), records);
        let mut canonical = Vec::new();
        for rec in &records {
            write_canonical(&mut canonical, rec).expect("write");
        }
        assert_eq!(read_all(&canonical).expect("read"), records, "the canonical form is still read");
        assert!(bytes.len() * 3 < canonical.len() * 2, "compact {} vs canonical {}", bytes.len(), canonical.len());
    }

    #[test]
    fn a_typical_upload_takes_about_a_third_of_its_canonical_size() {
        // Many uploads by a few users of one server, blob names as the edge makes them.
        let mut records = Vec::new();
        for n in 0..1000u32 {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&n.to_le_bytes());
            let cid = Cid::new_v1(0x55, Multihash::<64>::wrap(0x12, &digest).expect("digest fits"));
            let user = format!("@user{}:example.org", n % 50);
            let state = MediaState::Ready {
                cid,
                content_type: "image/jpeg".into(),
                filename: None,
                uploaded_at_ms: 1_700_000_000_000,
            };
            let record = MediaRecord {
                key: MediaKey::new("example.org", cid.to_string()),
                uploader: user,
                created_at_ms: 1_700_000_000_000,
                state,
            };
            records.push(SnapshotRecord::Media {
                server: "example.org".into(),
                id: cid.to_string(),
                value: encode(&record).expect("encode"),
            });
            records.push(content(
                cid,
                &blob_key::new(3, &format!("{:032x}", u128::from(n) * 0x9e37_79b9_7f4a_7c15)),
                None,
            ));
        }
        let bytes = compact(&records);
        let mut canonical = Vec::new();
        for rec in &records {
            write_canonical(&mut canonical, rec).expect("write");
        }
        let (per_upload, canonical_per_upload) = (bytes.len() / 1000, canonical.len() / 1000);
        assert!(per_upload <= 140, "{per_upload} bytes per upload (canonical {canonical_per_upload})");
        assert!(per_upload * 2 < canonical_per_upload, "{per_upload} vs canonical {canonical_per_upload}");
    }

    #[test]
    fn damaged_compact_snapshots_are_refused_with_what_is_wrong() {
        let err = |bytes: &[u8]| match read_all(bytes) {
            Err(StorageError::Corrupt { detail, .. }) => detail,
            other => panic!("expected corruption, got {other:?}"),
        };
        let bytes = compact(&records());
        assert!(err(&bytes[..bytes.len() - 1]).contains("truncated"));
        assert!(err(b"\0\0\0\0mxs9rest").contains("unknown format"));
        // A length far over the limit is refused before anything is allocated for it.
        let mut huge = MAGIC.to_vec();
        huge.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(err(&huge).contains("over the"));
        let mut canonical_huge = (u32::MAX - 1).to_le_bytes().to_vec();
        canonical_huge.extend([0; 8]);
        assert!(err(&canonical_huge).contains("over the"));
        // A reference to a string never defined.
        let mut dangling = MAGIC.to_vec();
        let rec = Compact::Pending {
            user: Text::Shared(5),
            server: Text::Inline("hs".into()),
            id: "x".into(),
            expires_at_ms: 1,
        };
        let body = postcard::to_stdvec(&rec).expect("encode");
        dangling.push(body.len() as u8);
        dangling.extend(body);
        assert!(err(&dangling).contains("before defining it"));
        // A CID with bytes after it (the key and the record would disagree).
        let mut trailing = MAGIC.to_vec();
        let mut junk_cid = cid(1).to_bytes();
        junk_cid.push(0);
        let rec = Compact::Content(CompactContent {
            cid: junk_cid,
            size: 1,
            chunk_size: 1,
            blob: Key::Other("k".into()),
            index: Index::None,
            refcount: 1,
            created_at_ms: 1,
            lost: false,
        });
        let body = postcard::to_stdvec(&rec).expect("encode");
        trailing.push(body.len() as u8);
        trailing.extend(body);
        assert!(err(&trailing).contains("trailing bytes"));
    }

    #[test]
    fn records_that_do_not_translate_exactly_travel_as_they_are() {
        // Odd stored values must neither stop a snapshot nor change the digest.
        let SnapshotRecord::Media { value, .. } = media("hs", "a", "@a:hs", ready(cid(1), 0, None)) else {
            unreachable!()
        };
        let mut longer = value.clone();
        longer.push(0);
        let SnapshotRecord::Content { value: content_value, .. } = content(cid(2), "k", None) else { unreachable!() };
        let odd = vec![
            // Names another key than the one it is stored under.
            SnapshotRecord::Media { server: "hs".into(), id: "b".into(), value: value.clone() },
            // Bytes after the record (postcard would ignore them).
            SnapshotRecord::Media { server: "hs".into(), id: "a".into(), value: longer },
            // Does not decode at all.
            SnapshotRecord::Media { server: "hs".into(), id: "c".into(), value: vec![0xff; 3] },
            // Stored under another CID.
            SnapshotRecord::Content { cid: cid(3).to_bytes(), value: content_value },
            SnapshotRecord::End { records: 4 },
        ];
        assert_eq!(read_all(&compact(&odd)).expect("read"), odd);
    }

    #[test]
    fn the_compact_form_of_a_record_is_fixed() {
        // postcard is positional: reordering a variant or field changes these bytes, and
        // snapshots already written could no longer be read.
        let key = blob_key::new(7, "0123456789abcdef0123456789abcdef");
        let bytes = compact(&[
            media("hs", &cid(1).to_string(), "@a:hs", ready(cid(1), 1_700_000_000_050, None)),
            content(cid(1), &key, Some(&blob_key::index_of(&key))),
            SnapshotRecord::End { records: 2 },
        ]);
        let hex = super::hex(&bytes);
        assert_eq!(
            hex,
            concat!(
                "000000006d787332",
                // Shared strings as they are first used: "image/png", "hs", "@a:hs".
                "0b0009696d6167652f706e67",
                "0400026873",
                "07000540613a6873",
                // Media: server #1, ID of its CID, uploader #2, created, Ready, CID, type #0,
                // no filename, uploaded 50 ms after creation.
                "36",
                "01",
                "0101",
                "00",
                "0102",
                "80d095ffbc31",
                "01",
                "24015512200101010101010101010101010101010101010101010101010101010101010101",
                "0100",
                "00",
                "64",
                // Content: CID, size, chunk size, blob key of generation 7 with a hex name,
                // index beside it, refcount 3, created, lost.
                "48",
                "02",
                "24015512200101010101010101010101010101010101010101010101010101010101010101",
                "b960",
                "808040",
                "00",
                "07",
                "00",
                "10",
                "0123456789abcdef0123456789abcdef",
                "01",
                "03",
                "81d095ffbc31",
                "01",
                // End, 2 records.
                "02",
                "0602",
            )
        );
    }

    #[test]
    fn the_stored_form_of_thumbnail_usage_and_block_records_is_fixed() {
        use crate::model::{ThumbnailMethod, ThumbnailRecord, ThumbnailSpec, Usage};
        // Both travel as they are stored (postcard of the record, positional): reordering a
        // field changes these bytes, and snapshots already written could no longer be read.
        let spec = ThumbnailSpec { width: 96, height: 96, method: ThumbnailMethod::Crop, animated: true };
        let thumbnail = ThumbnailRecord {
            source: cid(1),
            spec,
            cid: cid(2),
            content_type: "image/gif".into(),
            width: 96,
            height: 54,
            animated: true,
            created_at_ms: 1_700_000_000_000,
        };
        let usage = Usage { window: 19_675, bytes: 1 << 20, files: 3 };
        let bytes = compact(&[
            SnapshotRecord::Thumbnail {
                source: cid(1).to_bytes(),
                spec: spec.key(),
                value: postcard::to_allocvec(&thumbnail).expect("encode"),
            },
            SnapshotRecord::Usage {
                key: "00000189c5ee1800:5265c00:u:@a:hs".into(),
                value: postcard::to_allocvec(&usage).expect("encode"),
            },
            SnapshotRecord::Block { block: cid(2).to_bytes(), root: cid(1).to_bytes() },
            SnapshotRecord::End { records: 3 },
        ]);
        assert_eq!(
            super::hex(&bytes),
            concat!(
                "000000006d787332",
                // Thumbnail, 157 bytes, raw: source CID, spec key, then the record: source,
                // 96×96 crop animated, its CID, type, 96×54, animated, created.
                "9d01",
                "07",
                "06",
                "24015512200101010101010101010101010101010101010101010101010101010101010101",
                "1339367839362d63726f702d616e696d61746564",
                "61",
                "24015512200101010101010101010101010101010101010101010101010101010101010101",
                "60600001",
                "24015512200202020202020202020202020202020202020202020202020202020202020202",
                "09696d6167652f676966",
                "6036",
                "01",
                "80d095ffbc31",
                // Usage, 43 bytes, raw: key (window end, period, scope, who), then window,
                // bytes, files.
                "2b",
                "07",
                "07",
                "20303030303031383963356565313830303a353236356330303a753a40613a6873",
                "07",
                "db9901",
                "808040",
                "03",
                // Block, 76 bytes, raw: block CID, root CID.
                "4c",
                "07",
                "08",
                "24015512200202020202020202020202020202020202020202020202020202020202020202",
                "24015512200101010101010101010101010101010101010101010101010101010101010101",
                // End, 3 records.
                "02",
                "0603",
            )
        );
    }
}
