//! Faults, with the real `slimserve` binary: SIGTERM under load (nothing accepted is lost),
//! SIGKILL mid-load then a restart on the same port (it comes back clean), a half-open
//! connection at shutdown (it does not hold the exit), and a request over the size limit
//! streamed slowly (refused from its length prefix, not after buffering it).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_slimserve");
const M: &str = "faulty";

/// The server binary on a fixed loopback port (so that a restart can reuse it), its stderr
/// forwarded line by line.
struct Proc {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

/// A free loopback port below Linux's ephemeral range (32768-60999), so that no other test's
/// port-0 listener can take it between a kill and the restart.
fn free_port() -> u16 {
    let start = 20000 + (std::process::id() as u16 % 97) * 100;
    (0..10000u16)
        .map(|k| 20000 + (start - 20000 + k) % 12000)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port in 20000-31999")
}

impl Proc {
    fn start(models: &std::path::Path, port: u16, extra: &[&str]) -> Proc {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut child = Command::new(BIN)
            .arg("--models")
            .arg(models)
            .args(["--grpc-addr", &addr.to_string()])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut p = Proc {
            child,
            addr,
            lines,
            log: Vec::new(),
        };
        p.wait_for("serving 1 model(s)", Duration::from_secs(30));
        p
    }

    /// Reads the log until a line contains `needle`; panics with the log after `timeout`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                let found = line.contains(needle);
                self.log.push(line);
                if found {
                    return;
                }
            }
        }
        panic!("no `{needle}` in the server log: {:#?}", self.log);
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn client(&self) -> ClassifierClient<tonic::transport::Channel> {
        ClassifierClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn models_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_model(dir.path(), M);
    dir
}

/// `workers` clients sending Classify in a closed loop until they get an error; each returns
/// (OK answers, OK answers received after `signalled` was set, the error). `answering` counts
/// the workers that have had at least one answer.
fn closed_loop(
    p: &Proc,
    workers: usize,
    signalled: Arc<AtomicBool>,
    answering: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<(u32, u32, tonic::Status)>> {
    let addr = p.addr;
    (0..workers)
        .map(|_| {
            let (signalled, answering) = (signalled.clone(), answering.clone());
            tokio::spawn(async move {
                let mut c = ClassifierClient::connect(format!("http://{addr}"))
                    .await
                    .unwrap();
                let (mut ok, mut late) = (0, 0);
                loop {
                    match c.classify(image_request(M, png(16, 16))).await {
                        Ok(_) => {
                            if ok == 0 {
                                answering.fetch_add(1, Ordering::SeqCst);
                            }
                            ok += 1;
                            if signalled.load(Ordering::SeqCst) {
                                late += 1;
                            }
                        }
                        Err(status) => return (ok, late, status),
                    }
                }
            })
        })
        .collect()
}

/// Starts `workers` closed-loop clients and returns once each has had an answer.
async fn load_until_all_answered(
    p: &Proc,
    workers: usize,
) -> (
    Vec<tokio::task::JoinHandle<(u32, u32, tonic::Status)>>,
    Arc<AtomicBool>,
) {
    let signalled = Arc::new(AtomicBool::new(false));
    let answering = Arc::new(AtomicUsize::new(0));
    let handles = closed_loop(p, workers, signalled.clone(), answering.clone());
    let until = Instant::now() + Duration::from_secs(30);
    while answering.load(Ordering::SeqCst) < workers {
        assert!(Instant::now() < until, "the workers got no answers");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A little more load, so that the queue is full when the signal comes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (handles, signalled)
}

/// SIGTERM under a closed-loop load at a slow model: every request is either answered (those
/// already accepted, including the ones still queued when the signal came) or refused with
/// UNAVAILABLE; nothing is cut off; the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_everything_accepted() {
    let models = models_dir();
    let mut p = Proc::start(
        models.path(),
        free_port(),
        &["--max-batch-size", "2", "--inject-compute-delay", "30ms"],
    );
    let (workers, signalled) = load_until_all_answered(&p, 8).await;
    signalled.store(true, Ordering::SeqCst);
    p.signal("-TERM");
    let mut results = Vec::new();
    for w in workers {
        results.push(w.await.unwrap());
    }
    let status = p.wait_exit(Duration::from_secs(20)).expect("exited");
    p.wait_for("stopped", Duration::from_secs(5));
    let log = p.log.join("\n");
    let mut answered_after_signal = 0;
    for (ok, late, code) in results {
        assert!(ok > 0);
        // UNAVAILABLE: "shutting down", or the connection refused once the port closed; or a
        // request sent as the server's GOAWAY (NO_ERROR) crossed it: HTTP/2 guarantees that
        // such a stream was not processed (tonic's client reports it as INTERNAL).
        let not_processed = code.code() == Code::Unavailable
            || format!("{code:?}").contains("GoAway(b\"\", NO_ERROR, Remote)");
        assert!(not_processed, "a request was lost: {code:?}\n{log}");
        answered_after_signal += late;
    }
    // 8 workers on batches of 2 x 30 ms: requests were queued at the signal and still answered.
    assert!(answered_after_signal >= 1, "nothing drained");
    assert!(status.success(), "{status:?}");
}

/// SIGKILL mid-load, then the same binary on the same port and models: it binds (no "address
/// in use" from the killed one's sockets), becomes ready, and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_then_restart_comes_back_clean() {
    let models = models_dir();
    let port = free_port();
    let mut p = Proc::start(models.path(), port, &["--inject-compute-delay", "10ms"]);
    let (workers, _) = load_until_all_answered(&p, 4).await;
    p.signal("-KILL");
    for w in workers {
        let (ok, _, status) = w.await.unwrap();
        assert!(ok > 0);
        assert_ne!(status.code(), Code::Ok);
    }
    let status = p.wait_exit(Duration::from_secs(5)).expect("killed");
    assert!(!status.success());
    drop(p);

    let p = Proc::start(models.path(), port, &[]);
    let mut c = p.client().await;
    let r = c
        .classify(image_request(M, png(16, 16)))
        .await
        .unwrap_or_else(|e| panic!("after the restart: {e:?}\n{:#?}", p.log))
        .into_inner();
    assert_eq!(r.model, M);
    assert_serving(&mut c, M).await;
}

