//! One `mxcas serve` process under test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::wait_for;

/// Tokens every test node accepts.
pub const ALICE: &str = "alice-token-0123456789";
pub const BOB: &str = "bob-token-0123456789";

#[derive(Clone, Debug)]
pub enum Store {
    /// `<data_dir>/blobs`
    Fs,
    /// An S3-compatible server.
    S3 { endpoint: String, bucket: String, access_key: String, secret_key: String },
}

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub store: Store,
    /// Extra TOML for `[media]`.
    pub media: String,
    /// Extra TOML for `[cache]`.
    pub cache: String,
    /// Empty: `mxcas serve` (embedded metadata service). Otherwise `mxcas edge` against
    /// these metadata nodes.
    pub edge_meta: Vec<String>,
    /// Extra TOML for `[auth]` (after the test tokens).
    pub auth: String,
    /// Extra TOML sections appended to the config.
    pub extra: String,
    /// Accept the test tokens [`ALICE`] and [`BOB`] (off for configs where only homeservers'
    /// tokens may be, such as `[[tenants]]`).
    pub static_tokens: bool,
    /// The top-level `server_name` (default `localhost`).
    pub server_name: Option<String>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            store: Store::Fs,
            media: String::new(),
            cache: String::new(),
            edge_meta: Vec::new(),
            auth: String::new(),
            extra: String::new(),
            static_tokens: true,
            server_name: None,
        }
    }
}

pub struct Node {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub opts: NodeOptions,
    /// `http://127.0.0.1:PORT` of the media API.
    pub api: String,
    /// `http://127.0.0.1:PORT` of /livez, /readyz, /metrics.
    pub admin: String,
    pub http: reqwest::Client,
    starts: u32,
}

pub fn mxcas_bin() -> PathBuf {
    let fallback =
        std::env::current_exe().ok().and_then(|exe| exe.parent().and_then(Path::parent).map(|dir| dir.join("mxcas")));
    crate::required_program("MXCAS_BIN", fallback)
}

