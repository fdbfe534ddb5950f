//! Faults, with the real `slimserve` binary: SIGTERM under load (nothing accepted is lost),
//! SIGKILL mid-load then a restart on the same port (it comes back clean), a half-open
//! connection at shutdown (it does not hold the exit), and a request over the size limit
//! streamed slowly (refused from its length prefix, not after buffering it), and ten model
//! versions swapped under load (`--model-control poll`) with memory measured before and after.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_slimserve");

/// These tests run one at a time: each drives a server process hard, and their timing (drains,
/// grace periods, memory) should not depend on what another is doing.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
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
            .args(["--http-addr", "127.0.0.1:0"])
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
    let mut handles = closed_loop(p, workers, signalled.clone(), answering.clone());
    let until = Instant::now() + Duration::from_secs(30);
    while answering.load(Ordering::SeqCst) < workers {
        if let Some(k) = handles.iter().position(|h| h.is_finished()) {
            let (ok, _, status) = handles.swap_remove(k).await.unwrap();
            panic!("worker {k} stopped before the signal after {ok} answers: {status:?}");
        }
        assert!(
            Instant::now() < until,
            "{} of {workers} workers had an answer after 30 s",
            answering.load(Ordering::SeqCst)
        );
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
    let _serial = SERIAL.lock().await;
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
        // such a stream was not processed (tonic's client reports it as INTERNAL); or a request
        // still in hyper's queue when the connection closed: hyper hands it back unsent
        // (`Canceled, "connection closed"`, from its dispatch queue's drop; tonic: CANCELLED).
        let debug = format!("{code:?}");
        let not_processed = code.code() == Code::Unavailable
            || debug.contains("GoAway(b\"\", NO_ERROR, Remote)")
            || (code.code() == Code::Cancelled
                && debug.contains("hyper::Error(Canceled, \"connection closed\")"));
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
    let _serial = SERIAL.lock().await;
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
    let _serial = SERIAL.blocking_lock();
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
    let _serial = SERIAL.lock().await;
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

/// Resident memory of a process, from /proc (MiB): `VmRSS` (all of it) or `RssAnon` (heap and
/// other anonymous memory, without the pages of the executable read in as code runs).
fn rss_mib(pid: u32) -> f64 {
    rss_field(pid, "RssAnon:")
}

/// Anonymous KiB per mapping (start address and name) from `/proc/PID/smaps`.
fn anon_by_mapping(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = std::collections::BTreeMap::new();
    let mut current = String::new();
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Anonymous:") {
            let kib: u64 = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            *out.entry(current.clone()).or_insert(0) += kib;
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|t| !t.ends_with(':'))
        {
            // A mapping's header: ADDR-ADDR PERMS OFFSET DEV INODE [NAME].
            let mut f = line.split_whitespace();
            let range = f.next().unwrap_or("");
            let start = range.split('-').next().unwrap_or("");
            current = format!("{start} {}", f.nth(4).unwrap_or("[anon]"));
        }
    }
    out
}

/// The mappings whose anonymous memory grew most from `a` to `b`, for a failure message.
fn grown_mappings(
    a: &std::collections::BTreeMap<String, u64>,
    b: &std::collections::BTreeMap<String, u64>,
) -> String {
    let mut d: Vec<(i64, &String)> = b
        .iter()
        .map(|(k, &v)| (v as i64 - a.get(k).copied().unwrap_or(0) as i64, k))
        .filter(|(d, _)| *d > 0)
        .collect();
    d.sort_by_key(|x| std::cmp::Reverse(x.0));
    let top: Vec<String> = d
        .iter()
        .take(5)
        .map(|(d, k)| format!("{k} +{d} KiB"))
        .collect();
    top.join(", ")
}

fn rss_field(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib / 1024.0
}

/// The shipped `kd` (a 256x256 student) as version `v` of `kd` under `root`, published by
/// rename; `mangle` may spoil it first.
fn publish_kd(root: &std::path::Path, v: u64, mangle: impl FnOnce(&std::path::Path)) {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kd");
    let staging = root.join(format!(".staging-{v}"));
    std::fs::create_dir_all(&staging).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(shipped.join(file), staging.join(file)).unwrap();
    }
    mangle(&staging);
    std::fs::rename(&staging, root.join(format!("kd/{v}"))).unwrap();
}

