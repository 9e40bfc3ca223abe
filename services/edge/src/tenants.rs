//! Tenants: the homeservers (server names) one cluster serves.
//!
//! Each tenant has its own homeserver (tokens are checked with it, and cached per tenant, so
//! one homeserver's token never means anything to another's), its own upload and download
//! limits, and its signing key for federation. A request's tenant is chosen by its `Host`
//! header (the reverse proxy forwards the client's); a request whose `Host` names none gets the
//! default tenant. Uploads land under the requesting tenant's server name; media of every
//! tenant is local media, downloadable by the users of any of them (as a homeserver's users
//! download remote media through their own server).
//!
//! With `[[tenants]]` declared, a request whose `Host` names none is refused (404
//! `M_UNRECOGNIZED`) before any token is looked at: handing it to some default tenant would send
//! another homeserver's tokens to it, and its "unknown token" would log those users out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::http::{HeaderMap, header};

use crate::api::auth::Authenticator;
use crate::api::error::ApiError;
use crate::config::{AuthConfig, GatewayAccess, MediaConfig, SigningKey, TenantConfig};
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
    /// Upload quotas held in the metadata (`None`: none configured).
    pub quota: Option<mxcas_meta::model::Quota>,
    /// Sent with a user's quota refusal.
    pub quota_info_uri: Option<String>,
    /// Sent with a tenant's quota refusal.
    pub quota_admin_contact: Option<String>,
    /// The homeserver's key: signs this tenant's federation requests and its key document.
    pub signing_key: Option<Arc<mxcas_federation::SigningKey>>,
    /// Who may use the IPFS gateway under this tenant's hosts.
    pub ipfs_gateway: GatewayAccess,
}

pub struct Tenants {
    all: Vec<Arc<Tenant>>,
    by_host: HashMap<String, usize>,
    /// The only tenant (none declared): every request is its.
    only: Option<usize>,
}

/// The quotas of a tenant: `[media]`'s, overridden by the tenant's own.
fn quota_of(media: &MediaConfig, t: Option<&TenantConfig>) -> Option<mxcas_meta::model::Quota> {
    let q = mxcas_meta::model::Quota {
        period_ms: (media.quota_period.as_millis() as u64).max(1),
        user_bytes: t.and_then(|t| t.user_bytes_per_period).unwrap_or(media.user_bytes_per_period).as_u64(),
        user_files: t.and_then(|t| t.user_files_per_period).unwrap_or(media.user_files_per_period),
        tenant_bytes: t.and_then(|t| t.tenant_bytes_per_period).unwrap_or(media.tenant_bytes_per_period).as_u64(),
        tenant_files: t.and_then(|t| t.tenant_files_per_period).unwrap_or(media.tenant_files_per_period),
    };
    (q.user_bytes > 0 || q.user_files > 0 || q.tenant_bytes > 0 || q.tenant_files > 0).then_some(q)
}

