//! The worker roles: the server, the clients, the syscall loop and the
//! many-listeners helper. Each runs the same natively, in another network
//! namespace, or under `ax exec`.
//!
//! Wire protocol: the client's first byte names the test — `p` ping-pong,
//! `b` bulk, `c` connection rate (that byte is the "1 byte" the test sends).
//! A connection closed before any byte is an egress probe (connect + close).
//! After a bulk transfer the server answers one JSON line, [`ServerReport`],
//! with its own CPU time, then closes.

use crate::net::{self, Addr, Listener, Stream};
use crate::stats::{self, median, quantile};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// What a server accepts (`any` serves every test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeMode {
    /// Every test, chosen by the client's first byte.
    Any,
    /// 1-byte ping-pong.
    Pingpong,
    /// Bulk transfer.
    Bulk,
    /// Connect, 1 byte, close.
    Connrate,
}

/// What a client measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMode {
    /// 1-byte ping-pong: median and p99 per round trip.
    Pingpong,
    /// Bulk transfer in 64 KiB writes: Gbit/s and CPU time of both ends.
    Bulk,
    /// Connect, send 1 byte, close: connections per second.
    Connrate,
    /// Connect and close (no byte): connect latency, e.g. to a native
    /// server from under ax.
    Egress,
}

const HDR_PINGPONG: u8 = b'p';
const HDR_BULK: u8 = b'b';
const HDR_CONNRATE: u8 = b'c';

/// Size of each bulk write (and read).
pub const CHUNK: usize = 64 * 1024;

/// Ping-pong result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingPong {
    /// Timed round trips.
    pub iterations: u64,
    /// Median round trip, µs.
    pub median_us: f64,
    /// 99th percentile round trip, µs.
    pub p99_us: f64,
    /// Mean round trip, µs.
    pub mean_us: f64,
    /// Fastest round trip, µs.
    pub min_us: f64,
}

/// Bulk result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bulk {
    /// Bytes the server received.
    pub bytes: u64,
    /// From the first write until the server's report arrived.
    pub seconds: f64,
    /// bytes × 8 / seconds / 1e9.
    pub gbit_s: f64,
    /// Client CPU (user + system) during the transfer, ns.
    pub client_cpu_ns: u64,
    /// Server CPU (user + system) during the transfer, ns.
    pub server_cpu_ns: u64,
    /// Client user time, ns (10 ms resolution).
    pub client_utime_ns: u64,
    /// Client system time, ns (10 ms resolution).
    pub client_stime_ns: u64,
    /// Server user time, ns (10 ms resolution).
    pub server_utime_ns: u64,
    /// Server system time, ns (10 ms resolution).
    pub server_stime_ns: u64,
}

/// Connection-rate (or egress) result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnRate {
    /// Attempts.
    pub iterations: u64,
    /// Attempts that connected and sent their byte.
    pub ok: u64,
    /// Attempts that failed.
    pub errors: u64,
    /// Wall time of the loop.
    pub seconds: f64,
    /// ok / seconds.
    pub conn_per_s: f64,
    /// Median time of the `connect` call alone, µs.
    pub connect_median_us: f64,
    /// 99th percentile of the `connect` call, µs.
    pub connect_p99_us: f64,
    /// CLOCK_MONOTONIC at the start of the loop, ns.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC at the end of the loop, ns.
    pub end_ns: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
}

/// Syscall-loop result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Syscall {
    /// Calls made (timed).
    pub iterations: u64,
    /// Median over batches of ns per call.
    pub median_ns: f64,
    /// Fastest batch, ns per call.
    pub min_ns: f64,
}

/// The server's side of a bulk transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerReport {
    /// Bytes received.
    pub bytes: u64,
    /// CPU (user + system), ns.
    pub cpu_ns: u64,
    /// User time, ns (ticks).
    pub utime_ns: u64,
    /// System time, ns (ticks).
    pub stime_ns: u64,
}

/// One line of client output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Report {
    /// See [`PingPong`].
    Pingpong(PingPong),
    /// See [`Bulk`].
    Bulk(Bulk),
    /// See [`ConnRate`].
    Connrate(ConnRate),
    /// See [`ConnRate`] (connect + close, no byte).
    Egress(ConnRate),
    /// See [`Syscall`].
    Syscall(Syscall),
}

/// Client parameters.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    /// Where to connect.
    pub addr: Addr,
    /// Which test.
    pub mode: ClientMode,
    /// Round trips or connections.
    pub iterations: u64,
    /// Bulk bytes.
    pub bytes: u64,
    /// Per-call timeout.
    pub timeout: Duration,
    /// connrate/egress: stop after this long even if fewer than
    /// `iterations` were made (the rate stays ok ÷ elapsed).
    pub max_time: Option<Duration>,
    /// bulk: print `SYNC start` once connected and `SYNC end` once done,
    /// each time waiting for a line on stdin before going on (lets the
    /// orchestrator sample the broker's CPU over exactly the transfer).
    pub sync: bool,
}

