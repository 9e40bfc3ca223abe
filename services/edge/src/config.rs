//! The edge's sections of the config file. Every field has a documented default
//! (`docs/configuration.md`); sizes are human (`50 MiB`), durations too (`24h`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// `[media]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Largest accepted upload (`m.upload.size`). Default 100 MiB.
    pub max_upload_size: ByteSize,
    /// Most unfinished `POST /create` reservations per user. Default 10.
    pub max_pending_uploads_per_user: u32,
    /// How long a `POST /create` reservation waits for its content. Default 24h.
    #[serde(with = "humantime_serde")]
    pub unused_expires_after: Duration,
    /// Longest a download of a not-yet-uploaded media ID waits (`timeout_ms` is capped to
    /// this). Default 60s; a request without `timeout_ms` waits 20s.
    #[serde(with = "humantime_serde")]
    pub max_download_wait: Duration,
    /// Uploads streaming in at once on this edge; more wait up to 10s for a slot, then get
    /// 503 with `Retry-After`. Default 64.
    pub max_concurrent_uploads: u32,
    /// An upload whose client sends nothing for this long is aborted. Default 30s.
    #[serde(with = "humantime_serde")]
    pub upload_idle_timeout: Duration,
    /// Once `upload_idle_timeout` has passed, an upload must have arrived at least this fast
    /// on average (per second), or it is aborted: a client trickling a byte now and then
    /// cannot hold a slot. 0 disables. Default 1 KiB.
    pub min_upload_rate: ByteSize,
    /// Uploads one user may have streaming in at once on this edge (so one token cannot take
    /// every slot); more get 429. Default 8.
    pub max_concurrent_uploads_per_user: u32,
    /// Uploads (and `/create`s) one user may start per minute on this edge, as a token bucket
    /// (bursts up to this many); more get 429 with `retry_after_ms`. 0: no limit. Default 60.
    pub uploads_per_minute_per_user: u32,
    /// Authenticated downloads one user may make per minute on this edge (same rules).
    /// 0: no limit. Default 600.
    pub downloads_per_minute_per_user: u32,
    /// Upload quotas, held in the metadata (so they hold across every edge), counted per
    /// period of the metadata leader's clock. Default 1 day.
    #[serde(with = "humantime_serde")]
    pub quota_period: Duration,
    /// Bytes one user may upload per period (new media; the same bytes again are free).
    /// 0: no quota. Default 0. Over it: 403 `M_USER_LIMIT_EXCEEDED`.
    pub user_bytes_per_period: ByteSize,
    /// Files one user may upload per period. 0: no quota. Default 0.
    pub user_files_per_period: u64,
    /// Bytes all users of a tenant (server name) may upload per period. 0: no quota. Default 0.
    /// Over it: 403 `M_RESOURCE_LIMIT_EXCEEDED`.
    pub tenant_bytes_per_period: ByteSize,
    /// Files all users of a tenant may upload per period. 0: no quota. Default 0.
    pub tenant_files_per_period: u64,
    /// Sent as `info_uri` with `M_USER_LIMIT_EXCEEDED`: where users learn about the quota.
    /// Required (MSC4335) when a user quota is set.
    pub quota_info_uri: Option<String>,
    /// Sent as `admin_contact` with `M_RESOURCE_LIMIT_EXCEEDED` (e.g. `mailto:…`). Required
    /// when a tenant quota is set.
    pub quota_admin_contact: Option<String>,
    /// Serve the unauthenticated `/_matrix/media/v3/download` endpoints. Default true.
    pub legacy_download: bool,
    /// Freeze the legacy endpoints (the spec's recommendation): media whose upload arrived
    /// after this RFC 3339 time (by the metadata leader's clock when it was recorded, not when
    /// its ID was reserved) is only served through the authenticated endpoints. `"never"`
    /// serves everything. Default `2024-09-01T00:00:00Z` (after the spec added authenticated
    /// media): everything uploaded to a new mxcas is frozen.
    pub freeze_legacy_download_after: String,
    /// Who may use the IPFS trustless gateway (`/ipfs/{cid}`, raw blocks and CARs of stored
    /// content): `public` (anyone who knows a CID), `authenticated` (an access token, as for
    /// media downloads), `federation` (an access token, or a request another Matrix server
    /// signed for this tenant: what lets other mxcas clusters fetch blocks from this one when
    /// a media's origin cannot serve it) or `off`. Default `authenticated`: knowing a hash is
    /// not always enough (see docs/decentralisation.md). Tenants may override it.
    pub ipfs_gateway: GatewayAccess,
}

