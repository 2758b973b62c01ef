//! End-to-end tests of services: names, replicas behind one name, labels
//! and policy, services exposed at host addresses, and clients that start
//! before their servers. Real programs (python3, curl, busybox-static, a
//! static Go binary), run by `scripts/test.sh` in a network namespace with
//! loopback only, as root and as an unprivileged user.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use ax_e2e::{
    build_go, elf_is_static, find_program, free_loopback_port, note, poll, require, run,
    signal_pid, App, Daemon, TempDir, SHORT,
};
use rustix::process::Signal;

/// `python3 -c SCRIPT ARGS…`
fn py(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["python3".to_string(), "-c".to_string(), script.to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// An HTTP server on 0.0.0.0:PORT answering every GET with BODY and a
/// newline; prints `READY` once it listens and, for every connection, the
/// peer address `accept` gave it (`PEER ip port`).
const TAGGED_HTTP_SERVER: &str = r#"
import http.server, socketserver, sys
port, body = int(sys.argv[1]), sys.argv[2].encode() + b"\n"
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    def get_request(self):
        conn, peer = self.socket.accept()
        print("PEER", peer[0], peer[1], flush=True)
        return conn, peer
s = S(("0.0.0.0", port), H)
print("READY", flush=True)
s.serve_forever()
"#;

/// Starts [`TAGGED_HTTP_SERVER`] under ax with `opts`, answering `body`,
/// and waits until it listens.
fn tagged_server(d: &Daemon, opts: &[&str], port: u16, body: &str) -> App {
    let mut app = d.spawn(opts, &py(TAGGED_HTTP_SERVER, &[&port.to_string(), body]));
    app.wait_for_stdout("READY", SHORT);
    app
}

/// The VIP `name` has, per `ax get apps`.
fn vip_of(d: &Daemon, name: &str) -> String {
    d.apps()
        .iter()
        .find(|a| {
            a["names"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x == name))
        })
        .and_then(|a| a["vips"][0].as_str().map(String::from))
        .unwrap_or_else(|| panic!("no app named {name}"))
}

/// All VIPs `name` has, per `ax get apps`.
fn vips_of(d: &Daemon, name: &str) -> Vec<String> {
    d.apps()
        .iter()
        .find(|a| {
            a["names"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x == name))
        })
        .and_then(|a| a["vips"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

// ---------------------------------------------------------------- names

/// A Go client with Go's own resolver (static, no libc): GETs the URL and
/// prints the status line's code and the body.
const GO_HTTP_GET: &str = r#"
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	r, err := http.Get(os.Args[1])
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	fmt.Printf("%d %s", r.StatusCode, b)
}
"#;

#[test]
fn names_resolve_for_glibc_busybox_and_go() {
    require!("python3", "curl", "busybox", "getent");
    let d = Daemon::start();
    let mut server = tagged_server(&d, &["--name", "web"], 8500, "hello-from-web");
    let vip = vip_of(&d, "web");

    // glibc (curl), both spellings.
    for host in ["web", "web.ax"] {
        let out = d.run(&[], &["curl", "-sS", &format!("http://{host}:8500/")]);
        out.assert_success();
        assert_eq!(out.stdout.trim(), "hello-from-web", "curl {host}: {out}");
    }
    // getent asks for IPv6 first: the app's IPv6 VIP, if it has one.
    let out = d.run(&[], &["getent", "hosts", "web"]);
    let all = vips_of(&d, "web");
    assert!(
        all.contains(&vip) && all.iter().any(|v| out.stdout.starts_with(v.as_str())),
        "getent: {out}"
    );
    // Names that are not ax's still resolve as on the host.
    let out = d.run(&[], &["getent", "hosts", "localhost"]);
    out.assert_success();

    // busybox-static: no libc interposition possible.
    let busybox = find_program("busybox").expect("busybox");
    if elf_is_static(&busybox).unwrap_or(false) {
        let out = d.run(
            &[],
            &["busybox", "wget", "-q", "-O", "-", "http://web.ax:8500/"],
        );
        out.assert_success();
        assert_eq!(out.stdout.trim(), "hello-from-web", "busybox wget: {out}");
    } else {
        note("busybox is not static here; tested it anyway as a dynamic binary");
    }

    // Go's own resolver, in a static binary.
    if find_program("go").is_some() {
        let dir = TempDir::new("go-names");
        let bin = build_go(&dir, GO_HTTP_GET);
        assert!(elf_is_static(std::path::Path::new(&bin)).unwrap_or(false));
        let out = d.run(&[], &[bin.as_str(), "http://web:8500/"]);
        out.assert_success();
        assert_eq!(out.stdout.trim(), "200 hello-from-web", "go: {out}");
    } else {
        assert!(!ax_e2e::strict(), "go is required in strict runs");
    }

    // Without ax the name means nothing: the program sees the host's file.
    let plain = run(
        std::process::Command::new("getent").args(["hosts", "web.ax"]),
        SHORT,
    );
    assert!(
        !plain.status.success(),
        "web.ax resolved without ax: {plain}"
    );
    server.kill();
}

/// Resolves NAME every 20 ms; prints `UP ip` when it first resolves and
/// `GONE` when it stops resolving, then exits. Started before the app.
const RESOLVER_LOOP: &str = r#"
import socket, sys, time
name, state = sys.argv[1], "waiting"
deadline = time.time() + 60
while time.time() < deadline:
    try:
        ip = socket.getaddrinfo(name, 80, socket.AF_INET)[0][4][0]
        if state == "waiting":
            print("UP", ip, flush=True)
            state = "up"
    except socket.gaierror:
        if state == "up":
            print("GONE", flush=True)
            sys.exit(0)
    time.sleep(0.02)
sys.exit(1)
"#;

#[test]
fn names_appear_and_disappear_without_restarting_clients() {
    require!("python3");
    let d = Daemon::start();
    let mut watcher = d.spawn(&[], &py(RESOLVER_LOOP, &["late"]));
    // The watcher runs (and fails to resolve) before the app exists.
    poll(SHORT, Duration::from_millis(20), || {
        d.apps()
            .iter()
            .any(|a| a["command"][0] == "python3")
            .then_some(())
    })
    .expect("watcher registered");
    let mut late = d.spawn(&["--name", "late"], &["sleep", "60"]);
    let line = watcher.wait_for_stdout("UP ", SHORT);
    let vip = vip_of(&d, "late");
    assert!(line.contains(&vip), "resolved {line:?}, VIP is {vip}");
    late.kill();
    watcher.wait_for_stdout("GONE", SHORT);
    assert!(watcher.wait(SHORT).success(), "{}", watcher.report());
}

// ---------------------------------------------------------------- replicas

/// Makes N requests, one connection each, to URL; prints one JSON object
/// counting the bodies, and the errors.
const COUNT_BODIES: &str = r#"
import json, sys, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
counts, errors = {}, []
for _ in range(n):
    try:
        body = urllib.request.urlopen(url, timeout=10).read().decode().strip()
        counts[body] = counts.get(body, 0) + 1
    except Exception as e:
        errors.append(repr(e))
print(json.dumps({"counts": counts, "errors": errors[:5], "failed": len(errors)}))
"#;

fn count_bodies(d: &Daemon, url: &str, n: u32) -> (BTreeMap<String, u64>, u64) {
    let out = d.run(&[], &py(COUNT_BODIES, &[url, &n.to_string()]));
    out.assert_success();
    let v: ax_e2e::serde_json::Value = ax_e2e::serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let counts = v["counts"]
        .as_object()
        .expect("counts")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    (counts, v["failed"].as_u64().unwrap_or(u64::MAX))
}

#[test]
fn three_servers_behind_one_name_share_connections() {
    require!("python3");
    let d = Daemon::start();
    let mut servers: Vec<App> = ["a", "b", "c"]
        .iter()
        .map(|tag| tagged_server(&d, &["--name", "shop"], 8600, &format!("backend-{tag}")))
        .collect();
    // One VIP, one service, three backends.
    let vips: Vec<String> = d
        .apps()
        .iter()
        .filter(|a| a["names"][0] == "shop")
        .map(|a| a["vips"][0].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(vips.len(), 3);
    assert!(vips.iter().all(|v| *v == vips[0]), "{vips:?}");
    let svc = d.wait_for_service(&mut servers[0], &format!("{}:8600", vips[0]));
    assert_eq!(svc["backends"].as_array().map(Vec::len), Some(3), "{svc}");
    assert_eq!(svc["lb"], "round-robin");

    // Round robin: 300 requests, 100 each, none failed.
    let (counts, failed) = count_bodies(&d, "http://shop:8600/", 300);
    note(&format!(
        "round robin over 3 backends, 300 requests: {counts:?}"
    ));
    assert_eq!(failed, 0);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&c| c == 100), "{counts:?}");

    // A backend that exited is never picked.
    servers[1].kill();
    poll(SHORT, Duration::from_millis(50), || {
        let s = d.services();
        (s.iter().find(|x| x["addr"] == svc["addr"])?["backends"]
            .as_array()?
            .len()
            == 2)
            .then_some(())
    })
    .expect("the dead backend leaves the service");
    let (counts, failed) = count_bodies(&d, "http://shop:8600/", 60);
    assert_eq!(failed, 0, "{counts:?}");
    assert!(!counts.contains_key("backend-b"), "{counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 60);
    for s in &mut servers {
        s.kill();
    }
}

#[test]
fn random_balancing_and_a_refusing_backend_skipped() {
    require!("python3");
    let d = Daemon::start();
    let mut servers: Vec<App> = ["x", "y", "z"]
        .iter()
        .map(|tag| {
            tagged_server(
                &d,
                &["--name", "rand", "--lb", "random"],
                8610,
                &format!("backend-{tag}"),
            )
        })
        .collect();
    let (counts, failed) = count_bodies(&d, "http://rand:8610/", 300);
    note(&format!("random over 3 backends, 300 requests: {counts:?}"));
    assert_eq!(failed, 0);
    assert_eq!(counts.len(), 3, "{counts:?}");
    // Binomial(300, 1/3): below 50 is more than 7 standard deviations off.
    assert!(counts.values().all(|&c| c >= 50), "{counts:?}");
    let svc = d
        .services()
        .into_iter()
        .find(|s| s["addr"].as_str().is_some_and(|a| a.ends_with(":8610")))
        .expect("service");
    assert_eq!(svc["lb"], "random");

    // A backend that closed its listener but lives on refuses: it is
    // skipped, and the next one answers.
    let mut closer = d.spawn(
        &["--name", "rand"],
        &py(
            r#"
import socket, sys, time
s = socket.socket(); s.bind(("0.0.0.0", 8610)); s.listen(1)
s.close()
print("CLOSED", flush=True)
time.sleep(60)
"#,
            &[],
        ),
    );
    closer.wait_for_stdout("CLOSED", SHORT);
    let (counts, failed) = count_bodies(&d, "http://rand:8610/", 60);
    assert_eq!(failed, 0, "a refusing backend was not skipped: {counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 60);
    closer.kill();
    for s in &mut servers {
        s.kill();
    }
}

#[test]
fn replicas_by_ip_need_lb() {
    require!("python3");
    let d = Daemon::start();
    let vip = "10.233.8.20";
    let mut first = tagged_server(&d, &["--ip", vip], 8620, "first");
    // The --ip of a running app: refused, with a hint…
    let out = d.run(&["--ip", vip], &["true"]);
    assert_eq!(out.code(), Some(125), "{out}");
    assert!(out.stderr.contains("--lb"), "{out}");
    // …unless the app asks to share its connections.
    let mut second = tagged_server(&d, &["--ip", vip, "--lb", "round-robin"], 8620, "second");
    let (counts, failed) = count_bodies(&d, &format!("http://{vip}:8620/"), 40);
    assert_eq!(failed, 0);
    assert_eq!(counts.get("first"), Some(&20), "{counts:?}");
    assert_eq!(counts.get("second"), Some(&20), "{counts:?}");
    first.kill();
    second.kill();
}

// ---------------------------------------------------------------- policy

/// Connects to HOST:PORT; prints `OK` or `ERRNO n`.
const TRY_CONNECT: &str = r#"
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()
    print("OK")
except OSError as e:
    print("ERRNO", e.errno)
"#;

fn try_connect(d: &Daemon, opts: &[&str], host: &str, port: u16) -> String {
    let out = d.run(opts, &py(TRY_CONNECT, &[host, &port.to_string()]));
    out.assert_success();
    out.stdout.trim().to_string()
}

#[test]
fn labels_decide_who_connects_and_denials_are_logged() {
    require!("python3");
    let d = Daemon::start();
    let mut db = tagged_server(&d, &["--name", "db", "--label", "tier=db"], 8700, "db");
    // A shared label lets in; none shared (an unlabelled client is in
    // zone=default) is refused like a closed port.
    assert_eq!(try_connect(&d, &["--label", "tier=db"], "db", 8700), "OK");
    assert_eq!(try_connect(&d, &[], "db", 8700), "ERRNO 111");
    assert_eq!(
        try_connect(&d, &["--label", "tier=web"], "db", 8700),
        "ERRNO 111"
    );
    // Non-blocking: EINPROGRESS, then the refusal from SO_ERROR. (By VIP:
    // "db" has an IPv6 VIP too, and asyncio folds two refusals into one
    // error without an errno.)
    let db_vip = vip_of(&d, "db");
    let out = d.run(
        &[],
        &py(
            r#"
import asyncio, sys
async def main():
    try:
        await asyncio.open_connection(sys.argv[1], 8700)
        print("OK")
    except OSError as e:
        print("ERRNO", e.errno)
asyncio.run(main())
"#,
            &[&db_vip],
        ),
    );
    assert_eq!(out.stdout.trim(), "ERRNO 111", "{out}");
    let log = poll(SHORT, Duration::from_millis(50), || {
        let log = d.log();
        log.lines()
            .any(|l| l.contains("connect denied by policy") && l.contains("tier=web"))
            .then_some(log)
    })
    .expect("denial logged");
    let line = log
        .lines()
        .find(|l| l.contains("connect denied by policy") && l.contains("tier=web"))
        .unwrap_or_default();
    for field in [
        "client_app=",
        "server_app=",
        "server_labels=tier=db",
        "rule=",
        ":8700",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    db.kill();
}

#[test]
fn policy_file_rules_and_reload_on_sighup() {
    require!("python3");
    let dir = TempDir::new("policy");
    let policy = dir.write(
        "policy.toml",
        r#"
default = "deny"
[[allow]]
name = "web-to-db"
from = { role = "web" }
to = { tier = "db" }
ports = [8710]
"#,
    );
    let mut d = Daemon::start_with(&[], &["--policy", policy.to_str().expect("utf-8")]);
    let mut db = tagged_server(&d, &["--name", "pdb", "--label", "tier=db"], 8710, "db");
    let mut db2 = tagged_server(&d, &["--name", "pdb2", "--label", "tier=db"], 8711, "db2");
    assert_eq!(try_connect(&d, &["--label", "role=web"], "pdb", 8710), "OK");
    // Not on the rule's port; a shared label no longer suffices.
    assert_eq!(
        try_connect(&d, &["--label", "role=web"], "pdb2", 8711),
        "ERRNO 111"
    );
    assert_eq!(
        try_connect(&d, &["--label", "tier=db"], "pdb", 8710),
        "ERRNO 111"
    );
    assert!(d.log().contains("rule=default: deny"), "{}", d.log());

    // Reload: a broken file keeps the policy in force…
    fs::write(&policy, "default = \"permit\"\n").expect("write policy");
    signal_pid(d.pid(), Signal::HUP).expect("SIGHUP");
    poll(SHORT, Duration::from_millis(50), || {
        d.log().contains("policy not reloaded").then_some(())
    })
    .expect("bad policy reported");
    assert_eq!(try_connect(&d, &["--label", "role=web"], "pdb", 8710), "OK");
    // …a good one takes over.
    fs::write(&policy, "default = \"shared-label\"\n").expect("write policy");
    signal_pid(d.pid(), Signal::HUP).expect("SIGHUP");
    poll(SHORT, Duration::from_millis(50), || {
        d.log().contains("policy reloaded").then_some(())
    })
    .expect("policy reloaded");
    assert_eq!(try_connect(&d, &["--label", "tier=db"], "pdb", 8710), "OK");
    assert_eq!(
        try_connect(&d, &["--label", "role=web"], "pdb", 8710),
        "ERRNO 111"
    );
    assert!(d.is_running(), "SIGHUP must not stop the daemon");
    db.kill();
    db2.kill();
}

// ---------------------------------------------------------------- expose

#[test]
fn exposed_service_is_reached_by_curl_without_ax() {
    require!("python3", "curl");
    let d = Daemon::start();
    let host_port = free_loopback_port();
    let expose = format!("8800:127.0.0.1:{host_port}");
    let dir = TempDir::new("expose");
    // 256 MiB served by python's own http.server, under ax.
    let big = dir.join("big.bin");
    let f = fs::File::create(&big).expect("create big file");
    f.set_len(256 << 20).expect("size big file");
    let mut server = d.spawn(
        &["--name", "files", "--expose", &expose],
        &py(
            r#"
import http.server, socketserver, sys, os
os.chdir(sys.argv[1])
class S(http.server.ThreadingHTTPServer):
    def get_request(self):
        conn, peer = self.socket.accept()
        print("PEER", peer[0], peer[1], flush=True)
        return conn, peer
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
s = S(("0.0.0.0", 8800), H)
print("READY", flush=True)
s.serve_forever()
"#,
            &[dir.path().to_str().expect("utf-8")],
        ),
    );
    server.wait_for_stdout("READY", SHORT);

    // curl is not under ax: a plain TCP client of the host address.
    let cpu_before = d.cpu_time();
    let t = Instant::now();
    let out = run(
        std::process::Command::new("curl").args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{local_port}",
            &format!("http://127.0.0.1:{host_port}/big.bin"),
        ]),
        Duration::from_secs(120),
    );
    let took = t.elapsed();
    let daemon_cpu = d.cpu_time().saturating_sub(cpu_before);
    out.assert_success();
    let fields: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(fields.first().copied(), Some("200"), "{out}");
    assert_eq!(fields.get(1).copied(), Some("268435456"), "{out}");
    // The server saw curl's own address and port.
    let peer = server.wait_for_stdout("PEER", SHORT);
    let curl_port = fields.get(2).copied().unwrap_or("?");
    assert!(
        peer.contains(&format!("PEER 127.0.0.1 {curl_port}")),
        "server saw {peer:?}, curl's port is {curl_port}"
    );
    note(&format!(
        "256 MiB through an exposed port in {took:?}; daemon CPU meanwhile {daemon_cpu:?}"
    ));
    // Data never passed through the daemon: its CPU time stayed flat.
    assert!(
        daemon_cpu <= Duration::from_millis(50),
        "daemon used {daemon_cpu:?} during a {took:?} download"
    );

    // `ax get exposures`, and `ax expose` for the running service.
    let list = d.get_json("exposures");
    assert_eq!(list[0]["host"], format!("127.0.0.1:{host_port}"), "{list}");
    let second = free_loopback_port();
    let mut cmd = d.ax();
    cmd.args(["expose", "files:8800", &format!("127.0.0.1:{second}")]);
    let out = run(&mut cmd, SHORT);
    out.assert_success();
    let fetch = |port: u16| {
        run(
            std::process::Command::new("curl").args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://127.0.0.1:{port}/"),
            ]),
            SHORT,
        )
    };
    assert_eq!(fetch(second).stdout.trim(), "200");
    let mut cmd = d.ax();
    cmd.args(["expose", "--remove", &format!("127.0.0.1:{second}")]);
    run(&mut cmd, SHORT).assert_success();
    assert!(
        !fetch(second).status.success(),
        "still exposed after --remove"
    );

    // The exposure ends with its app.
    server.kill();
    poll(SHORT, Duration::from_millis(100), || {
        (!fetch(host_port).status.success()).then_some(())
    })
    .expect("exposure ends with the app");
}

