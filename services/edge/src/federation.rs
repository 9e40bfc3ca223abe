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
use mxcas_federation::keys::{MAX_DOCUMENT_SIZE, ServerKeys, verify_server_keys};
use mxcas_federation::x_matrix::{self, XMatrix};

use crate::api::error::ApiError;
use crate::config::FederationConfig;

/// Largest `.well-known` answer read.
const MAX_WELL_KNOWN: usize = 16 * 1024;
/// How long a failed key fetch is remembered (no storm of fetches at a server that is down).
const KEY_FAILURE_TTL: Duration = Duration::from_secs(30);
/// How long a `.well-known` delegation (or a clear absence: 404, invalid) is kept.
const WELL_KNOWN_TTL: Duration = Duration::from_secs(3600);
/// How long a `.well-known` that could not be fetched (down, timing out) counts as absent.
const WELL_KNOWN_FAILURE_TTL: Duration = Duration::from_secs(120);
/// A key ID the cached document lacks is fetched again if the document is older than this
/// (the server may have rotated its key), at most that often.
const KEY_REFRESH_AFTER: Duration = Duration::from_secs(300);
/// Outbound discovery and key fetches in flight at once on this edge, for all requests.
const MAX_OUTBOUND: usize = 32;

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
    keys: Cache<String, Result<Fetched, FederationError>>,
    /// `.well-known/matrix/server` delegations.
    well_known: Cache<String, Delegation>,
    /// Bounds outbound fetches, whoever asks.
    outbound: Arc<tokio::sync::Semaphore>,
    /// Servers that failed to answer lately: (consecutive failures, not asked again before).
    backoff: moka::sync::Cache<String, (u32, std::time::Instant)>,
}

/// First wait after a server failed to answer; it doubles with each failure in a row.
const BACKOFF_FIRST: Duration = Duration::from_secs(30);
/// Longest wait.
const BACKOFF_MAX: Duration = Duration::from_secs(600);

/// A key document and when it was fetched.
#[derive(Clone, Debug)]
struct Fetched {
    keys: Arc<ServerKeys>,
    at: std::time::Instant,
}

