//! Who is calling: an access token → a Matrix user.
//!
//! Two sources, tried in order:
//!
//! - **Static tokens** from the config (`[auth] tokens`, `tokens_file`): the embedded default
//!   and tests. Looked up by their sha2-256, so a lookup's timing says nothing about how much
//!   of a guessed token matched a real one.
//! - **The homeserver** (`[auth] homeserver_url`): `GET /_matrix/client/v3/account/whoami`
//!   with the caller's token, as the homeserver's own media repository would check it. Answers
//!   are cached by the token's hash: users for `cache_ttl` (a logged-out token keeps working on
//!   this edge for at most that long), refusals for `negative_cache_ttl`. One check per token is
//!   in flight at a time; concurrent requests with it wait for that one. A refusal is passed on
//!   as the homeserver gave it (`M_UNKNOWN_TOKEN` with `soft_logout`, `M_FORBIDDEN`, …); a
//!   homeserver that cannot answer (down, timing out, 5xx, rate limiting) gives 503 with
//!   `Retry-After` and is never cached, so clients retry instead of logging their users out.
//!   Application services masquerade with `?user_id=`, forwarded to `whoami`, which decides.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::config::AuthConfig;
use crate::metrics::{Metrics, ResultLabels};

/// The user a request is from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub is_guest: bool,
}

pub struct Authenticator {
    /// sha2-256 of each static token → its user.
    static_tokens: HashMap<[u8; 32], String>,
    homeserver: Option<Homeserver>,
    metrics: Arc<Metrics>,
}

/// Longest `whoami` answer read (a real one is about 100 bytes).
const MAX_WHOAMI_BODY: usize = 64 * 1024;
/// How long a client is told to wait when the homeserver cannot answer.
const HOMESERVER_RETRY_MS: u64 = 5_000;

impl Authenticator {
    pub fn new(
        tokens: BTreeMap<String, String>,
        config: &AuthConfig,
        server_name: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let static_tokens = tokens.into_iter().map(|(token, user)| (digest(&token, None), user)).collect();
        let homeserver =
            config.homeserver_url.as_deref().map(|url| Homeserver::new(url, config, server_name)).transpose()?;
        Ok(Self { static_tokens, homeserver, metrics })
    }

    /// The caller of a request, or the spec's error: 401 `M_MISSING_TOKEN` without a token,
    /// the homeserver's refusal (401 `M_UNKNOWN_TOKEN`, …), or 503 when it cannot tell. The
    /// token comes from `Authorization: Bearer` (scheme case-insensitive) or, deprecated but
    /// still in the spec, the `access_token` query parameter.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        query: &BTreeMap<String, String>,
    ) -> Result<Caller, ApiError> {
        let token = access_token(headers, query)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token"))?;
        let masquerade = query.get("user_id").map(String::as_str);
        if let Some(user) = self.static_tokens.get(&digest(token, None)) {
            if masquerade.is_some_and(|m| m != user) {
                self.count("refused");
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "M_FORBIDDEN",
                    "This access token cannot act as another user",
                ));
            }
            self.count("static");
            return Ok(Caller { user_id: user.clone(), is_guest: false });
        }
        let Some(hs) = &self.homeserver else {
            self.count("refused");
            return Err(unknown_token(false));
        };
        if !plausible_token(token) || masquerade.is_some_and(|m| m.len() > 255) {
            self.count("refused");
            return Err(unknown_token(false));
        }
        let key = digest(token, masquerade);
        let mut asked = false;
        let verdict = hs
            .cache
            .try_get_with(key, async {
                asked = true;
                hs.whoami(token, masquerade).await
            })
            .await;
        match verdict {
            Ok(Verdict::User(caller)) => {
                self.count(if asked { "valid" } else { "cached" });
                Ok(caller)
            }
            Ok(Verdict::Refused(refusal)) => {
                self.count("refused");
                Err(refusal.into_error())
            }
            Err(e) => {
                self.count("unavailable");
                Err((*e).clone())
            }
        }
    }

    /// The servers of `room` as the holder of `token` (acting as `masquerade`, for an
    /// application service) sees it from its homeserver, in MSC2846's order
    /// ([`order_room_servers`]): the joined members' servers at `event` (the room's state
    /// there, `/context`) and now (`/joined_members`). Empty without a homeserver (static
    /// tokens), or when the homeserver answers neither (the user is not in the room, say).
    pub async fn room_servers(&self, token: &str, masquerade: Option<&str>, room: &str, event: &str) -> Vec<String> {
        // A static token is this edge's own: it never goes to the homeserver.
        let Some(hs) = self.homeserver.as_ref().filter(|_| !self.static_tokens.contains_key(&digest(token, None)))
        else {
            return Vec::new();
        };
        // Each lookup reads a room's whole state: a few at a time, whoever asks.
        let Ok(_slot) = hs.room_lookups.acquire().await else { return Vec::new() };
        let (then, now) =
            tokio::join!(hs.members_at(token, masquerade, room, event), hs.joined_now(token, masquerade, room));
        for (what, result) in [("at the event", &then), ("now", &now)] {
            if let Err(e) = result {
                tracing::info!(%room, %event, error = %e, "cannot learn a room's members {what} from the homeserver");
            }
        }
        order_room_servers(&then.unwrap_or_default(), &now.unwrap_or_default())
    }

    /// [`Self::authenticate`] for endpoints guests may not use (uploads): 403
    /// `M_GUEST_ACCESS_FORBIDDEN` for a guest.
    pub async fn authenticate_member(
        &self,
        headers: &HeaderMap,
        query: &BTreeMap<String, String>,
    ) -> Result<Caller, ApiError> {
        let caller = self.authenticate(headers, query).await?;
        if caller.is_guest {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN", "Guests cannot upload media"));
        }
        Ok(caller)
    }

    fn count(&self, result: &'static str) {
        self.metrics.auth_checks.get_or_create(&ResultLabels { result }).inc();
    }
}

