//! Tenants: the homeservers (server names) one cluster serves.
//!
//! Each tenant has its own homeserver (tokens are checked with it, and cached per tenant, so
//! one homeserver's token never means anything to another's), its own upload and download
//! limits, and its signing key for federation. A request's tenant is chosen by its `Host`
//! header (the reverse proxy forwards the client's); a request whose `Host` names none gets the
//! default tenant. Uploads land under the requesting tenant's server name; media of every
//! tenant is local media, downloadable by the users of any of them (as a homeserver's users
//! download remote media through their own server).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::http::{HeaderMap, header};

use crate::api::auth::Authenticator;
use crate::config::{AuthConfig, MediaConfig, SigningKey, TenantConfig};
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;

pub struct Tenant {
    pub server_name: String,
    pub auth: Authenticator,
    /// Uploads and `/create`s per user per minute on this edge.
    pub upload_limit: RateLimiter,
    /// Authenticated downloads (and thumbnails) per user per minute on this edge.
    pub download_limit: RateLimiter,
    pub max_upload_size: u64,
    /// For federation (checked at start).
    pub signing_key: Option<SigningKey>,
}

pub struct Tenants {
    all: Vec<Arc<Tenant>>,
    by_host: HashMap<String, usize>,
    default: usize,
}

impl Tenants {
    /// The tenants of a config: the declared `[[tenants]]`, or (none declared) one made of the
    /// top-level `server_name`, `[auth]` and `[media]`. `tokens` are the static tokens loaded
    /// from `[auth]`.
    pub fn new(
        server_name: &str,
        tokens: BTreeMap<String, String>,
        auth: &AuthConfig,
        media: &MediaConfig,
        declared: &[TenantConfig],
        metrics: &Arc<Metrics>,
    ) -> Result<Self, String> {
        let rates = |t: Option<&TenantConfig>| {
            (
                RateLimiter::new(
                    "uploads",
                    t.and_then(|t| t.uploads_per_minute_per_user).unwrap_or(media.uploads_per_minute_per_user),
                ),
                RateLimiter::new(
                    "downloads",
                    t.and_then(|t| t.downloads_per_minute_per_user).unwrap_or(media.downloads_per_minute_per_user),
                ),
            )
        };
        if declared.is_empty() {
            let (upload_limit, download_limit) = rates(None);
            let only = Tenant {
                server_name: server_name.to_owned(),
                auth: Authenticator::new(tokens, auth, server_name, metrics.clone())?,
                upload_limit,
                download_limit,
                max_upload_size: media.max_upload_size.as_u64(),
                signing_key: None,
            };
            return Ok(Self { all: vec![Arc::new(only)], by_host: HashMap::new(), default: 0 });
        }
        if !tokens.is_empty() {
            return Err(
                "[auth] tokens (or tokens_file) cannot be used with [[tenants]]: every token must be a homeserver's. \
                 Remove them (static tokens are for the embedded single-server default)"
                    .into(),
            );
        }
        let mut all = Vec::new();
        let mut by_host = HashMap::new();
        for t in declared {
            if !crate::api::valid_server_name(&t.server_name) {
                return Err(format!("tenants: {:?} is not a valid Matrix server name", t.server_name));
            }
            if all.iter().any(|x: &Arc<Tenant>| x.server_name == t.server_name) {
                return Err(format!("tenants: {} is declared twice", t.server_name));
            }
            let hosts = if t.hosts.is_empty() { vec![t.server_name.clone()] } else { t.hosts.clone() };
            for host in hosts {
                let host = host.to_ascii_lowercase();
                if by_host.insert(host.clone(), all.len()).is_some() {
                    return Err(format!("tenants: host {host} selects two tenants"));
                }
            }
            let tenant_auth = AuthConfig { homeserver_url: Some(t.homeserver_url.clone()), ..auth.clone() };
            let (upload_limit, download_limit) = rates(Some(t));
            all.push(Arc::new(Tenant {
                server_name: t.server_name.clone(),
                auth: Authenticator::new(BTreeMap::new(), &tenant_auth, &t.server_name, metrics.clone())
                    .map_err(|e| format!("tenants.{}: {e}", t.server_name))?,
                upload_limit,
                download_limit,
                max_upload_size: t.max_upload_size.unwrap_or(media.max_upload_size).as_u64(),
                signing_key: t.signing_key()?,
            }));
        }
        let default = all.iter().position(|t| t.server_name == server_name).ok_or_else(|| {
            format!(
                "server_name {server_name:?} is not one of the [[tenants]]: set it to the tenant that requests \
                 naming no tenant's host belong to"
            )
        })?;
        Ok(Self { all, by_host, default })
    }

    /// The tenant a request is for, by its `Host` header (with or without the port).
    pub fn for_request(&self, headers: &HeaderMap) -> &Arc<Tenant> {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_ascii_lowercase);
        let without_port = |h: &str| -> Option<String> {
            let (name, port) = h.rsplit_once(':')?;
            let is_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
            (is_port && (!name.contains(':') || name.ends_with(']'))).then(|| name.to_owned())
        };
        let found = host
            .as_deref()
            .and_then(|h| self.by_host.get(h).or_else(|| without_port(h).and_then(|n| self.by_host.get(&n))));
        &self.all[found.copied().unwrap_or(self.default)]
    }

    /// Every tenant's server name: the media held here.
    pub fn server_names(&self) -> impl Iterator<Item = &str> {
        self.all.iter().map(|t| t.server_name.as_str())
    }
}
