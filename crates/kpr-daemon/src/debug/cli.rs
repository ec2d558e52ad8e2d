//! `kube-proxy-rs explain`: where a packet goes on this node, and why.
//!
//! By default it asks the running proxy (`--server`, the metrics address); with `--manifests
//! DIR`, `--kubeconfig FILE`, `--master URL` or `--in-cluster` it computes offline what a node
//! would do, programming nothing (the other flags are the proxy's own: `--config`,
//! `--hostname-override`, `--cluster-cidr`, `--proxy-mode`, ...). Exit codes: 0 answered, 2 bad
//! input, 1 the proxy or the API server could not be reached.

use super::routes::{ExplainQuery, explain_in};
use super::{Hub, Static};
use kpr_config::{Flags, resolve};
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str =
    "usage: kube-proxy-rs explain --to IP:PORT [--from IP[:PORT]] [--proto tcp|udp|sctp] \
[--from-node] [--output text|json] [--server http://127.0.0.1:10249]
       offline: add --manifests DIR, --kubeconfig FILE, --master URL or --in-cluster, and any
       kube-proxy flag (--config, --hostname-override, --cluster-cidr, --proxy-mode, ...)";

/// The explain arguments, and the proxy flags left for the configuration.
#[derive(Debug, Default)]
struct Args {
    query: ExplainQuery,
    server: String,
    json: bool,
    in_cluster: bool,
    rest: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        server: "http://127.0.0.1:10249".into(),
        ..Args::default()
    };
    a.query.proto = "tcp".into();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{what} needs a value"))
        };
        match name.as_str() {
            "--from" => a.query.from = value("--from")?,
            "--to" => a.query.to = value("--to")?,
            "--proto" => a.query.proto = value("--proto")?,
            "--from-node" => a.query.from_node = true,
            "--output" | "-o" => {
                a.json = match value("--output")?.as_str() {
                    "json" => true,
                    "text" => false,
                    other => return Err(format!("--output: {other:?} is not text or json")),
                }
            }
            "--server" => a.server = value("--server")?,
            "--in-cluster" => a.in_cluster = true,
            "-h" | "--help" => return Err(String::new()),
            _ => a.rest.push(arg.clone()),
        }
    }
    if a.query.to.is_empty() {
        return Err("--to IP:PORT is required".into());
    }
    Ok(a)
}

/// Runs `kube-proxy-rs explain ARGS`.
/// What a node would know, computed offline from the proxy's own configuration (the daemon's
/// wiring supplies it: the state and the sync belong to the loop, not to this surface).
pub type Offline = dyn Fn(&kpr_config::ProxyConfig) -> Result<super::Snapshot, (u8, String)>;