/// Who may use the IPFS trustless gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayAccess {
    Public,
    #[default]
    Authenticated,
    Federation,
    Off,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_upload_size: ByteSize::mib(100),
            max_pending_uploads_per_user: 10,
            unused_expires_after: Duration::from_secs(24 * 3600),
            max_download_wait: Duration::from_secs(60),
            max_concurrent_uploads: 64,
            upload_idle_timeout: Duration::from_secs(30),
            min_upload_rate: ByteSize::kib(1),
            max_concurrent_uploads_per_user: 8,
            uploads_per_minute_per_user: 60,
            downloads_per_minute_per_user: 600,
            quota_period: Duration::from_secs(24 * 3600),
            user_bytes_per_period: ByteSize::b(0),
            user_files_per_period: 0,
            tenant_bytes_per_period: ByteSize::b(0),
            tenant_files_per_period: 0,
            quota_info_uri: None,
            quota_admin_contact: None,
            legacy_download: true,
            freeze_legacy_download_after: DEFAULT_LEGACY_FREEZE.to_owned(),
            ipfs_gateway: GatewayAccess::default(),
        }
    }
}

/// When the legacy endpoints freeze unless configured otherwise.
pub const DEFAULT_LEGACY_FREEZE: &str = "2024-09-01T00:00:00Z";

impl MediaConfig {
    /// The freeze time in ms since the epoch (`None`: never frozen; validated by
    /// [`Self::validate`]).
    pub fn freeze_after_ms(&self) -> Result<Option<u64>, String> {
        Some(self.freeze_legacy_download_after.as_str())
            .filter(|s| *s != "never")
            .map(|s| {
                humantime::parse_rfc3339_weak(s)
                    .map_err(|e| {
                        format!("media.freeze_legacy_download_after {s:?}: {e} (want e.g. 2024-09-01T00:00:00Z)")
                    })
                    .and_then(|t| {
                        t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).map_err(|e| e.to_string())
                    })
            })
            .transpose()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_upload_size.as_u64() == 0 {
            return Err("media.max_upload_size must be above 0".into());
        }
        if self.max_concurrent_uploads == 0
            || self.upload_idle_timeout.is_zero()
            || self.max_concurrent_uploads_per_user == 0
        {
            return Err("media.max_concurrent_uploads, media.max_concurrent_uploads_per_user and media.upload_idle_timeout must be above 0".into());
        }
        if self.unused_expires_after.is_zero() {
            return Err("media.unused_expires_after must be above 0".into());
        }
        if self.quota_period.as_millis() == 0 {
            return Err("media.quota_period must be at least 1ms".into());
        }
        let user_quota = self.user_bytes_per_period.as_u64() > 0 || self.user_files_per_period > 0;
        if user_quota && self.quota_info_uri.is_none() {
            return Err(
                "media.quota_info_uri must be set with a user quota: clients show it to users who hit it".into()
            );
        }
        let tenant_quota = self.tenant_bytes_per_period.as_u64() > 0 || self.tenant_files_per_period > 0;
        if tenant_quota && self.quota_admin_contact.is_none() {
            return Err("media.quota_admin_contact must be set with a tenant quota (the spec's admin_contact)".into());
        }
        self.freeze_after_ms().map(|_| ())
    }
}

