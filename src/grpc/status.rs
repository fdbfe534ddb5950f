//! Every gRPC status code the server answers is decided here: [`code`] for our own errors, and
//! [`Edge`] for the one error the transport raises itself (an oversize message, which tonic
//! reports as OUT_OF_RANGE but gRPC clients expect as RESOURCE_EXHAUSTED).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::Arrival;
use crate::error::Error;

/// The gRPC code for each error.
pub fn code(e: &Error) -> Code {
    match e {
        Error::ModelNotFound { .. } | Error::VersionNotFound { .. } | Error::NoModels => {
            Code::NotFound
        }
        Error::InvalidArgument(_) | Error::Image(_) | Error::TopK { .. } => Code::InvalidArgument,
        Error::QueueFull { .. } | Error::TooManyInFlight { .. } => Code::ResourceExhausted,
        Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
        Error::ShuttingDown | Error::Starting | Error::ExecutorGone { .. } => Code::Unavailable,
        Error::Backend { .. } | Error::Internal(_) => Code::Internal,
        Error::Item { source, .. } => code(source),
        Error::Unimplemented(_) => Code::Unimplemented,
        Error::ModelControl(_) | Error::LoadFailed { .. } => Code::FailedPrecondition,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(code(&e), e.to_string())
    }
}

/// tonic's oversize-message status; see [`oversize`].
const TONIC_TOO_LARGE: &str = "message length too large";

/// Turns tonic's "decoded message length too large" (OUT_OF_RANGE) into RESOURCE_EXHAUSTED
/// with a message naming the limit and the flag that raises it; other statuses pass through.
pub fn oversize(status: Status, limit: usize) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains(TONIC_TOO_LARGE) {
        Status::resource_exhausted(oversize_message(status.message(), limit))
    } else {
        status
    }
}

fn oversize_message(tonic_message: &str, limit: usize) -> String {
    let found = tonic_message
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("more");
    format!(
        "request message is {found} bytes, over this server's limit of {limit} bytes (--max-message-bytes)"
    )
}

/// Wraps a generated gRPC service: stamps each request's arrival time (deadlines count from
/// it) and rewrites the transport's oversize-message answer (see [`oversize`]).
#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> Edge<S> {
    pub fn new(inner: S, max_message_bytes: usize) -> Self {
        Self {
            inner,
            max_message_bytes,
        }
    }
}

impl<S: NamedService> NamedService for Edge<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for Edge<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut()
            .insert(Arrival(std::time::Instant::now()));
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let limit = self.max_message_bytes;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut response = fut.await?;
            rewrite_oversize(&mut response, limit, &method);
            Ok(response)
        })
    }
}

/// Unary calls fail decoding before any handler runs, so the status is in the headers.
fn rewrite_oversize<R>(response: &mut http::Response<R>, limit: usize, method: &str) {
    let headers = response.headers_mut();
    let is_out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    if !is_out_of_range {
        return;
    }
    let Some(message) = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| m.replace("%20", " "))
        .filter(|m| m.contains(TONIC_TOO_LARGE))
    else {
        return;
    };
    let text = oversize_message(&message, limit);
    headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    if let Ok(v) = http::HeaderValue::from_str(&text) {
        headers.insert("grpc-message", v);
    }
    crate::telemetry::count_request("", "", method_name(method), Code::ResourceExhausted);
}

/// Method names as `'static` metric labels (unknown ones collapse to `other`).
fn method_name(method: &str) -> &'static str {
    const KNOWN: &[&str] = &["Classify", "ClassifyBatch", "ClassifyStream", "ModelInfer"];
    KNOWN
        .iter()
        .find(|k| **k == method)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_becomes_resource_exhausted() {
        let tonic = Status::out_of_range(
            "Error, decoded message length too large: found 20000000 bytes, the limit is: 16777216 bytes",
        );
        let s = oversize(tonic, 16777216);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "request message is 20000000 bytes, over this server's limit of 16777216 bytes (--max-message-bytes)"
        );
        assert_eq!(
            oversize(Status::out_of_range("x"), 1).code(),
            Code::OutOfRange
        );
    }
}
