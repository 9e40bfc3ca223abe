//! Optional mutual TLS for every gRPC link of the metadata service: raft between nodes, the
//! metadata API from edges, and cluster administration.
//!
//! One `[tls]` section serves every role. A metadata node presents `cert` to whoever connects
//! and requires them to present a certificate signed by `ca`; every client (a raft peer, an
//! edge, `mxcas admin`) verifies the node against `ca` and presents its own `cert`. Mutual
//! authentication is not optional: the raft port accepts log entries, so a client without a
//! certificate from the cluster's CA must not get in.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// `[tls]` as written in the config file: PEM files.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// CA certificate(s) that sign every node's and client's certificate.
    pub ca: Option<PathBuf>,
    /// This process's certificate chain (server certificate on metadata nodes, client
    /// certificate everywhere).
    pub cert: Option<PathBuf>,
    /// Private key of `cert`.
    pub key: Option<PathBuf>,
    /// Name to verify servers' certificates against, when it is not the host in their
    /// address (e.g. one certificate for `meta.mxcas.svc` behind per-pod IPs).
    pub server_name: Option<String>,
    /// Names (DNS or IP) a client certificate must be valid for to use raft and cluster
    /// administration on a metadata node; a certificate with a wildcard SAN matches names it
    /// covers. Empty: any certificate the CA signed may, edges' included, so set it whenever
    /// edges hold certificates from the same CA.
    pub node_names: Vec<String>,
}

/// Loaded TLS material; cheap to clone.
#[derive(Clone)]
pub struct Tls {
    ca: Certificate,
    identity: Identity,
    /// Our own leaf certificate (DER), to check against `node_names` at start.
    own_leaf: Option<CertificateDer<'static>>,
    server_name: Option<String>,
    node_names: Vec<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// `None` when TLS is off (no field set); an error naming what is missing or unreadable.
    pub fn load(&self) -> Result<Option<Tls>, String> {
        let (ca, cert, key) = match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => {
                return match (&self.server_name, self.node_names.is_empty()) {
                    (None, true) => Ok(None),
                    _ => Err("[tls] server_name or node_names is set but ca, cert and key are not".into()),
                };
            }
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            _ => return Err("[tls] needs all of ca, cert and key (mutual TLS), or none of them".into()),
        };
        let read = |what: &str, p: &Path| {
            let bytes = std::fs::read(p).map_err(|e| format!("[tls] {what} {}: {e}", p.display()))?;
            if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
                return Err(format!("[tls] {what} {} is not a PEM file", p.display()));
            }
            Ok(bytes)
        };
        let node_names = self
            .node_names
            .iter()
            .map(|n| {
                ServerName::try_from(n.as_str())
                    .map(|n| n.to_owned())
                    .map_err(|_| format!("[tls] node_names: {n:?} is not a DNS name or IP address"))
            })
            .collect::<Result<_, _>>()?;
        let cert_pem = read("cert", cert)?;
        let own_leaf = CertificateDer::pem_slice_iter(&cert_pem).next().and_then(Result::ok);
        Ok(Some(Tls {
            ca: Certificate::from_pem(read("ca", ca)?),
            identity: Identity::from_pem(cert_pem, read("key", key)?),
            own_leaf,
            server_name: self.server_name.clone(),
            node_names,
        }))
    }
}

