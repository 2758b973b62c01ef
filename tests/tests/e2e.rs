//! End-to-end tests: real, unmodified programs under `ax exec`.
//!
//! Run them with `scripts/test.sh`, which builds ax and runs this binary
//! inside a network namespace with loopback only, as root and as an
//! unprivileged user. Each test starts its own daemon; VIPs and ports are
//! distinct per test anyway, so that logs never confuse one with another.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ax_e2e::serde_json::{self, json, Value};
use ax_e2e::{
    descendants, elf_is_static, euid, find_program, free_loopback_port, peer_pid, poll, require,
    run, run_with_input, signal_pid, unique, App, Daemon, TempDir, SHORT, THREADED_ECHO_SERVER,
};
use rustix::process::Signal;

// ---------------------------------------------------------------- helpers

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `python3 -c SCRIPT ARGS…`
fn py(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["python3".to_string(), "-c".to_string(), script.to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// The first line of `text` that parses as a JSON object.
fn json_line(text: &str) -> Value {
    text.lines()
        .find_map(|l| {
            let l = l.trim();
            l.starts_with('{')
                .then(|| serde_json::from_str(l).ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no JSON line in output:\n{text}"))
}

/// All lines of `text` that parse as JSON objects.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| {
            serde_json::from_str(l.trim()).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}"))
        })
        .collect()
}

/// One socket as `ss -xn` prints it.
#[derive(Debug, Clone)]
struct SsRow {
    netid: String,
    state: String,
    local: String,
    lport: String,
    peer: String,
    rport: String,
    line: String,
}

/// Parses `ss -xn` output (columns: Netid State Recv-Q Send-Q Local Port Peer Port).
fn parse_ss_x(out: &str) -> Vec<SsRow> {
    out.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            Some(SsRow {
                netid: f[0].into(),
                state: f[1].into(),
                local: f[4].into(),
                lport: f[5].into(),
                peer: f[6].into(),
                rport: f[7].into(),
                line: line.to_string(),
            })
        })
        .collect()
}

fn ss(args: &[&str]) -> String {
    run(Command::new("ss").args(args), SHORT)
        .assert_success()
        .stdout
        .clone()
}

/// The inode of the socket at `/proc/PID/fd/FD`.
fn socket_inode(pid: u32, fd: u32) -> String {
    let link = fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/fd/{fd}: {e}"));
    let link = link.to_string_lossy().into_owned();
    link.strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or_else(|| panic!("/proc/{pid}/fd/{fd} is {link:?}, not a socket"))
        .to_string()
}

/// The `(pid, fd)` pairs among `pids` that hold the socket `inode`.
fn procs_of_inode(pids: &[u32], inode: &str) -> Vec<(u32, u32)> {
    let want = format!("socket:[{inode}]");
    let mut out = Vec::new();
    for &pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in fds.flatten() {
            let is = fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want);
            if let (true, Some(fd)) = (is, e.file_name().to_str().and_then(|n| n.parse().ok())) {
                out.push((pid, fd));
            }
        }
    }
    out
}

/// The first backend's UNIX listener as `ss` prints it (`@name` for
/// abstract names).
fn endpoint_name(svc: &Value) -> String {
    svc["backends"][0]["listener"]
        .as_str()
        .unwrap_or_else(|| panic!("service has no backend listener: {svc}"))
        .to_string()
}

fn as_u32(v: &Value) -> u32 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a number")) as u32
}

fn is_v4_vip(s: &str) -> bool {
    s.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.octets()[0] == 10 && ip.octets()[1] == 233)
}

/// `python3 -c ECHO_CLIENT HOST PORT MSG`: prints the echoed line.
const ECHO_CLIENT: &str = r#"
import socket, sys
host, port, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.connect((host, port))
s.sendall(msg.encode() + b"\n")
print(s.makefile("rb").readline().decode().strip(), flush=True)
"#;

// ---------------------------------------------------------------- a. http.server + curl

/// Connects, reports its socket, waits for a line on stdin, then sends an
/// HTTP request and prints the response as JSON.
const HOLD_HTTP_CLIENT: &str = r#"
import json, os, socket, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect((host, port))
print(json.dumps({"pid": os.getpid(), "fd": s.fileno(),
                  "sockname": list(s.getsockname()), "peername": list(s.getpeername())}), flush=True)
print("READY", flush=True)
sys.stdin.readline()
s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path, host)).encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print("RESPONSE " + json.dumps(data.decode(errors="replace")), flush=True)
"#;

#[test]
fn http_server_and_curl_talk_over_unix_sockets() {
    require!("python3", "curl", "ss", "sh");
    let d = Daemon::start();
    let www = TempDir::new("www");
    let body = format!("hello from ax e2e {}\n", unique());
    www.write("hello.txt", &body);
    let mut server = d.spawn(
        &["--ip", "10.233.0.10"],
        &[
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "0.0.0.0",
            "--directory",
            p(www.path()),
        ],
    );
    let svc = d.wait_for_service(&mut server, "10.233.0.10:8000");
    let endpoint = endpoint_name(&svc);
    assert!(
        endpoint.starts_with("@ax/") && endpoint.ends_with("/8000"),
        "service endpoint should be an abstract @ax/…/8000 name: {svc}"
    );

    // curl under ax: 200 and the exact body.
    let out = d.run(
        &[],
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "http://10.233.0.10:8000/hello.txt",
        ],
    );
    out.assert_success();
    assert_eq!(out.stdout, format!("{body}\n200"), "curl output: {out}");

    // A grandchild of the program is covered too.
    let out = d.run(
        &[],
        &[
            "sh",
            "-c",
            "curl -sS --max-time 10 http://10.233.0.10:8000/hello.txt | cat",
        ],
    );
    out.assert_success();
    assert_eq!(out.stdout, body, "curl run by sh: {out}");

    // The kernel's view while a client holds a connection.
    let mut client = d.spawn(
        &[],
        &py(HOLD_HTTP_CLIENT, &["10.233.0.10", "8000", "/hello.txt"]),
    );
    let out = client.wait_for_stdout("READY", SHORT);
    let info = json_line(&out);
    let (cpid, cfd) = (as_u32(&info["pid"]), as_u32(&info["fd"]));
    assert_eq!(
        info["peername"],
        json!(["10.233.0.10", 8000]),
        "client getpeername: {info}"
    );
    let own = info["sockname"][0].as_str().unwrap_or_default();
    assert!(
        is_v4_vip(own) && own != "10.233.0.10",
        "client getsockname should be its own pool VIP in 10.233.0.0/16: {info}"
    );
    assert!(
        info["sockname"][1].as_u64().unwrap_or(0) > 0,
        "client port: {info}"
    );

    let client_pids = client.pids();
    let server_pids = server.pids();
    assert!(
        client_pids.contains(&cpid),
        "client pid {cpid} not under ax exec {}",
        client.pid()
    );

    // ax's UNIX sockets live in the daemon's private network namespace:
    // the host's table shows none of them, the private one shows them.
    let host_table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    assert!(
        !host_table.contains("@ax/"),
        "ax names visible in the host's network namespace:\n{host_table}"
    );
    // `ss -p` cannot name processes from inside another user namespace:
    // sockets are matched by inode, from the programs' /proc/PID/fd.
    let xs = run(&mut d.in_private_ns(&["ss", "-xn"]), SHORT)
        .assert_success()
        .stdout
        .clone();
    let rows = parse_ss_x(&xs);
    let client_inode = socket_inode(cpid, cfd);
    let crow = rows
        .iter()
        .find(|r| r.lport == client_inode)
        .unwrap_or_else(|| {
            panic!("client socket (pid {cpid}, fd {cfd}) is not an AF_UNIX socket in ss -xn:\n{xs}")
        })
        .clone();
    assert_eq!(crow.netid, "u_str", "client socket: {}", crow.line);
    assert_eq!(crow.state, "ESTAB", "client socket: {}", crow.line);
    assert_eq!(
        socket_inode(cpid, cfd),
        crow.lport,
        "/proc/{cpid}/fd/{cfd} vs ss row {}",
        crow.line
    );
    // Unbound, so that the server's recvfrom reports no address, as over
    // TCP: the client's identity is the broker's to keep.
    assert_eq!(
        crow.local, "*",
        "client UNIX socket should be unbound: {}",
        crow.line
    );
    let srow = rows
        .iter()
        .find(|r| r.lport == crow.rport)
        .unwrap_or_else(|| {
            panic!(
                "the client's peer (inode {}) is not in ss -xpn:\n{xs}",
                crow.rport
            )
        })
        .clone();
    assert_eq!(srow.state, "ESTAB", "server end: {}", srow.line);
    assert_eq!(
        srow.rport, crow.lport,
        "server end's peer is not the client: {}",
        srow.line
    );
    let owners = procs_of_inode(&server_pids, &srow.lport);
    let (spid, sfd) = *owners.first().unwrap_or_else(|| {
        panic!(
            "the client's peer socket is not owned by the server (pids {server_pids:?}): {}",
            srow.line
        )
    });
    assert_eq!(socket_inode(spid, sfd), srow.lport);
    assert!(
        srow.local.starts_with("@ax/") && srow.local.contains("/8000"),
        "server end should carry the listener's @ax/…/8000 name: {}",
        srow.line
    );
    let _ = &srow.peer;

    // No TCP socket belongs to either side.
    let tcp = ss(&["-tanp"]);
    for pid in client_pids.iter().chain(server_pids.iter()) {
        assert!(
            !tcp.contains(&format!("pid={pid},")),
            "pid {pid} owns a TCP socket:\n{tcp}"
        );
    }
    assert!(!tcp.contains("10.233."), "a TCP socket uses a VIP:\n{tcp}");

    // And the connection works.
    client.send("go\n");
    let out = client.wait_for_stdout("RESPONSE", SHORT);
    let resp: String = out
        .lines()
        .find_map(|l| l.strip_prefix("RESPONSE "))
        .map(|j| serde_json::from_str(j).expect("response JSON"))
        .expect("response line");
    assert!(resp.starts_with("HTTP/1.0 200"), "response: {resp:?}");
    assert!(resp.ends_with(&body), "response body: {resp:?}");
    let st = client.wait(SHORT);
    assert!(st.success(), "client: {}", client.report());
}