/// A client that opened a TCP connection and sent half of the HTTP/2 preface, then nothing:
/// SIGTERM still ends the process within the shutdown timeout, and the idle connection is
/// closed, not left hanging.
#[test]
fn half_open_connection_does_not_hold_up_shutdown() {
    let models = models_dir();
    let mut p = Proc::start(models.path(), free_port(), &["--shutdown-timeout", "2s"]);
    let mut half = TcpStream::connect(p.addr).unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    let mut silent = TcpStream::connect(p.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    p.signal("-TERM");
    let status = p.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(
        status.is_some(),
        "still running 10 s after SIGTERM with a half-open connection: {:#?}",
        p.log
    );
    assert!(status.unwrap().success());
    // The 2 s shutdown timeout is not needed (nothing in flight), then CLOSE_GRACE (5 s).
    assert!(took < Duration::from_secs(8), "exit took {took:?}");
    // Both sockets see the end of the stream (or a reset): the server closed them.
    for s in [&mut half, &mut silent] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        let closed = loop {
            match std::io::Read::read(s, &mut buf) {
                Ok(0) => break true,
                Ok(_) => continue, // a GOAWAY or SETTINGS frame first
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(closed, "a connection was left open after exit");
    }
}

/// A request whose gRPC length prefix claims 64 MiB (over the 16 MiB default limit), its body
/// trickled in 16 KiB pieces: RESOURCE_EXHAUSTED arrives while under 1 MiB has been sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_request_streamed_slowly_is_refused_from_its_length_prefix() {
    let models = models_dir();
    let p = Proc::start(models.path(), free_port(), &[]);
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/slimserve.v1.Classifier/Classify",
            p.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(64u32 << 20).to_be_bytes());
    body.send_data(prefix.into(), false).unwrap();
    let sender = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < (1 << 20) {
            body.reserve_capacity(16 << 10);
            if body.send_data(vec![0u8; 16 << 10].into(), false).is_err() {
                break;
            }
            sent += 16 << 10;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    });
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer before 1 MiB was trickled")
        .unwrap();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        if chunk.is_err() {
            break;
        }
    }
    let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
    let status = headers
        .get("grpc-status")
        .or_else(|| trailers.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(
        status.as_deref(),
        Some("8"),
        "grpc-status (8 = RESOURCE_EXHAUSTED); headers {headers:?}, trailers {trailers:?}"
    );
    sender.abort();
    // The server still serves.
    let mut c = p.client().await;
    c.classify(image_request(M, png(16, 16))).await.unwrap();
}