/// `[cache]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes of file blocks kept in memory. Default 256 MiB.
    pub capacity: ByteSize,
    /// Deadline of one blob store read. Default 30s.
    #[serde(with = "humantime_serde")]
    pub store_read_timeout: Duration,
    /// How long an edge trusts its cached copy of an mxc record. Default 60s.
    #[serde(with = "humantime_serde")]
    pub media_ttl: Duration,
    /// A download waiting for an async upload re-checks the metadata this often even when no
    /// change arrives on the change feed (the feed normally wakes it at once). Default 1s.
    #[serde(with = "humantime_serde")]
    pub change_poll_interval: Duration,
    /// Blocks a download reads from the store ahead of its client (in parallel, each verified
    /// on its own): the memory a download may hold beyond the cache is this many blocks.
    /// Default 8 (8 MiB of 1 MiB blocks).
    pub read_ahead_blocks: usize,
    /// Blocks read from the store by one ranged read when one of them is missed (the others
    /// are cached, each verified on its own). Default 4. 1 to 64.
    pub read_span_blocks: usize,
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.read_ahead_blocks) {
            return Err(format!("cache.read_ahead_blocks = {}: want 1 to 64", self.read_ahead_blocks));
        }
        if !(1..=64).contains(&self.read_span_blocks) {
            return Err(format!("cache.read_span_blocks = {}: want 1 to 64", self.read_span_blocks));
        }
        Ok(())
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: ByteSize::mib(256),
            store_read_timeout: Duration::from_secs(30),
            media_ttl: Duration::from_secs(60),
            change_poll_interval: Duration::from_secs(1),
            read_ahead_blocks: 8,
            read_span_blocks: 4,
        }
    }
}

/// `[auth]`: who may upload and download: tokens listed here, and/or the tokens of the
/// homeserver at `homeserver_url` (checked with its `whoami`, see `api::auth`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Access token → Matrix user ID.
    pub tokens: BTreeMap<String, String>,
    /// A TOML file with more `token = "@user:server"` lines (keeps secrets out of the config).
    pub tokens_file: Option<PathBuf>,
    /// The homeserver whose users this edge serves, e.g. `http://synapse:8008` (its
    /// client-server API as this edge can reach it). Default: unset (static tokens only).
    pub homeserver_url: Option<String>,
    /// How long a token the homeserver accepted is trusted without asking again (a logged-out
    /// token keeps working on this edge for at most this long). Default 60s.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long a token the homeserver refused stays refused without asking again. Default 5s.
    #[serde(with = "humantime_serde")]
    pub negative_cache_ttl: Duration,
    /// Most tokens remembered. Default 100000.
    pub cache_capacity: u64,
    /// Deadline of one `whoami` call. Default 10s.
    #[serde(with = "humantime_serde")]
    pub homeserver_timeout: Duration,
    /// Most `whoami` calls in flight; requests needing one more get 503 at once. Default 64.
    pub max_concurrent_checks: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens: BTreeMap::new(),
            tokens_file: None,
            homeserver_url: None,
            cache_ttl: Duration::from_secs(60),
            negative_cache_ttl: Duration::from_secs(5),
            cache_capacity: 100_000,
            homeserver_timeout: Duration::from_secs(10),
            max_concurrent_checks: 64,
        }
    }
}

impl AuthConfig {
    /// All configured tokens (inline and from `tokens_file`).
    pub fn load(&self) -> Result<BTreeMap<String, String>, String> {
        let mut tokens = self.tokens.clone();
        if let Some(path) = &self.tokens_file {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("auth.tokens_file {}: {e}", path.display()))?;
            let more: BTreeMap<String, String> =
                toml_lite(&text).map_err(|e| format!("auth.tokens_file {}: {e}", path.display()))?;
            tokens.extend(more);
        }
        for (token, user) in &tokens {
            if token.len() < 8 {
                return Err(format!("auth token for {user} is shorter than 8 characters"));
            }
            if !user.starts_with('@') || !user.contains(':') {
                return Err(format!("auth: {user:?} is not a Matrix user ID (@name:server)"));
            }
        }
        Ok(tokens)
    }
}

/// Parses `key = "value"` lines (comments and blank lines allowed).
fn toml_lite(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| format!("line {}: expected key = \"value\"", n + 1))?;
        let unquote = |s: &str| s.trim().trim_matches('"').to_owned();
        out.insert(unquote(k), unquote(v));
    }
    Ok(out)
}

