//! What the API source tells the operator's metrics: every HTTP request the client makes
//! (upstream's client-go `rest_client_requests_total{code,host,method}` and
//! `rest_client_request_duration_seconds{host,verb}`), and when a watch goes down and comes
//! back. The source only reports; the daemon decides where it goes.

use futures_util::future::BoxFuture;
use http::{Request, Response};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Receives what the API source reports.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// One request: its method, `host:port`, status code (`None`: no response, a connection
    /// error, which client-go counts as code `<error>`) and the time to the response head.
    fn request(&self, method: &str, host: &str, code: Option<u16>, elapsed: Duration);
    /// A watch of `resource` (`services`, `endpointslices`, `nodes`) is listed and watching
    /// (`true`), or failed and is retrying (`false`).
    fn watch(&self, resource: &str, up: bool);
}

/// Reports nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn request(&self, _: &str, _: &str, _: Option<u16>, _: Duration) {}
    fn watch(&self, _: &str, _: bool) {}
}

/// The tower layer that reports each request of the kube client.
#[derive(Debug, Clone)]
pub(crate) struct RequestLayer {
    observer: Arc<dyn Observer>,
    /// The API server's `host:port` (requests reach this layer with a path only).
    host: Arc<str>,
}

impl RequestLayer {
    pub(crate) fn new(observer: Arc<dyn Observer>, host: &str) -> RequestLayer {
        RequestLayer {
            observer,
            host: host.into(),
        }
    }
}

impl<S> tower::Layer<S> for RequestLayer {
    type Service = Observed<S>;
    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            observer: self.observer.clone(),
            host: self.host.clone(),
        }
    }
}

/// A service that reports each request to the observer.
#[derive(Debug, Clone)]
pub(crate) struct Observed<S> {
    inner: S,
    observer: Arc<dyn Observer>,
    host: Arc<str>,
}

impl<S, B, R> tower::Service<Request<B>> for Observed<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = req.method().as_str().to_owned();
        let host = self.host.clone();
        let observer = self.observer.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let code = result.as_ref().ok().map(|r| r.status().as_u16());
            observer.request(&method, &host, code, start.elapsed());
            result
        })
    }
}
