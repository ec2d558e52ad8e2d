//! healthCheckNodePort servers (§7.2): for each LoadBalancer Service with
//! externalTrafficPolicy=Local, an HTTP server on its healthCheckNodePort telling the load
//! balancer how many ready endpoints of the Service this node has (200 with the count, 503 with
//! none or when the proxy is unhealthy). Opened and closed after each successful sync; a port
//! that cannot be bound is tried again at the next sync. Served by [`crate::listen::serve`]
//! within [`Limits::health`].

use crate::listen::Limits;
use crate::server::Health;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// One Service's entry: namespace, name, local ready endpoint count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

#[derive(Debug)]
struct Running {
    /// The Service it answers for (namespace, name): a port that passes from a deleted
    /// Service to a new one in one sync keeps its listeners and changes only this, since
    /// binding it again before the old listeners are gone would fail.
    service: Arc<RwLock<(String, String)>>,
    count: Arc<AtomicUsize>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// The running servers, by port.
#[derive(Debug)]
pub struct ServiceHealth {
    health: Arc<Health>,
    limits: Limits,
    running: BTreeMap<u16, Running>,
    failed_logged: BTreeMap<u16, String>,
}

/// The body upstream sends: tab-indented, no trailing newline, namespace and name JSON-quoted.
pub fn body(namespace: &str, name: &str, count: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        json_string(namespace),
        json_string(name)
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl ServiceHealth {
    pub fn new(health: Arc<Health>) -> ServiceHealth {
        ServiceHealth::with_limits(health, Limits::health())
    }

    /// The same, serving within other limits.
    pub fn with_limits(health: Arc<Health>, limits: Limits) -> ServiceHealth {
        ServiceHealth {
            health,
            limits,
            running: BTreeMap::new(),
            failed_logged: BTreeMap::new(),
        }
    }

    /// Ports served now.
    pub fn ports(&self) -> Vec<u16> {
        self.running.keys().copied().collect()
    }

    /// Brings the servers in line with `wanted` (by port), bound to `addrs` (the node's
    /// NodePort addresses, or the unspecified address). Must run inside a tokio runtime.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, Wanted>, addrs: &[IpAddr]) {
        let stale: Vec<u16> = self
            .running
            .keys()
            .filter(|port| !wanted.contains_key(port))
            .copied()
            .collect();
        for port in stale {
            if let Some(r) = self.running.remove(&port) {
                for stop in r.stops {
                    let _ = stop.send(());
                }
                let (ns, name) = r.service.read().unwrap_or_else(|e| e.into_inner()).clone();
                tracing::debug!(port, service = %format!("{ns}/{name}"), "Closed healthCheckNodePort");
            }
        }
        for (port, w) in wanted {
            if let Some(r) = self.running.get(port) {
                let mut service = r.service.write().unwrap_or_else(|e| e.into_inner());
                if service.0 != w.namespace || service.1 != w.name {
                    tracing::debug!(port, service = %format!("{}/{}", w.namespace, w.name), "healthCheckNodePort passed to another Service");
                    *service = (w.namespace.clone(), w.name.clone());
                }
                r.count.store(w.local_endpoints, Ordering::Relaxed);
                continue;
            }
            match self.start(*port, w, addrs) {
                Ok(r) => {
                    self.failed_logged.remove(port);
                    self.running.insert(*port, r);
                }
                Err(e) => {
                    let svc = format!("{}/{}", w.namespace, w.name);
                    if self.failed_logged.get(port) != Some(&svc) {
                        tracing::warn!(port, service = %svc, "FailedToStartServiceHealthcheck: {e}; retrying at the next sync");
                        self.failed_logged.insert(*port, svc);
                    }
                }
            }
        }
    }

    fn start(&self, port: u16, w: &Wanted, addrs: &[IpAddr]) -> std::io::Result<Running> {
        let count = Arc::new(AtomicUsize::new(w.local_endpoints));
        let service = Arc::new(RwLock::new((w.namespace.clone(), w.name.clone())));
        let mut listeners = Vec::new();
        for ip in addrs {
            listeners.push(crate::listen::bind(SocketAddr::new(*ip, port))?);
        }
        let mut stops = Vec::new();
        for listener in listeners {
            let (service, count, health) = (service.clone(), count.clone(), self.health.clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let app = axum::Router::new().fallback(move || {
                let (ns, name) = service.read().unwrap_or_else(|e| e.into_inner()).clone();
                let (count, health) = (count.clone(), health.clone());
                async move { respond(&ns, &name, count.load(Ordering::Relaxed), &health) }
            });
            let stopped = async {
                let _ = stopped.await;
            };
            tokio::spawn(crate::listen::serve(
                listener,
                app,
                self.limits.clone(),
                stopped,
            ));
            stops.push(stop);
        }
        tracing::debug!(port, service = %format!("{}/{}", w.namespace, w.name), "Opened healthCheckNodePort");
        Ok(Running {
            service,
            count,
            stops,
        })
    }
}

fn respond(ns: &str, name: &str, count: usize, health: &Health) -> Response {
    let healthy = health.healthy(SystemTime::now());
    let status = if count > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut r = (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body(ns, name, count, healthy),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
        r.headers_mut()
            .insert("X-Load-Balancing-Endpoint-Weight", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_upstreams_bytes() {
        assert_eq!(
            body("ns", "web", 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        assert!(body("a\"b", "c\\d", 0, false).contains(r#""namespace": "a\"b","#));
    }

    fn get(port: u16) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// A healthCheckNodePort that passes from a deleted Service to a new one in one sync is
    /// served at once for the new one (binding it again right after stopping the old server
    /// failed until the next sync).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_port_passed_to_another_service_in_one_sync_keeps_serving() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let health = Health::new(crate::health::HealthModel::new(
            &["IPv4"],
            SystemTime::now(),
            std::time::Duration::from_secs(60),
        ));
        let mut servers = ServiceHealth::new(health);
        let addrs = ["127.0.0.1".parse().unwrap()];
        let wanted = |name: &str, n| {
            let w = Wanted {
                namespace: "ns".into(),
                name: name.into(),
                local_endpoints: n,
            };
            BTreeMap::from([(port, w)])
        };
        servers.sync(&wanted("old", 1), &addrs);
        let r = tokio::task::spawn_blocking(move || get(port))
            .await
            .unwrap();
        assert!(
            r.contains("\"old\"") && r.starts_with("HTTP/1.1 200"),
            "{r}"
        );
        servers.sync(&wanted("new", 2), &addrs);
        assert_eq!(servers.ports(), [port]);
        let r = tokio::task::spawn_blocking(move || get(port))
            .await
            .unwrap();
        assert!(
            r.contains("\"new\"") && r.contains("\"localEndpoints\": 2"),
            "{r}"
        );
        servers.sync(&BTreeMap::new(), &addrs);
        assert!(servers.ports().is_empty());
    }
}
