//! The records the metadata service keeps: per-mxc [`MediaRecord`]s over per-CID
//! [`ContentRecord`]s. Content is stored once however many mxcs reference it; `refcount`
//! counts those references so that deletion and retention (later) know when a blob is free.

use cid::Cid;
use serde::{Deserialize, Serialize};

/// `(server_name, media_id)`: the two halves of an `mxc://` URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MediaKey {
    pub server_name: String,
    pub media_id: String,
}

impl MediaKey {
    pub fn new(server_name: impl Into<String>, media_id: impl Into<String>) -> Self {
        Self { server_name: server_name.into(), media_id: media_id.into() }
    }
}

impl std::fmt::Display for MediaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mxc://{}/{}", self.server_name, self.media_id)
    }
}

/// One mxc: who made it, when, and whether its bytes have arrived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRecord {
    pub key: MediaKey,
    pub uploader: String,
    pub created_at_ms: u64,
    pub state: MediaState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MediaState {
    /// Reserved by `POST /create`; content must arrive before `expires_at_ms`.
    Pending { expires_at_ms: u64 },
    /// Has content.
    Ready {
        #[serde(with = "cid_bytes")]
        cid: Cid,
        content_type: String,
        filename: Option<String>,
        uploaded_at_ms: u64,
    },
}

impl MediaRecord {
    /// The CID of the content, once uploaded.
    pub fn cid(&self) -> Option<&Cid> {
        match &self.state {
            MediaState::Ready { cid, .. } => Some(cid),
            MediaState::Pending { .. } => None,
        }
    }
}

/// One stored file, named by its CID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentRecord {
    #[serde(with = "cid_bytes")]
    pub cid: Cid,
    pub size: u64,
    /// Leaf size of the DAG: leaf `i` covers bytes `[i*chunk_size, (i+1)*chunk_size)`.
    pub chunk_size: u32,
    /// Object key of the file's bytes in the blob store.
    pub blob_key: String,
    /// Object key of the block index (leaf hashes, dag-pb nodes); `None` for one-block files.
    pub index_key: Option<String>,
    /// How many mxc records reference this content.
    pub refcount: u64,
    pub created_at_ms: u64,
    /// The stored bytes were found missing or corrupt: downloads answer data loss until an
    /// upload of the same bytes repairs the record.
    pub lost: bool,
}

/// The blob-store keys of uploads: `blobs/<generation, 12 digits>/<random>`, plus
/// `<blob key>.idx` for the block index. The generation is the reclaim generation current when
/// the upload started (see `docs/storage.md`): the orphan sweeper only deletes unreferenced
/// objects of *sealed* generations, and the metadata service refuses any commit that names a
/// key of a sealed generation, so an object can never be deleted while a commit of it is still
/// possible.
pub mod blob_key {
    /// Width of the zero-padded generation, so keys of one generation share a prefix and sort
    /// by generation.
    const WIDTH: usize = 12;

    /// A fresh object key for an upload under `generation`.
    pub fn new(generation: u64, random: &str) -> String {
        format!("blobs/{generation:0WIDTH$}/{random}")
    }

    /// The key of the block index stored beside the object `blob` (same generation).
    pub fn index_of(blob: &str) -> String {
        format!("{blob}.idx")
    }

    /// The generation a key was made under. Keys of the old layout (`blobs/<random>`, no
    /// generation) are generation 0, sealed from the start. `None` for anything else.
    pub fn generation(key: &str) -> Option<u64> {
        let rest = key.strip_prefix("blobs/")?;
        match rest.split_once('/') {
            Some((generation, name))
                if generation.len() == WIDTH
                    && generation.bytes().all(|b| b.is_ascii_digit())
                    && !name.is_empty()
                    && !name.contains('/') =>
            {
                generation.parse().ok()
            }
            Some(_) => None,
            None if !rest.is_empty() => Some(0),
            None => None,
        }
    }