// ---------------------------------------------------------------- b. busybox (static)

#[test]
fn busybox_static_httpd_and_wget() {
    require!("busybox");
    let bb = find_program("busybox").expect("busybox");
    let bb_s = bb.to_str().expect("utf-8").to_string();
    assert!(
        elf_is_static(&bb).unwrap_or_else(|e| panic!("{}: {e}", bb.display())),
        "{} is dynamically linked; install busybox-static",
        bb.display()
    );
    let d = Daemon::start();
    let www = TempDir::new("bbwww");
    let body = format!("busybox says hi {}\n", unique());
    www.write("hello.txt", &body);
    let mut server = d.spawn(
        &["--ip", "10.233.0.20"],
        &[
            bb_s.as_str(),
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            p(www.path()),
        ],
    );
    d.wait_for_service(&mut server, "10.233.0.20:8080");
    let out = d.run(
        &[],
        &[
            bb_s.as_str(),
            "wget",
            "-q",
            "-O",
            "-",
            "http://10.233.0.20:8080/hello.txt",
        ],
    );
    out.assert_success();
    assert_eq!(out.stdout, body, "busybox wget: {out}");
    // A 404 is an HTTP answer too: the static server really answered.
    let out = d.run(
        &[],
        &[
            bb_s.as_str(),
            "wget",
            "-q",
            "-O",
            "-",
            "http://10.233.0.20:8080/missing.txt",
        ],
    );
    assert!(!out.status.success(), "wget of a missing file: {out}");
    assert!(
        out.stderr.contains("404"),
        "busybox wget should report 404: {out}"
    );
}

// ---------------------------------------------------------------- c. redis

#[test]
fn redis_server_cli_and_benchmark() {
    require!("redis-server", "redis-cli", "redis-benchmark");
    let d = Daemon::start();
    let data = TempDir::new("redis");
    let mut server = d.spawn(
        &["--ip", "10.233.0.40"],
        &[
            "redis-server",
            "--port",
            "6380",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            p(data.path()),
        ],
    );
    d.wait_for_service(&mut server, "10.233.0.40:6380");
    let cli = |args: &[&str]| {
        let mut argv = vec!["redis-cli", "-h", "10.233.0.40", "-p", "6380"];
        argv.extend_from_slice(args);
        let out = d.run(&["--ip", "10.233.0.41"], &argv);
        out.assert_success();
        out.stdout.trim().to_string()
    };
    assert_eq!(cli(&["PING"]), "PONG");
    let value = format!("v-{}", unique());
    assert_eq!(cli(&["SET", "ax-e2e-key", &value]), "OK");
    assert_eq!(cli(&["GET", "ax-e2e-key"]), value);
    // Redis's own view of the connection: accept() and getsockname().
    let list = cli(&["CLIENT", "LIST"]);
    assert!(
        list.contains("addr=10.233.0.41:"),
        "redis should see the client's VIP 10.233.0.41 as its address: {list}"
    );
    assert!(
        list.contains("laddr=10.233.0.40:6380"),
        "redis should see 10.233.0.40:6380 as the local address: {list}"
    );

    let mut cmd = d.exec_command(
        &[],
        &[
            "redis-benchmark",
            "-h",
            "10.233.0.40",
            "-p",
            "6380",
            "-n",
            "2000",
            "-c",
            "10",
            "-t",
            "set,get",
            "-q",
        ],
    );
    let out = run(&mut cmd, Duration::from_secs(120));
    out.assert_success();
    let text = out.stdout.replace('\r', "\n");
    for t in ["SET:", "GET:"] {
        assert!(
            text.lines()
                .any(|l| l.contains(t) && l.contains("requests per second")),
            "redis-benchmark has no {t} result: {out}"
        );
    }
}

// ---------------------------------------------------------------- d. dual stack

/// Listens on [::]:PORT with IPV6_V6ONLY=0 and answers each connection with
/// one JSON line: accept()'s address, getsockname(), getpeername().
const DUAL_SERVER: &str = r#"
import json, socket, sys
port = int(sys.argv[1])
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", port))
srv.listen(16)
print(json.dumps({"listening": list(srv.getsockname()[:2])}), flush=True)
while True:
    c, peer = srv.accept()
    info = {"accept": list(peer[:2]), "sockname": list(c.getsockname()[:2]),
            "peername": list(c.getpeername()[:2])}
    c.sendall((json.dumps(info) + "\n").encode())
    c.close()
"#;

/// Connects once per (label, family, host) and prints what both sides saw.
const DUAL_CLIENT: &str = r#"
import json, socket, sys
port = int(sys.argv[1])
cases = [("v4", socket.AF_INET, sys.argv[2]), ("v6", socket.AF_INET6, sys.argv[3]),
         ("mapped", socket.AF_INET6, "::ffff:" + sys.argv[2])]
for label, fam, host in cases:
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.connect((host, port))
    except OSError as e:
        print(json.dumps({"case": label, "error": str(e)}), flush=True)
        continue
    server = json.loads(s.makefile("rb").readline())
    print(json.dumps({"case": label, "sockname": list(s.getsockname()[:2]),
                      "peername": list(s.getpeername()[:2]), "server": server}), flush=True)
    s.close()
"#;

#[test]
fn dual_stack_addresses_in_each_sockets_family() {
    require!("python3");
    let d = Daemon::start();
    let mut server = d.spawn(
        &["--ip", "10.233.0.30", "--ip", "fd00:a8::30"],
        &py(DUAL_SERVER, &["9000"]),
    );
    d.wait_for_service(&mut server, "10.233.0.30:9000");
    d.wait_for_service(&mut server, "[fd00:a8::30]:9000");
    let listening = json_line(&server.wait_for_stdout("listening", SHORT));
    assert_eq!(
        listening["listening"],
        json!(["::", 9000]),
        "listener getsockname"
    );

    let out = d.run(
        &["--ip", "fd00:a8::31", "--ip", "10.233.0.31"],
        &py(DUAL_CLIENT, &["9000", "10.233.0.30", "fd00:a8::30"]),
    );
    out.assert_success();
    let cases = json_lines(&out.stdout);
    assert_eq!(cases.len(), 3, "{out}");
    let expect = [
        // case, client's own VIP, VIP connected to, how the server sees each
        (
            "v4",
            "10.233.0.31",
            "10.233.0.30",
            "::ffff:10.233.0.31",
            "::ffff:10.233.0.30",
        ),
        (
            "v6",
            "fd00:a8::31",
            "fd00:a8::30",
            "fd00:a8::31",
            "fd00:a8::30",
        ),
        (
            "mapped",
            "::ffff:10.233.0.31",
            "::ffff:10.233.0.30",
            "::ffff:10.233.0.31",
            "::ffff:10.233.0.30",
        ),
    ];
    for ((case, c_own, c_peer, s_peer, s_own), got) in expect.iter().zip(&cases) {
        assert_eq!(got["case"], *case);
        assert!(got.get("error").is_none(), "{case}: connect failed: {got}");
        assert_eq!(
            got["peername"],
            json!([c_peer, 9000]),
            "{case}: client getpeername: {got}"
        );
        assert_eq!(
            got["sockname"][0], *c_own,
            "{case}: client getsockname: {got}"
        );
        let cport = got["sockname"][1].as_u64().unwrap_or(0);
        assert!(cport > 0, "{case}: client port: {got}");
        let srv = &got["server"];
        assert_eq!(
            srv["accept"],
            json!([s_peer, cport]),
            "{case}: server accept() address: {got}"
        );
        assert_eq!(
            srv["peername"], srv["accept"],
            "{case}: server getpeername: {got}"
        );
        assert_eq!(
            srv["sockname"],
            json!([s_own, 9000]),
            "{case}: server getsockname: {got}"
        );
    }
}

