//! Raft RPCs to peers over tonic gRPC (`mxcas.meta.v1.Raft`): one cached channel per peer
//! address, a deadline on every call, openraft's messages as postcard (JSON to a peer that
//! cannot read postcard: an older version during a rolling upgrade).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mxcas_proto::meta::raft_client::RaftClient;
use mxcas_proto::meta::{Encoding, RaftMessage};
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::{NodeId, TypeConfig};
use crate::tls::{self, Tls};

/// Channels shared by every connection to the same address.
#[derive(Clone)]
pub struct Network {
    timeout: Duration,
    local: Option<std::net::IpAddr>,
    tls: Option<Tls>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Peers known to read JSON only (older versions), for every connection to them, and
    /// since when: postcard is tried again after [`JSON_ONLY_FOR`] (an upgrade may be done).
    json_only: JsonOnly,
}

type JsonOnly = Arc<Mutex<HashMap<NodeId, std::time::Instant>>>;

/// How long a peer that refused postcard is sent JSON before postcard is tried again.
const JSON_ONLY_FOR: Duration = Duration::from_secs(60);

impl Network {
    pub fn new(timeout: Duration, local: Option<std::net::IpAddr>, tls: Option<Tls>) -> Self {
        Self { timeout, local, tls, channels: Arc::default(), json_only: Arc::default() }
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().map_err(|_| "channel cache poisoned".to_owned())?;
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = tls::endpoint(addr, self.tls.as_ref())?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true)
            .local_address(self.local)
            .connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

pub struct Peer {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
    /// Peers that refused a postcard message as malformed (shared by all connections).
    json_only: JsonOnly,
}

pub(crate) fn encode<T: Serialize + ?Sized>(encoding: Encoding, value: &T) -> Result<Vec<u8>, String> {
    match encoding {
        Encoding::Postcard => postcard::to_stdvec(value).map_err(|e| e.to_string()),
        Encoding::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(encoding: Encoding, bytes: &[u8]) -> Result<T, String> {
    match encoding {
        Encoding::Postcard => match postcard::take_from_bytes(bytes) {
            Ok((value, [])) => Ok(value),
            Ok((_, rest)) => Err(format!("{} bytes after the message", rest.len())),
            Err(e) => Err(e.to_string()),
        },
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        let client = self.channel(&node.addr).map(|c| RaftClient::new(c).max_decoding_message_size(256 << 20));
        Peer { target, client, json_only: self.json_only.clone() }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl Peer {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = self.client.as_mut().map_err(|e| RPCError::Unreachable(Unreachable::new(&Msg(e.clone()))))?;
        let network = |e: String| RPCError::Network(NetworkError::new(&Msg(e)));
        let json_only = |peer: NodeId| {
            self.json_only
                .lock()
                .map(|s| s.get(&peer).is_some_and(|since| since.elapsed() < JSON_ONLY_FOR))
                .unwrap_or(false)
        };
        let mut encoding = if json_only(self.target) { Encoding::Json } else { Encoding::Postcard };
        let reply = loop {
            let data = encode(encoding, req).map_err(network)?;
            let mut request = tonic::Request::new(RaftMessage { data, encoding: encoding.into() });
            request.set_timeout(option.hard_ttl());
            let reply = match rpc {
                Rpc::Append => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::Snapshot => client.install_snapshot(request).await,
            };
            match reply {
                // A node of an older version reads JSON only (and ignores the encoding field).
                Err(status)
                    if status.code() == tonic::Code::InvalidArgument
                        && status.message().starts_with("malformed raft message")
                        && encoding == Encoding::Postcard =>
                {
                    tracing::warn!(
                        peer = self.target,
                        "peer cannot read postcard raft messages (an older version?); sending it JSON for {JSON_ONLY_FOR:?}"
                    );
                    if let Ok(mut s) = self.json_only.lock() {
                        s.insert(self.target, std::time::Instant::now());
                    }
                    encoding = Encoding::Json;
                }
                other => break other,
            }
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Err(status) => return Err(RPCError::Network(NetworkError::new(&status))),
        };
        let encoding = reply.encoding();
        if !reply.error.is_empty() {
            let e: RaftError<NodeId, E> = decode(encoding, &reply.error).map_err(network)?;
            return Err(RPCError::RemoteError(RemoteError::new(self.target, e)));
        }
        decode(encoding, &reply.data).map_err(network)
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Append, &req, &option).await
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(Rpc::Snapshot, &req, &option).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &req, &option).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::error::{Fatal, Infallible};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, Membership};

    use super::*;
    use crate::Command;

    fn log_id(term: u64, index: u64) -> openraft::LogId<NodeId> {
        openraft::LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn round_trip<T: Serialize + DeserializeOwned + std::fmt::Debug>(value: &T) {
        for encoding in [Encoding::Postcard, Encoding::Json] {
            let bytes = encode(encoding, value).expect("encodes");
            let back: T = decode(encoding, &bytes).expect("decodes");
            // Not every openraft type is PartialEq: compare what they print.
            assert_eq!(format!("{back:?}"), format!("{value:?}"), "{encoding:?}");
        }
    }

    #[test]
    fn every_raft_message_survives_both_encodings() {
        let nodes: BTreeMap<NodeId, BasicNode> =
            (1..=3).map(|i| (i, BasicNode::new(format!("127.0.0.1:{i}")))).collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes);
        let batch = Command::Batch(vec![
            Command::Expire { now_ms: 5, limit: 1000 },
            Command::RegisterStore { id: 7 },
            Command::BeginSweep { now_ms: 1, min_interval_ms: 600_000 },
        ]);
        let entries = vec![
            Entry::<TypeConfig> { log_id: log_id(2, 10), payload: EntryPayload::Blank },
            Entry { log_id: log_id(2, 11), payload: EntryPayload::Membership(membership) },
            Entry { log_id: log_id(2, 12), payload: EntryPayload::Normal(batch) },
        ];
        let vote = openraft::Vote::new_committed(2, 1);
        round_trip(&AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(log_id(1, 9)),
            entries,
            leader_commit: Some(log_id(2, 10)),
        });
        round_trip(&AppendEntriesResponse::<NodeId>::Success);
        round_trip(&AppendEntriesResponse::<NodeId>::PartialSuccess(Some(log_id(2, 11))));
        round_trip(&AppendEntriesResponse::<NodeId>::Conflict);
        round_trip(&AppendEntriesResponse::<NodeId>::HigherVote(vote));
        round_trip(&VoteRequest::<NodeId>::new(vote, Some(log_id(2, 12))));
        round_trip(&VoteResponse::<NodeId>::new(vote, None, false));
        round_trip(&RaftError::<NodeId, Infallible>::Fatal(Fatal::Stopped));
    }

    #[test]
    fn postcard_messages_are_not_read_as_json() {
        // What makes an older (JSON-only) peer answer "malformed raft message", which switches
        // the sender to JSON for it.
        let bytes = encode(Encoding::Postcard, &AppendEntriesResponse::<NodeId>::Conflict).expect("encodes");
        assert!(decode::<AppendEntriesResponse<NodeId>>(Encoding::Json, &bytes).is_err());
    }
}