/// sha2-256 of a token (and the user an application service masquerades as): the cache key,
/// so raw tokens are not kept.
fn digest(token: &str, masquerade: Option<&str>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((token.len() as u64).to_le_bytes());
    h.update(token.as_bytes());
    if let Some(user) = masquerade {
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
    }
    h.finalize().into()
}

/// Longest access token accepted (Synapse's are about 40 bytes; JWT-style ones a few hundred).
const MAX_TOKEN_LEN: usize = 4096;

/// Whether `token` can be a token at all: visible ASCII, bounded. Anything else is refused
/// here, without asking the homeserver.
/// The access token of a request: `Authorization: Bearer` (scheme case-insensitive) or the
/// `access_token` query parameter.
pub fn access_token<'a>(headers: &'a HeaderMap, query: &'a BTreeMap<String, String>) -> Option<&'a str> {
    let from_header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    from_header.or(query.get("access_token").map(String::as_str)).filter(|t| !t.is_empty())
}

/// MSC2846's order for a room's servers, from the user IDs of its joined members at an event
/// (`then`) and now: those in it then and now, then those in it now only, then those in it
/// then only (last, so servers that left are spared the room's load). Within each, servers
/// with more members first (more likely to hold the room's media), then by name. Malformed
/// user IDs are skipped.
pub fn order_room_servers(then: &[String], now: &[String]) -> Vec<String> {
    fn servers(users: &[String]) -> HashMap<&str, usize> {
        let mut counts = HashMap::new();
        for user in users {
            if let Some(server) = user.strip_prefix('@').and_then(|u| u.split_once(':')).map(|(_, s)| s)
                && super::valid_server_name(server)
            {
                *counts.entry(server).or_insert(0) += 1;
            }
        }
        counts
    }
    let (then, now) = (servers(then), servers(now));
    let mut ranked: Vec<(u8, usize, &str)> = now
        .iter()
        .map(|(server, n)| (if then.contains_key(server) { 0 } else { 1 }, *n, *server))
        .chain(then.iter().filter(|(s, _)| !now.contains_key(*s)).map(|(server, n)| (2, *n, *server)))
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
    ranked.into_iter().map(|(_, _, s)| s.to_owned()).collect()
}

