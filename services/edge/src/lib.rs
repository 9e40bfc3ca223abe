//! mxcas-edge: the stateless front of mxcas.
//!
//! Serves the Matrix media API ([`api`]), names every upload by its CID ([`mxcas_cas`]),
//! streams bytes into object storage ([`ingest`], [`store`]), keeps hot blocks in memory
//! ([`cache`]) and asks the metadata service (`mxcas-meta`'s client) what an mxc holds.
//! An edge keeps no state but caches: any number can run in front of one store and one
//! metadata service.
//!
//! Must not depend on: the metadata service's storage or prost types (only its client).

#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod block_fetch;
pub mod block_index;
pub mod cache;
pub mod config;
pub mod federation;
pub mod flight;
pub mod gateway;
pub mod http_server;
pub mod ingest;
pub mod ipfs;
pub mod local_files;
pub mod media;
pub mod metrics;
pub mod pause;
pub mod rate_limit;
pub mod remote;
pub mod sniff;
pub mod store;
pub mod sweeper;
pub mod tenants;
pub mod thumbnails;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use mxcas_meta::MetaClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::AppState;
use crate::cache::BlockCache;
use crate::config::{AuthConfig, CacheConfig, MediaConfig};
use crate::media::MediaService;
use crate::metrics::Metrics;
use crate::store::{BlobStore, StoreConfig};

/// Everything an edge needs to start.
#[derive(Clone, Debug)]
pub struct EdgeSettings {
    pub server_name: String,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub media: MediaConfig,
    pub cache: CacheConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub sweeper: sweeper::SweeperConfig,
    pub http: http_server::HttpConfig,
    pub thumbnails: config::ThumbnailConfig,
    /// `[[tenants]]` (empty: one tenant, the top-level server name and `[auth]`).
    pub tenants: Vec<config::TenantConfig>,
    pub federation: config::FederationConfig,
    pub ipfs: config::IpfsConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// A running edge: its bound addresses; it stops when the cancel token fires.
pub struct Edge {
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The media service behind the API (tests arm its pause points).
    pub media: Arc<MediaService>,
}

impl EdgeSettings {
    /// Checks everything that can be checked before a port is bound.
    pub fn validate(&self) -> Result<(), EdgeError> {
        self.tenants(&Arc::new(Metrics::new())).map(|_| ())
    }

    /// Checks the settings and builds the tenants from them (the token checks reading, and the
    /// tenants' rules: static tokens refused, hosts, keys), counting into `metrics`.
    fn tenants(&self, metrics: &Arc<Metrics>) -> Result<tenants::Tenants, EdgeError> {
        if !api::valid_server_name(&self.server_name) {
            return Err(EdgeError::Config(format!(
                "server_name {:?} is not a valid Matrix server name",
                self.server_name
            )));
        }
        self.media.validate().map_err(EdgeError::Config)?;
        self.http.validate().map_err(EdgeError::Config)?;
        self.thumbnails.validate().map_err(EdgeError::Config)?;
        self.ipfs.validate().map_err(EdgeError::Config)?;
        self.cache.validate().map_err(EdgeError::Config)?;
        let tokens = self.auth.load().map_err(EdgeError::Config)?;
        if !tokens.is_empty() && self.auth.homeserver_url.is_some() {
            return Err(EdgeError::Config(
                "[auth] tokens (or tokens_file) cannot be used with [auth] homeserver_url: every token must be the \
                 homeserver's. Remove them (static tokens are for the embedded default without a homeserver)"
                    .into(),
            ));
        }
        if tokens.is_empty() && self.auth.homeserver_url.is_none() && self.tenants.is_empty() {
            return Err(EdgeError::Config(
                "no way to check access tokens: set [auth] homeserver_url (or list [auth] tokens)".into(),
            ));
        }
        let single_key = self.federation.signing_key().map_err(EdgeError::Config)?;
        tenants::Tenants::new(&self.server_name, tokens, &self.auth, &self.media, &self.tenants, single_key, metrics)
            .map_err(EdgeError::Config)
    }
}

/// Binds the API and admin ports and serves until `cancel` fires; tasks go on `tracker`.
pub async fn start(
    settings: EdgeSettings,
    meta: MetaClient,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Edge, EdgeError> {
    let metrics = Arc::new(Metrics::new());
    let tenants = settings.tenants(&metrics)?;
    let store = BlobStore::open(&settings.store, &settings.data_dir, metrics.clone())?;
    let blocks = BlockCache::new(
        settings.cache.capacity.as_u64(),
        settings.cache.store_read_timeout,
        settings.cache.read_ahead_blocks,
        settings.cache.read_span_blocks,
        store.clone(),
        metrics.clone(),
    );
    let media = Arc::new(
        MediaService::new(
            if settings.tenants.is_empty() {
                std::iter::once(settings.server_name.clone()).collect()
            } else {
                settings.tenants.iter().map(|t| t.server_name.clone()).collect()
            },
            settings.media.clone(),
            &settings.cache,
            meta,
            store,
            blocks,
            metrics.clone(),
        )
        .map_err(EdgeError::Config)?,
    );
    let thumbnails =
        Arc::new(thumbnails::Thumbnails::new(settings.thumbnails.clone(), media.clone()).map_err(EdgeError::Config)?);
    let state = Arc::new(AppState {
        media: media.clone(),
        thumbnails,
        tenants,
        metrics,
        gateway: crate::gateway::Gateway::new(),
        federation: crate::federation::Federation::new(&settings.federation).map_err(EdgeError::Config)?,
        flights: Arc::default(),
        remote_slots: Arc::new(tokio::sync::Semaphore::new(crate::remote::MAX_FETCHES)),
        ipfs: crate::ipfs::Ipfs::new(&settings.ipfs).map_err(EdgeError::Config)?,
    });

    let api_listener =
        TcpListener::bind(settings.listen).await.map_err(|source| EdgeError::Bind { addr: settings.listen, source })?;
    let admin_listener = TcpListener::bind(settings.admin_listen)
        .await
        .map_err(|source| EdgeError::Bind { addr: settings.admin_listen, source })?;
    let api_addr = api_listener.local_addr().map_err(|source| EdgeError::Bind { addr: settings.listen, source })?;
    let admin_addr =
        admin_listener.local_addr().map_err(|source| EdgeError::Bind { addr: settings.admin_listen, source })?;

    let app = api::router(state);
    tracker.spawn(http_server::serve(api_listener, app, settings.http.clone(), cancel.clone()));
    let admin = admin::router(media.clone(), cancel.clone());
    let c = cancel.clone();
    tracker.spawn(async move {
        let served = axum::serve(admin_listener, admin).with_graceful_shutdown(c.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    if settings.sweeper.enabled {
        tracker.spawn(sweeper::run(
            media.store.clone(),
            media.meta.clone(),
            settings.sweeper.clone(),
            media.metrics.clone(),
            cancel.clone(),
        ));
    }
    tracker.spawn(media.clone().watch_loop(cancel.clone()));
    tracker.spawn(media.clone().generation_loop(cancel));
    Ok(Edge { api_addr, admin_addr, media })
}