// ---------------------------------------------------------------- e. asyncio (non-blocking)

const ASYNC_SERVER: &str = r#"
import asyncio, sys
async def handle(r, w):
    line = await r.readline()
    w.write(b"echo:" + line)
    await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]))
    print("LISTENING", flush=True)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"#;

const ASYNC_CLIENT: &str = r#"
import asyncio, fcntl, json, os, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def one(i):
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    fd = w.get_extra_info("socket").fileno()
    # O_NONBLOCK of the open file description the program now holds.
    nonblocking = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)
    info = {"nonblocking": nonblocking, "peer": list(w.get_extra_info("peername")[:2])}
    w.write(b"msg-%d\n" % i)
    await w.drain()
    info["reply"] = (await asyncio.wait_for(r.readline(), 10)).decode()
    w.close()
    return info
async def main():
    res = await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps(res), flush=True)
asyncio.run(main())
"#;

#[test]
fn asyncio_nonblocking_client_and_server() {
    require!("python3");
    let d = Daemon::start();
    let mut server = d.spawn(&["--ip", "10.233.0.50"], &py(ASYNC_SERVER, &["9100"]));
    d.wait_for_service(&mut server, "10.233.0.50:9100");
    let out = d.run(&[], &py(ASYNC_CLIENT, &["10.233.0.50", "9100", "20"]));
    out.assert_success();
    let res: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("client output not JSON ({e}): {out}"));
    let res = res.as_array().expect("array");
    assert_eq!(res.len(), 20);
    for (i, r) in res.iter().enumerate() {
        assert_eq!(r["reply"], format!("echo:msg-{i}\n"), "connection {i}: {r}");
        assert_eq!(r["nonblocking"], true, "connection {i}: {r}");
        assert_eq!(
            r["peer"],
            json!(["10.233.0.50", 9100]),
            "connection {i}: {r}"
        );
    }
}

// ---------------------------------------------------------------- f. egress

/// A native (not under ax) threaded server on 127.0.0.1:0: answers `native:LINE`.
const NATIVE_SERVER: &str = r#"
import json, os, socket, threading
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind(("127.0.0.1", 0))
srv.listen(16)
print(json.dumps({"port": srv.getsockname()[1], "pid": os.getpid()}), flush=True)
def handle(c):
    with c:
        for line in c.makefile("rb"):
            c.sendall(b"native:" + line)
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

const EGRESS_CLIENT: &str = r#"
import errno, json, os, select, socket, sys
port, closed = int(sys.argv[1]), int(sys.argv[2])
def name(e):
    return "OK" if e == 0 else errno.errorcode.get(e, str(e))
res = {}
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect(("127.0.0.1", port))
s.sendall(b"hi\n")
res["reply"] = s.makefile("rb").readline().decode()
res["sockname_ip"] = s.getsockname()[0]
res["peername"] = list(s.getpeername())
# Non-blocking connect: EINPROGRESS (or 0), then writable with SO_ERROR 0.
n = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
n.setblocking(False)
rc = n.connect_ex(("127.0.0.1", port))
res["nb_rc_ok"] = name(rc) in ("OK", "EINPROGRESS")
select.select([], [n], [], 10)
res["nb_err"] = name(n.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
n.setblocking(True)
n.sendall(b"nb\n")
res["nb_reply"] = n.makefile("rb").readline().decode()
# A closed port on loopback.
c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:
    c.connect(("127.0.0.1", closed))
    res["closed"] = "OK"
except OSError as e:
    res["closed"] = name(e.errno)
c2 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
c2.setblocking(False)
rc = c2.connect_ex(("127.0.0.1", closed))
if name(rc) == "EINPROGRESS":
    select.select([], [c2], [], 10)
    rc = c2.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
res["closed_nb"] = name(rc)
print(json.dumps(dict(res, pid=os.getpid(), fd=s.fileno())), flush=True)
print("READY", flush=True)
sys.stdin.readline()
"#;

#[test]
fn egress_to_native_loopback_server() {
    require!("python3", "ss");
    let d = Daemon::start();
    let mut native = App::spawn({
        let mut c = Command::new("python3");
        c.arg("-c").arg(NATIVE_SERVER);
        c
    });
    let info = json_line(&native.wait_for_stdout("port", SHORT));
    let port = as_u32(&info["port"]).to_string();
    let closed = free_loopback_port().to_string();

    // The same script without ax is the reference.
    let reference = run_with_input(
        Command::new("python3").args(["-c", EGRESS_CLIENT, &port, &closed]),
        b"\n",
        SHORT,
    );
    reference.assert_success();
    let mut want = json_line(&reference.stdout);

    let mut client = d.spawn(&[], &py(EGRESS_CLIENT, &[&port, &closed]));
    let out = client.wait_for_stdout("READY", SHORT);
    let mut got = json_line(&out);
    let (cpid, cfd) = (as_u32(&got["pid"]), as_u32(&got["fd"]));
    for v in [&mut got, &mut want] {
        let o = v.as_object_mut().expect("object");
        o.remove("pid");
        o.remove("fd");
    }
    assert_eq!(got, want, "under ax (left) vs native (right)");
    assert_eq!(got["reply"], "native:hi\n");
    assert_eq!(got["closed"], "ECONNREFUSED");
    assert_eq!(got["peername"], json!(["127.0.0.1", as_u32(&info["port"])]));

    // The kernel shows a real TCP connection for the client's fd.
    let tcp = ss(&["-tnp"]);
    let line = tcp
        .lines()
        .find(|l| l.contains(&format!("pid={cpid},fd={cfd})")))
        .unwrap_or_else(|| panic!("no TCP socket for pid {cpid} fd {cfd} in ss -tnp:\n{tcp}"));
    assert!(
        line.starts_with("ESTAB") && line.contains(&format!("127.0.0.1:{port}")),
        "egress socket: {line}"
    );
    client.send("\n");
    assert!(client.wait(SHORT).success(), "{}", client.report());
}

// ---------------------------------------------------------------- g. forking servers

const FORKING_SERVER: &str = r#"
import os, socketserver, sys
class H(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline().decode().strip()
        self.wfile.write(("%d %s %s\n" % (os.getpid(), self.client_address[0], line)).encode())
class S(socketserver.ForkingTCPServer):
    allow_reuse_address = True
with S(("0.0.0.0", int(sys.argv[1])), H) as s:
    print("LISTENING", os.getpid(), flush=True)
    s.serve_forever()
"#;

#[test]
fn forking_tcp_server() {
    require!("python3");
    let d = Daemon::start();
    let mut server = d.spawn(&["--ip", "10.233.0.60"], &py(FORKING_SERVER, &["9200"]));
    d.wait_for_service(&mut server, "10.233.0.60:9200");
    let out = server.wait_for_stdout("LISTENING", SHORT);
    let main_pid: u32 = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("server pid");
    let mut workers = BTreeSet::new();
    for i in 0..5 {
        let msg = format!("req-{i}");
        let out = d.run(&[], &py(ECHO_CLIENT, &["10.233.0.60", "9200", &msg]));
        out.assert_success();
        let f: Vec<&str> = out.stdout.split_whitespace().collect();
        assert_eq!(f.len(), 3, "reply: {out}");
        let pid: u32 = f[0].parse().expect("pid");
        assert_ne!(pid, main_pid, "request {i} answered by the main process");
        assert!(
            is_v4_vip(f[1]),
            "worker's accept() address {} is not a VIP",
            f[1]
        );
        assert_eq!(f[2], msg);
        workers.insert(pid);
    }
    assert_eq!(
        workers.len(),
        5,
        "each request in its own worker: {workers:?}"
    );
}

/// Binds and listens, then forks workers that all accept on the inherited listener.
const PREFORK_SERVER: &str = r#"
import os, socket, sys, time
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
workers = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        while True:
            c, peer = srv.accept()
            line = c.makefile("rb").readline().decode().strip()
            c.sendall(("%d %s %s\n" % (os.getpid(), peer[0], line)).encode())
            c.close()
    workers.append(pid)
print("WORKERS", " ".join(map(str, workers)), flush=True)
while True:
    time.sleep(60)
"#;

const MANY_CLIENT: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect((host, port))
    s.sendall(b"req-%d\n" % i)
    print(s.makefile("rb").readline().decode().strip(), flush=True)
    s.close()
"#;

#[test]
fn prefork_workers_accept_on_inherited_listener() {
    require!("python3");
    let d = Daemon::start();
    let mut server = d.spawn(&["--ip", "10.233.0.61"], &py(PREFORK_SERVER, &["9250"]));
    d.wait_for_service(&mut server, "10.233.0.61:9250");
    let out = server.wait_for_stdout("WORKERS", SHORT);
    let workers: BTreeSet<u32> = out
        .lines()
        .find_map(|l| l.strip_prefix("WORKERS "))
        .expect("workers line")
        .split_whitespace()
        .map(|s| s.parse().expect("pid"))
        .collect();
    let out = d.run(
        &["--ip", "10.233.0.62"],
        &py(MANY_CLIENT, &["10.233.0.61", "9250", "9"]),
    );
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 9, "{out}");
    for (i, l) in lines.iter().enumerate() {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f.len(), 3, "reply {i}: {l}");
        let pid: u32 = f[0].parse().expect("pid");
        assert!(
            workers.contains(&pid),
            "reply {i} from {pid}, not a worker {workers:?}"
        );
        assert_eq!(f[1], "10.233.0.62", "worker's accept() address, reply {i}");
        assert_eq!(f[2], format!("req-{i}"));
    }
}

