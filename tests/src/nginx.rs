//! A real nginx (Debian's `nginx`) on loopback as the reverse proxy operators put in front of
//! a homeserver and mxcas: the media prefixes go to mxcas, everything else to the homeserver,
//! with the settings `docs/deploy/homeserver.md` recommends. It runs as the current user in
//! the foreground (`daemon off`, `master_process off`) with its prefix, pid file, temp paths
//! and logs in its own temp dir, so nothing root-owned is touched and it dies with the test.
//! `NGINX_BIN` names the binary (`scripts/test.sh` installs it), else `/usr/sbin/nginx`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::wait_for;

pub struct Nginx {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`: what a client is given as its homeserver URL.
    pub url: String,
}

fn nginx_bin() -> PathBuf {
    crate::required_program("NGINX_BIN", Some(PathBuf::from("/usr/sbin/nginx")))
}

/// `host:port` of an `http://host:port` base URL, as an `upstream` block's `server` wants it.
fn upstream_server(url: &str) -> anyhow::Result<&str> {
    let hostport = url.strip_prefix("http://").with_context(|| format!("not an http:// URL: {url}"))?;
    anyhow::ensure!(!hostport.is_empty() && !hostport.contains('/'), "not a base URL: {url}");
    Ok(hostport)
}

/// What every config here starts with: foreground, one worker, and every path nginx writes
/// moved into `dir`; it leaves the `http` block open.
fn preamble(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format mxcas '$request_method $request_uri -> $status $upstream_addr '
                     'in=$request_length out=$bytes_sent rt=$request_time';
    access_log {d}/access.log mxcas;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
"#
    )
}

/// The proxy rules of `docs/deploy/homeserver.md` (without TLS), with every path nginx
/// writes moved into `dir`.
fn config(dir: &Path, port: u16, media: &[&str], homeserver: &str) -> anyhow::Result<String> {
    let media_servers = media
        .iter()
        .map(|url| upstream_server(url).map(|s| format!("server {s};")))
        .collect::<anyhow::Result<Vec<_>>>()?
        .join(" ");
    Ok(format!(
        r#"{preamble}
    upstream mxcas   {{ {media_servers} keepalive 16; }}
    upstream synapse {{ server {homeserver}; keepalive 16; }}

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        client_max_body_size 100m;

        location ~ ^/_matrix/(media|client/v1/media|federation/v1/media)/ {{
            proxy_pass http://mxcas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
        location / {{
            proxy_pass http://synapse;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}
}}
"#,
        preamble = preamble(dir),
        homeserver = upstream_server(homeserver)?,
    ))
}

/// A TLS front on `port` for everything to `upstream` (`http://host:port`), with the original
/// `Host` (port included, as a Matrix server name has it) passed on; with `media`, the media
/// prefixes and the IPFS gateway's `/ipfs/` go there instead.
fn tls_config(
    dir: &Path,
    port: u16,
    upstream: &str,
    media: Option<&str>,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<String> {
    let media = match media {
        Some(url) => format!(
            r#"        location ~ ^/(ipfs/|_matrix/(media|client/v1/media|federation/v1/media)/) {{
            proxy_pass http://{};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
        }}
"#,
            upstream_server(url)?
        ),
        None => String::new(),
    };
    Ok(format!(
        r#"{preamble}    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
{media}        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
        }}
    }}
}}
"#,
        preamble = preamble(dir),
        upstream = upstream_server(upstream)?,
        cert = cert.display(),
        key = key.display(),
    ))
}

impl Nginx {
    /// Starts nginx terminating TLS on `port` (chosen by the caller, who may need it in a
    /// server name first) in front of `upstream`, with `cert` and `key` (PEM).
    pub async fn start_tls(port: u16, upstream: &str, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        Self::start_tls_split(port, upstream, None, cert, key).await
    }

