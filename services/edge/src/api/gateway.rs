//! `GET`/`HEAD /ipfs/{cid}`: the IPFS trustless gateway (MSC2706), strict (no deserialized
//! responses): a raw block (`format=raw`, `application/vnd.ipld.raw`) or a CARv1
//! (`format=car`, `application/vnd.ipld.car`; `dag-scope`, `entity-bytes`, `order=dfs`,
//! `dups=y|n`) of any block of any stored DAG. Who may use it is the tenant's
//! `ipfs_gateway` setting (`authenticated`: an access token, as for media; `federation`: that,
//! or a request signed with `X-Matrix` by another Matrix server for this tenant, as for
//! federation media); `bafkqaaa` (the empty identity CID) answers the spec's probe. The gateway serves what is stored and never fetches.
//!
//! Errors are plain text, as gateways answer them; an access refusal is the media API's
//! Matrix JSON (it is the media API's authentication). A CAR's `Content-Length` is known
//! before its first byte is sent, so a client can tell a cut-off stream (a block that fails
//! verification in the store mid-way ends the response) from a short DAG.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cid::Cid;
use futures::{StreamExt, TryStreamExt, stream};
use mxcas_cas::walk::{EntityBytes, Scope, Walk, WalkError};
use mxcas_cas::{Limits, VerifiedBlock, car};

use super::AppState;
use crate::config::GatewayAccess;
use crate::gateway::{LocateError, Located, Source, StoredDag};
use crate::metrics::ResultLabels;

const RAW: &str = "application/vnd.ipld.raw";
const CAR: &str = "application/vnd.ipld.car";
/// Blocks read ahead of the one being sent in a CAR.
const READ_AHEAD: usize = 4;

/// What the client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Raw,
    Car { dups: bool },
}

/// A gateway answer that is not content: a status and a plain-text reason.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal { status, reason: reason.into() }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut resp = (self.status, format!("{}\n", self.reason)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        resp
    }
}

pub async fn ipfs(
    state: State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(cid): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    serve(&state, &method, &uri, &headers, &cid, None, &query).await
}