// ---------------------------------------------------------------- h. errors

const CONNECT_PROBE: &str = r#"
import errno, json, select, socket, sys
def name(e):
    return "OK" if e == 0 else errno.errorcode.get(e, str(e))
res = {}
for label, host, port in [("v4", sys.argv[1], int(sys.argv[3])), ("v6", sys.argv[2], int(sys.argv[3])),
                          ("v4_other_port", sys.argv[4], int(sys.argv[5]))]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.connect((host, port))
        res[label] = "OK"
    except OSError as e:
        res[label] = name(e.errno)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setblocking(False)
    rc = s.connect_ex((host, port))
    if name(rc) == "EINPROGRESS":
        select.select([], [s], [], 10)
        rc = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    res[label + "_nonblocking"] = name(rc)
print(json.dumps(res, sort_keys=True), flush=True)
"#;

/// Connects a non-blocking socket, waits until it is writable and connects
/// it twice more (what APR, and so `ab` and Apache httpd, does with every
/// socket), three times over, then connects a blocking socket again: the
/// errno of each, as JSON (`seq`).
const RECONNECT_PROBE: &str = r#"
import errno, json, select, socket, sys
def name(e):
    return "OK" if e == 0 else errno.errorcode.get(e, str(e))
host, port = sys.argv[1], int(sys.argv[2])
out = []
for i in range(3):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    seq = [name(s.connect_ex((host, port)))]
    select.select([], [s], [], 10)
    seq.append(name(s.connect_ex((host, port))))
    seq.append(name(s.connect_ex((host, port))))
    s.setblocking(True)
    s.sendall(b"x\n")
    seq.append(s.recv(100).decode().strip())
    s.close()
    out.append(seq)
b = socket.create_connection((host, port))
out.append([name(b.connect_ex((host, port)))])
print(json.dumps({"seq": out}), flush=True)
"#;

/// A socket connected again after `EINPROGRESS` answers as over TCP: 0 the
/// first time (the connect completes), `EISCONN` after. The second round
/// on is answered from the broker's records of its connections (an app
/// seen connecting again takes that shorter path); a fresh socket's
/// connect still takes the full one.
#[test]
fn connecting_again_after_einprogress_answers_as_tcp() {
    require!("python3");
    let native = App::spawn({
        let mut c = Command::new("python3");
        c.args(["-c", THREADED_ECHO_SERVER, "127.0.0.1", "7311"]);
        c
    });
    let mut native = native;
    native.wait_for_stdout("LISTENING", SHORT);
    let reference = run(
        Command::new("python3").args(["-c", RECONNECT_PROBE, "127.0.0.1", "7311"]),
        SHORT,
    );
    reference.assert_success();
    native.kill();
    let d = Daemon::start();
    let mut server = d.spawn(
        &["--ip", "10.233.0.75"],
        &py(THREADED_ECHO_SERVER, &["0.0.0.0", "7311"]),
    );
    d.wait_for_service(&mut server, "10.233.0.75:7311");
    let out = d.run(&[], &py(RECONNECT_PROBE, &["10.233.0.75", "7311"]));
    out.assert_success();
    let want = json!({"seq": [
        ["EINPROGRESS", "OK", "EISCONN", "echo:x"],
        ["EINPROGRESS", "OK", "EISCONN", "echo:x"],
        ["EINPROGRESS", "OK", "EISCONN", "echo:x"],
        ["EISCONN"],
    ]});
    assert_eq!(json_line(&reference.stdout), want, "{reference}");
    assert_eq!(json_line(&out.stdout), want, "{out}");
}

/// `ab` (APR) against a server under ax, every socket connected twice:
/// every request completes.
#[test]
fn ab_completes_every_request() {
    require!("ab", "python3");
    let d = Daemon::start();
    let dir = TempDir::new("ab");
    dir.write("index.html", "hello\n");
    let mut cmd = d.exec_command(
        &["--ip", "10.233.0.76"],
        &["python3", "-m", "http.server", "--bind", "0.0.0.0", "7312"],
    );
    cmd.current_dir(dir.path());
    let mut server = App::spawn(cmd);
    d.wait_for_service(&mut server, "10.233.0.76:7312");
    let out = d.run(
        &[],
        &[
            "ab",
            "-q",
            "-c",
            "4",
            "-n",
            "200",
            "http://10.233.0.76:7312/index.html",
        ],
    );
    out.assert_success();
    assert!(out.stdout.contains("Complete requests:      200"), "{out}");
    assert!(out.stdout.contains("Failed requests:        0"), "{out}");
    server.kill();
}

#[test]
fn connect_to_unserved_vip_port_is_refused() {
    require!("python3");
    let d = Daemon::start();
    // A served VIP, to also try one of its ports that nobody listens on.
    let mut server = d.spawn(
        &["--ip", "10.233.0.71"],
        &py(THREADED_ECHO_SERVER, &["0.0.0.0", "7001"]),
    );
    d.wait_for_service(&mut server, "10.233.0.71:7001");
    let out = d.run(
        &[],
        &py(
            CONNECT_PROBE,
            &["10.233.0.70", "fd00:a8::70", "7000", "10.233.0.71", "7002"],
        ),
    );
    out.assert_success();
    let got = json_line(&out.stdout);
    let want = json!({
        "v4": "ECONNREFUSED", "v4_nonblocking": "ECONNREFUSED",
        "v6": "ECONNREFUSED", "v6_nonblocking": "ECONNREFUSED",
        "v4_other_port": "ECONNREFUSED", "v4_other_port_nonblocking": "ECONNREFUSED",
    });
    assert_eq!(got, want, "{out}");
    // The served port still answers.
    let out = d.run(
        &[],
        &py(ECHO_CLIENT, &["10.233.0.71", "7001", "still-here"]),
    );
    out.assert_success();
    assert_eq!(out.stdout.trim(), "echo:still-here");
}

const BIND_PROBE: &str = r#"
import errno, json, socket, sys
other, own = sys.argv[1], sys.argv[2]
def name(e):
    return errno.errorcode.get(e, str(e))
def bind(host, port, listen=False):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        if listen:
            s.listen(8)
        keep.append(s)
        return "OK"
    except OSError as e:
        return name(e.errno)
keep = []
res = {
    "other_app_vip_same_port": bind(other, 7100),
    "other_app_vip_free_port": bind(other, 7101),
    "nobodys_vip": bind("10.233.0.199", 7100),
    "wildcard_first": bind("0.0.0.0", 7200, True),
    "wildcard_again": bind("0.0.0.0", 7200),
    "own_vip_after_wildcard": bind(own, 7200),
    "own_vip_first": bind(own, 7300, True),
    "wildcard_after_own_vip": bind("0.0.0.0", 7300),
    "own_vip_free_port": bind(own, 7400, True),
}
print(json.dumps(res, sort_keys=True), flush=True)
"#;

#[test]
fn bind_conflicts_and_foreign_vips() {
    require!("python3");
    let d = Daemon::start();
    let mut holder = d.spawn(
        &["--ip", "10.233.0.72"],
        &py(THREADED_ECHO_SERVER, &["0.0.0.0", "7100"]),
    );
    d.wait_for_service(&mut holder, "10.233.0.72:7100");
    let out = d.run(
        &["--ip", "10.233.0.73"],
        &py(BIND_PROBE, &["10.233.0.72", "10.233.0.73"]),
    );
    out.assert_success();
    let got = json_line(&out.stdout);
    let want = json!({
        "other_app_vip_same_port": "EADDRNOTAVAIL",
        "other_app_vip_free_port": "EADDRNOTAVAIL",
        "nobodys_vip": "EADDRNOTAVAIL",
        "wildcard_first": "OK",
        "wildcard_again": "EADDRINUSE",
        "own_vip_after_wildcard": "EADDRINUSE",
        "own_vip_first": "OK",
        "wildcard_after_own_vip": "EADDRINUSE",
        "own_vip_free_port": "OK",
    });
    assert_eq!(got, want, "{out}");
    // The holder's service is untouched.
    let out = d.run(&[], &py(ECHO_CLIENT, &["10.233.0.72", "7100", "mine"]));
    out.assert_success();
    assert_eq!(out.stdout.trim(), "echo:mine");
}