fn say(line: &str) {
    let mut o = io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// Prints a report as one JSON line.
pub fn print_report(r: &Report) -> Result<()> {
    say(&serde_json::to_string(r)?);
    Ok(())
}

/// `serve`: listens, prints `READY`, serves connections until killed.
pub fn serve(addr: &Addr, mode: ServeMode, threads: usize, backlog: i32) -> Result<()> {
    let l = net::listen(addr, backlog)?;
    say("READY");
    let mut extra = Vec::new();
    for _ in 1..threads.max(1) {
        let l2 = l.try_clone().context("dup listener")?;
        extra.push(std::thread::spawn(move || accept_loop(&l2, mode)));
    }
    accept_loop(&l, mode);
}

/// Accepts on `addr` in a busy loop, never sleeping, and closes each
/// connection at once (see `ax-bench serve --spin`).
pub fn serve_spinning(addr: &Addr, backlog: i32) -> Result<()> {
    let l = net::listen(addr, backlog)?;
    l.set_nonblocking()?;
    say("READY");
    loop {
        match l.accept() {
            Ok(s) => drop(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("ax-bench serve: accept: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn accept_loop(l: &Listener, mode: ServeMode) -> ! {
    let mut logged = 0u32;
    loop {
        match l.accept() {
            Ok(s) => {
                if let Err(e) = handle(s, mode) {
                    if logged < 20 {
                        eprintln!("ax-bench serve: {e:#}");
                        logged += 1;
                    }
                }
            }
            Err(e) => {
                if logged < 20 {
                    eprintln!("ax-bench serve: accept: {e}");
                    logged += 1;
                }
                if e.kind() != io::ErrorKind::Interrupted {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

fn handle(mut s: Stream, mode: ServeMode) -> Result<()> {
    s.timeouts(Duration::from_secs(120));
    let mut hdr = [0u8; 1];
    if s.read(&mut hdr)? == 0 {
        return Ok(()); // egress probe: connect + close
    }
    let allowed = matches!(
        (mode, hdr[0]),
        (ServeMode::Any, _)
            | (ServeMode::Pingpong, HDR_PINGPONG)
            | (ServeMode::Bulk, HDR_BULK)
            | (ServeMode::Connrate, HDR_CONNRATE)
    );
    if !allowed {
        bail!(
            "test {:?} refused: this server serves {mode:?}",
            hdr[0] as char
        );
    }
    match hdr[0] {
        HDR_PINGPONG => {
            s.nodelay();
            let mut b = [0u8; 1];
            loop {
                if s.read(&mut b)? == 0 {
                    return Ok(());
                }
                s.write_all(&b)?;
            }
        }
        HDR_BULK => {
            let mut len = [0u8; 8];
            s.read_exact(&mut len).context("bulk length")?;
            let want = u64::from_le_bytes(len);
            let cpu0 = stats::process_cpu_ns();
            let (u0, s0) = stats::self_utime_stime_ns().unwrap_or_default();
            let mut buf = vec![0u8; CHUNK];
            let mut bytes = 0u64;
            while bytes < want {
                let n = s.read(&mut buf[..(want - bytes).min(CHUNK as u64) as usize])?;
                if n == 0 {
                    bail!("bulk: EOF after {bytes} of {want} bytes");
                }
                bytes += n as u64;
            }
            let cpu1 = stats::process_cpu_ns();
            let (u1, s1) = stats::self_utime_stime_ns().unwrap_or_default();
            let r = ServerReport {
                bytes,
                cpu_ns: cpu1 - cpu0,
                utime_ns: u1.saturating_sub(u0),
                stime_ns: s1.saturating_sub(s0),
            };
            let mut line = serde_json::to_vec(&r)?;
            line.push(b'\n');
            s.write_all(&line)?;
            Ok(())
        }
        HDR_CONNRATE => Ok(()),
        other => bail!("unknown test byte {other:#x}"),
    }
}

/// Blocks until stdin reaches EOF: a start barrier for many clients.
pub fn wait_stdin() {
    say("READY");
    let mut sink = Vec::new();
    let _ = io::stdin().lock().read_to_end(&mut sink);
}

fn sync_point(what: &str) -> Result<()> {
    say(&format!("SYNC {what}"));
    let mut l = String::new();
    if io::stdin().lock().read_line(&mut l)? == 0 {
        bail!("stdin closed at SYNC {what}");
    }
    Ok(())
}

/// `client`: runs one test and returns its report.
pub fn client(o: &ClientOpts) -> Result<Report> {
    match o.mode {
        ClientMode::Pingpong => pingpong(o).map(Report::Pingpong),
        ClientMode::Bulk => bulk(o).map(Report::Bulk),
        ClientMode::Connrate => Ok(Report::Connrate(connrate(o, true))),
        ClientMode::Egress => Ok(Report::Egress(connrate(o, false))),
    }
}

fn pingpong(o: &ClientOpts) -> Result<PingPong> {
    let mut s = net::connect(&o.addr).with_context(|| format!("connect {}", o.addr))?;
    s.nodelay();
    s.timeouts(o.timeout);
    s.write_all(&[HDR_PINGPONG])?;
    let warmup = (o.iterations / 10).clamp(1, 1000);
    let mut b = [1u8; 1];
    let mut lat = Vec::with_capacity(o.iterations as usize);
    for i in 0..warmup + o.iterations {
        let t = Instant::now();
        s.write_all(&b)?;
        s.read_exact(&mut b).context("read echo")?;
        if i >= warmup {
            lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    drop(s);
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    Ok(PingPong {
        iterations: o.iterations,
        median_us: median(&lat).unwrap_or(f64::NAN),
        p99_us: quantile(&lat, 0.99).unwrap_or(f64::NAN),
        mean_us: mean,
        min_us: lat.iter().copied().fold(f64::INFINITY, f64::min),
    })
}

fn bulk(o: &ClientOpts) -> Result<Bulk> {
    let mut s = net::connect(&o.addr).with_context(|| format!("connect {}", o.addr))?;
    s.timeouts(o.timeout);
    let mut hdr = vec![HDR_BULK];
    hdr.extend_from_slice(&o.bytes.to_le_bytes());
    s.write_all(&hdr)?;
    if o.sync {
        sync_point("start")?;
    }
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let cpu0 = stats::process_cpu_ns();
    let (u0, s0) = stats::self_utime_stime_ns().unwrap_or_default();
    let t = Instant::now();
    let mut left = o.bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..n]).context("bulk write")?;
        left -= n as u64;
    }
    // The server knows the length: no half-close (some user-mode stacks
    // handle it badly), just wait for its one-line report.
    let mut reply = Vec::new();
    let mut b = [0u8; 256];
    while !reply.contains(&b'\n') {
        let n = s.read(&mut b).context("read server report")?;
        if n == 0 {
            bail!("server closed without a report");
        }
        reply.extend_from_slice(&b[..n]);
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu1 = stats::process_cpu_ns();
    let (u1, s1) = stats::self_utime_stime_ns().unwrap_or_default();
    if o.sync {
        sync_point("end")?;
    }
    let line = String::from_utf8_lossy(&reply);
    let line = line.trim();
    let r: ServerReport =
        serde_json::from_str(line).with_context(|| format!("server report {line:?}"))?;
    if r.bytes != o.bytes {
        bail!("server received {} bytes of {}", r.bytes, o.bytes);
    }
    Ok(Bulk {
        bytes: r.bytes,
        seconds: secs,
        gbit_s: r.bytes as f64 * 8.0 / secs / 1e9,
        client_cpu_ns: cpu1 - cpu0,
        server_cpu_ns: r.cpu_ns,
        client_utime_ns: u1.saturating_sub(u0),
        client_stime_ns: s1.saturating_sub(s0),
        server_utime_ns: r.utime_ns,
        server_stime_ns: r.stime_ns,
    })
}

/// Connect (+ 1 byte when `send`) + close, `iterations` times.
fn connrate(o: &ClientOpts, send: bool) -> ConnRate {
    let mut lat = Vec::with_capacity(o.iterations as usize);
    let mut errors = 0u64;
    let mut first_error = None;
    let start_ns = stats::monotonic_ns();
    let t = Instant::now();
    let mut attempts = 0u64;
    for _ in 0..o.iterations {
        if o.max_time.is_some_and(|m| t.elapsed() >= m) {
            break;
        }
        attempts += 1;
        let t0 = Instant::now();
        let r = net::connect(&o.addr).and_then(|mut s| {
            lat.push(t0.elapsed().as_nanos() as f64 / 1000.0);
            if send {
                s.write_all(&[HDR_CONNRATE])?;
            }
            Ok(())
        });
        if let Err(e) = r {
            errors += 1;
            first_error.get_or_insert_with(|| e.to_string());
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let end_ns = stats::monotonic_ns();
    let ok = attempts - errors;
    ConnRate {
        iterations: attempts,
        ok,
        errors,
        seconds: secs,
        conn_per_s: ok as f64 / secs,
        connect_median_us: median(&lat).unwrap_or(f64::NAN),
        connect_p99_us: quantile(&lat, 0.99).unwrap_or(f64::NAN),
        start_ns,
        end_ns,
        first_error,
    }
}

/// `syscall`: ns per `getppid` (a syscall no filter cares about), median
/// over batches of 10,000 calls.
pub fn syscall(iterations: u64) -> Syscall {
    const BATCH: u64 = 10_000;
    let batches = (iterations / BATCH).max(1);
    for _ in 0..BATCH {
        std::hint::black_box(rustix::process::getppid());
    }
    let mut per = Vec::with_capacity(batches as usize);
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..BATCH {
            std::hint::black_box(rustix::process::getppid());
        }
        per.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    Syscall {
        iterations: batches * BATCH,
        median_ns: median(&per).unwrap_or(f64::NAN),
        min_ns: per.iter().copied().fold(f64::INFINITY, f64::min),
    }
}

/// Raises the soft open-files limit to the hard one.
pub fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// `many-listeners`: listens on `count` ports from `base_port` on `ip`,
/// prints `READY`, then sleeps until killed. Under `ax exec --ip VIP` each
/// listener registers one service.
pub fn many_listeners(ip: IpAddr, base_port: u16, count: u32) -> Result<()> {
    raise_nofile();
    if u32::from(base_port) + count > 65536 {
        bail!("{count} ports from {base_port} do not fit below 65536");
    }
    let mut keep = Vec::with_capacity(count as usize);
    for i in 0..count {
        let a = Addr::Tcp(SocketAddr::new(ip, base_port + i as u16));
        keep.push(net::listen(&a, 16).with_context(|| format!("listener {} of {count}", i + 1))?);
    }
    say(&format!("READY {count}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `unixpair`: starts a server on a UNIX path (a child process), runs one
/// client test against it, and stops the server.
pub fn unixpair(
    mode: ClientMode,
    iterations: u64,
    bytes: u64,
    path: Option<&str>,
) -> Result<Report> {
    let path = path
        .map(String::from)
        .unwrap_or_else(|| format!("/tmp/ax-bench-unixpair-{}.sock", std::process::id()));
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["serve", "--bind", &format!("unix:{path}")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start server")?;
    let result = (|| {
        let out = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "READY" {
            bail!("server did not start: {line:?}");
        }
        client(&ClientOpts {
            addr: Addr::Unix(path.clone().into()),
            mode,
            iterations,
            bytes,
            timeout: Duration::from_secs(60),
            max_time: None,
            sync: false,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_server<F: FnOnce(Addr)>(addr: Addr, f: F) {
        let l = net::listen(&addr, 128).unwrap();
        std::thread::spawn(move || accept_loop(&l, ServeMode::Any));
        f(addr);
    }

    #[test]
    fn all_tests_over_unix() {
        let p = format!("/tmp/ax-bench-test-{}.sock", std::process::id());
        with_server(Addr::Unix(p.clone().into()), |addr| {
            let o = |mode, iterations, bytes| ClientOpts {
                addr: addr.clone(),
                mode,
                iterations,
                bytes,
                timeout: Duration::from_secs(10),
                max_time: None,
                sync: false,
            };
            let Report::Pingpong(pp) = client(&o(ClientMode::Pingpong, 200, 0)).unwrap() else {
                panic!()
            };
            assert!(pp.median_us > 0.0 && pp.p99_us >= pp.median_us);
            let Report::Bulk(b) = client(&o(ClientMode::Bulk, 0, 10 * CHUNK as u64 + 7)).unwrap()
            else {
                panic!()
            };
            assert_eq!(b.bytes, 10 * CHUNK as u64 + 7);
            let Report::Connrate(c) = client(&o(ClientMode::Connrate, 100, 0)).unwrap() else {
                panic!()
            };
            assert_eq!((c.ok, c.errors), (100, 0));
            let Report::Egress(c) = client(&o(ClientMode::Egress, 50, 0)).unwrap() else {
                panic!()
            };
            assert_eq!((c.ok, c.errors), (50, 0));
        });
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn tcp_loopback_and_refused() {
        // Port 0 would not tell us the port; pick one from a bound socket.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        with_server(Addr::Tcp(([127, 0, 0, 1], port).into()), |addr| {
            let o = ClientOpts {
                addr,
                mode: ClientMode::Connrate,
                iterations: 50,
                bytes: 0,
                timeout: Duration::from_secs(10),
                max_time: None,
                sync: false,
            };
            let Report::Connrate(c) = client(&o).unwrap() else {
                panic!()
            };
            assert_eq!(c.errors, 0);
        });
        let s = syscall(20_000);
        assert!(s.median_ns > 0.0);
        let json = serde_json::to_string(&Report::Syscall(s)).unwrap();
        assert!(json.starts_with("{\"mode\":\"syscall\""));
        let back: Report = serde_json::from_str(&json).unwrap();
        assert!(matches!(back, Report::Syscall(_)));
    }
}
