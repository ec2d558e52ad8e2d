//! Checks what the API server sends before kube-rs reads it, where kube-rs would be silently
//! wrong or wait forever: a watch line that is not JSON (kube-rs skips one that ends early, so
//! a truncated event would be lost without a trace), a watch line without end (kube-rs buffers
//! it without a limit), a watch that stays silent past its own `timeoutSeconds` (a stuck
//! server or connection), and a list of another kind (its items would read as empty objects
//! of ours and replace the real ones). Each ends the response with an error, so the watcher
//! fails and the source relists; nothing else is changed or copied (a watch line is kept only
//! until its newline).

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// The longest watch line accepted: an object is at most ~1.5 MiB in etcd (3 MiB for a
/// request to the API server), so a line ten times that is garbage, not an event.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// A watch that has sent nothing (not even a bookmark) for its `timeoutSeconds` plus this is
/// stuck: a healthy API server ends every watch by its timeout. kube-rs's own idle timeout
/// (the timeout plus 5 s) would resume it quietly from the same resourceVersion; failing it
/// first makes the outage visible and the source relist.
pub const WATCH_SILENCE_GRACE: Duration = Duration::from_secs(2);

/// The tower layer of the kube client that guards response bodies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardLayer {
    /// (plural, kind) of each resource whose lists are checked.
    resources: &'static [(&'static str, &'static str)],
}

impl GuardLayer {
    pub(crate) fn new(resources: &'static [(&'static str, &'static str)]) -> GuardLayer {
        GuardLayer { resources }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            resources: self.resources,
        }
    }
}

/// A service whose responses carry a [`Guarded`] body.
#[derive(Debug, Clone)]
pub(crate) struct Guard<S> {
    inner: S,
    resources: &'static [(&'static str, &'static str)],
}

impl<S, B, R> tower::Service<Request<B>> for Guard<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    R: 'static,
{
    type Response = Response<Guarded<R>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<Guarded<R>>, S::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let check = Check::of(&req, self.resources);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            // An error's body is a Status, which kube-rs reads and reports as it is.
            let check = if res.status().is_success() {
                check
            } else {
                Check::Nothing
            };
            Ok(res.map(|inner| Guarded::new(inner, check)))
        })
    }
}

/// What is checked in one response.
#[derive(Debug)]
enum Check {
    Nothing,
    Watch {
        /// The current line so far (empty between lines).
        line: Vec<u8>,
        /// Silence longer than this ends the watch.
        silence: Duration,
    },
    List {
        /// `<Kind>List`.
        expected: String,
        /// The body's start, until its first key is known.
        prefix: Vec<u8>,
        decided: bool,
    },
}

impl Check {
    fn of<B>(req: &Request<B>, resources: &[(&str, &str)]) -> Check {
        let query = req.uri().query().unwrap_or("");
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        };
        if matches!(param("watch"), Some("true" | "1")) {
            let timeout = param("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .unwrap_or(290);
            return Check::Watch {
                line: Vec::new(),
                silence: Duration::from_secs(timeout) + WATCH_SILENCE_GRACE,
            };
        }
        let last = req.uri().path().rsplit('/').next().unwrap_or("");
        match resources.iter().find(|(plural, _)| *plural == last) {
            Some((_, kind)) if req.method() == http::Method::GET => Check::List {
                expected: format!("{kind}List"),
                prefix: Vec::new(),
                decided: false,
            },
            _ => Check::Nothing,
        }
    }

    /// Takes in the next piece of the body.
    fn feed(&mut self, data: &[u8]) -> Result<(), Refused> {
        match self {
            Check::Nothing => Ok(()),
            Check::Watch { line, .. } => feed_watch(line, data),
            Check::List {
                expected,
                prefix,
                decided,
            } => {
                if *decided {
                    return Ok(());
                }
                prefix.extend_from_slice(&data[..data.len().min(LIST_PREFIX - prefix.len())]);
                match first_kind(prefix) {
                    Sniff::Undecided if prefix.len() < LIST_PREFIX => return Ok(()),
                    Sniff::Kind(kind) if kind != *expected => {
                        return Err(Refused(format!(
                            "the API server answered a list with a {kind} where an {expected} belongs"
                        )));
                    }
                    _ => {}
                }
                *decided = true;
                *prefix = Vec::new();
                Ok(())
            }
        }
    }
}

/// How much of a list's start is looked at for its `kind` (an API server writes it first).
const LIST_PREFIX: usize = 4096;

/// Checks every complete line in `data` (with what came before it, in `line`).
fn feed_watch(line: &mut Vec<u8>, mut data: &[u8]) -> Result<(), Refused> {
    while let Some(nl) = data.iter().position(|b| *b == b'\n') {
        if line.is_empty() {
            check_line(&data[..nl])?;
        } else {
            line.extend_from_slice(&data[..nl]);
            check_line(line)?;
            line.clear();
        }
        data = &data[nl + 1..];
    }
    if line.len() + data.len() > MAX_EVENT_BYTES {
        return Err(Refused(format!(
            "the API server sent a watch event longer than {} MiB",
            MAX_EVENT_BYTES >> 20
        )));
    }
    line.extend_from_slice(data);
    Ok(())
}