/// Raw `connect`/`bind` with bad pointers and lengths through ctypes.
const SOCKADDR_PROBE: &str = r#"
import ctypes, errno, json, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
def name(r):
    return "OK" if r == 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
def sin(ip, port):
    b = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + b"\0" * 8
    return ctypes.create_string_buffer(b, len(b))
def sin6(ip, port):
    b = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + socket.inet_pton(socket.AF_INET6, ip) + struct.pack("=I", 0)
    return ctypes.create_string_buffer(b, len(b))
def call(fam, fn, addr, alen):
    s = socket.socket(fam, socket.SOCK_STREAM)
    ctypes.set_errno(0)
    r = fn(s.fileno(), addr, ctypes.c_uint(alen))
    out = name(r)
    s.close()
    return out
V4, V6 = socket.AF_INET, socket.AF_INET6
res = {
    "connect_bad_pointer": call(V4, libc.connect, ctypes.c_void_p(1), 16),
    "connect_addrlen_3": call(V4, libc.connect, sin("10.233.0.80", 80), 3),
    "connect_addrlen_200": call(V4, libc.connect, sin("10.233.0.80", 80), 200),
    "connect6_addrlen_16": call(V6, libc.connect, sin6("fd00:a8::80", 80), 16),
    "connect6_bad_pointer": call(V6, libc.connect, ctypes.c_void_p(1), 28),
    "bind_bad_pointer": call(V4, libc.bind, ctypes.c_void_p(1), 16),
    "bind_addrlen_3": call(V4, libc.bind, sin("0.0.0.0", 7500), 3),
    "bind6_addrlen_16": call(V6, libc.bind, sin6("::", 7500), 16),
}
print(json.dumps(res, sort_keys=True), flush=True)
"#;

#[test]
fn bad_sockaddr_errnos_match_the_kernel() {
    require!("python3");
    let want = json!({
        "connect_bad_pointer": "EFAULT",
        "connect_addrlen_3": "EINVAL",
        "connect_addrlen_200": "EINVAL",
        "connect6_addrlen_16": "EINVAL",
        "connect6_bad_pointer": "EFAULT",
        "bind_bad_pointer": "EFAULT",
        "bind_addrlen_3": "EINVAL",
        "bind6_addrlen_16": "EINVAL",
    });
    same_as_native(&Daemon::start(), &[], SOCKADDR_PROBE, &[], want);
}

/// Runs the Python `probe` natively, checks that it prints `want` (else the
/// test's own expectation is wrong), then under ax with `opts`: it must
/// print the same.
fn same_as_native(d: &Daemon, opts: &[&str], probe: &str, args: &[&str], want: Value) {
    let native = run(
        Command::new("python3").arg("-c").arg(probe).args(args),
        SHORT,
    );
    native.assert_success();
    let native = json_line(&native.stdout);
    assert_eq!(
        native, want,
        "native reference (the test's own expectation is wrong)"
    );
    let out = d.run(opts, &py(probe, args));
    out.assert_success();
    assert_eq!(
        json_line(&out.stdout),
        native,
        "under ax vs natively: {out}"
    );
}

/// Accepts on an empty and on a shut-down listener, non-blocking and
/// blocking (a thread blocked in `accept` when the listener is shut down),
/// on ports argv[1] and argv[1]+1 of the wildcard address.
const SHUTDOWN_PROBE: &str = r#"
import errno, json, socket, sys, threading
port = int(sys.argv[1])
def listener(port, blocking):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4)
    s.setblocking(blocking)
    return s
def attempt(s):
    try:
        s.accept()
        return "OK"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def accepting(s):
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
def outcome(f):
    try:
        return repr(f())
    except socket.timeout:
        return "TIMED OUT"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
res = {}
s = listener(port, False)
res["nonblocking_empty"] = attempt(s)
res["acceptconn_listening"] = accepting(s)
# A client waiting in the queue when the listener is shut down is reset.
queued = socket.create_connection(("127.0.0.1", port))
queued.settimeout(10)
s.shutdown(socket.SHUT_RDWR)
res["nonblocking_shut_down"] = attempt(s)
res["acceptconn_shut_down"] = accepting(s)
res["queued_client_reads"] = outcome(lambda: queued.recv(1))
b = listener(port + 1, True)
out = {}
ids = {}
def blocked():
    ids["tid"] = threading.get_native_id()
    out["r"] = attempt(b)
t = threading.Thread(target=blocked, daemon=True)
t.start()
# Shut down once the thread waits in accept4 (288): natively in the kernel,
# under ax in its trapped call.
while True:
    tid = ids.get("tid")
    if tid is not None:
        with open("/proc/self/task/%d/syscall" % tid) as f:
            if f.read().split()[0] == "288":
                break
    threading.Event().wait(0.01)
b.shutdown(socket.SHUT_RDWR)
t.join(10)
res["blocked_shut_down"] = out.get("r", "STILL BLOCKED")
print(json.dumps(res, sort_keys=True), flush=True)
"#;

/// A listener shut down stops listening, as TCP's does: its accepts fail
/// with `EINVAL` (a UNIX listener would answer `EAGAIN`, and a server
/// polling it would spin), a thread blocked in one wakes,
/// `SO_ACCEPTCONN` reads 0 (a UNIX listener would still say 1), and a
/// client waiting in its queue is reset (it would wait until the listener
/// is closed).
#[test]
fn accept_on_a_shut_down_listener_matches_the_kernel() {
    require!("python3");
    let want = json!({
        "nonblocking_empty": "EAGAIN",
        "acceptconn_listening": 1,
        "nonblocking_shut_down": "EINVAL",
        "acceptconn_shut_down": 0,
        "queued_client_reads": "ECONNRESET",
        "blocked_shut_down": "EINVAL",
    });
    same_as_native(
        &Daemon::start(),
        &["--ip", "10.233.0.82"],
        SHUTDOWN_PROBE,
        &["7610"],
        want,
    );
}

/// Address queries with bad pointers and short buffers on a connected socket.
const QUERY_PROBE: &str = r#"
import ctypes, errno, json, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect((host, port))
fd = s.fileno()
def call(fn, addr, lenp):
    ctypes.set_errno(0)
    r = fn(fd, addr, lenp)
    return "OK" if r == 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
res = {}
for label, fn in (("peer", libc.getpeername), ("sock", libc.getsockname)):
    n = ctypes.c_uint(16)
    res[label + "_bad_addr"] = call(fn, ctypes.c_void_p(1), ctypes.byref(n))
    buf = ctypes.create_string_buffer(16)
    res[label + "_bad_len_pointer"] = call(fn, buf, ctypes.c_void_p(1))
    # Truncation: a 4-byte buffer gets family and port; *len says 16.
    buf = ctypes.create_string_buffer(b"\xee" * 16, 16)
    n = ctypes.c_uint(4)
    rc = call(fn, buf, ctypes.byref(n))
    fam = struct.unpack("=H", buf.raw[:2])[0]
    p = struct.unpack("!H", buf.raw[2:4])[0]
    want = s.getpeername() if label == "peer" else s.getsockname()
    res[label + "_truncated"] = [rc, n.value, fam, p == want[1], buf.raw[4:] == b"\xee" * 12]
print(json.dumps(res, sort_keys=True), flush=True)
"#;

#[test]
fn address_query_errors_and_truncation_match_the_kernel() {
    require!("python3");
    let d = Daemon::start();
    let mut native = App::spawn({
        let mut c = Command::new("python3");
        c.arg("-c").arg(NATIVE_SERVER);
        c
    });
    let port = as_u32(&json_line(&native.wait_for_stdout("port", SHORT))["port"]).to_string();
    let reference = run(
        Command::new("python3").args(["-c", QUERY_PROBE, "127.0.0.1", &port]),
        SHORT,
    );
    reference.assert_success();
    let reference = json_line(&reference.stdout);
    assert_eq!(reference["peer_bad_addr"], "EFAULT", "native: {reference}");
    assert_eq!(
        reference["peer_truncated"],
        json!(["OK", 16, 2, true, true])
    );

    let mut server = d.spawn(
        &["--ip", "10.233.0.81"],
        &py(THREADED_ECHO_SERVER, &["0.0.0.0", "7600"]),
    );
    d.wait_for_service(&mut server, "10.233.0.81:7600");
    let out = d.run(&[], &py(QUERY_PROBE, &["10.233.0.81", "7600"]));
    out.assert_success();
    assert_eq!(
        json_line(&out.stdout),
        reference,
        "under ax (left) vs native TCP (right): {out}"
    );
}

// ---------------------------------------------------------------- i. no interception without ax

const NATIVE_VIP_CONNECT: &str = r#"
import errno, json, socket, sys
res = {}
for host in sys.argv[1:3]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, int(sys.argv[3])))
        res[host] = "OK"
    except OSError as e:
        res[host] = errno.errorcode.get(e.errno, str(e))
print(json.dumps(res, sort_keys=True), flush=True)
"#;

