//! A real Synapse homeserver on loopback (PyPI `matrix-synapse`, sqlite), configured the way an
//! operator runs it behind an external media repository: its own media repository off,
//! everything else as generated. `scripts/test.sh` installs it (pinned) and sets
//! `SYNAPSE_PYTHON` to the interpreter of its venv.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

pub struct Synapse {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`, its client-server API.
    pub url: String,
    pub server_name: String,
    http: reqwest::Client,
}

fn python() -> PathBuf {
    crate::required_program("SYNAPSE_PYTHON", None)
}

/// Raises Synapse's rate limits (tests log in and call `whoami` far faster than people) and
/// turns off what an external media repository replaces, in the generated config.
const PATCH: &str = r#"
import sys, yaml
import json
path, port, appservice, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
with open(path) as f:
    c = yaml.safe_load(f)
c["app_service_config_files"] = [appservice]
c["allow_guest_access"] = True
c["listeners"] = [{"port": port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                   "x_forwarded": True, "resources": [{"names": ["client"], "compress": False}]}]
c["enable_media_repo"] = False
c["trusted_key_servers"] = []
c["suppress_key_server_warning"] = True
c["report_stats"] = False
c["enable_registration"] = False
c["registration_shared_secret"] = "mxcas-test-registration-secret"
lots = {"per_second": 10000, "burst_count": 10000}
for k in ["rc_message", "rc_registration", "rc_joins", "rc_invites", "rc_3pid_validation",
          "rc_admin_redaction", "rc_room_creation", "rc_presence", "rc_delayed_event_mgmt"]:
    c[k] = lots
c["rc_login"] = {"address": lots, "account": lots, "failed_attempts": lots}
c["listeners"] += extra.pop("_listeners", [])
c.update(extra)
with open(path, "w") as f:
    yaml.safe_dump(c, f)
"#;

/// The application service every test homeserver has: it owns `@bridge_*` users.
pub const AS_TOKEN: &str = "mxcas-test-as-token-0123456789";
const APPSERVICE: &str = "id: mxcas-test-bridge
url: null
as_token: mxcas-test-as-token-0123456789
hs_token: mxcas-test-hs-token-0123456789
sender_localpart: bridgebot
rate_limited: false
namespaces:
  users:
    - exclusive: true
      regex: '@bridge_.*'
  aliases: []
  rooms: []
";

impl Synapse {
    /// Generates a config for `server_name` in a temp dir, starts Synapse and waits until it
    /// answers `/health`.
    pub async fn start(server_name: &str) -> anyhow::Result<Self> {
        Self::start_with(server_name, serde_json::json!({})).await
    }

    /// As [`Self::start`], with `extra` merged into the generated config (`_listeners`: more
    /// listeners).
    pub async fn start_with(server_name: &str, extra: serde_json::Value) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("mxcas-synapse-").tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.path().join("homeserver.yaml");
        let out = Command::new(python())
            .args(["-m", "synapse.app.homeserver", "--server-name", server_name, "--config-path"])
            .arg(&config)
            .args(["--generate-config", "--report-stats=no", "--data-directory"])
            .arg(dir.path())
            .current_dir(dir.path())
            .output()
            .context("cannot run Synapse's config generator (is SYNAPSE_PYTHON right?)")?;
        anyhow::ensure!(
            out.status.success(),
            "synapse --generate-config failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let appservice = dir.path().join("appservice.yaml");
        std::fs::write(&appservice, APPSERVICE)?;
        let out = Command::new(python())
            .args(["-c", PATCH])
            .arg(&config)
            .arg(port.to_string())
            .arg(&appservice)
            .arg(extra.to_string())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "patching homeserver.yaml failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut synapse = Self {
            child: None,
            dir,
            url: format!("http://127.0.0.1:{port}"),
            server_name: server_name.to_owned(),
            http: reqwest::Client::new(),
        };
        synapse.spawn().await?;
        Ok(synapse)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.path().join("synapse.out"))?;
        let child = Command::new(python())
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(self.dir.path().join("homeserver.yaml"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start Synapse")?;
        self.child = Some(child);
        let health = format!("{}/health", self.url);
        let http = self.http.clone();
        crate::wait_for("Synapse to answer /health", Duration::from_secs(90), || {
            let (http, health) = (http.clone(), health.clone());
            async move { http.get(&health).send().await.ok().filter(|r| r.status().is_success()) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.log()))?;
        Ok(())
    }

    /// The file of its ed25519 signing key (Synapse's format, as mxcas reads it too).
    pub fn signing_key_file(&self) -> anyhow::Result<PathBuf> {
        let config = std::fs::read_to_string(self.dir.path().join("homeserver.yaml"))?;
        let path = config
            .lines()
            .find_map(|l| l.strip_prefix("signing_key_path:"))
            .context("no signing_key_path in homeserver.yaml")?;
        Ok(PathBuf::from(path.trim().trim_matches(|c| c == '"' || c == '\'')))
    }

    /// The end of Synapse's output (for failures).
    pub fn log(&self) -> String {
        let tail = |file: &str, n: usize| {
            let text = std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(n).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        format!("{}\n--- homeserver.log ---\n{}", tail("synapse.out", 40), tail("homeserver.log", 60))
    }

    /// Registers `user` with `password` through Synapse's own `register_new_matrix_user`.
    pub fn register(&self, user: &str, password: &str) -> anyhow::Result<()> {
        let script = python().with_file_name("register_new_matrix_user");
        let out = Command::new(script)
            .arg("-c")
            .arg(self.dir.path().join("homeserver.yaml"))
            .args(["-u", user, "-p", password, "--no-admin"])
            .arg(&self.url)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "register_new_matrix_user {user} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Logs `user` in with a password; returns the access token.
    pub async fn login(&self, user: &str, password: &str) -> anyhow::Result<String> {
        let body = serde_json::json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": user },
            "password": password,
        });
        let resp = self.http.post(format!("{}/_matrix/client/v3/login", self.url)).json(&body).send().await?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await?;
        anyhow::ensure!(status.is_success(), "login of {user}: {status} {json}");
        json["access_token"].as_str().map(str::to_owned).context("login answer has no access_token")
    }

    /// A new guest account; returns its access token.
    pub async fn register_guest(&self) -> anyhow::Result<String> {
        let resp = self
            .http
            .post(format!("{}/_matrix/client/v3/register?kind=guest", self.url))
            .json(&serde_json::json!({}))
            .send()
            .await?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await?;
        anyhow::ensure!(status.is_success(), "guest registration: {status} {json}");
        json["access_token"].as_str().map(str::to_owned).context("no access_token")
    }

    /// Registers `localpart` as a user of the test application service (see [`AS_TOKEN`]).
    pub async fn register_appservice_user(&self, localpart: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .post(format!("{}/_matrix/client/v3/register", self.url))
            .bearer_auth(AS_TOKEN)
            .json(&serde_json::json!({ "type": "m.login.application_service", "username": localpart }))
            .send()
            .await?;
        let status = resp.status();
        anyhow::ensure!(status.is_success(), "appservice registration: {status} {}", resp.text().await?);
        Ok(())
    }

    /// Logs the session of `token` out.
    pub async fn logout(&self, token: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .post(format!("{}/_matrix/client/v3/logout", self.url))
            .bearer_auth(token)
            .json(&serde_json::json!({}))
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "logout: {}", resp.status());
        Ok(())
    }

    /// Stops Synapse (SIGKILL: a homeserver that is down).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        self.kill();
    }
}