/// What a `.well-known/matrix/server` said.
#[derive(Clone, Debug)]
enum Delegation {
    To(String),
    /// 404, or an answer that names no valid server.
    None,
    /// Could not be fetched: absent for now, asked again soon.
    Failed,
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

impl Federation {
    pub fn new(config: &FederationConfig) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .dns_resolver(Arc::new(PublicOnly { allow_private: config.allow_private_addresses }))
            // A proxy would resolve remote names itself, past the address rules.
            .no_proxy();
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
            well_known: Cache::builder().max_capacity(10_000).expire_after(WellKnownExpiry).build(),
            outbound: Arc::new(tokio::sync::Semaphore::new(MAX_OUTBOUND)),
            backoff: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(BACKOFF_MAX).build(),
        })
    }

    /// The client for requests to other servers (public addresses only unless allowed, no
    /// redirects, no proxy).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// How much longer `server` is left alone after failing to answer, if it is.
    pub fn backed_off(&self, server: &str) -> Option<Duration> {
        let (_, until) = self.backoff.get(server)?;
        until.checked_duration_since(std::time::Instant::now())
    }

    /// `server` failed to answer (unreachable, timing out, 5xx): it is left alone for 30 s,
    /// doubling with each failure in a row up to 10 minutes.
    pub fn failed(&self, server: &str) {
        let n = self.backoff.get(server).map_or(0, |(n, _)| n).saturating_add(1);
        let wait = BACKOFF_FIRST.saturating_mul(1 << (n - 1).min(10)).min(BACKOFF_MAX);
        self.backoff.insert(server.to_owned(), (n, std::time::Instant::now() + wait));
    }

    /// `server` answered: no more backoff.
    pub fn answered(&self, server: &str) {
        self.backoff.invalidate(server);
    }

    /// Longest one fetch of remote media (its whole body) may take.
    pub fn remote_media_timeout(&self) -> Duration {
        self.config.remote_media_timeout
    }

    /// Checks a URL a remote sent us to (a `Location`) under the address rules.
    pub fn check_location(&self, server: &str, url: &str) -> Result<(), FederationError> {
        self.check_url(server, url)
    }

    /// How long the key documents this edge serves say they are valid.
    pub fn key_validity(&self) -> Duration {
        self.config.key_validity
    }

    /// Checks the host a URL will connect to, as the HTTP client parses it (the WHATWG URL
    /// rules, which read `127.1` or `2130706433` as IPv4 addresses): an address must be public
    /// unless allowed. Names are checked by the resolver when connecting.
    fn check_url(&self, server: &str, url: &str) -> Result<(), FederationError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| FederationError::BadName(server.to_owned()))?;
        let ip = match parsed.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            Some(url::Host::Domain(_)) => return Ok(()),
            None => return Err(FederationError::BadName(server.to_owned())),
        };
        if !self.config.allow_private_addresses && !is_public(ip) {
            return Err(FederationError::Private(server.to_owned()));
        }
        Ok(())
    }

    fn checked_target(&self, server: &str, base: String, host: String) -> Result<Target, FederationError> {
        self.check_url(server, &base)?;
        Ok(Target { base, host })
    }

    /// Server discovery (the specification's steps, without SRV records for now): the
    /// `resolve` override; an IP literal or a name with a port as it is; else the name's
    /// `.well-known/matrix/server` delegation, then port 8448.
    pub async fn target(&self, server: &str) -> Result<Target, FederationError> {
        let bad = || FederationError::BadName(server.to_owned());
        if let Some(to) = self.config.resolve.get(server) {
            return self.checked_target(server, format!("https://{to}"), server.to_owned());
        }
        let (host, port) = split_name(server).ok_or_else(bad)?;
        // What the client will read as an address is one, however it is spelt.
        self.check_url(server, &format!("https://{host}/"))?;
        let literal = reqwest::Url::parse(&format!("https://{host}/"))
            .is_ok_and(|u| !matches!(u.host(), Some(url::Host::Domain(_))));
        if literal || port.is_some() {
            return self.checked_target(server, format!("https://{host}:{}", port.unwrap_or(8448)), server.to_owned());
        }
        if let Delegation::To(delegated) = self.delegation(host).await
            && let Some((dhost, dport)) = split_name(&delegated)
        {
            return self.checked_target(
                server,
                format!("https://{dhost}:{}", dport.unwrap_or(8448)),
                delegated.clone(),
            );
        }
        self.checked_target(server, format!("https://{host}:8448"), host.to_owned())
    }

    /// What `https://<host>/.well-known/matrix/server` delegates to.
    async fn delegation(&self, host: &str) -> Delegation {
        let http = self.http.clone();
        let url = format!("https://{host}/.well-known/matrix/server");
        let outbound = self.outbound.clone();
        self.well_known
            .get_with(host.to_owned(), async move {
                let Ok(_permit) = outbound.acquire_owned().await else { return Delegation::Failed };
                let resp = match http.get(&url).send().await {
                    Ok(r) => r,
                    Err(_) => return Delegation::Failed,
                };
                if resp.status().is_server_error() {
                    return Delegation::Failed;
                }
                if resp.status() != StatusCode::OK {
                    return Delegation::None;
                }
                let Ok(body) = read_limited(resp, MAX_WELL_KNOWN).await else { return Delegation::Failed };
                let to = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|json| json.get("m.server")?.as_str().map(str::to_owned))
                    .filter(|to| split_name(to).is_some());
                match to {
                    Some(to) => Delegation::To(to),
                    None => Delegation::None,
                }
            })
            .await
    }

    /// `server`'s checked signing keys (fetched once for all concurrent callers, kept until
    /// the document expires; discovery only on a miss).
    async fn fetch_keys(&self, server: &str) -> Result<Fetched, FederationError> {
        let server_owned = server.to_owned();
        let outbound = self.outbound.clone();
        self.keys
            .get_with(server.to_owned(), async move {
                let unreachable =
                    |reason: String| FederationError::Unreachable { server: server_owned.clone(), reason };
                let target = self.target(&server_owned).await?;
                let _permit = outbound.acquire_owned().await.map_err(|_| unreachable("shutting down".into()))?;
                let resp = self
                    .http
                    .get(format!("{}/_matrix/key/v2/server", target.base))
                    .header(header::HOST, &target.host)
                    .send()
                    .await
                    .map_err(|e| unreachable(error_chain(&e)))?;
                if resp.status() != StatusCode::OK {
                    return Err(unreachable(format!("key request answered {}", resp.status())));
                }
                let body = read_limited(resp, MAX_DOCUMENT_SIZE).await.map_err(unreachable)?;
                let doc: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| FederationError::BadKeys { server: server_owned.clone(), reason: e.to_string() })?;
                verify_server_keys(&doc, &server_owned, crate::media::now_ms())
                    .map(|keys| Fetched { keys: Arc::new(keys), at: std::time::Instant::now() })
                    .map_err(|e| FederationError::BadKeys { server: server_owned.clone(), reason: e.to_string() })
            })
            .await
    }

    /// `server`'s public key `key` for a request received now: from the cached document, or
    /// (a key it lacks, and it is older than [`KEY_REFRESH_AFTER`]) from a fresh one.
    pub async fn server_key(&self, server: &str, key: &str) -> Result<Option<[u8; 32]>, FederationError> {
        let fetched = self.fetch_keys(server).await?;
        if let Some(k) = fetched.keys.key_at(key, crate::media::now_ms()) {
            return Ok(Some(k));
        }
        if fetched.at.elapsed() < KEY_REFRESH_AFTER {
            return Ok(None);
        }
        self.keys.invalidate(server).await;
        Ok(self.fetch_keys(server).await?.keys.key_at(key, crate::media::now_ms()))
    }

    /// Checks a request's `X-Matrix` authorization: for one of `ours` (the server names this
    /// edge answers federation for), signed by its origin's current key over this method and
    /// URI. Only the first `X-Matrix` credential is tried (one origin, one key fetch per
    /// request), within `[federation] request_timeout`. Answers (origin, destination), or the
    /// specification's 401 (its reason says what to fix, never what a fetch ran into).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        method: &str,
        uri: &str,
        ours: &(dyn Fn(&str) -> bool + Sync),
        default_destination: &str,
    ) -> Result<(String, String), ApiError> {
        let unauthorized = |why: &str| ApiError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", why);
        let Some(credential) = x_matrix_credential(headers) else {
            return Err(unauthorized("Missing X-Matrix Authorization header"));
        };
        let auth: XMatrix = x_matrix::parse(credential).map_err(|e| unauthorized(&e.to_string()))?;
        let destination = auth.destination.clone().unwrap_or_else(|| default_destination.to_owned());
        if !ours(&destination) {
            return Err(unauthorized(
                "Destination mismatch in auth header: this server does not federate as that name",
            ));
        }
        if !crate::api::valid_server_name(&auth.origin) {
            return Err(unauthorized("Invalid origin in X-Matrix header"));
        }
        let key =
            match tokio::time::timeout(self.config.request_timeout, self.server_key(&auth.origin, &auth.key)).await {
                Ok(Ok(Some(key))) => key,
                Ok(Ok(None)) => return Err(unauthorized("The origin has no current key of that ID")),
                Ok(Err(e)) => {
                    tracing::debug!(origin = %auth.origin, error = %e, "cannot check a federation request's signature");
                    return Err(unauthorized("Cannot get the origin's signing keys to verify the request"));
                }
                Err(_) => return Err(unauthorized("Cannot get the origin's signing keys to verify the request")),
            };
        x_matrix::verify_request(&auth, &destination, method, uri, None, &key)
            .map_err(|_| unauthorized("Invalid signature"))?;
        Ok((auth.origin, destination))
    }
}

