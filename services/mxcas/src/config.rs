//! The `mxcas serve` config file: one TOML file (`--config` / `MXCAS_CONFIG`), every field
//! optional with a documented default (see `docs/configuration.md`), unknown fields refused.
//! Command-line flags and their `MXCAS_*` environment variables override the file.

use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Access token used when `[auth]` lists none (development only). Default: generated once
    /// and kept in `<data_dir>/dev-token`.
    pub dev_token: Option<String>,
    pub media: MediaConfig,
    pub cache: CacheConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub meta: MetaSection,
}

/// `[meta]`: the embedded metadata service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetaSection {
    /// gRPC address of the embedded metadata service. Default `127.0.0.1:0` (any free port:
    /// in `serve` only this process talks to it).
    pub listen: SocketAddr,
    /// This node's ID. Default 1.
    pub node_id: u64,
}

impl Default for MetaSection {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 0)), node_id: 1 }
    }
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
        }
    }
}

impl Config {
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
