//! End-to-end tests of clusters (`ax daemon --cluster`): hosts made of
//! network namespaces the test creates, joined through a bridge by veth
//! pairs, each running its own daemon; real programs (curl, python3, redis) on
//! different hosts reach each other by VIP and by name, host to host, both
//! ways; redis-cli on one host talks to redis-server on another.
//!
//! As root the namespaces are plain network namespaces; as another user
//! they live in a user namespace the test creates (where the test is root),
//! and the tests skip, saying so, where user namespaces are not allowed.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ax_e2e::{ax_bin, euid, note, poll, require, run, App, Daemon, TempDir, SHORT};
use serde_json::Value;

/// The cluster port every host uses.
const PORT: u16 = 7946;

/// How long a change may take to reach every host (gossip every 250 ms).
const CONVERGE: Duration = Duration::from_secs(20);

/// A network namespace, held by a `sleep` that `unshare` started in it;
/// as a user other than root, inside a user namespace of the test's (that
/// of `within`, or a new one).
struct Netns {
    holder: Child,
    /// Enter its user namespace too.
    user: bool,
}

impl Netns {
    /// The switch: a namespace of its own with a bridge `br0`; as root a
    /// network namespace, otherwise also a new user namespace (`None` if
    /// that is not allowed here).
    fn switch() -> Option<Netns> {
        let root = euid() == 0;
        let mut cmd = Command::new("unshare");
        if !root {
            cmd.args(["--user", "--map-root-user"]);
        }
        let ns = Netns::start(cmd, !root);
        let made = run(
            &mut ns.command(&["ip", "link", "add", "br0", "type", "bridge"]),
            SHORT,
        );
        // As a user, root of the user namespace may make links there, or
        // user namespaces are not for us here.
        assert!(
            made.status.success() || !root,
            "cannot make a bridge: {made}"
        );
        made.status.success().then_some(ns)
    }