fn check_line(line: &[u8]) -> Result<(), Refused> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(line)
        .map(|_| ())
        .map_err(|e| {
            let shown = String::from_utf8_lossy(&line[..line.len().min(80)]);
            Refused(format!(
                "the API server sent a watch line that is not JSON ({e}): {shown:?}"
            ))
        })
}

/// The first key of a JSON object, if it is `kind`.
#[derive(Debug, PartialEq, Eq)]
enum Sniff {
    /// Not enough bytes yet.
    Undecided,
    /// Not an object, or its first key is not a plain `kind` string: nothing to check.
    Unchecked,
    Kind(String),
}

fn first_kind(text: &[u8]) -> Sniff {
    let mut rest = text;
    let kind = (|| {
        expect(&mut rest, b'{')?;
        expect(&mut rest, b'"')?;
        if string(&mut rest)? != "kind" {
            return Err(Sniff::Unchecked);
        }
        expect(&mut rest, b':')?;
        expect(&mut rest, b'"')?;
        string(&mut rest)
    })();
    match kind {
        Ok(kind) => Sniff::Kind(kind),
        Err(s) => s,
    }
}

/// Skips whitespace, then takes `what`.
fn expect(rest: &mut &[u8], what: u8) -> Result<(), Sniff> {
    while let [b, tail @ ..] = *rest
        && b.is_ascii_whitespace()
    {
        *rest = tail;
    }
    match rest.split_first() {
        None => Err(Sniff::Undecided),
        Some((b, tail)) if *b == what => {
            *rest = tail;
            Ok(())
        }
        Some(_) => Err(Sniff::Unchecked),
    }
}

/// The rest of a string whose opening quote was taken (one with escapes is not checked).
fn string(rest: &mut &[u8]) -> Result<String, Sniff> {
    let end = rest
        .iter()
        .position(|b| *b == b'"' || *b == b'\\')
        .ok_or(Sniff::Undecided)?;
    if rest[end] == b'\\' {
        return Err(Sniff::Unchecked);
    }
    let s = String::from_utf8_lossy(&rest[..end]).into_owned();
    *rest = &rest[end + 1..];
    Ok(s)
}

/// Why a response was cut short.
#[derive(Debug)]
pub(crate) struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// A response body, checked as it streams.
pub(crate) struct Guarded<B> {
    inner: B,
    check: Check,
    /// Ends a silent watch (re-armed by every piece of data).
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    failed: bool,
}

impl<B> Guarded<B> {
    fn new(inner: B, check: Check) -> Guarded<B> {
        let silence = match &check {
            Check::Watch { silence, .. } => Some(Box::pin(tokio::time::sleep(*silence))),
            _ => None,
        };
        Guarded {
            inner,
            check,
            silence,
            failed: false,
        }
    }
}

