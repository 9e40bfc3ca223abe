//! A throwaway certificate authority for TLS tests: one CA, a node certificate (server and
//! client use) valid for `node.mxcas.test`, `localhost` and the loopback addresses the cluster
//! harness uses, and an edge certificate valid only for `edge.mxcas.test`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

pub const NODE_NAME: &str = "node.mxcas.test";

pub struct TestPki {
    _dir: tempfile::TempDir,
    /// `[tls]` of a metadata node (raft and admin restricted to [`NODE_NAME`]).
    pub config: mxcas_meta::tls::TlsConfig,
    /// `[tls]` of an edge: same CA, its own certificate.
    pub edge: mxcas_meta::tls::TlsConfig,
}

impl TestPki {
    /// A CA named `name` and the certificates it signs, written as PEM files in a temp dir.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut params = CertificateParams::new(vec![NODE_NAME.to_owned(), "localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, format!("{name} node"));
        // 127.0.0.1 (proxies, edges) and 127.0.0.10+ (the nodes' own addresses).
        params.subject_alt_names.extend((1..=40).map(|i| SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;

        let dir = tempfile::Builder::new().prefix("mxcas-pki-").tempdir()?;
        let write = |file: &str, pem: String| -> anyhow::Result<PathBuf> {
            let path = dir.path().join(file);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        let mut edge_params = CertificateParams::new(vec!["edge.mxcas.test".to_owned()])?;
        edge_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let edge_key = KeyPair::generate()?;
        let edge_cert = edge_params.signed_by(&edge_key, &ca)?;

        let ca_path = write("ca.pem", ca.pem())?;
        let config = mxcas_meta::tls::TlsConfig {
            ca: Some(ca_path.clone()),
            cert: Some(write("node.pem", cert.pem())?),
            key: Some(write("node.key", key.serialize_pem())?),
            server_name: None,
            node_names: vec![NODE_NAME.to_owned()],
        };
        let edge = mxcas_meta::tls::TlsConfig {
            ca: Some(ca_path),
            cert: Some(write("edge.pem", edge_cert.pem())?),
            key: Some(write("edge.key", edge_key.serialize_pem())?),
            server_name: None,
            node_names: Vec::new(),
        };
        Ok(Self { _dir: dir, config, edge })
    }

    /// The `[tls]` section of a metadata node's config file.
    pub fn toml(&self) -> String {
        self.toml_with_node_names(NODE_NAME)
    }

    /// A node's `[tls]` section restricting raft to certificates valid for `name`.
    pub fn toml_with_node_names(&self, name: &str) -> String {
        format!("{}node_names = [\"{name}\"]\n", section(&self.config))
    }

    /// The `[tls]` section of an edge's config file.
    pub fn edge_toml(&self) -> String {
        section(&self.edge)
    }

    /// A node's TLS material (what the harness and `mxcas admin` connect with).
    pub fn tls(&self) -> anyhow::Result<mxcas_meta::tls::Tls> {
        self.config.load().map_err(anyhow::Error::msg)?.ok_or_else(|| anyhow::anyhow!("no TLS material"))
    }

    /// An edge's TLS material.
    pub fn edge_tls(&self) -> anyhow::Result<mxcas_meta::tls::Tls> {
        self.edge.load().map_err(anyhow::Error::msg)?.ok_or_else(|| anyhow::anyhow!("no TLS material"))
    }
}

fn section(c: &mxcas_meta::tls::TlsConfig) -> String {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    format!("[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n", path(&c.ca), path(&c.cert), path(&c.key))
}
