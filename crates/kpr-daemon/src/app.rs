//! Wiring: flags and configuration file in, then one of `--version`, `--write-config-to`,
//! `--dry-run` or the long-running sync loop. Exit codes follow upstream: 0 on success, 1 on a
//! configuration error (nothing is programmed then).

use crate::dataplane::{Dataplane, ruleset_text};
use crate::sync::{SyncConfig, SyncState};
use crate::{logging, report, sync};
use kpr_config::{DetectLocal, Flags, ProxyConfig, ProxyMode, Resolved, resolve, written_yaml};
use kpr_model::node::DetectLocalMode;
use std::path::Path;
use std::process::ExitCode;
use tokio::sync::{mpsc, watch};

/// Entry point of the binary.
pub fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("sandbox") => return sandbox(),
        Some("explain") => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            return crate::debug::cli::explain(&args, &offline_state);
        }
        Some("verify") => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            return crate::debug::verify::cli(&args);
        }
        Some("conntrack") => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            return crate::debug::conntrack::conntrack(&args);
        }
        Some("completions") => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            return crate::commands::completions(&args);
        }
        Some("man") => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            return crate::commands::man(&args);
        }
        _ => {}
    }
    let flags = match Flags::try_parse_args(std::env::args_os()) {
        Ok(f) => f,
        Err(e) => {
            let usage_error = e.use_stderr();
            let _ = e.print();
            return if usage_error {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if flags.wants_version() {
        println!("{}", Flags::version_string());
        return ExitCode::SUCCESS;
    }
    let resolved = match resolve(&flags) {
        Ok(r) => r,
        Err(e) => {
            logging::init(0);
            tracing::error!("Invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    logging::init_with(&resolved.proxy.logging);
    for w in &resolved.warnings {
        tracing::warn!("{w}");
    }
    match run(&resolved) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `kube-proxy-rs sandbox` (see `crate::sandbox`): exit 0 only when traffic reached every pod.
fn sandbox() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("sandbox: cannot find this program's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    match crate::sandbox::run(&exe) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sandbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `explain`'s offline answer: the objects from `--manifests` or listed once from the API
/// server, folded into a sync state and synced once, programming nothing.
fn offline_state(proxy: &ProxyConfig) -> Result<crate::debug::Snapshot, (u8, String)> {
    let cfg = sync_config(proxy).map_err(|e| (2, format!("{e:#}")))?;
    let mut state = SyncState::new(cfg.clone());
    let inputs = match &proxy.manifests {
        Some(dir) => {
            let (snapshot, problems) =
                kpr_watch::load_dir(dir).map_err(|e| (1, format!("{}: {e}", dir.display())))?;
            for p in problems {
                eprintln!("explain: {p}");
            }
            snapshot.into_inputs()
        }
        None => crate::debug::cli::list_from_api(proxy, &cfg.node_name).map_err(|e| (1, e))?,
    };
    for input in inputs {
        state.record(input);
    }
    state.sync();
    Ok(state.debug_snapshot(0))
}

/// Makes the calling thread `SCHED_IDLE`: the smallest CPU share (it still gets one on a
/// saturated node, so a scrape is slower there, not refused), and a waking sync loop preempts
/// it at once, where a niced thread keeps the CPU for the rest of its slice (measured: a
/// reader without pause moved the loop's p99 from 1.3 to 3.5 ms at 1,000 x 10 at nice 10, not
/// at all at idle). For the metrics and debug server and its blocking threads.
fn idle_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
        tracing::debug!("Could not lower a metrics server thread to SCHED_IDLE: {e:?}");
    }
}

/// Raises the soft limit on open files to the hard one, as Go programs (upstream) do at start:
/// the servers' connection cap is a share of it (`kpr_ops::listen`), and the common soft
/// limit of 1,024 would leave them 256 connections.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!("Could not raise the open-files limit: {e}");
        }
    }
}

fn run(resolved: &Resolved) -> anyhow::Result<()> {
    let proxy = &resolved.proxy;
    if let Some(path) = &proxy.write_config_to {
        // Upstream's document: the platform defaults applied, the mode's block only.
        std::fs::write(path, written_yaml(&resolved.file_config))
            .map_err(|e| anyhow::anyhow!("writing the configuration to {}: {e}", path.display()))?;
        tracing::info!(file = %path.display(), "Wrote configuration");
        return Ok(());
    }
    if proxy.cleanup {
        return cleanup(&crate::socket_lb::pin_dir(&proxy.socket_lb));
    }
    let cfg = sync_config(proxy)?;
    crate::socket_lb::check_built(&proxy.socket_lb, kpr_socklb::built_with_bpf())
        .map_err(anyhow::Error::msg)?;
    raise_fd_limit();
    let source = match proxy.manifests.as_deref() {
        Some(dir) => {
            tracing::info!(node = %cfg.node_name, mode = proxy.mode.as_str(), manifests = %dir.display(), "Starting kube-proxy-rs");
            if proxy.dry_run {
                return dry_run(cfg, dir, proxy);
            }
            Source::Manifests(dir.to_owned())
        }
        None if proxy.dry_run => {
            anyhow::bail!("--dry-run reads its objects from --manifests DIR")
        }
        None => {
            tracing::info!(node = %cfg.node_name, mode = proxy.mode.as_str(), "Starting kube-proxy-rs, watching the API server");
            Source::Api(kpr_watch::api::Connect {
                kubeconfig: proxy.client.kubeconfig.clone(),
                master: proxy.client.master.clone(),
            })
        }
    };
    let metrics = std::sync::Arc::new(kpr_ops::metrics::Metrics::for_mode(
        proxy.mode == ProxyMode::Iptables,
    )?);
    let health = kpr_ops::server::Health::with_metrics(
        kpr_ops::health::HealthModel::new(
            &["IPv4", "IPv6"],
            std::time::SystemTime::now(),
            cfg.sync_period * 2,
        ),
        &metrics,
    );
    let hub = crate::debug::Hub::new(crate::debug::Static {
        mode: proxy.mode.as_str(),
        masquerade_bit: proxy.masquerade_bit,
        node_ports: proxy.node_port_addresses.clone(),
        localhost_node_ports: proxy.localhost_node_ports,
        configz: serde_json::to_value(&resolved.file_config).unwrap_or_default(),
    });
    hub.set_health(health.clone());
    let mut state = SyncState::new(cfg)
        .with_debug(hub.clone())
        .with_health(health.clone())
        .with_metrics(metrics.clone())
        .with_service_health(
            kpr_ops::service_health::ServiceHealth::new(health.clone()),
            proxy.node_port_addresses.clone(),
        );
    let netlink = || -> anyhow::Result<Box<dyn kpr_nft::Executor + Send>> {
        // nf_tables netlink directly: no `nft` process and no cache fill per sync.
        Ok(Box::new(kpr_nft::Netlink::open().map_err(|e| {
            anyhow::anyhow!("cannot open an nf_tables netlink socket (needs CAP_NET_ADMIN): {e}")
        })?))
    };
    let plane = match proxy.mode {
        ProxyMode::Nftables => {
            let mut exec = netlink()?;
            // Switching from upstream's nftables mode, or from either iptables mode (§2.1
            // step 4): their rules go.
            Dataplane::remove_nft_tables(exec.as_mut(), "kube-proxy");
            Dataplane::remove_iptables_rules();
            set_conntrack_sysctls(proxy);
            Dataplane::new(
                exec,
                proxy.masquerade_bit,
                proxy.node_port_addresses.clone(),
            )
            .with_socket_lb(crate::socket_lb::setup(&proxy.socket_lb, proxy.mode).map(
                |(lb, cgroup)| {
                    hub.set_socket_lb(cgroup.display().to_string());
                    lb
                },
            ))
        }
        ProxyMode::Iptables => {
            let variant = kpr_dataplane::iptables::exec::detect();
            tracing::info!(
                backend = variant.as_str(),
                "Using iptables-{}",
                variant.as_str()
            );
            // Switching from either nftables mode (§2.1 step 4, T2.4.1).
            let mut exec = netlink()?;
            Dataplane::remove_nft_tables(exec.as_mut(), "kube-proxy");
            Dataplane::remove_nft_tables(exec.as_mut(), kpr_dataplane::nftables::layout::TABLE);
            set_conntrack_sysctls(proxy);
            let localhost = proxy.localhost_node_ports
                && proxy.node_port_addresses == kpr_config::NodePortAddresses::Default;
            if localhost {
                // Localhost NodePorts need martian 127/8 destinations routed (§4.4).
                match std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1") {
                    Ok(()) => tracing::info!(
                        "Set net.ipv4.conf.all.route_localnet=1 for localhost NodePorts"
                    ),
                    Err(e) => tracing::warn!("Could not set route_localnet: {e}"),
                }
            }
            let liberal =
                std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
                    .is_ok_and(|v| v.trim() != "0");
            let settings = crate::dataplane::IptSettings {
                tools: kpr_dataplane::iptables::exec::Tools::new(variant),
                localhost_node_ports: proxy.localhost_node_ports,
                drop_invalid: !liberal,
            };
            hub.set_iptables(crate::debug::verify::IptHost {
                tools: settings.tools,
                drop_invalid: settings.drop_invalid,
            });
            // Socket-lb is for the nftables mode: what an earlier run attached goes.
            crate::socket_lb::setup(&proxy.socket_lb, proxy.mode);
            let nl = (variant == kpr_dataplane::iptables::exec::Variant::Nft).then_some(exec);
            Dataplane::iptables(
                settings,
                nl,
                proxy.masquerade_bit,
                proxy.node_port_addresses.clone(),
            )
        }
    };
    state = state.with_dataplane(plane);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let config_file = proxy.config_path.clone();
    rt.block_on(async {
        if let Some(addr) = proxy.healthz_bind_address {
            tokio::spawn(serve_retrying(addr, "/healthz and /livez", move |l| {
                kpr_ops::server::serve(l, health.clone(), std::future::pending())
            }));
        }
        if let Some(addr) = proxy.metrics_bind_address {
            let mode = proxy.mode.as_str();
            // A thread and runtime of its own: scrapes and debug readers (a streamed listing of
            // 10,000 service ports, explain) never take the sync loop's thread.
            let spawned = std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || {
                    // Below the sync loop's priority, it and the blocking threads its readers'
                    // heavy work runs on (explain, kernel readings, /debug/services, the page):
                    // the loop never waits for them (`idle_priority`).
                    idle_priority();
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .on_thread_start(idle_priority)
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!("Cannot start the metrics server's runtime: {e}");
                            return;
                        }
                    };
                    rt.block_on(serve_retrying(addr, "/metrics", move |l| {
                        kpr_ops::server::serve_metrics(
                            l,
                            metrics.clone(),
                            mode,
                            crate::debug::routes::router(hub.clone()),
                            std::future::pending(),
                        )
                    }));
                });
            if let Err(e) = spawned {
                tracing::error!("Cannot start the metrics server's thread: {e}");
            }
        }
        match config_file {
            Some(path) => tokio::select! {
                r = serve(state, source) => r,
                e = watch_config_file(path) => Err(e),
            },
            None => serve(state, source).await,
        }
    })
}