impl<B> Body for Guarded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                if let (Some(sleep), Check::Watch { silence, .. }) =
                    (&mut this.silence, &this.check)
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    this.failed = true;
                    return Poll::Ready(Some(Err(Box::new(Refused(format!(
                        "the watch sent nothing for {} s, past its timeoutSeconds: the API server or the connection is stuck",
                        silence.as_secs()
                    ))))));
                }
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(refused) = this.check.feed(data) {
                        this.failed = true;
                        return Poll::Ready(Some(Err(Box::new(refused))));
                    }
                    if let (Some(sleep), Check::Watch { silence, .. }) =
                        (&mut this.silence, &this.check)
                    {
                        sleep.as_mut().reset(tokio::time::Instant::now() + *silence);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.failed && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_list_kind_is_read_from_the_start_of_the_body() {
        let kind = |s: &str| first_kind(s.as_bytes());
        assert_eq!(
            kind(r#"{"kind":"ServiceList","apiVersion":"v1","items":[]}"#),
            Sniff::Kind("ServiceList".into())
        );
        assert_eq!(
            kind(" {\n \"kind\" : \"ConfigMapList\""),
            Sniff::Kind("ConfigMapList".into())
        );
        assert_eq!(kind(r#"{"kind":"Serv"#), Sniff::Undecided);
        assert_eq!(kind(r#"{"ki"#), Sniff::Undecided);
        assert_eq!(kind(""), Sniff::Undecided);
        assert_eq!(kind(r#"{"apiVersion":"v1","kind":"X"}"#), Sniff::Unchecked);
        assert_eq!(kind(r#"{"kind":null}"#), Sniff::Unchecked);
        assert_eq!(kind(r#"{"kind":"a\"b"}"#), Sniff::Unchecked);
        assert_eq!(kind("<html>"), Sniff::Unchecked);
    }

    #[test]
    fn list_checks_refuse_only_another_kind() {
        let req = |path: &str| Request::get(path).body(()).unwrap();
        let resources = &[("services", "Service")];
        let mut ok = Check::of(&req("/api/v1/services?limit=500"), resources);
        assert!(ok.feed(br#"{"kind":"Servi"#).is_ok());
        assert!(ok.feed(br#"ceList","items":[]}"#).is_ok());
        let mut wrong = Check::of(&req("/api/v1/services"), resources);
        let err = wrong
            .feed(br#"{"kind":"ConfigMapList","items":[]}"#)
            .unwrap_err();
        assert!(err.0.contains("ConfigMapList"), "{err}");
        let mut other = Check::of(&req("/api/v1/pods"), resources);
        assert!(other.feed(br#"{"kind":"ConfigMapList"}"#).is_ok());
    }

    #[test]
    fn watch_lines_must_be_json_and_bounded() {
        let req = Request::get("/api/v1/services?watch=true&timeoutSeconds=7")
            .body(())
            .unwrap();
        let mut check = Check::of(&req, &[]);
        assert!(
            matches!(&check, Check::Watch { silence, .. } if *silence == Duration::from_secs(9))
        );
        // Lines split anywhere across pieces.
        assert!(check.feed(b"{\"type\":\"ADDED\",").is_ok());
        assert!(check.feed(b"\"object\":{}}\n{\"type\"").is_ok());
        assert!(check.feed(b":\"BOOKMARK\",\"object\":{}}\n\n").is_ok());
        // A line that ends early: kube-rs would skip it without a word.
        let err = check.feed(b"{\"type\":\"DELETED\",\"obj\n").unwrap_err();
        assert!(err.0.contains("not JSON"), "{err}");
        let mut check = Check::of(&req, &[]);
        let chunk = vec![b'x'; 1 << 20];
        let mut fed = 0;
        let err = loop {
            match check.feed(&chunk) {
                Ok(()) => fed += chunk.len(),
                Err(e) => break e,
            }
        };
        assert_eq!(fed, MAX_EVENT_BYTES);
        assert!(err.0.contains("longer than 16 MiB"), "{err}");
    }

    /// A response of one status and one piece of body.
    struct Fixed(u16, &'static [u8]);

    impl tower::Service<Request<()>> for Fixed {
        type Response = Response<Piece>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Response<Piece>, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<()>) -> Self::Future {
            let body = Piece(Some(Bytes::from_static(self.1)));
            std::future::ready(Ok(Response::builder().status(self.0).body(body).unwrap()))
        }
    }

    /// A body of one piece (`None`: a body that never sends anything).
    struct Piece(Option<Bytes>);

    impl Body for Piece {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.get_mut().0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    async fn first_piece(status: u16, path: &str, body: &'static [u8]) -> Result<(), String> {
        use tower::{Layer, Service};
        let mut svc = GuardLayer::new(&[("services", "Service")]).layer(Fixed(status, body));
        let res = svc
            .call(Request::get(path).body(()).unwrap())
            .await
            .unwrap();
        let mut body = res.into_body();
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("no frame".into()),
        }
    }

    /// An error's Status is passed on as it is (kube-rs reports its message); a successful
    /// list of another kind is refused.
    #[tokio::test]
    async fn only_successful_lists_are_checked() {
        let status = br#"{"kind":"Status","apiVersion":"v1","code":401,"message":"Unauthorized"}"#;
        assert_eq!(first_piece(401, "/api/v1/services", status).await, Ok(()));
        let wrong = br#"{"kind":"ConfigMapList","items":[]}"#;
        let err = first_piece(200, "/api/v1/services", wrong)
            .await
            .unwrap_err();
        assert!(err.contains("ConfigMapList"), "{err}");
    }

    /// A watch that sends nothing fails after its timeoutSeconds plus the grace.
    #[tokio::test(start_paused = true)]
    async fn a_silent_watch_fails_after_its_timeout() {
        use tower::{Layer, Service};
        struct Silent;
        impl tower::Service<Request<()>> for Silent {
            type Response = Response<Piece>;
            type Error = std::convert::Infallible;
            type Future = std::future::Ready<Result<Response<Piece>, Self::Error>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<()>) -> Self::Future {
                std::future::ready(Ok(Response::new(Piece(None))))
            }
        }
        let mut svc = GuardLayer::new(&[]).layer(Silent);
        let req = Request::get("/api/v1/services?watch=true&timeoutSeconds=10")
            .body(())
            .unwrap();
        let mut body = svc.call(req).await.unwrap().into_body();
        let start = tokio::time::Instant::now();
        let got = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let err = got.unwrap().unwrap_err().to_string();
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(10) + WATCH_SILENCE_GRACE
        );
        assert!(err.contains("sent nothing for 12 s"), "{err}");
    }
}