fn plausible_token(token: &str) -> bool {
    token.len() <= MAX_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_graphic())
}

fn unknown_token(soft_logout: bool) -> ApiError {
    ApiError {
        soft_logout: soft_logout.then_some(true),
        ..ApiError::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unrecognised access token")
    }
}

/// What the homeserver said about a token.
#[derive(Clone, Debug, PartialEq)]
enum Verdict {
    User(Caller),
    Refused(Refusal),
}

/// A refusal to pass on: the status and a known errcode (fixed strings, so nothing a
/// homeserver says is reflected to clients).
#[derive(Clone, Debug, PartialEq)]
struct Refusal {
    status: StatusCode,
    errcode: &'static str,
    soft_logout: bool,
}

impl Refusal {
    fn into_error(self) -> ApiError {
        let message = match self.errcode {
            "M_UNKNOWN_TOKEN" => "Unrecognised access token",
            "M_USER_LOCKED" => "This account is locked",
            "M_USER_SUSPENDED" => "This account is suspended",
            "M_USER_DEACTIVATED" => "This account is deactivated",
            "M_GUEST_ACCESS_FORBIDDEN" => "Guests cannot use this endpoint",
            _ => "The homeserver refused this access token for this request",
        };
        ApiError { soft_logout: self.soft_logout.then_some(true), ..ApiError::new(self.status, self.errcode, message) }
    }
}

/// Maps a `whoami` answer to a verdict, or to the error to answer when it says nothing about
/// the token (the homeserver is failing or misconfigured). Pure: the status and body only.
fn judge(status: StatusCode, body: &[u8], server_name: &str) -> Result<Verdict, ApiError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if status == StatusCode::OK {
        let user_id = json.as_ref().and_then(|j| j.get("user_id")).and_then(|u| u.as_str());
        let Some(user_id) = user_id else {
            tracing::error!("the homeserver's whoami answer has no user_id");
            return Err(homeserver_unavailable());
        };
        let local = user_id
            .strip_prefix('@')
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(name, server)| !name.is_empty() && server == server_name);
        if !local {
            // A homeserver vouching for someone else's users is misconfigured (or not ours).
            tracing::error!(%user_id, %server_name, "the homeserver answered whoami with a user of another server");
            return Err(ApiError::internal("The homeserver vouched for a user of another server"));
        }
        let is_guest = json.as_ref().and_then(|j| j.get("is_guest")).and_then(|g| g.as_bool()).unwrap_or(false);
        return Ok(Verdict::User(Caller { user_id: user_id.to_owned(), is_guest }));
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        // Only the homeserver's own Matrix refusal is a refusal. A bare 401/403 (an HTML login
        // page of something in between, a proxy) or an unknown code says nothing about the
        // token, and must not log anyone out. `M_MISSING_TOKEN` after the edge sent one means
        // something in between dropped it.
        const REFUSALS: [&str; 6] = [
            "M_UNKNOWN_TOKEN",
            "M_FORBIDDEN",
            "M_USER_LOCKED",
            "M_USER_SUSPENDED",
            "M_USER_DEACTIVATED",
            "M_GUEST_ACCESS_FORBIDDEN",
        ];
        let given = json.as_ref().and_then(|j| j.get("errcode")).and_then(|e| e.as_str());
        let Some(errcode) = given.and_then(|g| REFUSALS.into_iter().find(|k| *k == g)) else {
            tracing::error!(%status, errcode = given.unwrap_or("none"), "whoami answered a refusal the edge does not recognise as the homeserver's; check [auth] homeserver_url and what sits between");
            return Err(homeserver_unavailable());
        };
        let soft_logout = json.as_ref().and_then(|j| j.get("soft_logout")).and_then(|s| s.as_bool()).unwrap_or(false);
        return Ok(Verdict::Refused(Refusal { status, errcode, soft_logout }));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        let wait = json.as_ref().and_then(|j| j.get("retry_after_ms")).and_then(|r| r.as_u64());
        tracing::warn!(
            "the homeserver rate-limits this edge's whoami checks; raise its rc_* limits for the media repository"
        );
        return Err(ApiError {
            retry_after_ms: Some(wait.unwrap_or(HOMESERVER_RETRY_MS).clamp(1_000, 60_000)),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", "Too many requests; retry later")
        });
    }
    tracing::error!(%status, "the homeserver's whoami failed; check [auth] homeserver_url and the homeserver");
    Err(homeserver_unavailable())
}