/// The conntrack sysctls of the configuration (§6.1, startup step 7); each failure is a
/// warning, as upstream.
fn set_conntrack_sysctls(proxy: &ProxyConfig) {
    let c = &proxy.conntrack;
    let settings = kpr_conntrack::sysctl::Settings {
        max_per_core: c.max_per_core,
        min: c.min,
        tcp_established_timeout: c.tcp_established_timeout,
        tcp_close_wait_timeout: c.tcp_close_wait_timeout,
        tcp_be_liberal: c.tcp_be_liberal,
        udp_timeout: c.udp_timeout,
        udp_stream_timeout: c.udp_stream_timeout,
    };
    // Asking ctnetlink loads nf_conntrack if nothing has yet, so its sysctls exist.
    let _ = kpr_conntrack::netlink::list(kpr_conntrack::netlink::Family::V4);
    for (w, result) in kpr_conntrack::sysctl::apply(&settings) {
        match result {
            Ok(()) => tracing::info!(path = %w.path, value = %w.value, "Set conntrack sysctl"),
            Err(e) => {
                tracing::warn!(path = %w.path, value = %w.value, "Conntrack sysctl not set: {e}")
            }
        }
    }
}

/// `--cleanup` (§2.4): removes our nftables tables, upstream kube-proxy's nftables tables,
/// the iptables chains and jumps of either's iptables mode (iptables-nft and -legacy) and the
/// socket-lb programs and maps pinned in `socket_lb_pins`, then exits; non-zero if any step
/// failed.
fn cleanup(socket_lb_pins: &Path) -> anyhow::Result<()> {
    let exec = kpr_nft::Netlink::open().map_err(|e| {
        anyhow::anyhow!("cannot open an nf_tables netlink socket (needs CAP_NET_ADMIN): {e}")
    })?;
    let mut exec: Box<dyn kpr_nft::Executor> = Box::new(exec);
    let ours = Dataplane::remove_nft_tables(exec.as_mut(), kpr_dataplane::nftables::layout::TABLE);
    let theirs = Dataplane::remove_nft_tables(exec.as_mut(), "kube-proxy");
    let iptables = Dataplane::remove_iptables_rules();
    let socket_lb = crate::socket_lb::remove(socket_lb_pins);
    if ours && theirs && iptables && socket_lb {
        tracing::info!("Removed every rule of kube-proxy-rs and of upstream kube-proxy");
        Ok(())
    } else {
        anyhow::bail!("--cleanup left some rules in place (see the lines above)")
    }
}