/// The first `X-Matrix` credential of a request's `Authorization` headers, if any.
pub fn x_matrix_credential(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.trim_start().get(..8).is_some_and(|s| s.eq_ignore_ascii_case("X-Matrix")))
}

/// Cache lifetimes: a key document until it expires, a failure briefly.
struct KeyExpiry;

impl moka::Expiry<String, Result<Fetched, FederationError>> for KeyExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Result<Fetched, FederationError>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(match value {
            Ok(f) => Duration::from_millis(f.keys.valid_until_ms.saturating_sub(crate::media::now_ms())),
            Err(_) => KEY_FAILURE_TTL,
        })
    }
}

/// `.well-known` lifetimes: an answer for an hour, a failure to get one briefly.
struct WellKnownExpiry;

impl moka::Expiry<String, Delegation> for WellKnownExpiry {
    fn expire_after_create(&self, _key: &String, value: &Delegation, _now: std::time::Instant) -> Option<Duration> {
        Some(if matches!(value, Delegation::Failed) { WELL_KNOWN_FAILURE_TTL } else { WELL_KNOWN_TTL })
    }
}

/// The body of `resp`, refused past `limit` bytes.
pub async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
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
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
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
        for name in [
            "127.0.0.1:8448",
            "10.1.2.3",
            "[::1]:8448",
            "169.254.169.254",
            "private.example",
            // Spellings a URL parser reads as addresses.
            "127.1",
            "127.1:6379",
            "2130706433",
            "0x7f.1",
            "0177.0.0.1",
            "0",
            "10.1",
            "169.254.43518",
        ] {
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