fn homeserver_unavailable() -> ApiError {
    ApiError::unavailable("The homeserver cannot check access tokens right now; retry later", HOMESERVER_RETRY_MS)
}

/// Cache lifetimes by verdict.
struct ByVerdict {
    ttl: Duration,
    negative_ttl: Duration,
}

impl moka::Expiry<[u8; 32], Verdict> for ByVerdict {
    fn expire_after_create(&self, _: &[u8; 32], value: &Verdict, _: Instant) -> Option<Duration> {
        Some(match value {
            Verdict::User(_) => self.ttl,
            Verdict::Refused(_) => self.negative_ttl,
        })
    }
}

struct Homeserver {
    /// Its client-server API, ending in `/`.
    base: reqwest::Url,
    whoami: reqwest::Url,
    http: reqwest::Client,
    server_name: String,
    cache: moka::future::Cache<[u8; 32], Verdict>,
    /// Bounds the checks in flight: a flood of made-up tokens costs the homeserver at most
    /// this many lookups at a time, and the rest are answered 503 at once.
    in_flight: tokio::sync::Semaphore,
    /// Room membership lookups (room hints) in flight at once: [`ROOM_LOOKUPS`].
    room_lookups: tokio::sync::Semaphore,
}

/// Room hint lookups in flight at once per tenant on an edge (each reads up to two answers of
/// [`MAX_ROOM_BODY`]).
const ROOM_LOOKUPS: usize = 4;

impl Homeserver {
    /// The client of the homeserver at `url`, with `c`'s cache and limits.
    fn new(url: &str, c: &AuthConfig, server_name: &str) -> Result<Self, String> {
        // A base with a path keeps it: `https://host/synapse` → `https://host/synapse/_matrix/…`.
        let with_slash = if url.ends_with('/') { url.to_owned() } else { format!("{url}/") };
        let base = reqwest::Url::parse(&with_slash).map_err(|e| format!("auth.homeserver_url {url:?}: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(format!("auth.homeserver_url {url:?} must be an http(s) URL"));
        }
        let whoami =
            base.join("_matrix/client/v3/account/whoami").map_err(|e| format!("auth.homeserver_url {url:?}: {e}"))?;
        // Straight to the homeserver: no redirects, and no proxy from the environment (tokens
        // must not travel through one the operator did not configure here).
        let http = reqwest::Client::builder()
            .timeout(c.homeserver_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the homeserver client: {e}"))?;
        let cache = moka::future::Cache::builder()
            .max_capacity(c.cache_capacity)
            .expire_after(ByVerdict { ttl: c.cache_ttl, negative_ttl: c.negative_cache_ttl })
            .build();
        let in_flight = tokio::sync::Semaphore::new(c.max_concurrent_checks.max(1));
        let room_lookups = tokio::sync::Semaphore::new(ROOM_LOOKUPS);
        Ok(Self { base, whoami, http, server_name: server_name.to_owned(), cache, in_flight, room_lookups })
    }

    async fn whoami(&self, token: &str, masquerade: Option<&str>) -> Result<Verdict, ApiError> {
        let Ok(_slot) = self.in_flight.try_acquire() else {
            tracing::warn!(
                "too many access-token checks in flight; answering 503 (raise [auth] max_concurrent_checks?)"
            );
            return Err(homeserver_unavailable());
        };
        let mut url = self.whoami.clone();
        if let Some(user) = masquerade {
            url.query_pairs_mut().append_pair("user_id", user);
        }
        let resp = match self.http.get(url).bearer_auth(token).send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the homeserver to check an access token");
                return Err(homeserver_unavailable());
            }
        };
        let status = resp.status();
        let body = match read_capped(resp, MAX_WHOAMI_BODY).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "the homeserver's whoami answer could not be read");
                return Err(homeserver_unavailable());
            }
        };
        judge(status, &body, &self.server_name)
    }
}