/// Exits (with upstream's message) when the `--config` file is written or renamed, so the
/// supervisor restarts the process with the new file (§2.3). Polls once a second.
async fn watch_config_file(path: std::path::PathBuf) -> anyhow::Error {
    let read = |p: &Path| std::fs::read(p).ok();
    let first = read(&path);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if read(&path) != first {
            return anyhow::anyhow!(
                "content of the proxy server's configuration file was updated: {}",
                path.display()
            );
        }
    }
}

/// `--dry-run`: read the directory once, compute, print the report, exit.
fn dry_run(cfg: SyncConfig, dir: &Path, proxy: &ProxyConfig) -> anyhow::Result<()> {
    let (snapshot, problems) = kpr_watch::load_dir(dir)?;
    for p in &problems {
        tracing::warn!("{p}");
    }
    let node = cfg.node_name.clone();
    let mut state = SyncState::new(cfg.clone());
    for input in snapshot.into_inputs() {
        state.record(input);
    }
    state.sync();
    println!(
        "# kube-proxy-rs --dry-run: node {node}, mode {}, from {}",
        proxy.mode.as_str(),
        dir.display()
    );
    println!("# the desired state per service port (nothing is programmed)\n");
    print!("{}", report::render(state.desired()));
    if proxy.mode == ProxyMode::Nftables {
        let ctx = state.node_context();
        println!("# the nftables ruleset this produces (as `nft list table` shows it)\n");
        print!(
            "{}",
            ruleset_text(
                state.desired(),
                proxy.masquerade_bit,
                &proxy.node_port_addresses,
                &ctx
            )
        );
    } else {
        let ctx = state.node_context();
        println!("# the iptables-restore input this produces (a full sync, per family)\n");
        print!(
            "{}",
            crate::dataplane::iptables_text(
                state.desired(),
                proxy.masquerade_bit,
                &proxy.node_port_addresses,
                proxy.localhost_node_ports,
                &ctx
            )
        );
    }
    Ok(())
}