// ---------------------------------------------------------------- start order

#[test]
fn clients_started_before_their_server_wait_for_it() {
    require!("python3", "curl");
    let d = Daemon::start();
    let vip = "10.233.8.1";
    // Blocking (python's create_connection) and non-blocking (curl).
    let mut blocking = d.spawn(
        &["--connect-wait", "30s"],
        &py(
            r#"
import socket, sys
c = socket.socket()  # no timeout: a blocking socket
c.connect((sys.argv[1], 8900))
c.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    chunk = c.recv(1000)
    if not chunk:
        break
    data += chunk
print("BLOCKING", data.decode().split("\r\n\r\n")[-1].strip(), flush=True)
"#,
            &[vip],
        ),
    );
    let mut nonblocking = d.spawn(
        &["--connect-wait", "30s"],
        &["curl", "-sS", &format!("http://{vip}:8900/")],
    );
    // Both wait (the daemon says so) before the server exists.
    poll(SHORT, Duration::from_millis(20), || {
        let log = d.log();
        (log.contains("connect waits for the service")
            && log.contains("connect held until the service is up"))
        .then_some(())
    })
    .expect("both clients waiting");
    assert!(blocking.try_status().is_none() && nonblocking.try_status().is_none());
    let mut server = tagged_server(&d, &["--ip", vip], 8900, "late-server");
    blocking.wait_for_stdout("BLOCKING late-server", SHORT);
    assert!(
        nonblocking.wait(SHORT).success(),
        "{}",
        nonblocking.report()
    );
    assert_eq!(nonblocking.stdout().trim(), "late-server");

    // Nobody comes: refused at the deadline, not before.
    let t = Instant::now();
    assert_eq!(
        try_connect(&d, &["--connect-wait", "1s"], "10.233.8.2", 8900),
        "ERRNO 111"
    );
    let waited = t.elapsed();
    assert!(waited >= Duration::from_secs(1), "refused after {waited:?}");
    server.kill();
}