/// A `Host` value as looked up: lower case, without a trailing dot.
fn normal_host(h: &str) -> String {
    h.trim().trim_end_matches('.').to_ascii_lowercase()
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
        single_key: Option<SigningKey>,
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
                quota: quota_of(media, None),
                quota_info_uri: media.quota_info_uri.clone(),
                quota_admin_contact: media.quota_admin_contact.clone(),
                signing_key: single_key.map(|k| k.key()).transpose()?,
                ipfs_gateway: media.ipfs_gateway,
            };
            return Ok(Self { all: vec![Arc::new(only)], by_host: HashMap::new(), only: Some(0) });
        }
        if single_key.is_some() {
            return Err(
                "[federation] signing_key_file cannot be used with [[tenants]]: set each tenant's signing_key_file"
                    .into(),
            );
        }
        if auth.homeserver_url.is_some() {
            return Err(
                "[auth] homeserver_url cannot be used with [[tenants]]: set each tenant's homeserver_url".into()
            );
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
            if all.iter().any(|x: &Arc<Tenant>| x.server_name.eq_ignore_ascii_case(&t.server_name)) {
                return Err(format!("tenants: {} is declared twice", t.server_name));
            }
            if t.max_upload_size.is_some_and(|m| m.as_u64() == 0) {
                return Err(format!("tenants.{}: max_upload_size must be above 0", t.server_name));
            }
            let hosts = if t.hosts.is_empty() { vec![t.server_name.clone()] } else { t.hosts.clone() };
            for host in hosts {
                let host = normal_host(&host);
                if !crate::api::valid_server_name(&host) {
                    return Err(format!(
                        "tenants.{}: host {host:?} is not a host name (as in a Host header: name[:port], no scheme or path)",
                        t.server_name
                    ));
                }
                if by_host.insert(host.clone(), all.len()).is_some() {
                    return Err(format!("tenants: host {host} selects two tenants"));
                }
            }
            let quota = quota_of(media, Some(t));
            let quota_info_uri = t.quota_info_uri.clone().or_else(|| media.quota_info_uri.clone());
            let quota_admin_contact = t.quota_admin_contact.clone().or_else(|| media.quota_admin_contact.clone());
            if quota.as_ref().is_some_and(|q| q.user_bytes > 0 || q.user_files > 0) && quota_info_uri.is_none() {
                return Err(format!(
                    "tenants.{}: a user quota needs quota_info_uri (the tenant's or [media]'s)",
                    t.server_name
                ));
            }
            if quota.as_ref().is_some_and(|q| q.tenant_bytes > 0 || q.tenant_files > 0) && quota_admin_contact.is_none()
            {
                return Err(format!(
                    "tenants.{}: a tenant quota needs quota_admin_contact (the tenant's or [media]'s)",
                    t.server_name
                ));
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
                quota,
                quota_info_uri,
                quota_admin_contact,
                signing_key: t.signing_key()?.map(|k| k.key()).transpose()?,
                ipfs_gateway: t.ipfs_gateway.unwrap_or(media.ipfs_gateway),
            }));
        }
        // Content is shared by every tenant (one copy per CID), so a public gateway under one
        // tenant's hosts serves every tenant's media: a tenant that keeps its gateway closed is
        // only closed if none is public.
        let public = all.iter().filter(|t| t.ipfs_gateway == GatewayAccess::Public).count();
        if public > 0 && public < all.len() {
            return Err(
                "tenants: ipfs_gateway = \"public\" on some tenants but not all: a public gateway serves every \
                 tenant's content (content is shared across tenants), so set it public for all tenants or for none"
                    .into(),
            );
        }
        let _ = server_name; // with tenants, the top-level server name is not one of them
        Ok(Self { all, by_host, only: None })
    }

    /// The tenant a request is for, by its `Host` header (with or without the port; case and a
    /// trailing dot ignored). With tenants declared, a `Host` naming none is refused.
    pub fn for_request(&self, headers: &HeaderMap) -> Result<&Arc<Tenant>, ApiError> {
        if let Some(only) = self.only {
            return Ok(&self.all[only]);
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(normal_host);
        let without_port = |h: &str| -> Option<String> {
            let (name, port) = h.rsplit_once(':')?;
            let is_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
            (is_port && (!name.contains(':') || name.ends_with(']'))).then(|| name.to_owned())
        };
        let found = host.as_deref().and_then(|h| {
            self.by_host.get(h).or_else(|| without_port(h).and_then(|n| self.by_host.get(normal_host(&n).as_str())))
        });
        match found {
            Some(&i) => Ok(&self.all[i]),
            None => {
                tracing::warn!(host = ?host, "request for a host no tenant lists; is the proxy forwarding Host?");
                Err(ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "M_UNRECOGNIZED",
                    "This media repository serves no homeserver under this host name",
                ))
            }
        }
    }

    /// Every tenant.
    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.all
    }

    /// The tenant whose server name is `server_name`, if any.
    pub fn by_server_name(&self, server_name: &str) -> Option<&Arc<Tenant>> {
        self.all.iter().find(|t| t.server_name == server_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, hosts: &[&str]) -> TenantConfig {
        TenantConfig {
            server_name: name.into(),
            homeserver_url: "http://127.0.0.1:1".into(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            max_upload_size: None,
            uploads_per_minute_per_user: None,
            downloads_per_minute_per_user: None,
            user_bytes_per_period: None,
            user_files_per_period: None,
            tenant_bytes_per_period: None,
            tenant_files_per_period: None,
            quota_info_uri: None,
            quota_admin_contact: None,
            ipfs_gateway: None,
            signing_key_file: None,
        }
    }

    #[test]
    fn a_public_gateway_is_all_tenants_or_none() {
        let public = |name: &str, access| TenantConfig { ipfs_gateway: Some(access), ..tenant(name, &[]) };
        let mixed = [public("a.example", GatewayAccess::Public), tenant("b.example", &[])];
        assert!(tenants(&mixed).err().is_some_and(|e| e.contains("ipfs_gateway")));
        let all = [public("a.example", GatewayAccess::Public), public("b.example", GatewayAccess::Public)];
        assert!(tenants(&all).is_ok());
        let closed = [public("a.example", GatewayAccess::Off), tenant("b.example", &[])];
        assert!(tenants(&closed).is_ok(), "off and authenticated mix: neither serves anyone without a token");
    }

    #[test]
    fn quota_details_are_per_tenant_and_required_with_its_quotas() {
        let mut one = tenant("one.example", &[]);
        one.user_files_per_period = Some(3);
        assert!(tenants(std::slice::from_ref(&one)).err().is_some_and(|e| e.contains("quota_info_uri")));
        one.quota_info_uri = Some("https://one.example/quota".into());
        let mut two = tenant("two.example", &[]);
        two.tenant_files_per_period = Some(10);
        assert!(tenants(&[one.clone(), two.clone()]).err().is_some_and(|e| e.contains("quota_admin_contact")));
        two.quota_admin_contact = Some("mailto:ops@two.example".into());
        let t = tenants(&[one, two]).expect("valid tenants");
        let (one, two) = (&t.all[0], &t.all[1]);
        assert_eq!(one.quota_info_uri.as_deref(), Some("https://one.example/quota"));
        assert_eq!(one.quota_admin_contact, None);
        assert_eq!(two.quota_admin_contact.as_deref(), Some("mailto:ops@two.example"));
        assert_eq!(two.quota_info_uri, None);
    }

    fn tenants(declared: &[TenantConfig]) -> Result<Tenants, String> {
        Tenants::new(
            "localhost",
            BTreeMap::new(),
            &AuthConfig::default(),
            &MediaConfig::default(),
            declared,
            None,
            &Arc::new(Metrics::new()),
        )
    }

    fn pick<'a>(t: &'a Tenants, host: Option<&str>) -> Option<&'a str> {
        let mut h = HeaderMap::new();
        if let Some(host) = host {
            h.insert(header::HOST, host.parse().expect("header"));
        }
        t.for_request(&h).ok().map(|t| t.server_name.as_str())
    }

    #[test]
    fn the_host_header_picks_the_tenant_and_unknown_hosts_get_none() {
        let t = tenants(&[tenant("a.example", &[]), tenant("b.example", &["matrix.b.example", "[::1]", "10.0.0.5"])])
            .expect("valid");
        assert_eq!(pick(&t, Some("a.example")), Some("a.example"));
        assert_eq!(pick(&t, Some("A.Example:443")), Some("a.example"));
        assert_eq!(pick(&t, Some("a.example.")), Some("a.example"));
        assert_eq!(pick(&t, Some("matrix.b.example:8448")), Some("b.example"));
        assert_eq!(pick(&t, Some("[::1]:8008")), Some("b.example"));
        assert_eq!(pick(&t, Some("[::1]")), Some("b.example"));
        assert_eq!(pick(&t, Some("10.0.0.5:80")), Some("b.example"));
        // The server name itself is not b's host: its hosts are listed.
        assert_eq!(pick(&t, Some("b.example")), None);
        assert_eq!(pick(&t, Some("c.example")), None);
        assert_eq!(pick(&t, None), None);
        // One tenant (none declared): every request is its.
        let one = tenants(&[]).expect("valid");
        assert_eq!(pick(&one, Some("anything")), Some("localhost"));
        assert_eq!(pick(&one, None), Some("localhost"));
    }

    #[test]
    fn tenant_configs_that_cannot_work_are_refused() {
        let cases: Vec<(Vec<TenantConfig>, &str)> = vec![
            (vec![tenant("a.example", &[]), tenant("A.example", &["x.example"])], "declared twice"),
            (vec![tenant("a.example", &["h.example"]), tenant("b.example", &["h.example"])], "selects two"),
            (vec![tenant("a.example", &["https://a.example/"])], "not a host name"),
            (vec![tenant("bad name", &[])], "not a valid Matrix server name"),
            (
                vec![TenantConfig { max_upload_size: Some(bytesize::ByteSize::b(0)), ..tenant("a.example", &[]) }],
                "above 0",
            ),
        ];
        for (declared, why) in cases {
            match tenants(&declared) {
                Err(e) => assert!(e.contains(why), "{why}: {e}"),
                Ok(_) => panic!("accepted: {why}"),
            }
        }
        let with_tokens = Tenants::new(
            "localhost",
            BTreeMap::from([("long-enough-token".to_owned(), "@a:a.example".to_owned())]),
            &AuthConfig::default(),
            &MediaConfig::default(),
            &[tenant("a.example", &[])],
            None,
            &Arc::new(Metrics::new()),
        );
        assert!(with_tokens.err().is_some_and(|e| e.contains("cannot be used with [[tenants]]")));
        let with_hs = Tenants::new(
            "localhost",
            BTreeMap::new(),
            &AuthConfig { homeserver_url: Some("http://127.0.0.1:1".into()), ..AuthConfig::default() },
            &MediaConfig::default(),
            &[tenant("a.example", &[])],
            None,
            &Arc::new(Metrics::new()),
        );
        assert!(with_hs.err().is_some_and(|e| e.contains("homeserver_url cannot be used")));
    }
}