/// One size thumbnails are made at: `{ width = 96, height = 96, method = "crop" }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThumbnailSize {
    pub width: u32,
    pub height: u32,
    /// `crop` or `scale`.
    pub method: ThumbnailMethodName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThumbnailMethodName {
    Crop,
    Scale,
}

/// Largest side a thumbnail may have (the metadata refuses larger).
pub const MAX_THUMBNAIL_SIDE: u32 = 16_384;

/// `[thumbnails]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThumbnailConfig {
    /// Serve thumbnails. Off: the thumbnail endpoints answer 400 ("cannot thumbnail"). Default true.
    pub enabled: bool,
    /// Make the configured `sizes` of every image in the background after its upload (the
    /// upload's answer never waits for it). Default true.
    pub pregenerate: bool,
    /// The sizes requests are rounded up to (the nearest at least as large, same method).
    /// Default: the spec's five (32×32 and 96×96 crop; 320×240, 640×480, 800×600 scale).
    pub sizes: Vec<ThumbnailSize>,
    /// A request larger than every configured size is made at the size asked, each side
    /// capped at this. Default 1600.
    pub max_side: u32,
    /// Threads doing image work (decoding, resizing, encoding) on this edge. Default 1, so
    /// request handling always keeps the other cores.
    pub workers: usize,
    /// Image jobs that may wait for a worker; beyond them a request gets 503 with
    /// `Retry-After`, and background work is skipped (made on demand later). Default 16.
    pub queue: usize,
    /// Largest source file thumbnailed; larger ones get 413 `M_TOO_LARGE`. Default 32 MiB.
    pub max_source_size: ByteSize,
    /// Largest source canvas (width × height, read from the header before decoding); larger
    /// ones (decompression bombs) get 413 `M_TOO_LARGE`. Default 32 000 000.
    pub max_pixels: u64,
    /// Animations with more frames get a still thumbnail. Default 300.
    pub max_frames: u32,
    /// Animations whose frames have more pixels in all get a still thumbnail. Default 100 000 000.
    pub max_animation_pixels: u64,
    /// Longest a request waits for its thumbnail to be made; then 503 with `Retry-After` (the
    /// making goes on and is recorded for the next request). Default 30s.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for ThumbnailConfig {
    fn default() -> Self {
        let size = |width, height, method| ThumbnailSize { width, height, method };
        Self {
            enabled: true,
            pregenerate: true,
            sizes: vec![
                size(32, 32, ThumbnailMethodName::Crop),
                size(96, 96, ThumbnailMethodName::Crop),
                size(320, 240, ThumbnailMethodName::Scale),
                size(640, 480, ThumbnailMethodName::Scale),
                size(800, 600, ThumbnailMethodName::Scale),
            ],
            max_side: 1600,
            workers: 1,
            queue: 16,
            max_source_size: ByteSize::mib(32),
            max_pixels: 32_000_000,
            max_frames: 300,
            max_animation_pixels: 100_000_000,
            max_wait: Duration::from_secs(30),
        }
    }
}

impl ThumbnailConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.workers == 0 || !(1..=MAX_THUMBNAIL_SIDE).contains(&self.max_side) {
            return Err(format!(
                "thumbnails.workers must be above 0 and thumbnails.max_side 1 to {MAX_THUMBNAIL_SIDE}"
            ));
        }
        if let Some(s) = self
            .sizes
            .iter()
            .find(|s| !(1..=self.max_side).contains(&s.width) || !(1..=self.max_side).contains(&s.height))
        {
            return Err(format!(
                "thumbnails.sizes: {}x{} is out of range (1 to max_side {} per side)",
                s.width, s.height, self.max_side
            ));
        }
        Ok(())
    }
}

