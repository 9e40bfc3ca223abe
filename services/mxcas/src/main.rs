//! The mxcas binary: wiring only.
//!
//! - `mxcas serve`: edge + one-node metadata cluster + local store in one process.
//! - `mxcas meta`: one node of a replicated metadata cluster.
//! - `mxcas edge`: a stateless edge in front of a metadata cluster and a blob store.
//! - `mxcas admin cluster …`: metadata cluster membership.
//! - `mxcas cid FILE…`: the CID mxcas gives each file (the same code as uploads).

#![forbid(unsafe_code)]

mod admin;
mod config;
mod meta_node;

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mxcas_edge::EdgeSettings;
use mxcas_meta::MetaClient;
use mxcas_meta::client::ClientConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

#[derive(Parser)]
#[command(name = "mxcas", version, about = "Content-addressed media repository for Matrix")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a complete single-node mxcas: the Matrix media API, the metadata service and a
    /// blob store (local directory unless `[store]` says otherwise).
    ///
    /// Settings come from the config file (`--config`, see docs/configuration.md), then from
    /// these flags or their environment variables. With no config at all it listens on
    /// 127.0.0.1:8008 as `localhost`, keeps data in ./mxcas-data and prints a development
    /// access token to upload with.
    Serve(ServeArgs),
    /// Run one node of the replicated metadata service (raft). Start every node, then
    /// `mxcas admin cluster init` once (see docs/operations/cluster.md).
    Meta(MetaArgs),
    /// Run a stateless edge: the Matrix media API in front of a metadata cluster (`[edge]
    /// meta`, `--meta`) and a blob store (`[store]`).
    Edge(ServeArgs),
    /// Administer a running cluster.
    Admin {
        /// A metadata node's gRPC address (host:port).
        #[arg(long, env = "MXCAS_META", global = true, default_value = "127.0.0.1:7100")]
        meta: String,
        /// Config file whose `[tls]` section to connect with (when the cluster uses TLS).
        #[arg(long, env = "MXCAS_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: AdminCmd,
    },
    /// Print the CID of each file, as mxcas (and IPFS with the unixfs-v1-2025 profile)
    /// computes it: `mxc://<server>/<cid>` is what an upload of that file returns.
    Cid {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Metadata cluster membership.
    #[command(subcommand)]
    Cluster(admin::ClusterCmd),
    /// Back up the metadata state, and restore it into a new cluster.
    #[command(subcommand)]
    Snapshot(admin::SnapshotCmd),
}

#[derive(clap::Args)]
struct MetaArgs {
    /// Config file (TOML): `data_dir` and `[meta]` apply.
    #[arg(long, env = "MXCAS_CONFIG")]
    config: Option<PathBuf>,
    /// This node's raft ID [default: 1].
    #[arg(long, env = "MXCAS_META_ID")]
    id: Option<u64>,
    /// gRPC address to listen on.
    #[arg(long, env = "MXCAS_META_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Address other nodes and edges reach this node at [default: the listen address].
    #[arg(long, env = "MXCAS_META_ADVERTISE")]
    advertise: Option<String>,
    /// Data directory [default: ./mxcas-data].
    #[arg(long, env = "MXCAS_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Config file (TOML).
    #[arg(long, env = "MXCAS_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the media API [default: 127.0.0.1:8008].
    #[arg(long, env = "MXCAS_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Address of /livez, /readyz and /metrics [default: 127.0.0.1:9008].
    #[arg(long, env = "MXCAS_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// Matrix server name used in mxc URIs [default: localhost].
    #[arg(long, env = "MXCAS_SERVER_NAME")]
    server_name: Option<String>,
    /// Data directory [default: ./mxcas-data].
    #[arg(long, env = "MXCAS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Access token to accept (as @dev:<server_name>) when the config lists none.
    #[arg(long, env = "MXCAS_DEV_TOKEN")]
    dev_token: Option<String>,
    /// `edge` only: metadata nodes, comma-separated host:port (overrides `[edge] meta`).
    #[arg(long, env = "MXCAS_META", value_delimiter = ',')]
    meta: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Cid { files } => cid(&files),
        Cmd::Serve(args) => run_server(serve(args, Role::Serve)),
        Cmd::Edge(args) => run_server(serve(args, Role::Edge)),
        Cmd::Meta(args) => run_server(meta(args)),
        Cmd::Admin { meta, config, command } => {
            // An offline import contacts no node: it needs no TLS material.
            let offline = matches!(command, AdminCmd::Snapshot(admin::SnapshotCmd::Import { .. }));
            let config = Config::load(config.as_deref())?;
            let tls = if offline { None } else { config.tls()? };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                match command {
                    AdminCmd::Cluster(cmd) => admin::run(&meta, tls.as_ref(), cmd).await,
                    AdminCmd::Snapshot(cmd) => admin::snapshot(&meta, tls.as_ref(), cmd).await,
                }
            })
        }
    }
}

fn run_server(f: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(f)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Serve,
    Edge,
}