/// The real binary in `--model-control poll`, serving the shipped `kd` under a closed-loop
/// load while ten versions are published (two corrupt, one half-written in place): no request
/// fails, the last version serves, and once the load stops, resident anonymous memory has grown
/// by less than two versions' footprint (keeping the ten old versions would add ten). The
/// figures printed (one version, peak, after) are those BENCHMARKS.md quotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_swaps_under_load_return_their_memory() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("kd")).unwrap();
    publish_kd(root, 1, |_| {});
    let mut p = Proc::start(
        root,
        free_port(),
        &[
            "--model-control",
            "poll",
            "--repository-poll-secs",
            "1",
            "--idle-memory-release",
            "1s",
        ],
    );
    let pid = p.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let addr = p.addr;
    let run_load = |stop: Arc<AtomicBool>, clients: usize| {
        (0..clients)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut c = ClassifierClient::connect(format!("http://{addr}"))
                        .await
                        .unwrap();
                    let (mut versions, mut errors) = (Vec::new(), Vec::new());
                    while !stop.load(Ordering::SeqCst) {
                        match c.classify(image_request("kd", png(64, 48))).await {
                            Ok(r) => versions.push(r.into_inner().model_version),
                            Err(e) => errors.push(e),
                        }
                    }
                    (versions, errors)
                })
            })
            .collect::<Vec<_>>()
    };
    // One version's footprint, idle: after six swaps under twice the load that follows (the
    // first ones spread glibc's per-thread arenas, once), and after the server's idle release
    // (`--idle-memory-release 1s`) has freed the batch buffer and the engine's scratch: those
    // are high-water marks of past load (a thread that ran two images at once keeps two 1 MiB
    // activation pairs), which would otherwise differ between the two measurements by a few
    // MiB. What follows then shows what each swap keeps.
    let warm = run_load(stop.clone(), 8);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for v in 2..=7 {
        publish_kd(root, v, |_| {});
        p.wait_for(
            &format!("model kd version {v}: loaded"),
            Duration::from_secs(30),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in warm {
        let errors = t.await.unwrap().1;
        assert!(errors.is_empty(), "{errors:?}");
    }
    // The idle release (after 1 s without a batch) and two polls (each pass ends by returning
    // freed memory to the system).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = rss_mib(pid);
    let before_all = rss_field(pid, "VmRSS:");
    let smaps_before = anon_by_mapping(pid);

    stop.store(false, Ordering::SeqCst);
    let load = run_load(stop.clone(), 4);
    let mut peak = before;
    let mut serving = 7;
    for v in 8..=17u64 {
        match v {
            10 => publish_kd(root, v, |d| {
                std::fs::write(d.join("model.safetensors"), b"not weights").unwrap()
            }),
            14 => publish_kd(root, v, |d| {
                std::fs::write(d.join("config.json"), b"{").unwrap()
            }),
            12 => {
                // Written in place in two halves, more than a poll apart.
                let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kd");
                let weights = std::fs::read(shipped.join("model.safetensors")).unwrap();
                let vdir = root.join("kd/12");
                std::fs::create_dir_all(&vdir).unwrap();
                std::fs::copy(shipped.join("config.json"), vdir.join("config.json")).unwrap();
                std::fs::write(
                    vdir.join("model.safetensors"),
                    &weights[..weights.len() / 2],
                )
                .unwrap();
                tokio::time::sleep(Duration::from_millis(2500)).await;
                std::fs::write(vdir.join("model.safetensors"), &weights).unwrap();
                serving = v;
            }
            _ => {
                publish_kd(root, v, |_| {});
                serving = v;
            }
        }
        if serving == v {
            p.wait_for(
                &format!("model kd version {v}: loaded"),
                Duration::from_secs(30),
            );
        } else {
            p.wait_for(
                &format!("model kd version {v}: failed to load"),
                Duration::from_secs(30),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss_mib(pid));
    }
    stop.store(true, Ordering::SeqCst);
    let (mut versions, mut errors) = (Vec::new(), Vec::new());
    for t in load {
        let (v, e) = t.await.unwrap();
        versions.extend(v);
        errors.extend(e);
    }
    assert!(
        errors.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        errors.len(),
        versions.len() + errors.len(),
        errors.first()
    );
    assert_eq!(versions.last().map(String::as_str), Some("17"));
    for bad in ["10", "14"] {
        assert!(!versions.iter().any(|v| v == bad), "version {bad} answered");
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = rss_mib(pid);
    let after_all = rss_field(pid, "VmRSS:");
    let grown = grown_mappings(&smaps_before, &anon_by_mapping(pid));
    eprintln!("VmRSS (with the executable's pages): {before_all:.1} -> {after_all:.1} MiB");
    eprintln!("mappings whose anonymous memory grew most: {grown}");
    eprintln!(
        "ten swaps under load: {} requests, 0 failed; RSS one version {before:.1} MiB, peak during swaps {peak:.1} MiB, after {after:.1} MiB ({:+.1}%)",
        versions.len(),
        (after / before - 1.0) * 100.0
    );
    // Ten old versions kept alive would add ten footprints (two versions side by side during a
    // swap show one: `peak - before`).
    let footprint = (peak - before).max(1.0);
    assert!(
        after - before < 2.0 * footprint,
        "RSS grew {:.1} MiB over ten swaps, more than two versions' footprint ({footprint:.1} MiB each): old versions are kept; grown mappings: {grown}",
        after - before
    );
    // The bound: back within 10% of one version's footprint (the whole process's
    // anonymous memory with one version loaded).
    assert!(
        after <= 1.10 * before,
        "RSS after ten swaps {after:.1} MiB is more than 10% above one version's {before:.1} MiB; grown mappings: {grown}"
    );
    assert_eq!(serving, 17);
}