impl Node {
    /// Process ID, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub async fn start(opts: NodeOptions) -> anyhow::Result<Node> {
        let dir = tempfile::Builder::new().prefix("mxcas-node-").tempdir()?;
        let mut node = Node {
            child: None,
            dir,
            opts,
            api: String::new(),
            admin: String::new(),
            http: reqwest::Client::builder().pool_max_idle_per_host(256).build()?,
            starts: 0,
        };
        node.write_config()?;
        node.spawn().await?;
        Ok(node)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("mxcas.{}.log", self.starts))
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let store = match &self.opts.store {
            Store::Fs => "backend = \"fs\"\n".to_owned(),
            Store::S3 { endpoint, bucket, access_key, secret_key } => format!(
                "backend = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\naccess_key_id = \"{access_key}\"\nsecret_access_key = \"{secret_key}\"\n"
            ),
        };
        let config = format!(
            "server_name = \"{server_name}\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\n\
             [auth]\n{tokens}{auth}\n\
             [media]\n{rates}{media}\n[cache]\n{cache}\n[edge]\nmeta = [{edge_meta}]\n[store]\n{store}\n{extra}",
            data = self.data_dir().display(),
            server_name = self.opts.server_name.as_deref().unwrap_or("localhost"),
            auth = self.opts.auth,
            tokens = if self.opts.static_tokens {
                format!("tokens = {{ \"{ALICE}\" = \"@alice:localhost\", \"{BOB}\" = \"@bob:localhost\" }}\n")
            } else {
                String::new()
            },
            // A few test users make every request: per-user rate limits off unless a test sets them.
            rates = if self.opts.media.contains("_per_minute_per_user") {
                ""
            } else {
                "uploads_per_minute_per_user = 0\ndownloads_per_minute_per_user = 0\n"
            }
            .to_owned()
                // Tests of the legacy endpoints see every upload unless they set a freeze.
                + if self.opts.media.contains("freeze_legacy") { "" } else { "freeze_legacy_download_after = \"never\"\n" },
            media = self.opts.media,
            cache = self.opts.cache,
            extra = self.opts.extra,
            edge_meta = self.opts.edge_meta.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", "),
        );
        std::fs::write(self.dir.path().join("mxcas.toml"), config)?;
        Ok(())
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path())?;
        let role = if self.opts.edge_meta.is_empty() { "serve" } else { "edge" };
        let child = Command::new(mxcas_bin())
            .arg(role)
            .arg("--config")
            .arg(self.dir.path().join("mxcas.toml"))
            .env("RUST_LOG", "info,mxcas=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start mxcas")?;
        self.child = Some(child);
        let log_path = self.log_path();
        let line = wait_for("mxcas to print its addresses", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            async move { text.lines().find(|l| l.starts_with("mxcas: Matrix media API on ")).map(str::to_owned) }
        })
        .await
        .with_context(|| format!("log:\n{}", self.log()))?;
        // "mxcas: Matrix media API on http://A (admin: http://B)"
        let mut urls = line
            .split_whitespace()
            .filter(|w| w.contains("http://"))
            .map(|w| w.trim_matches(|c| c == '(' || c == ')').to_owned());
        self.api = urls.next().context("no API address")?;
        self.admin = urls.next().context("no admin address")?;
        let ready = format!("{}/readyz", self.admin);
        let http = self.http.clone();
        wait_for("mxcas /readyz", Duration::from_secs(30), || {
            let (http, ready) = (http.clone(), ready.clone());
            async move { http.get(&ready).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await
        .with_context(|| format!("log:\n{}", self.log()))?;
        Ok(())
    }

    /// `kill -9`: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `grace` for the process to exit; returns its exit status.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
        let deadline = std::time::Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("mxcas did not exit within {grace:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process again on the same data directory (new ports).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// Restarts with other options (same data directory).
    pub async fn restart_with(&mut self, opts: NodeOptions) -> anyhow::Result<()> {
        self.kill9();
        self.opts = opts;
        self.write_config()?;
        self.spawn().await
    }

    /// Every log this node wrote, across restarts.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                let p = self.dir.path().join(format!("mxcas.{i}.log"));
                format!("--- {} ---\n{}", p.display(), std::fs::read_to_string(&p).unwrap_or_default())
            })
            .collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    /// `POST /_matrix/media/v3/upload` as alice.
    pub async fn upload(
        &self,
        body: Vec<u8>,
        content_type: &str,
        filename: Option<&str>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut url = self.url("/_matrix/media/v3/upload");
        if let Some(f) = filename {
            url = format!("{url}?filename={f}");
        }
        Ok(self.http.post(url).bearer_auth(ALICE).header("content-type", content_type).body(body).send().await?)
    }

    /// Uploads and returns the media ID (fails the test unless 200).
    pub async fn upload_ok(&self, body: Vec<u8>) -> anyhow::Result<String> {
        let resp = self.upload(body, "application/octet-stream", None).await?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::ensure!(status == 200, "upload answered {status}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let uri = json["content_uri"].as_str().context("no content_uri")?;
        let ours = format!("mxc://{}/", self.opts.server_name.as_deref().unwrap_or("localhost"));
        Ok(uri.strip_prefix(&ours).with_context(|| format!("unexpected mxc {uri}"))?.to_owned())
    }

    /// `GET /_matrix/client/v1/media/download/localhost/{id}` as alice.
    pub async fn download(&self, media_id: &str) -> anyhow::Result<reqwest::Response> {
        let url = self.url(&format!("/_matrix/client/v1/media/download/localhost/{media_id}"));
        Ok(self.http.get(url).bearer_auth(ALICE).send().await?)
    }

    /// A ranged download as alice.
    pub async fn download_range(&self, media_id: &str, range: &str) -> anyhow::Result<reqwest::Response> {
        let url = self.url(&format!("/_matrix/client/v1/media/download/localhost/{media_id}"));
        Ok(self.http.get(url).bearer_auth(ALICE).header("range", range).send().await?)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self.http.get(format!("{}/metrics", self.admin)).send().await?.text().await?)
    }

    /// Value of one sample line, e.g. `mxcas_edge_store_reads_total` (0 if absent).
    pub async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap_or(0.0))
            .unwrap_or(0.0))
    }

    /// Every file of uploads under the local blob directory (for Fs nodes; not the store's
    /// identity marker).
    pub fn local_blobs(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.is_dir() { walk(&p, out) } else { out.push(p) }
            }
        }
        let mut out = Vec::new();
        walk(&self.data_dir().join("blobs").join("blobs"), &mut out);
        out
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("==== mxcas logs ====\n{}", self.log());
        }
    }
}
