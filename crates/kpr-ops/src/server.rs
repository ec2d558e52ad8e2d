//! The `/healthz` and `/livez` server (§7.1): any method; other paths 404; upstream's headers.
//! It reads the shared [`Health`], which the sync loop updates. Both servers here run on
//! [`crate::listen::serve`] (connection cap, timeouts, size limits).

use crate::health::{HealthModel, Probe};
use crate::listen::Limits;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// What the health server reports, shared with the sync loop.
#[derive(Debug)]
pub struct Health {
    model: Mutex<HealthModel>,
    node_eligible: AtomicBool,
    /// Responses served: `[healthz 200, healthz 503, livez 200, livez 503]`.
    served: [AtomicU64; 4],
    /// `kubeproxy_proxy_healthz_total` and `kubeproxy_proxy_livez_total`, when exported.
    counters: Option<(prometheus::IntCounterVec, prometheus::IntCounterVec)>,
}

impl Health {
    pub fn new(model: HealthModel) -> Arc<Health> {
        Arc::new(Health {
            model: Mutex::new(model),
            node_eligible: AtomicBool::new(false),
            served: Default::default(),
            counters: None,
        })
    }

    /// The same, counting responses into the metrics' healthz and livez counters.
    pub fn with_metrics(model: HealthModel, metrics: &crate::metrics::Metrics) -> Arc<Health> {
        Arc::new(Health {
            model: Mutex::new(model),
            node_eligible: AtomicBool::new(false),
            served: Default::default(),
            counters: Some((metrics.healthz_total.clone(), metrics.livez_total.clone())),
        })
    }

    /// Changes the model (a queued change, a successful sync).
    pub fn update(&self, f: impl FnOnce(&mut HealthModel)) {
        f(&mut self.model.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Whether this node should get load-balancer traffic: its Node exists and is not being
    /// deleted or drained by the cluster autoscaler.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Relaxed);
    }

    /// The proxy is healthy now (the `/livez` rule).
    pub fn healthy(&self, now: SystemTime) -> bool {
        self.model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .healthy(now)
    }

    /// Responses served so far, by endpoint and code.
    pub fn served(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.served[i].load(Ordering::Relaxed))
    }

    fn respond(&self, healthz: bool) -> Response {
        let probe = if healthz {
            Probe::Healthz {
                node_eligible: self.node_eligible.load(Ordering::Relaxed),
            }
        } else {
            Probe::Livez
        };
        let (code, body) = self
            .model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .response(probe, SystemTime::now());
        let slot = usize::from(!healthz) * 2 + usize::from(code != 200);
        self.served[slot].fetch_add(1, Ordering::Relaxed);
        if let Some((healthz_total, livez_total)) = &self.counters {
            let c = if healthz { healthz_total } else { livez_total };
            c.with_label_values(&[&code.to_string()]).inc();
        }
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        (
            status,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            body,
        )
            .into_response()
    }
}

/// Serves `/healthz` and `/livez` on `listener` until `shutdown` resolves, within
/// [`Limits::health`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, health, Limits::health(), shutdown).await
}

/// [`serve`] within other limits.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (h1, h2) = (health.clone(), health);
    let app = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::any(move || async move { h1.respond(true) }),
        )
        .route(
            "/livez",
            axum::routing::any(move || async move { h2.respond(false) }),
        )
        .fallback(|| async { StatusCode::NOT_FOUND });
    crate::listen::serve(listener, app, limits, shutdown).await
}

/// Serves the metrics server's paths (§8) on `listener` until `shutdown` resolves, within
/// [`Limits::metrics`]:
/// `/metrics`, `/healthz` (always `ok`) and `/proxyMode`, and the routes of `extra` (the
/// daemon's debug surface).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<crate::metrics::Metrics>,
    proxy_mode: &'static str,
    extra: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = extra
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.text(),
                )
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/proxyMode",
            axum::routing::get(move || async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    proxy_mode,
                )
            }),
        )
        .fallback(|| async { StatusCode::NOT_FOUND });
    crate::listen::serve(listener, app, Limits::metrics(), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::unwrap_used)]
    async fn paths_methods_headers_and_counters() {
        let model = HealthModel::new(&["IPv4"], SystemTime::now(), Duration::from_secs(60));
        let health = Health::new(model);
        health.set_node_eligible(true);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, health.clone(), async {
            let _ = stopped.await;
        }));
        let ok = get(addr, "GET", "/healthz").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.to_lowercase().contains("content-type: application/json"));
        assert!(
            ok.to_lowercase()
                .contains("x-content-type-options: nosniff")
        );
        assert!(ok.contains(r#""nodeEligible":true,"healthy":true"#), "{ok}");
        assert!(
            get(addr, "POST", "/livez")
                .await
                .starts_with("HTTP/1.1 200")
        );
        assert!(
            get(addr, "GET", "/foo").await.starts_with("HTTP/1.1 404"),
            "T7.1.4"
        );
        health.set_node_eligible(false);
        assert!(
            get(addr, "GET", "/healthz")
                .await
                .starts_with("HTTP/1.1 503")
        );
        assert_eq!(health.served(), [1, 1, 1, 0], "T7.1.5: one 503 counted");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