    /// The first key of generation `generation + 1`: every key of generations `..=generation`
    /// sorts before it.
    pub fn after_generation(generation: u64) -> String {
        format!("blobs/{:0WIDTH$}/", generation.saturating_add(1))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn keys_carry_their_generation_and_sort_by_it() {
            let k = new(7, "abc");
            assert_eq!(k, "blobs/000000000007/abc");
            assert_eq!(generation(&k), Some(7));
            assert_eq!(generation(&format!("{k}.idx")), Some(7));
            assert_eq!(generation("blobs/0123abc"), Some(0));
            assert_eq!(generation("blobs/7/abc"), None);
            assert_eq!(generation("blobs/+00000000007/abc"), None);
            assert_eq!(generation("blobs/000000000007/a/b"), None);
            assert_eq!(generation("other/x"), None);
            assert_eq!(generation("blobs/"), None);
            assert!(new(7, "zzz") < after_generation(7));
            assert!(new(8, "000") >= after_generation(7));
        }
    }
}

impl ContentRecord {
    /// The objects this record names: its bytes and, for a multi-block file, its index.
    pub fn object_keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.blob_key.as_str()).chain(self.index_key.as_deref())
    }
}

/// Serde as the CID's binary form: compact and canonical.
pub(crate) mod cid_bytes {
    use cid::Cid;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(cid: &Cid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&cid.to_bytes())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Cid, D::Error> {
        let bytes: Vec<u8> = Deserialize::deserialize(d)?;
        Cid::try_from(bytes.as_slice()).map_err(D::Error::custom)
    }
}

pub(crate) mod cid_list {
    use cid::Cid;
    use serde::{Deserialize, Deserializer, Serializer, de::Error, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(cids: &[Cid], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(cids.len()))?;
        for cid in cids {
            seq.serialize_element(&cid.to_bytes())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cid>, D::Error> {
        let list: Vec<Vec<u8>> = Deserialize::deserialize(d)?;
        list.iter().map(|b| Cid::try_from(b.as_slice()).map_err(D::Error::custom)).collect()
    }
}

/// How a thumbnail relates to the box it was asked for: filled exactly (`crop`), or fitted
/// inside keeping the aspect ratio (`scale`), as the Matrix spec's `method` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ThumbnailMethod {
    Crop,
    Scale,
}

/// What a thumbnail is of, besides its source: a box, a method, and whether it may animate.
/// Thumbnails are keyed by (source CID, spec), so every mxc of the same bytes shares them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ThumbnailSpec {
    pub width: u32,
    pub height: u32,
    pub method: ThumbnailMethod,
    pub animated: bool,
}

impl ThumbnailSpec {
    /// Largest side a thumbnail may be recorded with.
    pub const MAX_SIDE: u32 = 16_384;

    /// The spec's key in the state: `96x96-crop`, `320x240-scale-animated`.
    pub fn key(&self) -> String {
        let method = match self.method {
            ThumbnailMethod::Crop => "crop",
            ThumbnailMethod::Scale => "scale",
        };
        let animated = if self.animated { "-animated" } else { "" };
        format!("{}x{}-{method}{animated}", self.width, self.height)
    }
}

/// A made thumbnail: its own content (by CID) and what it turned out as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThumbnailRecord {
    #[serde(with = "cid_bytes")]
    pub source: Cid,
    pub spec: ThumbnailSpec,
    /// The thumbnail's bytes, stored as content like any upload.
    #[serde(with = "cid_bytes")]
    pub cid: Cid,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub animated: bool,
    pub created_at_ms: u64,
}

/// What one account and one tenant (server name) may upload per period of leader time; 0 is
/// no limit. Usage counts within windows `[k × period, (k + 1) × period)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub period_ms: u64,
    pub user_bytes: u64,
    pub user_files: u64,
    pub tenant_bytes: u64,
    pub tenant_files: u64,
}

/// What was uploaded in one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub window: u64,
    pub bytes: u64,
    pub files: u64,
}

/// Whose quota a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuotaScope {
    User,
    Tenant,
}