/// `/ipfs/{cid}/{path}`: mxcas stores files, which have no paths inside them.
pub async fn ipfs_path(
    state: State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((cid, path)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    serve(&state, &method, &uri, &headers, &cid, Some(&path), &query).await
}

async fn serve(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    cid: &str,
    path: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Response {
    let tenant = match state.tenants.for_request(headers) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    if let Err(refusal) = admit(state, tenant.as_ref(), method, uri, headers, query).await {
        count(state, "refused");
        return refusal;
    }
    let public = tenant.ipfs_gateway == GatewayAccess::Public;
    match respond(state, method, headers, cid, path, query, public).await {
        Ok((result, resp)) => {
            count(state, result);
            resp
        }
        Err(refusal) => {
            let result = match refusal.status {
                StatusCode::NOT_FOUND => "not_found",
                s if s.is_client_error() => "refused",
                _ => "error",
            };
            count(state, result);
            refusal.into_response()
        }
    }
}

/// Whether the tenant's `ipfs_gateway` setting lets this request in; the refusal otherwise.
async fn admit(
    state: &AppState,
    tenant: &crate::tenants::Tenant,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
) -> Result<(), Response> {
    let access = tenant.ipfs_gateway;
    if access == GatewayAccess::Off {
        return Err(refuse(StatusCode::NOT_FOUND, "The IPFS gateway is off on this server").into_response());
    }
    if access == GatewayAccess::Public {
        return Ok(());
    }
    if super::federation::is_signed(headers) {
        // Another Matrix server, as for federation media, if the tenant the request is signed
        // for (and sent to) serves other servers' block fetches (MSC2846's fallback). The
        // setting is looked at first: a closed gateway fetches no keys to say no.
        let forbidden = || {
            super::error::ApiError::new(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "This server's IPFS gateway does not serve other servers (ipfs_gateway is not \"federation\")",
            )
            .into_response()
        };
        if access != GatewayAccess::Federation {
            return Err(forbidden());
        }
        let (origin, destination) =
            super::federation::authenticated(state, method, uri, headers).await.map_err(IntoResponse::into_response)?;
        if destination != tenant.server_name {
            return Err(forbidden());
        }
        tracing::debug!(%origin, "IPFS gateway request of a federating server");
        return Ok(());
    }
    let caller = tenant.auth.authenticate(headers, query).await.map_err(IntoResponse::into_response)?;
    tenant.download_limit.check(&caller.user_id).map_err(IntoResponse::into_response)
}

fn count(state: &AppState, result: &'static str) {
    state.metrics.gateway.get_or_create(&ResultLabels { result }).inc();
}

async fn respond(
    state: &AppState,
    method: &Method,
    headers: &HeaderMap,
    cid_text: &str,
    path: Option<&str>,
    query: &BTreeMap<String, String>,
    public: bool,
) -> Result<(&'static str, Response), Refusal> {
    let cid = Cid::try_from(cid_text).map_err(|e| {
        refuse(StatusCode::BAD_REQUEST, format!("{cid_text:?} is not a CID ({e}); ask for /ipfs/<CID>"))
    })?;
    let format = negotiate(headers, query)?;
    if path.is_some_and(|p| !p.is_empty()) {
        return Err(match format {
            Format::Raw => refuse(StatusCode::BAD_REQUEST, "A raw block has no path: ask for /ipfs/<CID>"),
            Format::Car { .. } => refuse(StatusCode::NOT_FOUND, "No such path: mxcas stores files, not directories"),
        });
    }
    let walk = match format {
        Format::Raw => None,
        Format::Car { dups } => Some(car_walk(query, dups)?),
    };
    let reply = Reply { method, headers, cid: &cid, public };
    let limits = Limits::default();
    // Identity CIDs (the `bafkqaaa` probe among them) carry their block.
    if let Some(identity) = VerifiedBlock::from_identity(&cid, &limits) {
        let block = identity.map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("identity CID: {e}")))?;
        let bytes = Bytes::from(block.into_bytes());
        return Ok(match walk {
            None => ("raw", reply.raw(bytes)),
            Some(walk) => {
                let header = Bytes::from(car::header(&[cid]));
                let etag = car_etag(&cid, &walk, query);
                ("car", reply.car(&etag, walk.dups, header.len() as u64, stream::iter([Ok(header)]).boxed()))
            }
        });
    }
    if let Err(e) = VerifiedBlock::supported(&cid) {
        return Err(refuse(StatusCode::NOT_FOUND, format!("{cid} is not stored here: {e}")));
    }
    let Located { dag, source } = match state.gateway.locate(&state.media, &cid).await {
        Ok(Some(found)) => found,
        Ok(None) => return Err(refuse(StatusCode::NOT_FOUND, format!("{cid} is not stored here"))),
        Err(e) => return Err(failure(state, None, &e).await),
    };
    let Some(walk) = walk else {
        if super::headers::not_modified(headers, &raw_etag(&cid)) {
            return Ok(("not_modified", reply.raw(Bytes::new())));
        }
        // HEAD too: its status must be GET's, and the block cache keeps what it read.
        let bytes = match dag.bytes(&state.media.blocks, source).await {
            Ok(b) => b,
            Err(e) => return Err(failure(state, Some(&dag), &LocateError::Block(e)).await),
        };
        return Ok(("raw", reply.raw(bytes)));
    };
    let etag = car_etag(&cid, &walk, query);
    if super::headers::not_modified(headers, &etag) {
        return Ok(("not_modified", reply.car(&etag, walk.dups, 0, stream::empty().boxed())));
    }
    let plan = dag.plan(cid, walk, &limits).map_err(|e| match e {
        WalkError::Outside { .. } => refuse(StatusCode::BAD_REQUEST, format!("entity-bytes: {e}")),
        e => {
            tracing::error!(%cid, error = %e, "a stored DAG cannot be walked");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("The stored DAG cannot be walked: {e}"))
        }
    })?;
    let header = Bytes::from(car::header(&[cid]));
    let length = plan.iter().fold(header.len() as u64, |n, (c, s)| {
        let block = dag.len(*s);
        n + car::section_head(c, block as usize).len() as u64 + block
    });
    let body = car_body(state, dag, header, plan);
    Ok(("car", reply.car(&etag, walk.dups, length, body)))
}

