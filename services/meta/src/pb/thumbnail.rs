use mxcas_proto::meta as pb;

use super::{WireError, cid_from_wire};
use crate::model::{ThumbnailMethod, ThumbnailRecord, ThumbnailSpec};

impl From<&ThumbnailSpec> for pb::ThumbnailSpec {
    fn from(s: &ThumbnailSpec) -> Self {
        let method = match s.method {
            ThumbnailMethod::Crop => "crop",
            ThumbnailMethod::Scale => "scale",
        };
        pb::ThumbnailSpec { width: s.width, height: s.height, method: method.into(), animated: s.animated }
    }
}

impl TryFrom<pb::ThumbnailSpec> for ThumbnailSpec {
    type Error = WireError;

    fn try_from(s: pb::ThumbnailSpec) -> Result<Self, WireError> {
        let method = match s.method.as_str() {
            "crop" => ThumbnailMethod::Crop,
            "scale" => ThumbnailMethod::Scale,
            other => return Err(WireError(format!("thumbnail method {other:?}"))),
        };
        Ok(ThumbnailSpec { width: s.width, height: s.height, method, animated: s.animated })
    }
}

impl From<&ThumbnailRecord> for pb::Thumbnail {
    fn from(t: &ThumbnailRecord) -> Self {
        pb::Thumbnail {
            source: t.source.to_bytes(),
            spec: Some((&t.spec).into()),
            cid: t.cid.to_bytes(),
            content_type: t.content_type.clone(),
            width: t.width,
            height: t.height,
            animated: t.animated,
            created_at_ms: t.created_at_ms,
        }
    }
}

impl TryFrom<pb::Thumbnail> for ThumbnailRecord {
    type Error = WireError;

    fn try_from(t: pb::Thumbnail) -> Result<Self, WireError> {
        Ok(ThumbnailRecord {
            source: cid_from_wire(&t.source)?,
            spec: t.spec.ok_or_else(|| WireError("thumbnail: no spec".into()))?.try_into()?,
            cid: cid_from_wire(&t.cid)?,
            content_type: t.content_type,
            width: t.width,
            height: t.height,
            animated: t.animated,
            created_at_ms: t.created_at_ms,
        })
    }
}