    /// [`Self::start_tls`], with the media prefixes and `/ipfs/` sent to `media` if given: a
    /// homeserver's federation port with mxcas as its media repository.
    pub async fn start_tls_split(
        port: u16,
        upstream: &str,
        media: Option<&str>,
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("mxcas-nginx-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        std::fs::write(dir.path().join("nginx.conf"), tls_config(dir.path(), port, upstream, media, cert, key)?)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = spawn(dir.path(), addr).await.map_err(|e| anyhow::anyhow!("{e}\n{}", logs(dir.path())))?;
        Ok(Self { child: Some(child), dir, addr, url: format!("https://{addr}") })
    }

    /// Starts nginx in front of `media` (the mxcas edges, `http://host:port` each, all behind
    /// one upstream) and `homeserver` (likewise), and waits until it accepts connections.
    pub async fn start(media: &[&str], homeserver: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(!media.is_empty(), "nginx needs at least one mxcas upstream");
        let dir = tempfile::Builder::new().prefix("mxcas-nginx-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        // The OS picks the port and it is released for nginx to bind, so another process can
        // take it in between: then try again on a new one.
        let mut last_err = None;
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            std::fs::write(dir.path().join("nginx.conf"), config(dir.path(), port, media, homeserver)?)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match spawn(dir.path(), addr).await {
                Ok(child) => return Ok(Self { child: Some(child), dir, addr, url: format!("http://{addr}") }),
                Err(e) => {
                    let in_use = read(dir.path(), "error.log").contains("Address already in use");
                    let e = anyhow::anyhow!("{e}\n{}", logs(dir.path()));
                    if !in_use {
                        return Err(e);
                    }
                    last_err = Some(e);
                    std::fs::remove_file(dir.path().join("error.log"))?;
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("nginx found no free port")))
    }

    /// What nginx printed, its error log and the end of its access log (a line a request:
    /// method, raw URI, status, the upstream that answered), for failures.
    pub fn log(&self) -> String {
        logs(self.dir.path())
    }

    /// Every request nginx has logged so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        read(self.dir.path(), "access.log").lines().filter_map(Request::parse).collect()
    }
}

/// One line of the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// As the client sent it, query included.
    pub uri: String,
    pub status: u16,
    /// `host:port` of the upstream that answered (`-` when nginx answered itself; a list when
    /// it tried more than one).
    pub upstream: String,
}

impl Request {
    /// Parses the `mxcas` log format: `METHOD URI -> STATUS UPSTREAM in=… out=… rt=…`.
    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let (method, uri) = (words.next()?.to_owned(), words.next()?.to_owned());
        if words.next()? != "->" {
            return None;
        }
        let status = words.next()?.parse().ok()?;
        let upstream = words.take_while(|w| !w.starts_with("in=")).collect::<Vec<_>>().join(" ");
        Some(Self { method, uri, status, upstream })
    }
}

async fn spawn(dir: &Path, addr: SocketAddr) -> anyhow::Result<Child> {
    let out = std::fs::File::create(dir.join("nginx.out"))?;
    match std::fs::remove_file(dir.join("nginx.pid")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    // `-e`: the compiled-in error log (under /var/log/nginx) is opened before the config is
    // read, so it has to be replaced on the command line.
    let mut child = Command::new(nginx_bin())
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("cannot start nginx (is NGINX_BIN right? scripts/test.sh installs it)")?;
    // nginx writes its pid file once its sockets are bound. A connection alone proves
    // nothing: while nginx retries a taken port (for 2.5 s), the port's owner answers.
    let pid = child.id().to_string();
    let up = wait_for("nginx to accept connections", Duration::from_secs(10), || {
        let exited = child.try_wait().ok().flatten();
        let connected = exited.is_none()
            && read(dir, "nginx.pid").trim() == pid
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
        async move {
            match exited {
                Some(status) => Some(Err(anyhow::anyhow!("nginx exited at start-up ({status})"))),
                None => connected.then_some(Ok(())),
            }
        }
    })
    .await
    .and_then(|r| r);
    if let Err(e) = up {
        stop(&mut child);
        return Err(e);
    }
    Ok(child)
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

fn logs(dir: &Path) -> String {
    let access = read(dir, "access.log");
    let tail: Vec<&str> = access.lines().rev().take(60).collect();
    format!(
        "--- nginx output ---\n{}--- nginx error.log ---\n{}--- nginx access.log (last 60) ---\n{}\n",
        read(dir, "nginx.out"),
        read(dir, "error.log"),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// SIGTERM (nginx's fast shutdown), then SIGKILL after a second.
fn stop(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
        if std::thread::panicking() {
            eprintln!("==== nginx logs ====\n{}", self.log());
        }
    }
}