pub fn explain(args: &[String], offline_state: &Offline) -> ExitCode {
    let a = match parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("explain: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let offline = a.in_cluster
        || a.rest.iter().any(|r| {
            ["--manifests", "--kubeconfig", "--master"]
                .iter()
                .any(|f| r.starts_with(f))
        });
    let result = if offline {
        offline_answer(&a, offline_state)
    } else {
        live_answer(&a)
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err((code, msg)) => {
            eprintln!("explain: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Asks the running proxy's `/debug/explain`.
fn live_answer(a: &Args) -> Result<String, (u8, String)> {
    let q = &a.query;
    let mut path = format!(
        "/debug/explain?to={}&proto={}&output={}",
        encode(&q.to),
        encode(&q.proto),
        if a.json { "json" } else { "text" }
    );
    if !q.from.is_empty() {
        path.push_str(&format!("&from={}", encode(&q.from)));
    }
    if q.from_node {
        path.push_str("&from_node=true");
    }
    let (status, body) = http_get(&a.server, &path)
        .map_err(|e| (1, format!("cannot ask the proxy at {}: {e}", a.server)))?;
    match status {
        200 => Ok(if a.json { format!("{body}\n") } else { body }),
        400 => {
            let msg = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(body);
            Err((2, msg))
        }
        _ => Err((1, format!("the proxy answered {status}: {body}"))),
    }
}

/// Computes offline: the objects from the source, the model, no kernel.
fn offline_answer(a: &Args, offline_state: &Offline) -> Result<String, (u8, String)> {
    let mut argv = vec!["kube-proxy-rs".to_owned()];
    argv.extend(a.rest.iter().cloned());
    let flags = Flags::try_parse_args(argv).map_err(|e| (2, e.to_string()))?;
    let resolved = resolve(&flags).map_err(|e| (2, e.to_string()))?;
    let proxy = &resolved.proxy;
    let snap = offline_state(proxy)?;
    let hub = Hub::new(Static {
        mode: proxy.mode.as_str(),
        masquerade_bit: proxy.masquerade_bit,
        node_ports: proxy.node_port_addresses.clone(),
        localhost_node_ports: proxy.localhost_node_ports,
        configz: serde_json::Value::Null,
    });
    let e = explain_in(&hub, &snap, &a.query).map_err(|e| (2, e))?;
    Ok(if a.json {
        format!("{}\n", serde_json::to_string_pretty(&e).unwrap_or_default())
    } else {
        e.to_string()
    })
}

/// Lists Services, EndpointSlices and this Node once from the API server.
pub fn list_from_api(
    proxy: &kpr_config::ProxyConfig,
    node: &str,
) -> Result<Vec<kpr_model::Input>, String> {
    use kpr_model::{Input, Update};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let connect = kpr_watch::api::Connect {
            kubeconfig: proxy.client.kubeconfig.clone(),
            master: proxy.client.master.clone(),
        };
        let client =
            kpr_watch::api::client(&connect, std::sync::Arc::new(kpr_watch::api::NoObserver))
                .await
                .map_err(|e| e.to_string())?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let source = tokio::spawn(kpr_watch::api::run(
            client,
            node.to_owned(),
            tx,
            shutdown,
            std::sync::Arc::new(kpr_watch::api::NoObserver),
        ));
        let mut inputs = Vec::new();
        let (mut services, mut slices, mut node_seen) = (false, false, false);
        let listed = tokio::time::timeout(Duration::from_secs(30), async {
            while !(services && slices && node_seen) {
                let Some(i) = rx.recv().await else { break };
                match &i {
                    Input::Services(Update::Keep(_) | Update::Replace(_)) => services = true,
                    Input::Slices(Update::Keep(_) | Update::Replace(_)) => slices = true,
                    Input::Node(_) => node_seen = true,
                    _ => {}
                }
                inputs.push(i);
            }
        })
        .await;
        // ServiceCIDRs (§4.8) are listed beside the others where the API server serves them;
        // where it does not, nothing comes: wait a moment, not more.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(i) = rx.recv().await {
                let done = matches!(i, Input::ServiceCidrs(Update::Keep(_)));
                inputs.push(i);
                if done {
                    break;
                }
            }
        })
        .await;
        let _ = stop.send(true);
        source.abort();
        listed.map_err(|_| "the API server did not list everything within 30 s".to_owned())?;
        Ok(inputs)
    })
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A minimal HTTP/1.1 GET (the metrics address is plain HTTP on this node): status and body.
pub fn http_get(server: &str, path: &str) -> std::io::Result<(u16, String)> {
    let authority = server
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&authority)?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_split_into_the_question_and_the_proxy_flags() {
        let args: Vec<String> = [
            "--to=172.30.0.1:80",
            "--from",
            "10.0.0.5",
            "--proto",
            "udp",
            "-o",
            "json",
            "--manifests",
            "/tmp/x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let a = parse_args(&args).unwrap_or_default();
        assert_eq!(a.query.to, "172.30.0.1:80");
        assert_eq!(a.query.from, "10.0.0.5");
        assert_eq!(a.query.proto, "udp");
        assert!(a.json);
        assert_eq!(a.rest, ["--manifests", "/tmp/x"]);
        assert!(parse_args(&["--from".into()]).is_err());
        assert!(parse_args(&["--to".into(), "x".into(), "-o".into(), "yaml".into()]).is_err());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\nab c\r\n3\r\ndef\r\n0\r\n\r\n"), "ab cdef");
        assert_eq!(encode("[::1]:80"), "%5B%3A%3A1%5D%3A80");
    }
}
