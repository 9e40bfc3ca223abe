//! The edge as a Matrix server to other servers: finding them (server discovery), fetching and
//! caching their signing keys, and checking the `X-Matrix` signature of their requests. The
//! pure parts (signatures, key documents, headers) are `mxcas-federation`'s.
//!
//! Every address a remote makes us connect to (its name, its `.well-known` delegation) is
//! resolved by a resolver that drops non-public addresses unless
//! `[federation] allow_private_addresses`; IP literals are checked the same way, and no
//! redirect is followed (reqwest's policy is `none`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use moka::future::Cache;
use mxcas_federation::addresses::is_public;
use mxcas_federation::keys::{ServerKeys, verify_server_keys};
use mxcas_federation::x_matrix::{self, XMatrix};

use crate::api::error::ApiError;
use crate::config::FederationConfig;

/// Largest key document or `.well-known` answer read.
const MAX_SMALL_BODY: usize = 64 * 1024;
/// How long a failed key fetch is remembered (no storm of fetches at a server that is down).
const KEY_FAILURE_TTL: Duration = Duration::from_secs(30);
/// How long a `.well-known` delegation (or its absence) is kept.
const WELL_KNOWN_TTL: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, thiserror::Error)]
pub enum FederationError {
    #[error("{0:?} is not a valid server name")]
    BadName(String),
    #[error("{0} resolves only to addresses that are not public (set [federation] allow_private_addresses to allow)")]
    Private(String),
    #[error("cannot reach {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("the keys of {server} do not hold: {reason}")]
    BadKeys { server: String, reason: String },
}

/// Where requests for a server name go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `https://host:port`.
    pub base: String,
    /// The `Host` header to send.
    pub host: String,
}