    /// A network namespace in the user namespace of `within`.
    fn within(within: &Netns) -> Netns {
        if !within.user {
            return Netns::start(Command::new("unshare"), false);
        }
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &within.pid().to_string(),
            "-U",
            "--preserve-credentials",
            "--",
            "unshare",
        ]);
        Netns::start(cmd, true)
    }

    /// `unshare_cmd --net -- sleep 3600`, ready once it is in its own
    /// network namespace.
    fn start(mut unshare_cmd: Command, user: bool) -> Netns {
        let ours = fs::read_link("/proc/self/ns/net").expect("read our network namespace");
        let holder = unshare_cmd
            .args(["--net", "--", "sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start unshare --net");
        let ns = Netns { holder, user };
        let path = format!("/proc/{}/ns/net", ns.pid());
        let comm = format!("/proc/{}/comm", ns.pid());
        // Ready once the holder has entered its new namespace and become
        // `sleep`: by then `unshare` has also written the user namespace's
        // id maps (without which nsenter -U gives no capabilities there).
        let entered = poll(SHORT, Duration::from_millis(5), || {
            let execed = fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep");
            fs::read_link(&path)
                .ok()
                .filter(|l| *l != ours && execed)
                .map(|_| ())
        });
        assert!(entered.is_some(), "unshare --net did not enter a namespace");
        ns
    }

    fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// `nsenter -t PID [-U] -n --`: what runs a command in this namespace.
    fn prefix(&self) -> Vec<String> {
        let mut p = vec![
            "nsenter".to_string(),
            "-t".to_string(),
            self.pid().to_string(),
        ];
        if self.user {
            // Joining the user namespace gives its capabilities; the ids
            // stay (setgroups is denied there).
            p.extend(["-U".to_string(), "--preserve-credentials".to_string()]);
        }
        p.extend(["-n".to_string(), "--".to_string()]);
        p
    }

    /// `nsenter … ARGV…`: runs in this namespace.
    fn command(&self, argv: &[&str]) -> Command {
        let prefix = self.prefix();
        let mut cmd = Command::new(&prefix[0]);
        cmd.args(&prefix[1..]).args(argv);
        cmd
    }

    /// Runs `argv` here; it must succeed.
    fn sh(&self, argv: &[&str]) -> String {
        let out = run(&mut self.command(argv), SHORT);
        assert!(out.status.success(), "{argv:?} failed: {out}");
        out.stdout
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// One host: a network namespace with the address 10.99.0.N on a veth to
/// the switch, and a daemon there.
struct Host {
    name: String,
    addr: String,
    daemon: Daemon,
    ns: Netns,
}

impl Host {
    /// `ax exec --socket SOCK OPTS… -- ARGV…`, in this host's namespace.
    fn exec_command(&self, opts: &[&str], argv: &[&str]) -> Command {
        let mut cmd = self.ns.command(&[]);
        cmd.arg(ax_bin())
            .arg("exec")
            .arg("--socket")
            .arg(self.daemon.socket())
            .args(opts)
            .arg("--")
            .args(argv)
            .env("AX_SOCKET", self.daemon.socket())
            .env("XDG_RUNTIME_DIR", self.daemon.dir());
        cmd
    }

    fn spawn(&self, opts: &[&str], argv: &[&str]) -> App {
        App::spawn(self.exec_command(opts, argv))
    }

    fn run(&self, opts: &[&str], argv: &[&str]) -> ax_e2e::Output {
        run(&mut self.exec_command(opts, argv), SHORT)
    }

    fn nodes(&self) -> Vec<Value> {
        as_array(self.daemon.get_json("nodes"))
    }

    fn state_of(&self, node: &str) -> Option<String> {
        self.nodes()
            .iter()
            .find(|n| n["name"] == node)
            .and_then(|n| n["state"].as_str().map(str::to_string))
    }

    /// Waits until `ax get services -o json` here lists `addr` with a
    /// backend on `node` (`None`: until it lists none there).
    fn wait_for_backend(&self, addr: &str, node: &str, present: bool) {
        let seen = poll(CONVERGE, Duration::from_millis(50), || {
            let there = self.daemon.services().iter().any(|s| {
                s["addr"] == addr
                    && s["backends"]
                        .as_array()
                        .is_some_and(|b| b.iter().any(|b| b["node"] == node))
            });
            (there == present).then_some(())
        });
        assert!(
            seen.is_some(),
            "{}: service {addr} on node {node} {} within {CONVERGE:?}; services: {:?}\nlog:\n{}",
            self.name,
            if present {
                "did not appear"
            } else {
                "was not withdrawn"
            },
            self.daemon.services(),
            tail(&self.daemon.log())
        );
    }
}

fn as_array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        other => panic!("not a JSON array: {other}"),
    }
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(6000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Hosts joined through a bridge in a namespace of its own.
struct Cluster {
    hosts: Vec<Host>,
    _switch: Netns,
    _dir: TempDir,
}

/// The switch the hosts hang off, or `None` (and a SKIP note) where no
/// network namespaces can be made.
fn switch() -> Option<Netns> {
    let switch = Netns::switch();
    if switch.is_none() {
        note(
            "SKIP: not root, and no user namespace in which to create network namespaces and \
             veth pairs for the hosts",
        );
    }
    switch
}

/// Starts `n` hosts named a, b, c…, joined through `switch`; every host
/// but the first joins the first. `daemon_args`: extra arguments for every
/// daemon.
fn cluster(switch: Netns, n: usize, daemon_args: &[&str]) -> Cluster {
    let c = hosts(switch, n, &|_| daemon_args.to_vec());
    for h in &c.hosts {
        let all_alive = poll(CONVERGE, Duration::from_millis(50), || {
            let nodes = h.nodes();
            (nodes.len() == n && nodes.iter().all(|n| n["state"] == "alive")).then_some(())
        });
        assert!(
            all_alive.is_some(),
            "{}: not all {n} nodes alive within {CONVERGE:?}: {:?}\nlog:\n{}",
            h.name,
            h.nodes(),
            tail(&h.daemon.log())
        );
    }
    c
}

/// Starts `n` hosts as [`cluster`] does, host `i`'s daemon with the extra
/// arguments `args(i)`, without waiting for them to see each other.
fn hosts<'a>(switch: Netns, n: usize, args_of: &dyn Fn(usize) -> Vec<&'a str>) -> Cluster {
    let dir = TempDir::new("cluster");
    switch.sh(&["ip", "link", "set", "br0", "up"]);
    let mut hosts: Vec<Host> = Vec::new();
    for i in 0..n {
        let name = ((b'a' + u8::try_from(i).expect("few hosts")) as char).to_string();
        let ns = Netns::within(&switch);
        let addr = format!("10.99.0.{}", i + 1);
        let created = run(
            switch.command(&["ip"]).args([
                "link",
                "add",
                "eth0",
                "netns",
                &ns.pid().to_string(),
                "type",
                "veth",
                "peer",
                "name",
                &format!("p{name}"),
            ]),
            SHORT,
        );
        assert!(created.status.success(), "cannot create a veth: {created}");
        switch.sh(&["ip", "link", "set", &format!("p{name}"), "master", "br0"]);
        switch.sh(&["ip", "link", "set", &format!("p{name}"), "up"]);
        ns.sh(&["ip", "link", "set", "lo", "up"]);
        ns.sh(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.sh(&["ip", "link", "set", "eth0", "up"]);
        let cluster_addr = format!("{addr}:{PORT}");
        let first = format!("10.99.0.1:{PORT}");
        let mut args = vec!["--node", &name, "--cluster", &cluster_addr];
        if i > 0 {
            args.extend(["--join", &first]);
        }
        args.extend(args_of(i));
        let prefix = ns.prefix();
        let wrap: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let daemon = Daemon::start_wrapped(&wrap, &[], &args);
        hosts.push(Host {
            name,
            addr,
            daemon,
            ns,
        });
    }
    Cluster {
        hosts,
        _switch: switch,
        _dir: dir,
    }
}

/// An HTTP server on 0.0.0.0:PORT answering every GET with BODY; prints
/// `READY` once it listens and, for every connection, `PEER ip port` (what
/// `accept` gave it) and `SELF ip` (its `getsockname`).
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
    def server_bind(self):
        self.socket.bind(self.server_address)
    def get_request(self):
        conn, peer = self.socket.accept()
        print("PEER", peer[0], peer[1], flush=True)
        print("SELF", conn.getsockname()[0], "GETPEER", conn.getpeername()[0], flush=True)
        return conn, peer
s = S(("0.0.0.0", port), H)
print("READY", flush=True)
s.serve_forever()
"#;

/// A client that connects to HOST:PORT, prints `LOCAL ip port` and
/// `REMOTE ip port` (getsockname, getpeername), then `CONNECTED`, and
/// keeps the connection open until its stdin closes.
const HOLDING_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("LOCAL", *s.getsockname()[:2], flush=True)
print("REMOTE", *s.getpeername()[:2], flush=True)
print("CONNECTED", flush=True)
sys.stdin.read()
"#;

/// An IPv6 client: connects to [HOST]:PORT, prints `LOCAL ip port`,
/// `REMOTE ip port`, then sends a GET and prints the answer.
const V6_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.connect((sys.argv[1], int(sys.argv[2])))
print("LOCAL", *s.getsockname()[:2])
print("REMOTE", *s.getpeername()[:2])
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode(errors="replace"), flush=True)
"#;

fn py(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["python3".to_string(), "-c".to_string(), script.to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The first VIP of the app named `name`, per `ax get apps -o json` on `h`.
fn vip_of(h: &Host, name: &str) -> String {
    let apps = h.daemon.apps();
    apps.iter()
        .find(|a| {
            a["names"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n == name))
        })
        .and_then(|a| a["vips"][0].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("{}: no app named {name}: {apps:?}", h.name))
}

/// The word after `key` on the first line of `out` that starts with it.
fn field(out: &str, key: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

/// Three hosts: all alive everywhere; curl on a reaches python on b by VIP
/// and by name; the server sees the client's VIP; the apps and services
/// of b are listed on a with their node.
#[test]
fn curl_reaches_a_server_on_another_host_by_vip_and_name() {
    require!("curl", "python3", "ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 3, &[]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let nodes = a.nodes();
    let names: Vec<&str> = nodes.iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "ax get nodes on a: {nodes:?}");
    assert_eq!(nodes[1]["address"], format!("10.99.0.2:{PORT}"));

    let argv = py(TAGGED_HTTP_SERVER, &["8000", "hello-from-b"]);
    let mut server = b.spawn(&["--name", "web"], &as_strs(&argv));
    server.wait_for_stdout("READY", SHORT);
    let web = vip_of(b, "web");
    let service = format!("{web}:8000");
    a.wait_for_backend(&service, "b", true);

    // By name (the hosts file of a covers b's names) and by VIP.
    for url in [
        "http://web:8000/".to_string(),
        format!("http://{web}:8000/"),
    ] {
        let out = a.run(
            &["--name", "client"],
            &[
                "curl",
                "-sS",
                "-m",
                "10",
                "-w",
                "\nLOCAL %{local_ip}\n",
                &url,
            ],
        );
        assert!(
            out.status.success() && out.stdout.contains("hello-from-b"),
            "curl {url} on a: {out}\nlog a:\n{}\nlog b:\n{}",
            tail(&a.daemon.log()),
            tail(&b.daemon.log())
        );
        let local = field(&out.stdout, "LOCAL").expect("curl printed its local address");
        assert!(
            local.starts_with("10.233."),
            "curl's own address is not a VIP: {local}"
        );
        // accept gave the server the client's VIP.
        server.wait_for_stdout(&format!("PEER {local} "), SHORT);
        assert_ne!(local, web, "client and server share a VIP");
    }
    // An IPv6 socket to the v4-mapped VIP (as Java and Go make): the same,
    // in its family.
    let v6 = a.run(
        &[],
        &["python3", "-c", V6_CLIENT, &format!("::ffff:{web}"), "8000"],
    );
    assert!(
        v6.status.success()
            && v6.stdout.contains("hello-from-b")
            && v6.stdout.contains(&format!("REMOTE ::ffff:{web} 8000"))
            && v6.stdout.contains("LOCAL ::ffff:10.233."),
        "IPv6 client: {v6}"
    );
    let out = server.stdout();
    assert!(
        out.contains(&format!("SELF {web} GETPEER 10.233.")),
        "the server's getsockname/getpeername are not VIPs: {out}"
    );
    assert!(
        !out.contains("10.99.0."),
        "the server saw a host address: {out}"
    );

    // b's apps and services are listed on a, with their node.
    let apps = a.daemon.apps();
    assert!(
        apps.iter()
            .any(|x| x["node"] == "b" && x["names"][0] == "web"),
        "ax get apps on a: {apps:?}"
    );
    let table = a.daemon.get("nodes", &[]);
    assert!(
        table.stdout.contains("alive") && table.stdout.contains("web"),
        "{table}"
    );
    server.kill();
}

/// Replicas of one name on two hosts share its VIP, and a client on a
/// third host gets both, round-robin.
#[test]
fn replicas_on_two_hosts_share_connections() {
    require!("curl", "python3", "ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 3, &[]);
    let (a, b, cc) = (&c.hosts[0], &c.hosts[1], &c.hosts[2]);
    let argv = py(TAGGED_HTTP_SERVER, &["8600", "from-a"]);
    let mut on_a = a.spawn(&["--name", "rep"], &as_strs(&argv));
    on_a.wait_for_stdout("READY", SHORT);
    let vip = vip_of(a, "rep");
    let service = format!("{vip}:8600");
    b.wait_for_backend(&service, "a", true);
    let argv = py(TAGGED_HTTP_SERVER, &["8600", "from-b"]);
    let mut on_b = b.spawn(&["--name", "rep"], &as_strs(&argv));
    on_b.wait_for_stdout("READY", SHORT);
    assert_eq!(
        vip_of(b, "rep"),
        vip,
        "the replica on b did not take the name's VIP"
    );
    cc.wait_for_backend(&service, "a", true);
    cc.wait_for_backend(&service, "b", true);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let out = cc.run(&[], &["curl", "-sS", "-m", "10", "http://rep:8600/"]);
        assert!(out.status.success(), "{out}");
        seen.insert(out.stdout.trim().to_string());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["from-a", "from-b"],
        "connections from c did not reach both replicas"
    );
    on_a.kill();
    on_b.kill();
}

/// The connection between the two programs is a TCP connection between
/// the hosts, held by the programs themselves (not by a daemon), and both
/// ends see VIPs.
#[test]
fn the_connection_runs_between_the_programs_own_sockets() {
    require!("python3", "ip", "nsenter", "unshare", "ss");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 2, &[]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let argv = py(TAGGED_HTTP_SERVER, &["8100", "x"]);
    let mut server = b.spawn(&["--name", "db"], &as_strs(&argv));
    server.wait_for_stdout("READY", SHORT);
    let db = vip_of(b, "db");
    a.wait_for_backend(&format!("{db}:8100"), "b", true);

    let argv = py(HOLDING_CLIENT, &["db", "8100"]);
    let mut client = a.spawn(&["--name", "holder"], &as_strs(&argv));
    let out = client.wait_for_stdout("CONNECTED", SHORT);
    let local = field(&out, "LOCAL").expect("LOCAL");
    assert_eq!(field(&out, "REMOTE").as_deref(), Some(db.as_str()), "{out}");
    assert!(local.starts_with("10.233."), "{out}");
    server.wait_for_stdout(&format!("PEER {local} "), SHORT);

    // On a: python holds a TCP connection to b's cluster port.
    let ss_a = a.ns.sh(&["ss", "-tnpH", "state", "established"]);
    let line = ss_a
        .lines()
        .find(|l| l.contains(&format!("{}:{PORT}", b.addr)))
        .unwrap_or_else(|| panic!("no connection to b on a: {ss_a}"));
    assert!(
        line.contains("python3") && !line.contains("\"ax\""),
        "the connection on a is not the program's: {line}"
    );
    // On b: the server holds the other end.
    let ss_b = b.ns.sh(&["ss", "-tnpH", "state", "established"]);
    let line = ss_b
        .lines()
        .find(|l| l.contains(&format!("{}:{PORT}", b.addr)) && l.contains(&a.addr))
        .unwrap_or_else(|| panic!("no connection from a on b: {ss_b}"));
    assert!(
        line.contains("python3") && !line.contains("\"ax\""),
        "the connection on b is not the program's: {line}"
    );
    client.close_stdin();
    client.wait(SHORT);
    server.kill();
}

/// Labels and the policy apply across hosts: a client whose labels share
/// nothing with the server's is refused (curl: exit 7, connection
/// refused), and the host that decided logs it; one that shares a label
/// gets through.
#[test]
fn policy_refuses_across_hosts() {
    require!("curl", "python3", "ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 2, &[]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let argv = py(TAGGED_HTTP_SERVER, &["8200", "secret"]);
    let mut server = b.spawn(&["--name", "vault", "--label", "tier=db"], &as_strs(&argv));
    server.wait_for_stdout("READY", SHORT);
    let vault = vip_of(b, "vault");
    a.wait_for_backend(&format!("{vault}:8200"), "b", true);

    let denied = a.run(
        &["--label", "tier=web"],
        &["curl", "-sS", "-m", "10", "http://vault:8200/"],
    );
    assert_eq!(denied.code(), Some(7), "curl should be refused: {denied}");
    assert!(!denied.stdout.contains("secret"), "{denied}");
    let logged = poll(SHORT, Duration::from_millis(20), || {
        a.daemon
            .log()
            .contains("connect denied by policy")
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "a did not log the refusal:\n{}",
        tail(&a.daemon.log())
    );

    let allowed = a.run(
        &["--label", "tier=db"],
        &["curl", "-sS", "-m", "10", "http://vault:8200/"],
    );
    assert!(
        allowed.status.success() && allowed.stdout.contains("secret"),
        "{allowed}"
    );
    server.kill();
}

/// A host whose daemon is killed is declared dead and its services are
/// withdrawn on the others; restarted, it rejoins and they come back.
#[test]
fn a_dead_host_is_withdrawn_and_rejoins() {
    require!("python3", "ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let mut c = cluster(switch, 2, &[]);
    let argv = py(TAGGED_HTTP_SERVER, &["8300", "x"]);
    // The launcher waits for the daemon the test restarts (rather than
    // starting one without --cluster).
    let mut server = c.hosts[1].spawn(&["--no-autostart", "--name", "api"], &as_strs(&argv));
    server.wait_for_stdout("READY", SHORT);
    let api = vip_of(&c.hosts[1], "api");
    let service = format!("{api}:8300");
    c.hosts[0].wait_for_backend(&service, "b", true);

    c.hosts[1].daemon.kill_hard();
    let a = &c.hosts[0];
    a.wait_for_backend(&service, "b", false);
    let dead = poll(CONVERGE, Duration::from_millis(50), || {
        (a.state_of("b").as_deref() == Some("dead")).then_some(())
    });
    assert!(dead.is_some(), "b not dead on a: {:?}", a.nodes());

    c.hosts[1].daemon.restart();
    let a = &c.hosts[0];
    let alive = poll(CONVERGE, Duration::from_millis(50), || {
        (a.state_of("b").as_deref() == Some("alive")).then_some(())
    });
    assert!(alive.is_some(), "b did not rejoin on a: {:?}", a.nodes());
    a.wait_for_backend(&service, "b", true);
    server.kill();
}

/// A host cut off (its link down) is declared dead on the others, and
/// comes back when the link does.
#[test]
fn a_host_cut_off_is_withdrawn_and_comes_back() {
    require!("python3", "ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 2, &[]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let argv = py(TAGGED_HTTP_SERVER, &["8400", "x"]);
    let mut server = b.spawn(&["--name", "cut"], &as_strs(&argv));
    server.wait_for_stdout("READY", SHORT);
    let service = format!("{}:8400", vip_of(b, "cut"));
    a.wait_for_backend(&service, "b", true);
    b.ns.sh(&["ip", "link", "set", "eth0", "down"]);
    a.wait_for_backend(&service, "b", false);
    b.ns.sh(&["ip", "link", "set", "eth0", "up"]);
    a.wait_for_backend(&service, "b", true);
    server.kill();
}

/// Python that sends a cluster header for DST from FROM, authenticated
/// with KEY (empty: none), to the cluster port HOST:PORT, then an HTTP
/// request; prints the answer, or `REFUSED` if the connection is closed
/// or reset without one.
const RAW_HEADER_CLIENT: &str = r#"
import hashlib, hmac, json, os, socket, struct, sys, time
host, port, dst, frm, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
body = json.dumps({"dst": dst, "from": frm, "app": 1, "labels": {}, "node": "x",
                   "ts": int(time.time() * 1000),
                   "nonce": int.from_bytes(os.urandom(8), "little")}).encode()
msg = b"AXC1" + struct.pack(">H", len(body)) + body
mac = hmac.new(key.encode(), msg, hashlib.sha256).digest() if key else bytes(32)
s = socket.create_connection((host, port))
s.sendall(msg + mac + b"GET / HTTP/1.0\r\n\r\n")
data = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except ConnectionResetError:
    pass
print(data.decode(errors="replace") if data else "REFUSED", flush=True)
"#;

/// With a cluster key, a header authenticated with another key (or none)
/// is refused; one with the key gets through.
#[test]
fn a_header_with_a_wrong_key_is_refused() {
    require!("python3", "ip", "nsenter", "unshare");
    let Some(keyed) = KeyedPair::serving("8500", "keyed", "kv") else {
        return;
    };
    let (a, b, kv) = (&keyed.c.hosts[0], &keyed.c.hosts[1], &keyed.service);
    let key = KeyedPair::KEY;
    assert!(
        !b.daemon.log().contains("unauthenticated"),
        "a daemon with a key warned anyway"
    );

    let raw = |k: &str| {
        let out = run(
            &mut a.ns.command(&[
                "python3",
                "-c",
                RAW_HEADER_CLIENT,
                &b.addr,
                &PORT.to_string(),
                kv,
                "10.233.250.9:4000",
                k,
            ]),
            SHORT,
        );
        assert!(out.status.success(), "{out}");
        out.stdout
    };
    assert!(raw("another-key-of-16-bytes").contains("REFUSED"));
    assert!(raw("").contains("REFUSED"));
    let answer = raw(key);
    assert!(
        answer.contains("keyed"),
        "the right key was refused: {answer}\nlog b:\n{}",
        tail(&b.daemon.log())
    );
    let log = b.daemon.log();
    assert!(
        log.contains("header not authenticated by the cluster key"),
        "b did not log the refusal:\n{}",
        tail(&log)
    );
}

/// Two hosts sharing [`KeyedPair::KEY`] as their cluster key, the second
/// serving [`TAGGED_HTTP_SERVER`] under a name, which the first has seen.
struct KeyedPair {
    /// Ended first (fields drop in order), before its host.
    _server: App,
    c: Cluster,
    /// The service's VIP:port.
    service: String,
    _keys: TempDir,
}

impl KeyedPair {
    const KEY: &'static str = "0123456789abcdef-cluster-secret";

    /// The pair, its server on `port` answering `tag` under `name`; `None`
    /// (and a SKIP note) where no switch can be made.
    fn serving(port: &str, tag: &str, name: &str) -> Option<KeyedPair> {
        let switch = switch()?;
        let keys = TempDir::new("key");
        let key_file = keys.write("cluster.key", Self::KEY);
        let key_arg = key_file.to_str().expect("a UTF-8 path");
        let c = cluster(switch, 2, &["--cluster-key-file", key_arg]);
        let (a, b) = (&c.hosts[0], &c.hosts[1]);
        let argv = py(TAGGED_HTTP_SERVER, &[port, tag]);
        let mut server = b.spawn(&["--name", name], &as_strs(&argv));
        server.wait_for_stdout("READY", SHORT);
        let service = format!("{}:{port}", vip_of(b, name));
        a.wait_for_backend(&service, "b", true);
        Some(KeyedPair {
            _server: server,
            c,
            service,
            _keys: keys,
        })
    }
}

/// Python that sends one header, authenticated with KEY, twice: on two
/// connections to the cluster port HOST:PORT, each followed by an HTTP
/// request (a recorded header replayed); prints `FIRST …` and `SECOND …`
/// with the answer, or `REFUSED`. Then a header stamped an hour ago:
/// `STALE …`.
const REPLAYING_CLIENT: &str = r#"
import hashlib, hmac, json, os, socket, struct, sys, time
host, port, dst, frm, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def header(ts):
    body = json.dumps({"dst": dst, "from": frm, "app": 1, "labels": {}, "node": "x",
                       "ts": ts, "nonce": int.from_bytes(os.urandom(8), "little")}).encode()
    msg = b"AXC1" + struct.pack(">H", len(body)) + body
    return msg + hmac.new(key.encode(), msg, hashlib.sha256).digest()
def send(h):
    s = socket.create_connection((host, port))
    s.sendall(h + b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return "ANSWERED " + data.decode(errors="replace").replace("\n", " ") if data else "REFUSED"
recorded = header(int(time.time() * 1000))
print("FIRST", send(recorded), flush=True)
print("SECOND", send(recorded), flush=True)
print("STALE", send(header(int(time.time() * 1000) - 3600 * 1000)), flush=True)
"#;

/// With a cluster key, a recorded header sent again, or one stamped far
/// in the past, is refused: whoever can watch the network between two
/// hosts cannot reuse a client's header to reach a service as that
/// client.
#[test]
fn a_replayed_or_stale_header_is_refused() {
    require!("python3", "ip", "nsenter", "unshare");
    let Some(keyed) = KeyedPair::serving("8550", "replayed", "rp") else {
        return;
    };
    let (a, b, rp) = (&keyed.c.hosts[0], &keyed.c.hosts[1], &keyed.service);
    let out = run(
        &mut a.ns.command(&[
            "python3",
            "-c",
            REPLAYING_CLIENT,
            &b.addr,
            &PORT.to_string(),
            rp,
            "10.233.250.9:4000",
            KeyedPair::KEY,
        ]),
        SHORT,
    );
    assert!(out.status.success(), "{out}");
    let line = |tag: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("no {tag} line: {out}"))
            .to_string()
    };
    assert!(
        line("FIRST").contains("replayed"),
        "the first use of the header was refused: {out}\nlog b:\n{}",
        tail(&b.daemon.log())
    );
    assert_eq!(
        line("SECOND"),
        "SECOND REFUSED",
        "a replayed header got through: {out}"
    );
    assert_eq!(
        line("STALE"),
        "STALE REFUSED",
        "a stale header got through: {out}"
    );
}

/// With a cluster key, gossip is sealed with it: a node with another key
/// (or none) never joins, and its apps never show on the others.
#[test]
fn a_node_with_another_key_does_not_join() {
    require!("ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let keys = TempDir::new("keys");
    let right = keys.write("right.key", "the-right-cluster-key-0123456789");
    let wrong = keys.write("wrong.key", "some-other-cluster-key-987654321");
    let (right, wrong) = (
        right.to_str().expect("utf-8"),
        wrong.to_str().expect("utf-8"),
    );
    let c = hosts(switch, 4, &|i| match i {
        2 => vec!["--cluster-key-file", wrong],
        3 => vec![],
        _ => vec!["--cluster-key-file", right],
    });
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let both = poll(CONVERGE, Duration::from_millis(50), || {
        (b.state_of("a").as_deref() == Some("alive")).then_some(())
    });
    assert!(both.is_some(), "b did not join a: {:?}", b.nodes());
    // The foreign gossip reached a, and was dropped.
    let dropped = poll(CONVERGE, Duration::from_millis(50), || {
        a.daemon
            .log()
            .contains("gossip datagram not authenticated")
            .then_some(())
    });
    assert!(
        dropped.is_some(),
        "a did not log the foreign gossip:\n{}",
        tail(&a.daemon.log())
    );
    let names: Vec<String> = a
        .nodes()
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["a", "b"], "a let in a node without its key");
    assert_eq!(c.hosts[2].nodes().len(), 1, "c joined with another key");
}

/// Without a key the daemon warns that cluster traffic is
/// unauthenticated; an unknown `--join` or a bad key file is a clear error.
#[test]
fn warns_without_a_key_and_refuses_a_short_one() {
    require!("ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 1, &[]);
    assert!(c.hosts[0]
        .daemon
        .log()
        .contains("cluster traffic is unauthenticated"));
    let dir = TempDir::new("short");
    let short = dir.write("k", "short");
    let out = run(
        c.hosts[0].ns.command(&[]).arg(ax_bin()).args([
            "daemon",
            "--socket",
            dir.join("ax.sock").to_str().expect("utf-8"),
            "--cluster",
            "10.99.0.1:7950",
            "--cluster-key-file",
            short.to_str().expect("utf-8"),
        ]),
        SHORT,
    );
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("shorter than 16 bytes"), "{out}");
}

/// Python that fetches each URL given with urllib and prints
/// `GOT url body`, one line each.
const URLLIB_CLIENT: &str = r#"
import sys, urllib.request
for url in sys.argv[1:]:
    body = urllib.request.urlopen(url, timeout=10).read().decode().strip()
    print("GOT", url, body, flush=True)
"#;

/// The other way round, and from a third host: a server on a (the host
/// the others joined) is reached from b with curl and from c with
/// python's urllib, by name and by VIP; the server sees each client's VIP.
#[test]
fn curl_and_python_on_other_hosts_reach_a_server_on_the_first() {
    require!("curl", "python3", "ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 3, &[]);
    let (a, b, cc) = (&c.hosts[0], &c.hosts[1], &c.hosts[2]);
    let argv = py(TAGGED_HTTP_SERVER, &["8700", "hello-from-a"]);
    let mut server = a.spawn(&["--name", "home"], &as_strs(&argv));
    server.wait_for_stdout("READY", SHORT);
    let home = vip_of(a, "home");
    let service = format!("{home}:8700");
    b.wait_for_backend(&service, "a", true);
    cc.wait_for_backend(&service, "a", true);
    let urls = [
        "http://home:8700/".to_string(),
        format!("http://{home}:8700/"),
    ];

    // b → a with curl.
    for url in &urls {
        let out = b.run(
            &["--name", "curler"],
            &[
                "curl",
                "-sS",
                "-m",
                "10",
                "-w",
                "\nLOCAL %{local_ip}\n",
                url,
            ],
        );
        assert!(
            out.status.success() && out.stdout.contains("hello-from-a"),
            "curl {url} on b: {out}\nlog a:\n{}\nlog b:\n{}",
            tail(&a.daemon.log()),
            tail(&b.daemon.log())
        );
        let local = field(&out.stdout, "LOCAL").expect("curl printed its local address");
        assert!(local.starts_with("10.233."), "curl on b: {local}");
        assert_ne!(local, home, "client and server share a VIP");
        server.wait_for_stdout(&format!("PEER {local} "), SHORT);
    }
    // c → a with python.
    let mut argv = vec!["python3", "-c", URLLIB_CLIENT];
    argv.extend(urls.iter().map(String::as_str));
    let out = cc.run(&["--name", "fetcher"], &argv);
    assert!(out.status.success(), "python on c: {out}");
    for url in &urls {
        assert!(
            out.stdout.contains(&format!("GOT {url} hello-from-a")),
            "python on c did not fetch {url}: {out}\nlog c:\n{}",
            tail(&cc.daemon.log())
        );
    }
    // Four connections, each from a client's VIP, never a host address.
    let peers = poll(SHORT, Duration::from_millis(20), || {
        let seen = server.stdout();
        let peers: Vec<String> = seen
            .lines()
            .filter_map(|l| l.strip_prefix("PEER "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        (peers.len() >= 4).then_some(peers)
    })
    .unwrap_or_else(|| {
        panic!(
            "the server on a saw fewer than 4 connections: {}",
            server.stdout()
        )
    });
    assert!(
        peers.iter().all(|p| p.starts_with("10.233.") && *p != home),
        "the server on a saw other addresses than the clients' VIPs: {peers:?}"
    );
    server.kill();
}

/// Redis across hosts: redis-server under ax on b; redis-cli under ax on
/// a writes a key by the server's name, redis-cli on c reads it back by
/// VIP.
#[test]
fn redis_across_hosts() {
    require!("redis-server", "redis-cli", "ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 3, &[]);
    let (a, b, cc) = (&c.hosts[0], &c.hosts[1], &c.hosts[2]);
    let mut server = b.spawn(
        &["--name", "kv"],
        &[
            "redis-server",
            "--port",
            "6391",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
    );
    server.wait_for_stdout("Ready to accept connections", SHORT);
    let kv = vip_of(b, "kv");
    let service = format!("{kv}:6391");
    a.wait_for_backend(&service, "b", true);
    cc.wait_for_backend(&service, "b", true);

    let set = a.run(
        &[],
        &[
            "redis-cli",
            "-h",
            "kv",
            "-p",
            "6391",
            "set",
            "greeting",
            "hello-across-hosts",
        ],
    );
    assert!(
        set.status.success() && set.stdout.trim() == "OK",
        "redis-cli set on a: {set}\nlog a:\n{}\nserver: {}",
        tail(&a.daemon.log()),
        server.report()
    );
    let get = cc.run(
        &[],
        &["redis-cli", "-h", &kv, "-p", "6391", "get", "greeting"],
    );
    assert!(
        get.status.success() && get.stdout.trim() == "hello-across-hosts",
        "redis-cli get on c: {get}\nlog c:\n{}",
        tail(&cc.daemon.log())
    );
    // The server saw clients by VIP, never by host address.
    let clients = cc.run(
        &[],
        &["redis-cli", "-h", "kv", "-p", "6391", "client", "list"],
    );
    assert!(
        clients.status.success()
            && clients.stdout.contains("addr=10.233.")
            && !clients.stdout.contains("10.99.0."),
        "redis-server's client list: {clients}"
    );
    server.kill();
}

/// A client that sets socket options before it connects to HOST:PORT,
/// then prints them (`BEFORE …`, `AFTER …`) as read on its socket before
/// and after connect.
const OPTIONS_CLIENT: &str = r#"
import socket, sys
T = socket.IPPROTO_TCP
OPTS = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 100000), (socket.SOL_SOCKET, socket.SO_SNDBUF, 50000),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (T, socket.TCP_NODELAY, 1),
        (T, socket.TCP_KEEPIDLE, 77), (T, socket.TCP_KEEPCNT, 4), (T, socket.TCP_USER_TIMEOUT, 12345)]
s = socket.socket()
for level, name, value in OPTS:
    s.setsockopt(level, name, value)
read = lambda: " ".join(str(s.getsockopt(level, name)) for level, name, _ in OPTS)
print("BEFORE", read(), flush=True)
s.connect((sys.argv[1], int(sys.argv[2])))
print("AFTER", read(), flush=True)
"#;

/// A server on 0.0.0.0:PORT that sets TCP_NODELAY and TCP_KEEPIDLE=66 on
/// its listener, and prints `ACCEPTED nodelay keepidle` as read on each
/// connection it accepts.
const OPTIONS_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 66)
print("READY", flush=True)
while True:
    c, _ = s.accept()
    print("ACCEPTED", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
          c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), flush=True)
    c.close()
"#;

/// The options a program sets on its socket before connecting to another
/// host (buffer sizes, TCP_NODELAY, keepalive…) hold on the connection
/// that replaces it, and a connection from another host accepted on a
/// listener has the TCP options the server set there, as the kernel's
/// accepted sockets inherit them.
#[test]
fn socket_options_hold_across_hosts() {
    require!("python3", "ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 2, &[]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let argv = py(OPTIONS_SERVER, &["8800"]);
    let mut server = b.spawn(&["--name", "opts"], &as_strs(&argv));
    server.wait_for_stdout("READY", SHORT);
    let opts = vip_of(b, "opts");
    a.wait_for_backend(&format!("{opts}:8800"), "b", true);

    let out = a.run(&[], &["python3", "-c", OPTIONS_CLIENT, "opts", "8800"]);
    assert!(out.status.success(), "{out}");
    let before = out.stdout.lines().find_map(|l| l.strip_prefix("BEFORE "));
    let after = out.stdout.lines().find_map(|l| l.strip_prefix("AFTER "));
    assert!(
        before.is_some() && before == after,
        "the client's options changed across connect: {out}"
    );
    let accepted = server.wait_for_stdout("ACCEPTED", SHORT);
    assert!(
        accepted.contains("ACCEPTED True 66"),
        "the accepted connection lacks the listener's options: {accepted}\nlog b:\n{}",
        tail(&b.daemon.log())
    );
    server.kill();
}

/// A blocking client: connects to HOST:PORT, sends a GET and prints the
/// answer.
const BLOCKING_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode(errors="replace"), flush=True)
"#;

/// `--connect-wait` also waits for a service that comes up on another
/// host: a blocking connect (python) made on a before the server on b
/// exists is answered once it listens. A non-blocking one (curl), held on
/// a loopback port, cannot be handed to another host: it is refused as
/// soon as the service is up there, and the next connect reaches it.
#[test]
fn connect_wait_reaches_a_service_that_comes_up_on_another_host() {
    require!("curl", "python3", "ip", "nsenter", "unshare");
    let Some(switch) = switch() else {
        return;
    };
    let c = cluster(switch, 2, &[]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let waiting = |needle: &str| {
        poll(SHORT, Duration::from_millis(20), || {
            a.daemon.log().contains(needle).then_some(())
        })
        .unwrap_or_else(|| panic!("a: no {needle:?} in the log:\n{}", tail(&a.daemon.log())));
    };

    // Blocking: held in the trapped connect, then connected host to host.
    let mut client = a.spawn(
        &["--connect-wait", "60s"],
        &["python3", "-c", BLOCKING_CLIENT, "10.233.77.7", "8900"],
    );
    waiting("connect waits for the service");
    assert!(client.try_status().is_none(), "{}", client.report());
    let argv = py(TAGGED_HTTP_SERVER, &["8900", "late-but-there"]);
    let mut late = b.spawn(&["--ip", "10.233.77.7", "--name", "late"], &as_strs(&argv));
    late.wait_for_stdout("READY", SHORT);
    assert!(client.wait(SHORT).success(), "{}", client.report());
    assert!(
        client.stdout().contains("late-but-there"),
        "{}\nlog a:\n{}",
        client.report(),
        tail(&a.daemon.log())
    );

    // Non-blocking: refused once the service is up on b, long before the
    // wait ends; the next connect gets through.
    let url = "http://10.233.77.8:8901/";
    let mut curl = a.spawn(&["--connect-wait", "120s"], &["curl", "-sS", url]);
    waiting("connect held until the service is up");
    let argv = py(TAGGED_HTTP_SERVER, &["8901", "second"]);
    let mut second = b.spawn(
        &["--ip", "10.233.77.8", "--name", "second"],
        &as_strs(&argv),
    );
    second.wait_for_stdout("READY", SHORT);
    let status = curl.wait(SHORT);
    assert_eq!(status.code(), Some(7), "curl: {}", curl.report());
    let again = a.run(&[], &["curl", "-sS", "-m", "10", url]);
    assert!(
        again.status.success() && again.stdout.contains("second"),
        "{again}"
    );
    late.kill();
    second.kill();
}
