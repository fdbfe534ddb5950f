//! The gRPC transport settings, chosen for ~1 MB raw-tensor requests at low latency.
//!
//! - **TCP_NODELAY on every accepted connection** (plain and TLS: TLS is layered on these
//!   sockets). The server hands tonic its own accept stream, so tonic's own `tcp_nodelay`
//!   setting would never apply; without it, Nagle's algorithm and the client's delayed ACK
//!   add ~40 ms to a response that ends in a small segment.
//! - **TCP keep-alive** (idle 60 s, then probes every 15 s): dead peers' sockets are reaped.
//! - **HTTP/2 windows** of 4 MiB per stream and 16 MiB per connection (the defaults are
//!   64 KiB): a 786 KB FP32 `[1, 3, 256, 256]` request flows without waiting for window
//!   updates, and 16 such requests fit in one connection's window at once. Frames up to
//!   1 MiB (default 16 KiB) cut the per-frame work for large messages.
//! - **HTTP/2 keep-alive pings** every 30 s, the connection closed when one goes unanswered
//!   for 10 s: half-open connections behind load balancers are noticed.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};

pub const STREAM_WINDOW_BYTES: u32 = 4 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
pub const MAX_FRAME_BYTES: u32 = 1 << 20;
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// A tonic server builder with the settings above.
pub fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
}

/// The accepted connections of `listener`, each with TCP_NODELAY and keep-alive set. A
/// socket whose options cannot be set is still served (and the failure logged).
pub fn accept(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|stream| {
            if let Err(e) = tune(stream) {
                tracing::warn!("cannot set socket options on an accepted connection: {e}");
            }
        })
    })
}

fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection the server accepts has TCP_NODELAY and keep-alive on (the listener's
    /// sockets start with both off).
    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(accept(listener));
        let _client = TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE_IDLE);
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            TCP_KEEPALIVE_INTERVAL
        );
        // Without `accept`, an accepted socket has neither: the test can fail.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = plain.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (raw, _) = plain.accept().await.unwrap();
        assert!(!raw.nodelay().unwrap());
        assert!(!socket2::SockRef::from(&raw).keepalive().unwrap());
    }
}