/// A DNS resolver that only hands out public addresses (unless allowed).
struct PublicOnly {
    allow_private: bool,
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs.into_iter().filter(|a| allow_private || is_public(a.ip())).collect();
            if allowed.is_empty() {
                return Err(FederationError::Private(host).into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

pub struct Federation {
    http: reqwest::Client,
    config: FederationConfig,
    /// Checked key documents, until they expire (failures briefly).
    keys: Cache<String, Result<Arc<ServerKeys>, FederationError>>,
    /// `.well-known/matrix/server` delegations (`None`: none).
    well_known: Cache<String, Option<String>>,
}

/// `host` and `port` of a server name (`[v6]` kept bracketed).
fn split_name(name: &str) -> Option<(&str, Option<u16>)> {
    if !crate::api::valid_server_name(name) {
        return None;
    }
    if name.starts_with('[') {
        let end = name.find(']')?;
        let port = name[end + 1..].strip_prefix(':').map(str::parse).transpose().ok()?;
        return Some((&name[..=end], port));
    }
    match name.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((name, None)),
    }
}

fn ip_of(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

impl Federation {
    pub fn new(config: &FederationConfig) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .dns_resolver(Arc::new(PublicOnly { allow_private: config.allow_private_addresses }));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("federation.ca_file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("federation.ca_file {}: {e}", path.display()))?;
            builder = builder.tls_certs_merge(certs);
        }
        for (name, target) in &config.resolve {
            if split_name(name).is_none() || split_name(target).is_none_or(|(_, port)| port.is_none()) {
                return Err(format!("federation.resolve: {name:?} = {target:?}: want a server name = \"host:port\""));
            }
        }
        let http = builder.build().map_err(|e| format!("federation HTTP client: {e}"))?;
        Ok(Self {
            http,
            config: config.clone(),
            keys: Cache::builder().max_capacity(10_000).expire_after(KeyExpiry).build(),
            well_known: Cache::builder().max_capacity(10_000).time_to_live(WELL_KNOWN_TTL).build(),
        })
    }

    /// How long the key documents this edge serves say they are valid.
    pub fn key_validity(&self) -> Duration {
        self.config.key_validity
    }

    fn check_literal(&self, server: &str, host: &str) -> Result<(), FederationError> {
        match ip_of(host) {
            Some(ip) if !self.config.allow_private_addresses && !is_public(ip) => {
                Err(FederationError::Private(server.to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// Server discovery (the specification's steps, without SRV records for now): the
    /// `resolve` override; an IP literal or a name with a port as it is; else the name's
    /// `.well-known/matrix/server` delegation, then port 8448.
    pub async fn target(&self, server: &str) -> Result<Target, FederationError> {
        let bad = || FederationError::BadName(server.to_owned());
        if let Some(to) = self.config.resolve.get(server) {
            let (host, _) = split_name(to).ok_or_else(bad)?;
            self.check_literal(server, host)?;
            return Ok(Target { base: format!("https://{to}"), host: server.to_owned() });
        }
        let (host, port) = split_name(server).ok_or_else(bad)?;
        self.check_literal(server, host)?;
        if ip_of(host).is_some() || port.is_some() {
            return Ok(Target { base: format!("https://{host}:{}", port.unwrap_or(8448)), host: server.to_owned() });
        }
        if let Some(delegated) = self.delegation(host).await
            && let Some((dhost, dport)) = split_name(&delegated)
        {
            self.check_literal(server, dhost)?;
            return Ok(Target { base: format!("https://{dhost}:{}", dport.unwrap_or(8448)), host: delegated.clone() });
        }
        Ok(Target { base: format!("https://{host}:8448"), host: host.to_owned() })
    }

    /// `m.server` of `https://<host>/.well-known/matrix/server`, if it names a valid server.
    async fn delegation(&self, host: &str) -> Option<String> {
        let http = self.http.clone();
        let url = format!("https://{host}/.well-known/matrix/server");
        self.well_known
            .get_with(host.to_owned(), async move {
                let resp = http.get(&url).send().await.ok().filter(|r| r.status() == StatusCode::OK)?;
                let body = read_limited(resp, MAX_SMALL_BODY).await.ok()?;
                let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
                let to = json.get("m.server")?.as_str()?.to_owned();
                split_name(&to).is_some().then_some(to)
            })
            .await
    }

    /// `server`'s checked signing keys (fetched once for all concurrent callers, kept until
    /// the document expires).
    pub async fn server_keys(&self, server: &str) -> Result<Arc<ServerKeys>, FederationError> {
        let this_http = self.http.clone();
        let target = self.target(server).await?;
        let server_owned = server.to_owned();
        self.keys
            .get_with(server.to_owned(), async move {
                let unreachable =
                    |reason: String| FederationError::Unreachable { server: server_owned.clone(), reason };
                let resp = this_http
                    .get(format!("{}/_matrix/key/v2/server", target.base))
                    .header(header::HOST, &target.host)
                    .send()
                    .await
                    .map_err(|e| unreachable(error_chain(&e)))?;
                if resp.status() != StatusCode::OK {
                    return Err(unreachable(format!("key request answered {}", resp.status())));
                }
                let body = read_limited(resp, MAX_SMALL_BODY).await.map_err(unreachable)?;
                let doc: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| FederationError::BadKeys { server: server_owned.clone(), reason: e.to_string() })?;
                verify_server_keys(&doc, &server_owned, crate::media::now_ms())
                    .map(Arc::new)
                    .map_err(|e| FederationError::BadKeys { server: server_owned.clone(), reason: e.to_string() })
            })
            .await
    }

    /// Checks a request's `X-Matrix` authorization: for one of `ours` (the local server names),
    /// signed by its origin's current key over this method and URI. Answers (origin,
    /// destination), or the specification's 401.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        method: &str,
        uri: &str,
        ours: &(dyn Fn(&str) -> bool + Sync),
        default_destination: &str,
    ) -> Result<(String, String), ApiError> {
        let unauthorized = |why: String| ApiError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", why);
        let mut last = unauthorized("Missing X-Matrix Authorization header".into());
        for value in headers.get_all(header::AUTHORIZATION) {
            let Ok(text) = value.to_str() else { continue };
            let auth: XMatrix = match x_matrix::parse(text) {
                Ok(a) => a,
                Err(x_matrix::XMatrixError::Scheme) => continue,
                Err(e) => {
                    last = unauthorized(e.to_string());
                    continue;
                }
            };
            let destination = auth.destination.clone().unwrap_or_else(|| default_destination.to_owned());
            if !ours(&destination) {
                return Err(unauthorized(format!(
                    "Destination mismatch in auth header: {destination:?} is not served here"
                )));
            }
            if !crate::api::valid_server_name(&auth.origin) {
                last = unauthorized("Invalid origin in X-Matrix header".into());
                continue;
            }
            let keys = match self.server_keys(&auth.origin).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::info!(origin = %auth.origin, error = %e, "cannot check a federation request's signature");
                    last = unauthorized(format!("Cannot get the keys of {}: {e}", auth.origin));
                    continue;
                }
            };
            let Some(key) = keys.key_at(&auth.key, crate::media::now_ms()) else {
                last = unauthorized(format!("{} has no current key {}", auth.origin, auth.key));
                continue;
            };
            match x_matrix::verify_request(&auth, &destination, method, uri, None, &key) {
                Ok(()) => return Ok((auth.origin, destination)),
                Err(e) => last = unauthorized(format!("Invalid signature: {e}")),
            }
        }
        Err(last)
    }
}

/// Cache lifetimes: a key document until it expires, a failure briefly.
struct KeyExpiry;

impl moka::Expiry<String, Result<Arc<ServerKeys>, FederationError>> for KeyExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Result<Arc<ServerKeys>, FederationError>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(match value {
            Ok(keys) => Duration::from_millis(keys.valid_until_ms.saturating_sub(crate::media::now_ms())),
            Err(_) => KEY_FAILURE_TTL,
        })
    }
}

/// The body of `resp`, refused past `limit` bytes.
async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if out.len() + chunk.len() > limit {
            return Err(format!("answer over {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An error and its causes, on one line (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(allow_private: bool, resolve: &[(&str, &str)]) -> Federation {
        Federation::new(&FederationConfig {
            allow_private_addresses: allow_private,
            resolve: resolve.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect(),
            ..Default::default()
        })
        .expect("federation")
    }

    #[tokio::test]
    async fn names_with_a_port_or_an_address_are_used_as_they_are_and_private_ones_refused() {
        let open = fed(true, &[("private.example", "127.0.0.1:8443")]);
        assert_eq!(
            open.target("1.2.3.4").await.expect("target"),
            Target { base: "https://1.2.3.4:8448".into(), host: "1.2.3.4".into() }
        );
        assert_eq!(open.target("hs.example:1234").await.expect("target").base, "https://hs.example:1234");
        assert_eq!(open.target("[2001:4860::1]:99").await.expect("target").base, "https://[2001:4860::1]:99");
        let overridden = open.target("private.example").await.expect("target");
        assert_eq!(overridden, Target { base: "https://127.0.0.1:8443".into(), host: "private.example".into() });
        let closed = fed(false, &[("private.example", "127.0.0.1:8443")]);
        for name in ["127.0.0.1:8448", "10.1.2.3", "[::1]:8448", "169.254.169.254", "private.example"] {
            assert!(matches!(closed.target(name).await, Err(FederationError::Private(_))), "{name}");
        }
        assert!(matches!(closed.target("bad name").await, Err(FederationError::BadName(_))));
        assert!(
            Federation::new(&FederationConfig {
                resolve: [("a.example".into(), "no-port".into())].into(),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[tokio::test]
    async fn the_resolver_hands_out_no_private_address() {
        use reqwest::dns::Resolve as _;
        let strict = PublicOnly { allow_private: false };
        let name: reqwest::dns::Name = "localhost".parse().expect("name");
        assert!(strict.resolve(name).await.is_err(), "localhost resolves to loopback only");
        let open = PublicOnly { allow_private: true };
        let name: reqwest::dns::Name = "localhost".parse().expect("name");
        assert!(open.resolve(name).await.expect("resolves").any(|a| a.ip().is_loopback()));
    }
}