/// The CAR's `dag-scope` and `entity-bytes`.
fn car_walk(query: &BTreeMap<String, String>, dups: bool) -> Result<Walk, Refusal> {
    let scope = match query.get("dag-scope") {
        None => Scope::All,
        Some(s) => Scope::parse(s)
            .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, format!("dag-scope={s:?}: want block, entity or all")))?,
    };
    let bytes = match query.get("entity-bytes") {
        None => None,
        Some(s) => Some(EntityBytes::parse(s).ok_or_else(|| {
            refuse(StatusCode::BAD_REQUEST, format!("entity-bytes={s:?}: want from:to (integers, or * for the end)"))
        })?),
    };
    Ok(Walk { scope, bytes, dups })
}

/// The blocks of a CAR as they are read, verified, in order, a few read ahead. A block that
/// cannot be read ends the body there (short of its `Content-Length`); a lost one is recorded.
fn car_body(
    state: &AppState,
    dag: StoredDag,
    header: Bytes,
    plan: Vec<(Cid, Source)>,
) -> futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>> {
    let dag = Arc::new(dag);
    let media = state.media.clone();
    let sections = stream::iter(plan)
        .map(move |(cid, source)| {
            let (dag, media) = (dag.clone(), media.clone());
            async move {
                let bytes = match dag.bytes(&media.blocks, source).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(%cid, error = %e, "a CAR response ends early: a block could not be read");
                        if e.is_data_loss() {
                            let _ = media.record_loss(&dag.content, &e).await;
                        }
                        return Err(std::io::Error::other(e.to_string()));
                    }
                };
                let head = Bytes::from(car::section_head(&cid, bytes.len()));
                Ok::<_, std::io::Error>(stream::iter([Ok(head), Ok(bytes)]))
            }
        })
        .buffered(READ_AHEAD)
        .try_flatten();
    stream::iter([Ok(header)]).chain(sections).boxed()
}

/// The gateway's answer to a failure to find or read a block; a loss of `dag`'s stored
/// bytes is recorded first (unless the store turns out not to be the cluster's: then 503).
async fn failure(state: &AppState, dag: Option<&StoredDag>, e: &LocateError) -> Refusal {
    match e {
        LocateError::Block(b) if b.is_data_loss() => {
            if let Some(dag) = dag
                && state.media.record_loss(&dag.content, b).await.is_err()
            {
                return refuse(StatusCode::SERVICE_UNAVAILABLE, "Storage is misconfigured or unavailable; retry later");
            }
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The stored bytes of this block are lost (missing or corrupt in storage); uploading the same file again restores them",
            )
        }
        LocateError::Block(b) => {
            tracing::warn!(error = %b, "gateway: blob store read failed");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "Storage is temporarily unavailable; retry later")
        }
        LocateError::Meta(m) => {
            tracing::warn!(error = %m, "gateway: metadata read failed");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "The metadata service is temporarily unavailable; retry later")
        }
    }
}

/// The format asked for: `format` first (the spec's precedence), then `Accept`. Anything
/// else is a 400: this gateway never answers deserialized content.
fn negotiate(headers: &HeaderMap, query: &BTreeMap<String, String>) -> Result<Format, Refusal> {
    let from_query = match query.get("format").map(String::as_str) {
        None => None,
        Some("raw") => Some(Format::Raw),
        Some("car") => Some(Format::Car { dups: false }),
        Some(other) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("format={other:?} is not served here: ask for raw or car"),
            ));
        }
    };
    // Every Accept line, as one list.
    let accept = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    // `format` takes precedence: an Accept naming nothing servable only matters without it.
    let from_accept = match accepted(&accept) {
        Ok(f) => f,
        Err(_) if from_query.is_some() => None,
        Err(e) => return Err(e),
    };
    let format = match (from_query, from_accept) {
        // The Accept header may still choose the CAR's parameters.
        (Some(Format::Car { .. }), Some(car @ Format::Car { .. })) => car,
        (Some(f), _) => f,
        (None, Some(f)) => f,
        (None, None) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "This is a trustless gateway: ask for ?format=raw or ?format=car (or Accept: application/vnd.ipld.raw or application/vnd.ipld.car)",
            ));
        }
    };
    let Format::Car { mut dups } = format else { return Ok(format) };
    if let Some(v) = query.get("car-version").filter(|v| *v != "1") {
        return Err(refuse(StatusCode::BAD_REQUEST, format!("car-version={v:?}: only CARv1 is served")));
    }
    if let Some(o) = query.get("car-order").filter(|o| !matches!(o.as_str(), "dfs" | "unk")) {
        return Err(refuse(StatusCode::BAD_REQUEST, format!("car-order={o:?}: blocks are sent in dfs order")));
    }
    match query.get("car-dups").map(String::as_str) {
        None => {}
        Some("y") => dups = true,
        Some("n") => dups = false,
        Some(d) => return Err(refuse(StatusCode::BAD_REQUEST, format!("car-dups={d:?}: want y or n"))),
    }
    Ok(Format::Car { dups })
}