impl Homeserver {
    /// A JSON answer of the homeserver at `path` (segments percent-encoded) for `token`.
    async fn get_json(
        &self,
        token: &str,
        masquerade: Option<&str>,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<serde_json::Value, String> {
        let mut url = self.base.clone();
        url.path_segments_mut().map_err(|_| "the homeserver URL cannot take a path")?.pop_if_empty().extend(segments);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.extend_pairs(query);
            if let Some(user) = masquerade {
                pairs.append_pair("user_id", user);
            }
        }
        let resp = self.http.get(url).bearer_auth(token).send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = read_capped(resp, MAX_ROOM_BODY).await?;
        if !status.is_success() {
            return Err(format!("answered {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])));
        }
        serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
    }

    /// The joined members of `room` at `event`: its state there (`/context`, no events
    /// around it, members not lazy-loaded).
    async fn members_at(
        &self,
        token: &str,
        masquerade: Option<&str>,
        room: &str,
        event: &str,
    ) -> Result<Vec<String>, String> {
        let path = ["_matrix", "client", "v3", "rooms", room, "context", event];
        let filter = r#"{"lazy_load_members":false}"#;
        let json = self.get_json(token, masquerade, &path, &[("limit", "0"), ("filter", filter)]).await?;
        let state = json["state"].as_array().ok_or("a context without state")?;
        Ok(state
            .iter()
            .filter(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "join")
            .filter_map(|e| e["state_key"].as_str().map(str::to_owned))
            .collect())
    }

    /// The joined members of `room` now.
    async fn joined_now(&self, token: &str, masquerade: Option<&str>, room: &str) -> Result<Vec<String>, String> {
        let path = ["_matrix", "client", "v3", "rooms", room, "joined_members"];
        let json = self.get_json(token, masquerade, &path, &[]).await?;
        let joined = json["joined"].as_object().ok_or("no joined members")?;
        Ok(joined.keys().cloned().collect())
    }
}

/// Largest room answer read (a `/context` carries the room's whole state).
const MAX_ROOM_BODY: usize = 16 * 1024 * 1024;

async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > cap {
            return Err(format!("answer over {cap} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(status: u16, body: &str) -> Result<Verdict, ApiError> {
        judge(StatusCode::from_u16(status).expect("status"), body.as_bytes(), "hs.example")
    }

    #[test]
    fn room_servers_come_in_msc2846_order() {
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let then = ids(&["@a:both.example", "@b:left.example", "@c:both.example", "@d:small.example", "bad", "@e"]);
        let now = ids(&["@a:both.example", "@c:both.example", "@d:small.example", "@f:new.example", "@g:new.example"]);
        assert_eq!(
            order_room_servers(&then, &now),
            // Then and now (more members first), now only, then only; malformed IDs skipped.
            ["both.example", "small.example", "new.example", "left.example"]
        );
        assert_eq!(order_room_servers(&[], &ids(&["@x:b.example", "@y:a.example"])), ["a.example", "b.example"]);
        assert!(order_room_servers(&[], &[]).is_empty());
    }

    #[test]
    fn whoami_answers_become_callers_refusals_or_503() {
        assert_eq!(
            judged(200, r#"{"user_id":"@alice:hs.example","device_id":"D"}"#).expect("user"),
            Verdict::User(Caller { user_id: "@alice:hs.example".into(), is_guest: false })
        );
        assert_eq!(
            judged(200, r#"{"user_id":"@g:hs.example","is_guest":true}"#).expect("guest"),
            Verdict::User(Caller { user_id: "@g:hs.example".into(), is_guest: true })
        );
        // Refusals pass through, soft logout included.
        let refused = |status, body| match judged(status, body) {
            Ok(Verdict::Refused(r)) => r,
            other => panic!("{other:?}"),
        };
        let r = refused(401, r#"{"errcode":"M_UNKNOWN_TOKEN","error":"x","soft_logout":true}"#);
        assert_eq!((r.status, r.errcode, r.soft_logout), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", true));
        let e = r.into_error();
        assert_eq!((e.status, e.errcode, e.soft_logout), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", Some(true)));
        let r =
            refused(403, r#"{"errcode":"M_FORBIDDEN","error":"Application service cannot masquerade as this user"}"#);
        assert_eq!((r.status, r.errcode), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
        let r = refused(401, r#"{"errcode":"M_USER_LOCKED","soft_logout":true}"#);
        assert_eq!(r.errcode, "M_USER_LOCKED");
        // A homeserver that cannot answer is never a 401; nor is a refusal that is not the
        // homeserver's (a bare 401 of something in between, an unknown code, a token that
        // went missing on the way).
        for (status, body) in [
            (500, ""),
            (502, "<html>"),
            (404, r#"{"errcode":"M_UNRECOGNIZED"}"#),
            (200, "{}"),
            (401, "<html>login</html>"),
            (403, ""),
            (401, r#"{"errcode":"X_<script>"}"#),
            (401, r#"{"errcode":"M_MISSING_TOKEN"}"#),
        ] {
            let e = judged(status, body).expect_err("unavailable");
            assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE, "{status} {body}");
            assert!(e.retry_after_ms.is_some());
        }
        let e = judged(429, r#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":2500}"#).expect_err("limited");
        assert_eq!((e.status, e.retry_after_ms), (StatusCode::TOO_MANY_REQUESTS, Some(2500)));
        // Users of other servers are not this tenant's.
        for other in [r#"{"user_id":"@alice:evil.example"}"#, r#"{"user_id":"alice"}"#, r#"{"user_id":"@:hs.example"}"#]
        {
            assert_eq!(judged(200, other).expect_err("foreign").status, StatusCode::INTERNAL_SERVER_ERROR, "{other}");
        }
    }

    #[test]
    fn cache_keys_do_not_collide_across_the_token_and_masquerade_boundary() {
        assert_ne!(digest("A\0B", None), digest("A", Some("B")));
        assert_ne!(digest("AB", None), digest("A", Some("B")));
        assert_ne!(digest("A", Some("")), digest("A", None));
        assert!(plausible_token("syt_YWxpY2U_abcDEF_0123"));
        for bad in ["a b", "a\nb", "tök", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(!plausible_token(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn static_tokens_need_the_whole_token_and_no_homeserver_means_unknown() {
        let tokens = BTreeMap::from([("secret-token-1".to_owned(), "@a:hs.example".to_owned())]);
        let auth =
            Authenticator::new(tokens, &AuthConfig::default(), "hs.example", Arc::new(Metrics::new())).expect("auth");
        let mut headers = HeaderMap::new();
        let none = BTreeMap::new();
        let e = auth.authenticate(&headers, &none).await.expect_err("missing");
        assert_eq!(e.errcode, "M_MISSING_TOKEN");
        headers.insert(header::AUTHORIZATION, "bEaReR secret-token-1".parse().expect("header"));
        assert_eq!(auth.authenticate(&headers, &none).await.expect("ok").user_id, "@a:hs.example");
        for wrong in ["Bearer secret-token-", "Bearer secret-token-12", "Basic secret-token-1"] {
            headers.insert(header::AUTHORIZATION, wrong.parse().expect("header"));
            let e = auth.authenticate(&headers, &none).await.expect_err(wrong);
            assert!(matches!(e.errcode, "M_UNKNOWN_TOKEN" | "M_MISSING_TOKEN"), "{wrong}: {e:?}");
        }
        let query = BTreeMap::from([("access_token".to_owned(), "secret-token-1".to_owned())]);
        assert_eq!(auth.authenticate(&HeaderMap::new(), &query).await.expect("query").user_id, "@a:hs.example");
        // A static token cannot masquerade (and is not sent anywhere to try).
        let mut query = query;
        query.insert("user_id".into(), "@b:hs.example".into());
        let e = auth.authenticate(&HeaderMap::new(), &query).await.expect_err("masquerade");
        assert_eq!((e.status, e.errcode), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
        query.insert("user_id".into(), "@a:hs.example".into());
        assert!(auth.authenticate(&HeaderMap::new(), &query).await.is_ok(), "as itself is fine");
    }
}