/// Serves `what` on `addr` with `serve_on`; a port that cannot be bound is retried every 5 s
/// (logged once), as upstream does without bindAddressHardFail (§2.3).
async fn serve_retrying<F, Fut>(addr: std::net::SocketAddr, what: &str, serve_on: F)
where
    F: Fn(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    let mut logged = false;
    loop {
        match kpr_ops::listen::bind(addr) {
            Ok(listener) => {
                tracing::info!(address = %addr, "Serving {what}");
                if let Err(e) = serve_on(listener).await {
                    tracing::warn!(address = %addr, "{what} server stopped: {e}");
                }
            }
            Err(e) if !logged => {
                tracing::warn!(address = %addr, "Cannot serve {what} yet, retrying every 5 s: {e}");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
}

/// Where Services, EndpointSlices and the Node come from.
#[derive(Debug)]
enum Source {
    Manifests(std::path::PathBuf),
    Api(kpr_watch::api::Connect),
}

/// The API source's requests and watch outages, into the metrics (§8: client-go's
/// `rest_client_*`, and kube-proxy-rs's `kpr_watch_*`).
#[derive(Debug)]
struct ApiMetrics(std::sync::Arc<kpr_ops::metrics::Metrics>);

impl kpr_watch::api::Observer for ApiMetrics {
    fn request(&self, method: &str, host: &str, code: Option<u16>, elapsed: std::time::Duration) {
        self.0.observe_request(method, host, code, elapsed);
    }
    fn watch(&self, resource: &str, up: bool) {
        self.0.observe_watch(resource, up);
    }
}

/// The long-running mode: follow the source, sync on changes, stop on SIGTERM/SIGINT.
async fn serve(state: SyncState, source: Source) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(1024);
    let (stop, shutdown) = watch::channel(false);
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let node = state.node_name().to_owned();
    let source = match source {
        Source::Manifests(dir) => {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                kpr_watch::run(dir, tx, shutdown, kpr_watch::DEFAULT_POLL_INTERVAL)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Source::Api(connect) => {
            let observer: std::sync::Arc<dyn kpr_watch::api::Observer> = match state.metrics() {
                Some(m) => std::sync::Arc::new(ApiMetrics(m.clone())),
                None => std::sync::Arc::new(kpr_watch::api::NoObserver),
            };
            let client = kpr_watch::api::client(&connect, observer.clone()).await?;
            // The Node event `Starting` (§2.1 step 10.6, §2.4): sent once, beside the watches,
            // never waited for; a refusal is only logged.
            let birth_cry = kpr_watch::api::event::starting(
                &node,
                &os_hostname().unwrap_or_default(),
                std::time::SystemTime::now(),
            );
            tokio::spawn(kpr_watch::api::event::record(client.clone(), birth_cry));
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                kpr_watch::api::run(client, node, tx, shutdown, observer).await;
                Ok(())
            })
        }
    };
    let looper = tokio::spawn(sync::run(state, rx, shutdown, reports_tx));
    let drain = tokio::spawn(async move { while reports.recv().await.is_some() {} });
    let mut looper = std::pin::pin!(looper);
    let state = tokio::select! {
        r = wait_for_signal() => {
            r?;
            tracing::info!("Shutting down");
            let _ = stop.send(true);
            (&mut looper).await?
        }
        // The loop stops by itself only when the process must exit (§2.3).
        state = &mut looper => state?,
    };
    let _ = stop.send(true);
    source.await??;
    let _ = drain.await;
    match state.exit_reason() {
        Some(reason) => anyhow::bail!("{reason}"),
        None => Ok(()),
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

/// The sync loop's settings from the configuration (§2.2 node name, §4.10 detection).
pub(crate) fn sync_config(proxy: &ProxyConfig) -> anyhow::Result<SyncConfig> {
    let node_name = match &proxy.hostname_override {
        Some(n) => n.clone(),
        None => match std::env::var("NODE_NAME")
            .ok()
            .map(|n| n.trim().to_lowercase())
            .filter(|n| !n.is_empty())
        {
            Some(n) => n,
            None => hostname()?,
        },
    };
    let detect_local = match &proxy.detect_local {
        DetectLocal::ClusterCidr => DetectLocalMode::ClusterCidr(proxy.cluster_cidrs.clone()),
        DetectLocal::NodeCidr => DetectLocalMode::NodeCidr,
        DetectLocal::BridgeInterface(b) => DetectLocalMode::BridgeInterface(b.clone()),
        DetectLocal::InterfaceNamePrefix(p) => DetectLocalMode::InterfaceNamePrefix(p.clone()),
    };
    Ok(SyncConfig {
        node_name,
        masquerade_all: proxy.masquerade_all,
        detect_local,
        bind_address: Some(proxy.bind_address),
        min_sync_period: proxy.min_sync_period,
        sync_period: proxy.sync_period,
        wait_for_node: proxy.manifests.is_none(),
    })
}

/// The OS hostname, lower-cased (upstream's fallback node name).
fn hostname() -> anyhow::Result<String> {
    let raw = os_hostname()
        .map_err(|e| anyhow::anyhow!("reading the hostname: {e}; set --hostname-override"))?;
    let name = raw.to_lowercase();
    anyhow::ensure!(
        !name.is_empty(),
        "the hostname is empty; set --hostname-override"
    );
    Ok(name)
}

/// The OS hostname as it is (Go's `os.Hostname`: the events' `reportingInstance`).
fn os_hostname() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_owned())
}
