use mxcas_proto::meta as pb;

use crate::command::Generations;

impl From<Generations> for pb::Generations {
    fn from(g: Generations) -> Self {
        pb::Generations { generation: g.generation, sealed: g.sealed, store_id: g.store_id }
    }
}

impl From<pb::Generations> for Generations {
    fn from(g: pb::Generations) -> Self {
        Generations { generation: g.generation, sealed: g.sealed, store_id: g.store_id }
    }
}