/// The first acceptable media range of an `Accept` header, by `q` then order; `None` if it
/// names neither of the gateway's types. A CAR range with parameters this gateway cannot
/// honour (another version or order) is passed over; if that leaves nothing, 406.
fn accepted(accept: &str) -> Result<Option<Format>, Refusal> {
    let mut ranges: Vec<(u16, usize, Option<Format>)> = Vec::new();
    for (n, range) in accept.split(',').enumerate() {
        let mut parts = range.split(';').map(str::trim);
        let kind = parts.next().unwrap_or("").to_ascii_lowercase();
        let (mut q, mut ok, mut dups) = (1000u16, true, false);
        for p in parts {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match (k.trim().to_ascii_lowercase().as_str(), v.trim().trim_matches('"')) {
                ("q", v) => q = parse_q(v).unwrap_or(0),
                ("version", v) => ok &= v == "1",
                ("order", v) => ok &= matches!(v, "dfs" | "unk"),
                ("dups", "y") => dups = true,
                ("dups", "n") => dups = false,
                ("dups", _) => ok = false,
                _ => {}
            }
        }
        let format = match kind.as_str() {
            RAW => Some(Format::Raw),
            CAR => Some(Format::Car { dups }),
            _ => continue,
        };
        if q > 0 {
            ranges.push((q, n, ok.then_some(format).flatten()));
        }
    }
    ranges.sort_by_key(|(q, n, _)| (std::cmp::Reverse(*q), *n));
    match ranges.iter().find_map(|(_, _, f)| *f) {
        Some(f) => Ok(Some(f)),
        None if !ranges.is_empty() => Err(refuse(
            StatusCode::NOT_ACCEPTABLE,
            "Only application/vnd.ipld.raw and application/vnd.ipld.car; version=1; order=dfs (dups=y or n) are served",
        )),
        None => Ok(None),
    }
}

/// An RFC 9110 weight in thousandths.
fn parse_q(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(frac),
        "1" if frac == 0 => Some(1000),
        _ => None,
    }
}

/// How to answer one request: its method and headers, the CID asked for, and whether the
/// answer may be kept by shared caches (only a public gateway's: otherwise a proxy could hand
/// an authenticated answer to anyone).
struct Reply<'a> {
    method: &'a Method,
    headers: &'a HeaderMap,
    cid: &'a Cid,
    public: bool,
}

impl Reply<'_> {
    fn common(&self, h: &mut HeaderMap, etag: &str, filename: &str) {
        let mut put = |name, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        };
        put(header::ETAG, etag);
        put(
            header::CACHE_CONTROL,
            if self.public { "public, max-age=29030400, immutable" } else { "private, max-age=29030400, immutable" },
        );
        put(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
        put(header::CONTENT_DISPOSITION, &format!("attachment; filename=\"{filename}\""));
        put(header::VARY, if self.public { "Accept" } else { "Accept, Authorization" });
        put(header::HeaderName::from_static("x-ipfs-path"), &format!("/ipfs/{}", self.cid));
        put(header::HeaderName::from_static("x-ipfs-roots"), &self.cid.to_string());
    }

    fn raw(&self, bytes: Bytes) -> Response {
        let etag = raw_etag(self.cid);
        let mut h = HeaderMap::new();
        self.common(&mut h, &etag, &format!("{}.bin", self.cid));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(RAW));
        if super::headers::not_modified(self.headers, &etag) {
            return (StatusCode::NOT_MODIFIED, h).into_response();
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let body = if *self.method == Method::HEAD { Body::empty() } else { Body::from(bytes) };
        (StatusCode::OK, h, body).into_response()
    }

    fn car(
        &self,
        etag: &str,
        dups: bool,
        length: u64,
        body: futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>,
    ) -> Response {
        let mut h = HeaderMap::new();
        self.common(&mut h, etag, &format!("{}.car", self.cid));
        let content_type = if dups {
            "application/vnd.ipld.car; version=1; order=dfs; dups=y"
        } else {
            "application/vnd.ipld.car; version=1; order=dfs; dups=n"
        };
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if super::headers::not_modified(self.headers, etag) {
            return (StatusCode::NOT_MODIFIED, h).into_response();
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        let body = if *self.method == Method::HEAD { Body::empty() } else { Body::from_stream(body) };
        (StatusCode::OK, h, body).into_response()
    }
}