impl Tls {
    /// Server side: present our certificate, require clients signed by the CA, and give a
    /// handshake 10 s (an unauthenticated peer cannot hold a connection open longer).
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .timeout(std::time::Duration::from_secs(10))
    }

    /// Whether raft and cluster administration are restricted to `node_names`.
    pub fn restricts_nodes(&self) -> bool {
        !self.node_names.is_empty()
    }

    fn names_a_node(&self, leaf: &CertificateDer<'_>) -> Result<bool, String> {
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("unreadable certificate: {e:?}"))?;
        Ok(self.node_names.iter().any(|n| cert.verify_is_valid_for_subject_name(n).is_ok()))
    }

    /// On a metadata node: its own certificate must pass its own `node_names` check, or every
    /// other node would refuse its raft calls and the cluster could never elect a leader.
    pub fn check_own_certificate(&self) -> Result<(), String> {
        if self.node_names.is_empty() {
            return Ok(());
        }
        let leaf = self.own_leaf.as_ref().ok_or("[tls] cert holds no certificate")?;
        if self.names_a_node(leaf)? {
            Ok(())
        } else {
            Err("[tls] this node's own certificate is valid for none of node_names: the other nodes would refuse \
                 its raft calls. Issue it for one of those names, or fix node_names"
                .into())
        }
    }

    /// Admits a raft or cluster-administration call only from a client certificate valid for
    /// one of `node_names` (when set): an edge's certificate opens the metadata API, not the
    /// replicated log.
    pub fn check_node_peer<T>(&self, req: &tonic::Request<T>) -> Result<(), tonic::Status> {
        if self.node_names.is_empty() {
            return Ok(());
        }
        let certs = req.peer_certs().ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
        let leaf = certs.first().ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
        if self.names_a_node(leaf).map_err(tonic::Status::unauthenticated)? {
            Ok(())
        } else {
            Err(tonic::Status::permission_denied(
                "this certificate may use the metadata API but not raft or cluster administration: \
                 it is valid for none of the nodes' [tls] node_names",
            ))
        }
    }

    fn client(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(self.server_name.clone().unwrap_or_else(|| host.to_owned()))
    }
}

/// The URL for a node address (`host:port`, or already a URL), `https` when TLS is on.
pub fn url(addr: &str, tls: Option<&Tls>) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_owned()
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// A tonic endpoint for a node address, with TLS when configured. A plain `http://` URL while
/// TLS is on is refused rather than silently sent in clear text.
pub fn endpoint(addr: &str, tls: Option<&Tls>) -> Result<Endpoint, String> {
    let url = url(addr, tls);
    let endpoint =
        Endpoint::from_shared(url.clone()).map_err(|e| format!("bad metadata node address {addr:?}: {e}"))?;
    let Some(tls) = tls else {
        if url.starts_with("https://") {
            return Err(format!("{url}: https needs a [tls] section (ca, cert, key)"));
        }
        return Ok(endpoint);
    };
    if !url.starts_with("https://") {
        return Err(format!("{url}: TLS is configured, so metadata nodes must be reached over https"));
    }
    let host = endpoint.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    endpoint.tls_config(tls.client(&host)).map_err(|e| format!("TLS setup for {url}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_tls_config_is_refused() {
        let c = TlsConfig { ca: Some("ca.pem".into()), ..Default::default() };
        assert!(c.load().expect_err("partial").contains("all of ca, cert and key"));
        let c = TlsConfig { server_name: Some("meta".into()), ..Default::default() };
        assert!(c.load().expect_err("name only").contains("server_name"));
        let c = TlsConfig { node_names: vec!["meta".into()], ..Default::default() };
        assert!(c.load().expect_err("node names only").contains("node_names"));
        assert!(TlsConfig::default().load().expect("off").is_none());
    }

    #[test]
    fn missing_or_non_pem_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        let c = TlsConfig {
            ca: Some(junk.clone()),
            cert: Some(junk.clone()),
            key: Some(junk.clone()),
            server_name: None,
            node_names: Vec::new(),
        };
        let err = c.load().expect_err("junk");
        assert!(err.contains("junk.pem is not a PEM file"), "{err}");
        let c = TlsConfig { cert: Some(dir.path().join("absent.pem")), ..c };
        assert!(c.load().expect_err("absent").contains("absent.pem"));
    }

    #[test]
    fn urls_follow_the_tls_setting() {
        assert_eq!(url("10.0.0.1:7100", None), "http://10.0.0.1:7100");
        assert_eq!(url("https://m:1", None), "https://m:1");
        assert!(endpoint("http://10.0.0.1:7100", None).is_ok());
        assert!(endpoint("https://10.0.0.1:7100", None).expect_err("https without TLS").contains("[tls]"));
    }
}
