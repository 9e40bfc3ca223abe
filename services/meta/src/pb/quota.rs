use mxcas_proto::meta as pb;

use crate::model::Quota;

impl From<&Quota> for pb::Quota {
    fn from(q: &Quota) -> Self {
        pb::Quota {
            period_ms: q.period_ms,
            user_bytes: q.user_bytes,
            user_files: q.user_files,
            tenant_bytes: q.tenant_bytes,
            tenant_files: q.tenant_files,
        }
    }
}

impl From<pb::Quota> for Quota {
    fn from(q: pb::Quota) -> Self {
        Quota {
            period_ms: q.period_ms.max(1),
            user_bytes: q.user_bytes,
            user_files: q.user_files,
            tenant_bytes: q.tenant_bytes,
            tenant_files: q.tenant_files,
        }
    }
}