/// `[[tenants]]`: one homeserver (server name) served by this cluster. With any declared,
/// the top-level `server_name` must be one of them (the tenant of requests whose `Host` names
/// none), and static `[auth]` tokens are refused: every token is a homeserver's.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The homeserver's server name: its users' uploads are `mxc://<server_name>/…`.
    pub server_name: String,
    /// Where its client-server API answers `whoami` (required).
    pub homeserver_url: String,
    /// `Host` header values (as the reverse proxy sends them) that select this tenant.
    /// Default: the server name.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Overrides `[media] max_upload_size` for this tenant.
    pub max_upload_size: Option<ByteSize>,
    /// Overrides `[media] uploads_per_minute_per_user`.
    pub uploads_per_minute_per_user: Option<u32>,
    /// Overrides `[media] downloads_per_minute_per_user`.
    pub downloads_per_minute_per_user: Option<u32>,
    /// Override `[media]`'s quotas for this tenant.
    pub user_bytes_per_period: Option<ByteSize>,
    pub user_files_per_period: Option<u64>,
    pub tenant_bytes_per_period: Option<ByteSize>,
    pub tenant_files_per_period: Option<u64>,
    /// Override `[media] quota_info_uri` and `quota_admin_contact` for this tenant's users.
    pub quota_info_uri: Option<String>,
    pub quota_admin_contact: Option<String>,
    /// Overrides `[media] ipfs_gateway` for requests with this tenant's hosts.
    pub ipfs_gateway: Option<GatewayAccess>,
    /// The homeserver's ed25519 signing key, Synapse's format (`ed25519 <key id> <base64
    /// seed>`), checked at start. With it the edge answers federation for this tenant.
    pub signing_key_file: Option<PathBuf>,
}

/// `[ipfs]`: `mxc://<server>/ipfs:<cid>` media (MSC2706), fetched from trustless gateways.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpfsConfig {
    /// Trustless gateways asked for the blocks of `ipfs:` media this cluster does not hold, all
    /// at once (each block verified against its CID as it arrives): each is the URL before
    /// `/ipfs/`, such as `https://trustless-gateway.link` or another mxcas edge whose
    /// `ipfs_gateway` is `public`. Operator-chosen, so any address is allowed; the bytes are
    /// trusted only once verified. Default: none (`ipfs:` media not held answers 404).
    pub gateways: Vec<String>,
    /// Blocks being fetched at once for one media, from all gateways. Default 16.
    pub blocks_in_flight: usize,
    /// Blocks being fetched at once from one gateway. Default 4.
    pub blocks_in_flight_per_gateway: usize,
    /// Deadline of one block request. Default 30s.
    #[serde(with = "humantime_serde")]
    pub block_timeout: Duration,
    /// Longest one fetch of `ipfs:` media may take. Default 10m.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
}

impl Default for IpfsConfig {
    fn default() -> Self {
        Self {
            gateways: Vec::new(),
            blocks_in_flight: 16,
            blocks_in_flight_per_gateway: 4,
            block_timeout: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(600),
        }
    }
}

impl IpfsConfig {
    pub fn validate(&self) -> Result<(), String> {
        for g in &self.gateways {
            let url = reqwest::Url::parse(g).map_err(|e| format!("ipfs.gateways: {g:?}: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || url.query().is_some() {
                return Err(format!("ipfs.gateways: {g:?}: want http(s)://host[:port][/path], the URL before /ipfs/"));
            }
        }
        if !(1..=256).contains(&self.blocks_in_flight) || !(1..=64).contains(&self.blocks_in_flight_per_gateway) {
            return Err("ipfs.blocks_in_flight must be 1 to 256, blocks_in_flight_per_gateway 1 to 64".into());
        }
        Ok(())
    }
}

/// `[federation]`: how the edge talks to other Matrix servers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// The signing key of the one tenant when no `[[tenants]]` are declared (each declared
    /// tenant has its own `signing_key_file`), Synapse's format. Default: none (federation
    /// requests are refused with 401, and `/_matrix/key/v2/server` is not served).
    pub signing_key_file: Option<PathBuf>,
    /// Server name → `host:port` to connect to instead of discovering it (private networks,
    /// tests). The TLS certificate is checked for that host. Default: none.
    pub resolve: BTreeMap<String, String>,
    /// Let remote servers be reached at loopback, private, link-local and other non-public
    /// addresses (a remote's name, delegation or redirect can point anywhere). Default false.
    pub allow_private_addresses: bool,
    /// PEM file of extra CA certificates trusted for federation TLS, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Longest one federation request (key fetch, discovery) may take. Default 30s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest one fetch of remote media may take, its whole body included. Default 10m.
    #[serde(with = "humantime_serde")]
    pub remote_media_timeout: Duration,
    /// How long the key document this edge serves for a tenant says it is valid. Default 1 day.
    #[serde(with = "humantime_serde")]
    pub key_validity: Duration,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            signing_key_file: None,
            resolve: BTreeMap::new(),
            allow_private_addresses: false,
            ca_file: None,
            request_timeout: Duration::from_secs(30),
            remote_media_timeout: Duration::from_secs(600),
            key_validity: Duration::from_secs(24 * 3600),
        }
    }
}

