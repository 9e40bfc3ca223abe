use mxcas_proto::meta as pb;

use super::{WireError, cid_from_wire};
use crate::model::{MediaKey, MediaRecord, MediaState};

impl From<&MediaKey> for pb::MediaKey {
    fn from(k: &MediaKey) -> Self {
        pb::MediaKey { server_name: k.server_name.clone(), media_id: k.media_id.clone() }
    }
}

impl From<pb::MediaKey> for MediaKey {
    fn from(k: pb::MediaKey) -> Self {
        MediaKey { server_name: k.server_name, media_id: k.media_id }
    }
}

impl From<&MediaRecord> for pb::Media {
    fn from(m: &MediaRecord) -> Self {
        let state = match &m.state {
            MediaState::Pending { expires_at_ms } => {
                pb::media::State::Pending(pb::Pending { expires_at_ms: *expires_at_ms })
            }
            MediaState::Ready { cid, content_type, filename, uploaded_at_ms } => pb::media::State::Ready(pb::Ready {
                cid: cid.to_bytes(),
                content_type: content_type.clone(),
                filename: filename.clone(),
                uploaded_at_ms: *uploaded_at_ms,
            }),
        };
        pb::Media {
            key: Some((&m.key).into()),
            uploader: m.uploader.clone(),
            created_at_ms: m.created_at_ms,
            state: Some(state),
        }
    }
}

impl TryFrom<pb::Media> for MediaRecord {
    type Error = WireError;

    fn try_from(m: pb::Media) -> Result<Self, WireError> {
        let key = m.key.ok_or_else(|| WireError("media: no key".into()))?.into();
        let state = match m.state.ok_or_else(|| WireError("media: no state".into()))? {
            pb::media::State::Pending(p) => MediaState::Pending { expires_at_ms: p.expires_at_ms },
            pb::media::State::Ready(r) => MediaState::Ready {
                cid: cid_from_wire(&r.cid)?,
                content_type: r.content_type,
                filename: r.filename,
                uploaded_at_ms: r.uploaded_at_ms,
            },
        };
        Ok(MediaRecord { key, uploader: m.uploader, created_at_ms: m.created_at_ms, state })
    }
}
