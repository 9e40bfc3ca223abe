//! The `mxcas serve` config file: one TOML file (`--config` / `MXCAS_CONFIG`), every field
//! optional with a documented default (see `docs/configuration.md`), unknown fields refused.
//! Command-line flags and their `MXCAS_*` environment variables override the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mxcas_edge::config::{AuthConfig, CacheConfig, MediaConfig};
use mxcas_edge::store::StoreConfig;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The Matrix server name in every `mxc://` this node issues. Default `localhost`.
    pub server_name: String,
    /// The media API. Default `127.0.0.1:8008`.
    pub listen: SocketAddr,
    /// `/livez`, `/readyz`, `/metrics`. Default `127.0.0.1:9008`.
    pub admin_listen: SocketAddr,
    /// Metadata database, local blobs (by default) and the dev token. Default `./mxcas-data`.
    pub data_dir: PathBuf,
    /// Access token used when `[auth]` lists none and names no homeserver (development only).
    /// Default: generated once and kept in `<data_dir>/dev-token`.
    pub dev_token: Option<String>,
    pub media: MediaConfig,
    pub cache: CacheConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub meta: MetaSection,
    pub edge: EdgeSection,
    pub sweeper: mxcas_edge::sweeper::SweeperConfig,
    pub http: mxcas_edge::http_server::HttpConfig,
    pub thumbnails: mxcas_edge::config::ThumbnailConfig,
    /// `[[tenants]]`: the homeservers this cluster serves (see docs/configuration.md).
    pub tenants: Vec<mxcas_edge::config::TenantConfig>,
    /// Mutual TLS on every gRPC link (raft, metadata API, admin). Default: off.
    pub tls: mxcas_meta::tls::TlsConfig,
    /// `[federation]`: signing key, discovery overrides, address rules.
    pub federation: mxcas_edge::config::FederationConfig,
    /// `[ipfs]`: trustless gateways for `ipfs:` media.
    pub ipfs: mxcas_edge::config::IpfsConfig,
}

/// `[meta]`: the metadata node (embedded in `serve`, alone in `mxcas meta`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetaSection {
    /// gRPC address (metadata API, raft, cluster admin). Default `127.0.0.1:0` for `serve`
    /// (any free port: only this process talks to it); `mxcas meta` needs a fixed one.
    pub listen: SocketAddr,
    /// Address other nodes and edges use to reach this one. Default: the bound `listen`.
    pub advertise: Option<String>,
    /// This node's raft ID (unique in the cluster, never reused). Default 1.
    pub node_id: u64,
    /// Local address outgoing raft connections are made from (multi-homed hosts; the test
    /// harness uses it to tell nodes apart behind its link proxies). Default: any.
    pub bind_outgoing: Option<std::net::IpAddr>,
    /// Raft heartbeat. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A follower that hears no leader for a random time in [min, max] starts an election.
    /// Defaults 500ms and 1s.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Build a snapshot (and purge the log before it) every this many entries. Default 10000.
    pub snapshot_every: u64,
    /// Also build one once this much log was written since the last one ("0": by count
    /// only). Default 64 MiB.
    pub snapshot_log_bytes: bytesize::ByteSize,
    /// Deadline of one raft RPC. Default 3s.
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
    /// A leader that has not heard from a majority for this long refuses writes (503 at the
    /// edge) instead of holding them until quorum returns. Default 2s.
    #[serde(with = "humantime_serde")]
    pub quorum_lease: Duration,
    /// Least time (leader clock) between two reclaim-generation advances, whatever sweepers
    /// ask: an upload has about this long from start to commit before its objects must be
    /// copied, and at least this long to finish writing them. Default 10m.
    #[serde(with = "humantime_serde")]
    pub reclaim_interval: Duration,
}

impl Default for MetaSection {
    fn default() -> Self {
        let r = mxcas_meta::raft::RaftSettings::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            node_id: 1,
            bind_outgoing: None,
            heartbeat_interval: r.heartbeat_interval,
            election_timeout_min: r.election_timeout_min,
            election_timeout_max: r.election_timeout_max,
            snapshot_every: r.snapshot_every,
            snapshot_log_bytes: bytesize::ByteSize::b(r.snapshot_log_bytes),
            rpc_timeout: r.rpc_timeout,
            quorum_lease: r.quorum_lease,
            reclaim_interval: r.reclaim_interval,
        }
    }
}

impl MetaSection {
    pub fn raft_settings(&self, tls: Option<mxcas_meta::tls::Tls>) -> mxcas_meta::raft::RaftSettings {
        mxcas_meta::raft::RaftSettings {
            heartbeat_interval: self.heartbeat_interval,
            election_timeout_min: self.election_timeout_min,
            election_timeout_max: self.election_timeout_max,
            snapshot_every: self.snapshot_every,
            snapshot_log_bytes: self.snapshot_log_bytes.as_u64(),
            // At most 1000 entries: an entry carries up to 256 commands.
            keep_after_snapshot: (self.snapshot_every / 10).clamp(10, 1000),
            rpc_timeout: self.rpc_timeout,
            bind_outgoing: self.bind_outgoing,
            quorum_lease: self.quorum_lease,
            tls,
            reclaim_interval: self.reclaim_interval,
        }
    }
}

/// `[edge]`: a stand-alone edge (`mxcas edge`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeSection {
    /// Metadata nodes (`host:port`), any number of them: the edge finds the leader.
    pub meta: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9008)),
            data_dir: PathBuf::from("./mxcas-data"),
            dev_token: None,
            media: MediaConfig::default(),
            cache: CacheConfig::default(),
            auth: AuthConfig::default(),
            store: StoreConfig::Fs { path: None },
            meta: MetaSection::default(),
            edge: EdgeSection::default(),
            sweeper: Default::default(),
            http: Default::default(),
            thumbnails: Default::default(),
            tenants: Vec::new(),
            tls: Default::default(),
            federation: Default::default(),
            ipfs: Default::default(),
        }
    }
}

impl Config {
    /// The `[tls]` material, read from its files (`None`: TLS off).
    pub fn tls(&self) -> anyhow::Result<Option<mxcas_meta::tls::Tls>> {
        self.tls.load().map_err(anyhow::Error::msg)
    }

    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses_and_validates() {
        let text = include_str!("../../../docs/mxcas.example.toml");
        let config: Config = toml::from_str(text).expect("docs/mxcas.example.toml parses");
        assert_eq!(config.server_name, "media.example.org");
        assert_eq!(config.media.max_upload_size.as_u64(), 100 * 1024 * 1024);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<Config>("listen_addr = \"127.0.0.1:1\"").expect_err("unknown field");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = toml::from_str::<Config>("[cache]\ncapacity_mb = 5").expect_err("unknown field");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn empty_config_is_the_defaults() {
        let config: Config = toml::from_str("").expect("empty parses");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8008");
        assert!(matches!(config.store, StoreConfig::Fs { path: None }));
    }
}
