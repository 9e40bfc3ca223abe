use mxcas_proto::meta as pb;

use super::{WireError, cid_from_wire};
use crate::model::ContentRecord;

impl From<&ContentRecord> for pb::Content {
    fn from(c: &ContentRecord) -> Self {
        pb::Content {
            cid: c.cid.to_bytes(),
            size: c.size,
            chunk_size: c.chunk_size,
            blob_key: c.blob_key.clone(),
            index_key: c.index_key.clone().unwrap_or_default(),
            refcount: c.refcount,
            created_at_ms: c.created_at_ms,
            lost: c.lost,
        }
    }
}

impl TryFrom<pb::Content> for ContentRecord {
    type Error = WireError;

    fn try_from(c: pb::Content) -> Result<Self, WireError> {
        if c.chunk_size == 0 {
            return Err(WireError("content: chunk_size 0".into()));
        }
        Ok(ContentRecord {
            cid: cid_from_wire(&c.cid)?,
            size: c.size,
            chunk_size: c.chunk_size,
            blob_key: c.blob_key,
            index_key: Some(c.index_key).filter(|k| !k.is_empty()),
            refcount: c.refcount,
            created_at_ms: c.created_at_ms,
            lost: c.lost,
        })
    }
}