#[test]
fn vip_is_unreachable_without_ax() {
    require!("python3");
    let d = Daemon::start();
    let mut server = d.spawn(
        &["--ip", "10.233.0.90", "--ip", "fd00:a8::90"],
        &py(THREADED_ECHO_SERVER, &["::", "8300"]),
    );
    d.wait_for_service(&mut server, "10.233.0.90:8300");
    let out = run(
        Command::new("python3").args([
            "-c",
            NATIVE_VIP_CONNECT,
            "10.233.0.90",
            "fd00:a8::90",
            "8300",
        ]),
        SHORT,
    );
    out.assert_success();
    assert_eq!(
        json_line(&out.stdout),
        json!({"10.233.0.90": "ENETUNREACH", "fd00:a8::90": "ENETUNREACH"}),
        "a plain program must not reach a VIP: {out}"
    );
    // Under ax it does.
    let out = d.run(&[], &py(ECHO_CLIENT, &["10.233.0.90", "8300", "via-ax"]));
    out.assert_success();
    assert_eq!(out.stdout.trim(), "echo:via-ax");
}

// ---------------------------------------------------------------- j. ax get

#[test]
fn get_apps_and_services() {
    require!("python3");
    let d = Daemon::start();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut server = d.spawn(
        &[
            "--ip",
            "10.233.0.100",
            "--name",
            "web",
            "--label",
            "tier=front",
        ],
        &py(THREADED_ECHO_SERVER, &["0.0.0.0", "8400"]),
    );
    let svc = d.wait_for_service(&mut server, "10.233.0.100:8400");
    let apps = d.apps();
    let app = apps
        .iter()
        .find(|a| a["vips"] == json!(["10.233.0.100"]))
        .unwrap_or_else(|| panic!("no app with VIP 10.233.0.100: {apps:?}"))
        .clone();
    assert_eq!(
        svc["backends"][0]["app"], app["id"],
        "service backend vs app id: {svc} {app}"
    );
    assert_eq!(svc["names"], json!(["web"]), "{svc}");
    assert_eq!(svc["lb"], json!("round-robin"), "{svc}");
    assert_eq!(app["names"], json!(["web"]), "{app}");
    assert_eq!(app["labels"], json!({"tier": "front"}), "{app}");
    assert_eq!(app["uid"], json!(euid()), "{app}");
    let cmd = app["command"].as_array().expect("command array");
    assert_eq!(cmd.first(), Some(&json!("python3")), "{app}");
    assert_eq!(cmd.last(), Some(&json!("8400")), "{app}");
    let pid = as_u32(&app["pid"]);
    assert!(
        server.pids().contains(&pid) && pid != server.pid(),
        "app pid {pid} should be the program, a child of ax exec {} ({:?})",
        server.pid(),
        server.pids()
    );
    let started = app["started_unix"].as_u64().expect("started_unix");
    assert!(
        started + 5 >= before && started <= before + 120,
        "started_unix {started} vs now {before}"
    );
    let endpoint = endpoint_name(&svc);
    assert!(
        endpoint.starts_with("@ax/") && endpoint.ends_with("/8400"),
        "endpoint name {endpoint:?} in {svc}"
    );
    // The name is the kernel's, in the daemon's private network namespace
    // only.
    let private = d.private_unix_table();
    assert!(
        private.contains(&format!(" {endpoint}\n")),
        "{endpoint} not in the private namespace's /proc/net/unix:\n{private}"
    );
    let host = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    assert!(
        !host.contains(&endpoint),
        "{endpoint} visible in the host's /proc/net/unix"
    );

    // Tables.
    let table = d.get("services", &[]).stdout.clone();
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        !header.is_empty() && header == header.to_uppercase(),
        "services table header: {table}"
    );
    assert!(
        lines.any(|l| l.contains("10.233.0.100:8400")),
        "services table: {table}"
    );
    let table = d.get("apps", &[]).stdout.clone();
    let header = table.lines().next().unwrap_or_default();
    assert!(
        !header.is_empty() && header == header.to_uppercase(),
        "apps table header: {table}"
    );
    let row = table
        .lines()
        .find(|l| l.contains("10.233.0.100"))
        .unwrap_or_else(|| panic!("apps table has no 10.233.0.100: {table}"));
    assert!(
        row.contains("web") && row.contains("tier=front") && row.contains("python3"),
        "apps row: {row}"
    );

    // When the app ends, its services and the app itself go away.
    server.kill();
    let gone = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let s = d.services();
        let a = d.apps();
        (!s.iter().any(|x| x["addr"] == "10.233.0.100:8400")
            && !a.iter().any(|x| x["id"] == app["id"]))
        .then_some(())
    });
    assert!(
        gone.is_some(),
        "app/service still listed 10 s after the app ended: services {:?} apps {:?}",
        d.services(),
        d.apps()
    );
}

// ---------------------------------------------------------------- k. exit statuses and CLI errors

#[test]
fn exit_status_is_the_programs() {
    require!("sh", "cat");
    let d = Daemon::start();
    let out = d.run(&[], &["sh", "-c", "exit 7"]);
    assert_eq!(out.code(), Some(7), "{out}");
    let out = d.run(&[], &["true"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let out = d.run(&[], &["sh", "-c", "kill -9 $$"]);
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.code() == Some(137) || out.status.signal() == Some(9),
            "killed program: {out}"
        );
    }
    // stdin and stdout are the program's own.
    let out = run_with_input(&mut d.exec_command(&[], &["cat"]), b"through ax\n", SHORT);
    out.assert_success();
    assert_eq!(out.stdout, "through ax\n");
    // A program that cannot be run: 126; a missing one: 127 (as a shell,
    // and docker run, say).
    let scratch = TempDir::new("noexec");
    let noexec = scratch.write("not-executable", "#!/bin/sh\necho ran\n");
    let out = d.run(&[], &[p(&noexec)]);
    assert_eq!(out.code(), Some(126), "{out}");
    assert!(!out.stdout.contains("ran"), "{out}");
    let out = d.run(&[], &["/nonexistent/ax-e2e-no-such-program"]);
    assert_eq!(out.code(), Some(127), "{out}");
    let out = d.run(&[], &["ax-e2e-no-such-program-in-path"]);
    assert_eq!(out.code(), Some(127), "{out}");
    assert!(!out.stderr.is_empty(), "a message is expected: {out}");
}

#[test]
fn invalid_options_fail_with_125_before_running_anything() {
    require!("sh");
    let d = Daemon::start();
    let scratch = TempDir::new("opts");
    let marker = scratch.join("ran");
    let touch = format!("touch {}", p(&marker));
    for opts in [
        &["--ip", "nonsense"][..],
        &["--ip", "10.233.0.1/24"][..],
        &["--label", "novalue"][..],
    ] {
        let out = d.run(opts, &["sh", "-c", &touch]);
        assert_eq!(out.code(), Some(125), "ax exec {opts:?}: {out}");
        assert!(
            !out.stderr.is_empty(),
            "ax exec {opts:?} gives no message: {out}"
        );
        assert!(!marker.exists(), "ax exec {opts:?} ran the program");
    }
}

#[test]
fn no_autostart_without_daemon_fails_with_125() {
    require!("sh");
    let scratch = TempDir::new("noauto");
    let sock = scratch.join("ax.sock");
    let marker = scratch.join("ran");
    let mut cmd = Command::new(ax_e2e::ax_bin());
    cmd.env_remove("AX_SOCKET")
        .env("XDG_RUNTIME_DIR", scratch.path())
        .args(["exec", "--no-autostart", "--socket", p(&sock), "--"])
        .args(["sh", "-c", &format!("touch {}", p(&marker))]);
    let out = run(&mut cmd, SHORT);
    assert_eq!(out.code(), Some(125), "{out}");
    assert!(
        out.stderr.to_lowercase().contains("daemon") || out.stderr.contains(p(&sock)),
        "the message should say that no daemon answers: {out}"
    );
    assert!(!marker.exists(), "the program ran");
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_err(),
        "a daemon was started despite --no-autostart"
    );
}

/// Kills a process that is not our child (an autostarted daemon) on drop.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = signal_pid(pid, Signal::TERM);
            let dead = poll(Duration::from_secs(3), Duration::from_millis(20), || {
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 1..].split_whitespace().next());
                matches!(state, None | Some("Z") | Some("X")).then_some(())
            });
            if dead.is_none() {
                let _ = signal_pid(pid, Signal::KILL);
            }
        }
    }
}