impl FederationConfig {
    /// The single tenant's key (`None` when not configured).
    pub fn signing_key(&self) -> Result<Option<SigningKey>, String> {
        let Some(path) = &self.signing_key_file else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("federation.signing_key_file {}: {e}", path.display()))?;
        SigningKey::parse(&text).map(Some).map_err(|e| format!("federation.signing_key_file {}: {e}", path.display()))
    }
}

/// A signing key as Synapse writes it: `ed25519 a_AbCd <unpadded base64 of the 32-byte seed>`.
#[derive(Clone)]
pub struct SigningKey {
    pub key_id: String,
    pub seed: [u8; 32],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(ed25519:{}, <secret>)", self.key_id)
    }
}

impl SigningKey {
    /// The key ready to sign with.
    pub fn key(&self) -> Result<std::sync::Arc<mxcas_federation::SigningKey>, String> {
        mxcas_federation::SigningKey::from_seed(&self.key_id, &self.seed).map(std::sync::Arc::new)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let line = text.lines().map(str::trim).find(|l| !l.is_empty()).ok_or("the file is empty")?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [algorithm, version, seed] = parts[..] else {
            return Err("want one line `ed25519 <key id> <base64 seed>`".into());
        };
        if algorithm != "ed25519" {
            return Err(format!("algorithm {algorithm:?}: only ed25519 keys are used in Matrix"));
        }
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("key id {version:?} is not [A-Za-z0-9_]+"));
        }
        let seed = mxcas_federation::signing::decode_base64(seed).ok_or("the seed is not base64")?;
        let seed: [u8; 32] = seed.try_into().map_err(|s: Vec<u8>| format!("the seed is {} bytes, not 32", s.len()))?;
        Ok(Self { key_id: version.to_owned(), seed })
    }
}

impl TenantConfig {
    /// The signing key, read and checked (`None` when not configured).
    pub fn signing_key(&self) -> Result<Option<SigningKey>, String> {
        let Some(path) = &self.signing_key_file else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("tenants.{}: signing_key_file {}: {e}", self.server_name, path.display()))?;
        SigningKey::parse(&text)
            .map(Some)
            .map_err(|e| format!("tenants.{}: signing_key_file {}: {e}", self.server_name, path.display()))
    }
}

#[cfg(test)]
mod signing_key_tests {
    use super::*;

    #[test]
    fn signing_keys_parse_in_synapses_format_only() {
        // 32 bytes of 0x01, unpadded base64 (as Synapse writes them).
        let seed = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE";
        let key = SigningKey::parse(&format!("ed25519 a_AbC1 {seed}\n")).expect("valid");
        assert_eq!((key.key_id.as_str(), key.seed), ("a_AbC1", [1u8; 32]));
        assert!(!format!("{key:?}").contains(seed), "the seed never shows in logs");
        for (bad, why) in [
            ("", "empty"),
            (&format!("rsa a_1 {seed}") as &str, "only ed25519"),
            (&format!("ed25519 a/1 {seed}"), "key id"),
            ("ed25519 a_1 AQEB", "not 32"),
            ("ed25519 a_1 !!!", "not base64"),
            ("ed25519 a_1", "one line"),
        ] {
            let e = SigningKey::parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