async fn meta(args: MetaArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(v) = args.id {
        config.meta.node_id = v;
    }
    if let Some(v) = args.listen {
        config.meta.listen = v;
    }
    if let Some(v) = args.advertise {
        config.meta.advertise = Some(v);
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let node = meta_node::start(&config, cancel.clone(), &tracker).await?;
    tracing::info!(id = node.node.id, addr = %node.addr, "metadata node is serving");
    println!("mxcas: metadata node {} on {} (advertised as {})", node.node.id, node.addr, node.advertise);
    run_until_signal(cancel, tracker).await
}

/// Log filter when `RUST_LOG` is not set: mxcas's own lines at info, openraft's internals
/// (elections, replication progress) at warn. `RUST_LOG=info` shows everything.
const DEFAULT_LOG: &str = "info,openraft=warn";

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn cid(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut dag = mxcas_cas::DagBuilder::new();
        loop {
            let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            dag.update(&buf[..n]);
        }
        println!("{}  {}", dag.finish().root, path.display());
    }
    Ok(())
}

async fn serve(args: ServeArgs, role: Role) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.admin_listen {
        config.admin_listen = v;
    }
    if let Some(v) = args.server_name {
        config.server_name = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.dev_token {
        config.dev_token = Some(v);
    }
    if !args.meta.is_empty() {
        config.edge.meta = args.meta;
    }
    if role == Role::Edge && config.edge.meta.is_empty() {
        anyhow::bail!("an edge needs the metadata service: set [edge] meta = [\"host:port\", …] or --meta");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;

    let mut auth = config.auth.clone();
    // A development token only where nothing else checks tokens: with a homeserver, its
    // users' tokens are the only ones.
    let dev_token = if auth.load().map_err(anyhow::Error::msg)?.is_empty()
        && auth.homeserver_url.is_none()
        && config.tenants.is_empty()
    {
        let token = match config.dev_token.clone() {
            Some(t) => t,
            None => dev_token(&config.data_dir)?,
        };
        auth.tokens.insert(token.clone(), format!("@dev:{}", config.server_name));
        Some(token)
    } else {
        None
    };
    let settings = EdgeSettings {
        server_name: config.server_name.clone(),
        listen: config.listen,
        admin_listen: config.admin_listen,
        data_dir: config.data_dir.clone(),
        media: config.media.clone(),
        cache: config.cache.clone(),
        auth,
        store: config.store.clone(),
        sweeper: config.sweeper.clone(),
        http: config.http.clone(),
        thumbnails: config.thumbnails.clone(),
        tenants: config.tenants.clone(),
        federation: config.federation.clone(),
        ipfs: config.ipfs.clone(),
    };
    settings.validate().context("invalid configuration")?;

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    let endpoints = match role {
        Role::Edge => config.edge.meta.clone(),
        Role::Serve => {
            // The embedded metadata service: a one-node raft cluster, through the same code
            // (and the same gRPC API) as a replicated one.
            let node = meta_node::start(&config, cancel.clone(), &tracker).await?;
            let members = [(node.node.id, mxcas_meta::raft::BasicNode { addr: node.advertise.clone() })];
            node.node.initialize(members.into_iter().collect()).await?;
            node.node.wait_for_leader(Duration::from_secs(10)).await?;
            vec![node.advertise.clone()]
        }
    };
    let meta = MetaClient::new(&endpoints, ClientConfig { tls: config.tls()?, ..ClientConfig::default() })?;
    let edge = mxcas_edge::start(settings, meta, cancel.clone(), &tracker).await?;
    tracing::info!(api = %edge.api_addr, admin = %edge.admin_addr, meta = ?endpoints, "mxcas is serving");
    println!("mxcas: Matrix media API on http://{} (admin: http://{})", edge.api_addr, edge.admin_addr);
    if let Some(token) = dev_token {
        println!(
            "mxcas: no [auth] tokens configured; accepting development token {token} as @dev:{}",
            config.server_name
        );
        println!(
            "mxcas: try: curl -H 'Authorization: Bearer {token}' -H 'Content-Type: text/plain' --data-binary 'hello' 'http://{}/_matrix/media/v3/upload?filename=hello.txt'",
            edge.api_addr
        );
    }

    run_until_signal(cancel, tracker).await
}

/// Waits for SIGTERM or Ctrl-C, then stops every task (servers drain, raft shuts down)
/// within a grace period.
async fn run_until_signal(cancel: CancellationToken, tracker: TaskTracker) -> anyhow::Result<()> {
    shutdown_signal().await;
    tracing::info!("shutting down");
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(20), tracker.wait()).await.is_err() {
        tracing::warn!("tasks did not stop within 20s; exiting anyway");
    }
    Ok(())
}

/// The development token: kept in `<data_dir>/dev-token` so it survives restarts.
fn dev_token(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("dev-token");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let t = existing.trim().to_owned();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let token = format!("mxcas_dev_{}", uuid_like());
    std::fs::write(&path, &token).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

fn uuid_like() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    // Two independently seeded SipHash states: 128 unpredictable bits without another crate.
    let a = RandomState::new().build_hasher().finish();
    let mut h = RandomState::new().build_hasher();
    h.write_u64(a);
    format!("{a:016x}{:016x}", h.finish())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