#[test]
fn exec_autostarts_a_daemon() {
    require!("sh");
    let scratch = TempDir::new("auto");
    let sock = scratch.join("ax.sock");
    let mut cmd = Command::new(ax_e2e::ax_bin());
    cmd.env_remove("AX_SOCKET")
        .env("XDG_RUNTIME_DIR", scratch.path())
        .args([
            "exec",
            "--socket",
            p(&sock),
            "--",
            "sh",
            "-c",
            "echo started",
        ]);
    let mut guard = KillOnDrop(None);
    let out = run(&mut cmd, SHORT);
    // Whatever happened, find and later kill the daemon that now serves the socket.
    let conn = std::os::unix::net::UnixStream::connect(&sock);
    if let Ok(c) = &conn {
        guard.0 = peer_pid(c);
    }
    out.assert_success();
    assert_eq!(out.stdout, "started\n");
    let conn = conn.unwrap_or_else(|e| {
        panic!(
            "no daemon answers on {} after autostart: {e}",
            sock.display()
        )
    });
    let dpid = guard.0.expect("daemon pid from SO_PEERCRED");
    assert!(
        !descendants(std::process::id()).contains(&dpid),
        "the autostarted daemon should be detached"
    );
    drop(conn);
    drop(guard);
}

// ---------------------------------------------------------------- l. signals

const SIGNAL_SCRIPT: &str = r#"
import os, signal, time
codes = {signal.SIGTERM: ("TERM", 0), signal.SIGINT: ("INT", 5), signal.SIGHUP: ("HUP", 6)}
def handler(sig, frame):
    n, code = codes[sig]
    print("got " + n, flush=True)
    os._exit(code)
for s in codes:
    signal.signal(s, handler)
print("READY", flush=True)
while True:
    time.sleep(0.1)
"#;

#[test]
fn signals_are_forwarded() {
    require!("python3");
    let d = Daemon::start();
    for (sig, name, code) in [
        (Signal::TERM, "TERM", 0),
        (Signal::INT, "INT", 5),
        (Signal::HUP, "HUP", 6),
    ] {
        let mut app = d.spawn(&[], &py(SIGNAL_SCRIPT, &[]));
        app.wait_for_stdout("READY", SHORT);
        app.signal(sig);
        let st = app.wait(Duration::from_secs(10));
        assert!(
            app.stdout().contains(&format!("got {name}")),
            "SIG{name} not forwarded: {}",
            app.report()
        );
        assert_eq!(st.code(), Some(code), "SIG{name}: {}", app.report());
    }
}

/// `accept` on a swapped listener, blocked until Ctrl-C: the broker waits on
/// the program's behalf, and must end the wait with `EINTR` when a signal
/// comes, so that the program's handler runs (here Python's
/// `KeyboardInterrupt`).
/// With a second argument, the listener's `SO_RCVTIMEO` in seconds: the
/// accept then fails with `EAGAIN` once it ran out.
const ACCEPT_UNTIL_INTERRUPTED: &str = r#"
import errno, socket, struct, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if len(sys.argv) > 2:
    t = float(sys.argv[2])
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(t), int(t % 1 * 1e6)))
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("LISTENING", flush=True)
t0 = time.monotonic()
try:
    s.accept()
    print("ACCEPTED", flush=True)
except KeyboardInterrupt:
    print("INTERRUPTED after %.2f s" % (time.monotonic() - t0), flush=True)
except OSError as e:
    print("%s after %.2f s" % (errno.errorcode[e.errno], time.monotonic() - t0), flush=True)
"#;

/// A server that has waited in `accept` long enough for the broker to look
/// at it less often (an idle server costs the daemon a few checks a second)
/// is still interrupted by a signal promptly.
#[test]
fn a_long_blocked_accept_is_interrupted_by_a_signal() {
    require!("python3");
    let d = Daemon::start();
    let mut app = d.spawn(
        &["--ip", "10.233.9.41"],
        &py(ACCEPT_UNTIL_INTERRUPTED, &["7100"]),
    );
    d.wait_for_service(&mut app, "10.233.9.41:7100");
    app.wait_for_stdout("LISTENING", SHORT);
    // Past the first second of the wait, when it is checked most often.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!app.stdout().contains("INTERRUPTED"), "{}", app.report());
    let sent = Instant::now();
    app.signal(Signal::INT);
    app.wait_for_stdout("INTERRUPTED", Duration::from_secs(5));
    let took = sent.elapsed();
    // A check every 250 ms at most, with room for a loaded machine.
    assert!(
        took < Duration::from_secs(3),
        "the accept was interrupted {took:?} after the signal: {}",
        app.report()
    );
    let st = app.wait(SHORT);
    assert!(st.success(), "{}", app.report());
}

/// Context switches so far of the daemon thread named `ax-app-*` (the
/// receive loop of the daemon's only app), and its tid.
fn receive_loop_switches(daemon: u32) -> (u32, u64) {
    let tasks = std::fs::read_dir(format!("/proc/{daemon}/task")).expect("daemon's threads");
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("ax-app-") {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        let tid = t.file_name().to_string_lossy().parse().unwrap_or(0);
        return (tid, switches);
    }
    panic!("no receive loop thread in daemon {daemon}");
}

/// Past its first second in `accept`, an idle server leaves its app's
/// receive loop asleep: the broker's watch thread looks at every such
/// accept for signals instead (four times a second), and wakes the loop
/// only for one (the loop used to wake four times a second itself, per
/// app: the daemon's main cost for idle servers).
#[test]
fn an_idle_server_leaves_its_receive_loop_asleep() {
    require!("python3");
    let d = Daemon::start();
    let mut app = d.spawn(
        &["--ip", "10.233.9.43"],
        &py(ACCEPT_UNTIL_INTERRUPTED, &["7100"]),
    );
    d.wait_for_service(&mut app, "10.233.9.43:7100");
    app.wait_for_stdout("LISTENING", SHORT);
    // Past the first second, when the loop itself looks every 50 ms.
    std::thread::sleep(Duration::from_millis(1500));
    let (tid, before) = receive_loop_switches(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let (tid_after, after) = receive_loop_switches(d.pid());
    assert_eq!(tid, tid_after, "{}", app.report());
    assert!(
        after - before <= 2,
        "the receive loop woke {} times in 2 s with its server idle in accept: {}",
        after - before,
        app.report()
    );
    // It is still woken for a signal.
    app.signal(Signal::INT);
    app.wait_for_stdout("INTERRUPTED", Duration::from_secs(5));
    assert!(app.wait(SHORT).success(), "{}", app.report());
}

/// A blocking accept with a receive timeout (`SO_RCVTIMEO`) fails with
/// `EAGAIN` when it runs out, as natively, also where the broker checks
/// on it less often (the timeout ends between two checks).
#[test]
fn a_blocked_accept_times_out_on_time() {
    require!("python3");
    let d = Daemon::start();
    let mut app = d.spawn(
        &["--ip", "10.233.9.42"],
        &py(ACCEPT_UNTIL_INTERRUPTED, &["7100", "1.6"]),
    );
    d.wait_for_service(&mut app, "10.233.9.42:7100");
    let st = app.wait(Duration::from_secs(10));
    let out = app.stdout();
    let after: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("EAGAIN after "))
        .and_then(|l| l.trim_end_matches(" s").parse().ok())
        .unwrap_or_else(|| panic!("no EAGAIN: {}", app.report()));
    assert!(
        (1.55..2.5).contains(&after),
        "the 1.6 s timeout ended after {after} s: {}",
        app.report()
    );
    assert!(st.success(), "{}", app.report());
}

// ---------------------------------------------------------------- more broker behaviour