fn raw_etag(cid: &Cid) -> String {
    format!("\"{cid}.raw\"")
}

/// A CAR's ETag: its root and everything that chooses its blocks.
fn car_etag(cid: &Cid, walk: &Walk, query: &BTreeMap<String, String>) -> String {
    let dups = if walk.dups { "y" } else { "n" };
    match (walk.bytes, query.get("entity-bytes")) {
        (Some(_), Some(b)) => format!("\"{cid}.car.entity.{b}.dfs.{dups}\""),
        _ => format!("\"{cid}.car.{}.dfs.{dups}\"", walk.scope.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).expect("header"));
        h
    }

    fn query(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn formats_are_negotiated_as_the_trustless_gateway_spec_says() {
        let none = BTreeMap::new();
        let get = |h: &HeaderMap, q: &BTreeMap<String, String>| negotiate(h, q).map_err(|r| r.status);
        assert_eq!(get(&with_accept(RAW), &none), Ok(Format::Raw));
        assert_eq!(get(&with_accept(CAR), &none), Ok(Format::Car { dups: false }));
        assert_eq!(
            get(&with_accept("application/vnd.ipld.car; version=1; order=dfs; dups=y"), &none),
            Ok(Format::Car { dups: true })
        );
        // format= wins over Accept; Accept may still pick the CAR's parameters.
        assert_eq!(get(&with_accept(CAR), &query(&[("format", "raw")])), Ok(Format::Raw));
        assert_eq!(
            get(&with_accept("application/vnd.ipld.car;dups=y"), &query(&[("format", "car")])),
            Ok(Format::Car { dups: true })
        );
        assert_eq!(
            get(&HeaderMap::new(), &query(&[("format", "car"), ("car-dups", "y")])),
            Ok(Format::Car { dups: true })
        );
        // By weight, then order.
        assert_eq!(
            get(&with_accept("application/vnd.ipld.raw;q=0.5, application/vnd.ipld.car"), &none),
            Ok(Format::Car { dups: false })
        );
        assert_eq!(
            get(&with_accept("application/vnd.ipld.car;version=2, application/vnd.ipld.raw;q=0.1"), &none),
            Ok(Format::Raw)
        );
        // No explicit trustless type: 400 (strict gateway); only unservable variants: 406.
        assert_eq!(get(&HeaderMap::new(), &none), Err(StatusCode::BAD_REQUEST));
        assert_eq!(get(&with_accept("*/*"), &none), Err(StatusCode::BAD_REQUEST));
        assert_eq!(get(&with_accept("text/html, application/json"), &none), Err(StatusCode::BAD_REQUEST));
        assert_eq!(get(&with_accept("application/vnd.ipld.car; version=2"), &none), Err(StatusCode::NOT_ACCEPTABLE));
        assert_eq!(get(&with_accept("application/vnd.ipld.car; order=weird"), &none), Err(StatusCode::NOT_ACCEPTABLE));
        assert_eq!(get(&with_accept("application/vnd.ipld.raw;q=0"), &none), Err(StatusCode::BAD_REQUEST));
        assert_eq!(get(&HeaderMap::new(), &query(&[("format", "html")])), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            get(&HeaderMap::new(), &query(&[("format", "car"), ("car-version", "2")])),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            get(&HeaderMap::new(), &query(&[("format", "car"), ("car-order", "bfs")])),
            Err(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn weights_parse_by_rfc_9110() {
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("1.000"), Some(1000));
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("0.125"), Some(125));
        assert_eq!(parse_q("0"), Some(0));
        for bad in ["1.5", "2", "0.1234", "-1", "x", "0.x"] {
            assert_eq!(parse_q(bad), None, "{bad}");
        }
    }
}
