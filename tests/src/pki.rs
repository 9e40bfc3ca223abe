//! A throwaway certificate authority for TLS tests: one CA and one certificate (server and
//! client use) valid for `localhost` and the loopback addresses the cluster harness uses.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

pub struct TestPki {
    dir: tempfile::TempDir,
    /// `[tls]` as mxcas reads it.
    pub config: mxcas_meta::tls::TlsConfig,
}

impl TestPki {
    /// A CA named `name` and a certificate it signs, written as PEM files in a temp dir.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
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
        let config = mxcas_meta::tls::TlsConfig {
            ca: Some(write("ca.pem", ca.pem())?),
            cert: Some(write("node.pem", cert.pem())?),
            key: Some(write("node.key", key.serialize_pem())?),
            server_name: None,
        };
        Ok(Self { dir, config })
    }

    /// The `[tls]` section for a config file.
    pub fn toml(&self) -> String {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            path(&self.config.ca),
            path(&self.config.cert),
            path(&self.config.key)
        )
    }

    pub fn tls(&self) -> anyhow::Result<mxcas_meta::tls::Tls> {
        self.config.load().map_err(anyhow::Error::msg)?.ok_or_else(|| anyhow::anyhow!("no TLS material"))
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}