const SOCKOPT_PROBE: &str = r#"
import errno, json, socket, sys
def opts(s):
    r = {"domain": s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN),
         "protocol": s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL),
         "type": s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
         "error": s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)}
    for name, lvl, opt, val in [("nodelay", socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                                ("keepalive", socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                                ("keepidle", socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
                                ("keepintvl", socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
                                ("keepcnt", socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]:
        try:
            s.setsockopt(lvl, opt, val)
            r["set_" + name] = "OK"
        except OSError as e:
            r["set_" + name] = errno.errorcode.get(e.errno, str(e))
    try:
        r["get_nodelay"] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    except OSError as e:
        r["get_nodelay"] = errno.errorcode.get(e.errno, str(e))
    return r
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "server":
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(8)
    print("LISTENING " + json.dumps({"acceptconn": srv.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
                                      "domain": srv.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN),
                                      "port": srv.getsockname()[1]}), flush=True)
    while True:
        c, _ = srv.accept()
        c.sendall((json.dumps(opts(c)) + "\n").encode())
        c.close()
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect((host, port))
    mine = opts(s)
    theirs = json.loads(s.makefile("rb").readline())
    print(json.dumps({"client": mine, "server": theirs}), flush=True)
"#;

#[test]
fn socket_options_on_swapped_sockets_answer_as_tcp() {
    require!("python3");
    let d = Daemon::start();

    // Reference: the same client and server natively, over loopback TCP.
    let mut native = App::spawn({
        let mut c = Command::new("python3");
        c.args(["-c", SOCKOPT_PROBE, "server", "127.0.0.1", "0"]);
        c
    });
    let listening = native.wait_for_stdout("LISTENING", SHORT);
    let native_port = as_u32(&json_line(&listening.replace("LISTENING ", ""))["port"]).to_string();
    let reference = run(
        Command::new("python3").args(["-c", SOCKOPT_PROBE, "client", "127.0.0.1", &native_port]),
        SHORT,
    );
    reference.assert_success();
    let reference = json_line(&reference.stdout);
    assert_eq!(reference["client"]["domain"], 2, "native: {reference}");

    let mut server = d.spawn(
        &["--ip", "10.233.0.110"],
        &py(SOCKOPT_PROBE, &["server", "0.0.0.0", "9500"]),
    );
    d.wait_for_service(&mut server, "10.233.0.110:9500");
    let listening = server.wait_for_stdout("LISTENING", SHORT);
    assert_eq!(
        json_line(&listening.replace("LISTENING ", "")),
        json!({"acceptconn": 1, "domain": 2, "port": 9500}),
        "listener options"
    );
    let out = d.run(&[], &py(SOCKOPT_PROBE, &["client", "10.233.0.110", "9500"]));
    out.assert_success();
    let got = json_line(&out.stdout);
    for side in ["client", "server"] {
        let (g, r) = (&got[side], &reference[side]);
        for (key, want) in r.as_object().expect("object") {
            assert_eq!(
                &g[key], want,
                "{side} socket option {key}: under ax {} vs native TCP {want} (all: ax {g} native {r})",
                g[key]
            );
        }
    }
}

/// UDP, AF_UNIX and loopback TCP used under ax must behave exactly as without it.
const UNTOUCHED_PROBE: &str = r#"
import errno, json, os, socket
res = {}
u1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u1.bind(("127.0.0.1", 0))
u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u2.sendto(b"ping", u1.getsockname())
data, addr = u1.recvfrom(100)
res["udp"] = [data.decode(), addr[0], addr == u2.getsockname()]
u3 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u3.connect(("10.233.0.120", 53))
    res["udp_connect_vip"] = "OK"
except OSError as e:
    res["udp_connect_vip"] = errno.errorcode.get(e.errno, str(e))
a, b = socket.socketpair()
a.sendall(b"x")
res["socketpair"] = b.recv(1).decode()
name = "\0ax-e2e-untouched-%d" % os.getpid()
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(name)
l.listen(4)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(name)
s, _ = l.accept()
c.sendall(b"y")
res["unix"] = [s.recv(1).decode(), l.getsockname() == name.encode() or l.getsockname() == name]
for fam, host, hexhost, table in ((socket.AF_INET, "127.0.0.1", "0100007F", "/proc/net/tcp"),
                                  (socket.AF_INET6, "::1", "00000000000000000000000001000000", "/proc/net/tcp6")):
    t = socket.socket(fam, socket.SOCK_STREAM)
    t.bind((host, 0))
    t.listen(4)
    port = t.getsockname()[1]
    tc = socket.socket(fam, socket.SOCK_STREAM)
    tc.connect((host, port))
    ts, peer = t.accept()
    tc.sendall(b"z")
    key = "tcp" if fam == socket.AF_INET else "tcp6"
    res[key] = [ts.recv(1).decode(), peer[0], tc.getsockname()[:2] == peer[:2],
                tc.getpeername()[:2] == (host, port),
                ("%s:%04X" % (hexhost, port)) in open(table).read()]
print(json.dumps(res, sort_keys=True), flush=True)
"#;

#[test]
fn udp_unix_and_loopback_tcp_are_untouched() {
    require!("python3");
    let d = Daemon::start();
    let native = run(Command::new("python3").args(["-c", UNTOUCHED_PROBE]), SHORT);
    native.assert_success();
    let native = json_line(&native.stdout);
    assert_eq!(
        native["tcp"],
        json!(["z", "127.0.0.1", true, true, true]),
        "{native}"
    );
    assert_eq!(native["udp_connect_vip"], "ENETUNREACH", "{native}");
    let out = d.run(&[], &py(UNTOUCHED_PROBE, &[]));
    out.assert_success();
    assert_eq!(
        json_line(&out.stdout),
        native,
        "under ax (left) vs native (right): {out}"
    );
}

const IO_URING_PROBE: &str = r#"
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
libc.syscall.restype = ctypes.c_long
r = libc.syscall(ctypes.c_long(425), ctypes.c_uint(4), params)
print("OK" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno())), flush=True)
"#;

#[test]
fn io_uring_setup_is_refused_with_enosys() {
    require!("python3");
    let d = Daemon::start();
    let out = d.run(&[], &py(IO_URING_PROBE, &[]));
    out.assert_success();
    assert_eq!(out.stdout.trim(), "ENOSYS", "{out}");
}

/// Fills a native listener's accept queue (backlog 0, never accepts), so that
/// a further connect to it hangs in SYN retries.
const FULL_LISTENER: &str = r#"
import json, select, socket, time
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.bind(("127.0.0.1", 0))
l.listen(0)
port = l.getsockname()[1]
fill = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
fill.connect(("127.0.0.1", port))
probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
probe.setblocking(False)
probe.connect_ex(("127.0.0.1", port))
_, w, _ = select.select([], [probe], [], 0.5)
print(json.dumps({"port": port, "full": not w}), flush=True)
while True:
    time.sleep(60)
"#;

/// One thread blocks in an egress connect that hangs; meanwhile another
/// thread's connect to a VIP must complete. Then the process exits with
/// the slow call still pending.
const SLOW_AND_FAST: &str = r#"
import json, os, socket, sys, threading, time
slow_port, vip, vip_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
state = {"slow": "pending"}
def slow():
    state["tid"] = threading.get_native_id()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.connect(("127.0.0.1", slow_port))
        state["slow"] = "connected"
    except OSError as e:
        state["slow"] = str(e)
threading.Thread(target=slow, daemon=True).start()
# Started once the kernel shows the thread waiting in connect(2).
nr = {"x86_64": "42", "aarch64": "203"}.get(os.uname().machine, "42")
deadline = time.monotonic() + 10
while True:
    try:
        with open("/proc/self/task/%d/syscall" % state["tid"]) as f:
            if f.read().split()[0] == nr:
                break
    except (KeyError, OSError):
        pass
    if time.monotonic() > deadline:
        sys.exit("the slow connect never started")
    time.sleep(0.01)
print("SLOW_STARTED", flush=True)
sys.stdin.readline()
t = time.monotonic()
c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
c.connect((vip, vip_port))
c.sendall(b"fast\n")
reply = c.makefile("rb").readline().decode().strip()
print(json.dumps({"reply": reply, "secs": time.monotonic() - t, "slow": state["slow"]}), flush=True)
os._exit(0)
"#;

#[test]
fn slow_egress_connect_stalls_no_other_call() {
    require!("python3");
    let d = Daemon::start();
    let mut full = App::spawn({
        let mut c = Command::new("python3");
        c.arg("-c").arg(FULL_LISTENER);
        c
    });
    let info = json_line(&full.wait_for_stdout("port", SHORT));
    assert_eq!(
        info["full"], true,
        "could not fill a listener's accept queue: {info}"
    );
    let slow_port = as_u32(&info["port"]).to_string();

    let mut server = d.spawn(
        &["--ip", "10.233.0.130"],
        &py(THREADED_ECHO_SERVER, &["0.0.0.0", "9600"]),
    );
    d.wait_for_service(&mut server, "10.233.0.130:9600");
    let mut app = d.spawn(
        &[],
        &py(SLOW_AND_FAST, &[&slow_port, "10.233.0.130", "9600"]),
    );
    app.wait_for_stdout("SLOW_STARTED", SHORT);

    // Another app's call goes through meanwhile.
    let t = Instant::now();
    let out = d.run(
        &[],
        &py(ECHO_CLIENT, &["10.233.0.130", "9600", "other-app"]),
    );
    out.assert_success();
    assert_eq!(out.stdout.trim(), "echo:other-app");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "another app's connect took {:?} while a slow egress connect was pending",
        t.elapsed()
    );

    // Another thread of the same app too.
    app.send("\n");
    let out = app.wait_for_stdout("reply", SHORT);
    let got = json_line(&out);
    assert_eq!(got["reply"], "echo:fast", "{got}");
    assert_eq!(
        got["slow"], "pending",
        "the slow connect should still be pending: {got}"
    );
    assert!(
        got["secs"].as_f64().unwrap_or(99.0) < 5.0,
        "the fast connect waited for the slow one: {got}"
    );
    assert!(app.wait(SHORT).success(), "{}", app.report());

    // The app died with a call pending; the daemon is unharmed.
    assert!(d_is_running(&d), "daemon died");
    let out = d.run(&[], &py(ECHO_CLIENT, &["10.233.0.130", "9600", "after"]));
    out.assert_success();
    assert_eq!(out.stdout.trim(), "echo:after");
    drop(full);
}

fn d_is_running(d: &Daemon) -> bool {
    // The daemon is our child; /proc tells whether it is alive without reaping it.
    let stat = fs::read_to_string(format!("/proc/{}/stat", d.pid())).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X"))
}
