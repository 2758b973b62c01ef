//! End-to-end tests of issue 9's declared services, reverse lookups and
//! dual stack: `ax service create` before its apps (redis-server and
//! redis-cli, python3's http.server and curl started in any order, by names
//! only), `getent hosts` and python's `gethostbyaddr` of every VIP answered
//! from ax's hosts file, and an `IPV6_V6ONLY` python server that sees its
//! client's IPv6 VIP. Run in a network namespace with loopback only, as
//! root and as an unprivileged user.

use std::time::Duration;

use ax_e2e::{poll, require, run, App, Daemon, Output, SHORT};
use serde_json::Value;

/// `python3 -c SCRIPT ARGS…`
fn py(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["python3".to_string(), "-c".to_string(), script.to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// `ax service ARGS… --socket SOCK`, to completion.
fn service(d: &Daemon, args: &[&str]) -> Output {
    let mut cmd = d.ax();
    cmd.arg("service")
        .args(args)
        .arg("--socket")
        .arg(d.socket());
    run(&mut cmd, SHORT)
}

/// The app whose `names` include `name`, per `ax get apps -o json`.
fn app_named(d: &Daemon, name: &str) -> Option<Value> {
    d.apps().into_iter().find(|a| {
        a["names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|x| x == name))
    })
}

/// The VIPs of an app, as strings.
fn vips(app: &Value) -> Vec<String> {
    app["vips"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|ip| ip.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the daemon logs that a client waits for its service.
fn wait_for_waiting_client(d: &Daemon) {
    poll(SHORT, Duration::from_millis(20), || {
        let log = d.log();
        (log.contains("connect waits for the service")
            || log.contains("connect held until the service is up"))
        .then_some(())
    })
    .expect("the client waits for its service");
}

// ---------------------------------------------------------------- declared services

/// The compose-style start of issue 9: the name is declared, the client
/// (redis-cli, by name, with --connect-wait) starts before the server
/// (redis-server --name db) and gets its answer.
#[test]
fn compose_style_start_by_names_only_redis() {
    require!("redis-server", "redis-cli");
    let d = Daemon::start();
    let created = service(&d, &["create", "db"]);
    created.assert_success();
    assert!(
        created.stdout.contains("service db declared at 10.233."),
        "{created}"
    );
    // It resolves at once, for every app.
    let resolved = d.run(&[], &["getent", "hosts", "db"]);
    resolved.assert_success();
    assert!(resolved.stdout.contains(" db db.ax"), "{resolved}");
    let mut client = d.spawn(
        &["--connect-wait", "30s"],
        &["redis-cli", "-h", "db", "-p", "6390", "ping"],
    );
    wait_for_waiting_client(&d);
    assert!(client.try_status().is_none(), "{}", client.report());
    let mut server = d.spawn(
        &["--name", "db"],
        &[
            "redis-server",
            "--port",
            "6390",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
    );
    assert!(client.wait(SHORT).success(), "{}", client.report());
    assert_eq!(client.stdout().trim(), "PONG", "{}", client.report());
    // The server took the declared VIPs.
    let declared: Vec<String> = d
        .services()
        .iter()
        .filter(|s| {
            s["names"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x == "db"))
        })
        .filter_map(|s| s["addr"].as_str().map(String::from))
        .collect();
    let app = app_named(&d, "db").expect("redis-server is app db");
    for vip in vips(&app) {
        assert!(
            declared.iter().any(|a| a.contains(&vip)),
            "{vip} not among {declared:?}"
        );
    }
    server.kill();
}

/// The same with python3's http.server and curl, the client again first;
/// then the service's life: shown with no backend, refused deletion while
/// an app serves it, the --ip of another VIP refused, --force.
#[test]
fn declared_service_lifecycle_http_server_and_curl() {
    require!("python3", "curl");
    let d = Daemon::start();
    service(
        &d,
        &["create", "web", "--ip", "10.233.40.1", "--lb", "random"],
    )
    .assert_success();
    // Shown with no backend yet, as a table and as JSON.
    let table = d.get("services", &[]).stdout;
    assert!(
        table.contains("10.233.40.1")
            && table.contains("web")
            && table.contains("<no backend yet>"),
        "{table}"
    );
    let json = d.services();
    assert_eq!(json.len(), 1, "{json:?}");
    assert_eq!(json[0]["addr"], "10.233.40.1:0");
    assert_eq!(json[0]["lb"], "random");
    assert_eq!(json[0]["backends"], Value::Array(vec![]));
    // Declared twice: refused.
    let again = service(&d, &["create", "web"]);
    assert!(
        !again.status.success() && again.stderr.contains("already declared"),
        "{again}"
    );
    // Another app may not take its VIP; an app named web may not take another.
    let thief = d.run(&["--ip", "10.233.40.1"], &["true"]);
    assert!(
        !thief.status.success()
            && thief
                .stderr
                .contains("reserved for the declared service 'web'"),
        "{thief}"
    );
    let elsewhere = d.run(&["--name", "web", "--ip", "10.233.40.2"], &["true"]);
    assert!(
        !elsewhere.status.success() && elsewhere.stderr.contains("declared service"),
        "{elsewhere}"
    );

    let mut client = d.spawn(
        &["--connect-wait", "30s"],
        &["curl", "-sS", "http://web:8000/hello.txt"],
    );
    wait_for_waiting_client(&d);
    assert!(client.try_status().is_none(), "{}", client.report());
    let dir = ax_e2e::TempDir::new("www");
    dir.write("hello.txt", "hello from web\n");
    let mut cmd = d.exec_command(
        &["--name", "web"],
        &["python3", "-m", "http.server", "8000"],
    );
    cmd.current_dir(dir.path());
    let mut server = App::spawn(cmd);
    assert!(client.wait(SHORT).success(), "{}", client.report());
    assert_eq!(client.stdout(), "hello from web\n");
    let app = app_named(&d, "web").expect("the server is app web");
    assert_eq!(vips(&app), vec!["10.233.40.1".to_string()]);

    // Delete: refused while the server runs, naming it…
    let refused = service(&d, &["delete", "web"]);
    assert!(
        !refused.status.success() && refused.stderr.contains("--force"),
        "{refused}"
    );
    // …done with --force; the server keeps serving at its VIP.
    service(&d, &["delete", "web", "--force"]).assert_success();
    let after = d.run(&[], &["curl", "-sS", "http://10.233.40.1:8000/hello.txt"]);
    after.assert_success();
    server.kill();
    // With no app left, the name is gone.
    poll(SHORT, Duration::from_millis(50), || {
        d.services().is_empty().then_some(())
    })
    .expect("nothing listed once the server ended");
    let gone = d.run(&[], &["getent", "hosts", "web"]);
    assert!(!gone.status.success(), "{gone}");
    let missing = service(&d, &["delete", "web"]);
    assert!(
        !missing.status.success() && missing.stderr.contains("no service 'web'"),
        "{missing}"
    );
}

// ---------------------------------------------------------------- reverse lookups

/// Every VIP has a hosts entry: an app without a name gets `app-ID.ax`,
/// so getent (glibc's files backend) and python's gethostbyaddr answer a
/// reverse lookup of any VIP without asking the host's DNS.
#[test]
fn reverse_lookups_of_every_vip_stay_on_the_host() {
    require!("python3", "getent");
    let d = Daemon::start();
    let mut anonymous = d.spawn(
        &[],
        &py("import sys; print('UP', flush=True); sys.stdin.read()", &[]),
    );
    anonymous.wait_for_stdout("UP", SHORT);
    let mut named = d.spawn(
        &["--name", "shop"],
        &py("import sys; print('UP', flush=True); sys.stdin.read()", &[]),
    );
    named.wait_for_stdout("UP", SHORT);
    service(&d, &["create", "later"]).assert_success();
    let apps = d.apps();
    let anon = apps
        .iter()
        .find(|a| a["names"].as_array().is_some_and(|n| n.is_empty()))
        .expect("the unnamed app");
    let id = anon["id"].as_u64().expect("an id");
    let mut expected: Vec<(String, String)> = vips(anon)
        .into_iter()
        .map(|v| (v, format!("app-{id}.ax")))
        .collect();
    expected.extend(
        vips(&app_named(&d, "shop").expect("shop"))
            .into_iter()
            .map(|v| (v, "shop".to_string())),
    );
    let later = d.services();
    for s in &later {
        if let Some(addr) = s["addr"].as_str() {
            let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip);
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            expected.push((ip.to_string(), "later".to_string()));
        }
    }
    assert!(
        expected.len() >= 6,
        "one VIP of each family each: {expected:?}"
    );
    for (vip, name) in &expected {
        let out = d.run(&[], &["getent", "hosts", vip.as_str()]);
        out.assert_success();
        assert_eq!(
            out.stdout.split_whitespace().take(2).collect::<Vec<_>>(),
            vec![vip.as_str(), name.as_str()],
            "{out}"
        );
        let by_python = d.run(
            &[],
            &py(
                "import socket, sys; print(socket.gethostbyaddr(sys.argv[1])[0])",
                &[vip],
            ),
        );
        by_python.assert_success();
        assert_eq!(by_python.stdout.trim(), name, "{by_python}");
    }
    anonymous.kill();
    named.kill();
}

// ---------------------------------------------------------------- dual stack

/// Each app gets one VIP of each family; a client connecting to the
/// server's IPv6 VIP is seen by an IPV6_V6ONLY listener at its own IPv6
/// VIP (never as ::ffff:10.233.x), and at its IPv4 VIP over IPv4.
#[test]
fn ipv6_only_server_sees_the_clients_ipv6_vip() {
    require!("python3");
    let d = Daemon::start();
    let mut server = d.spawn(
        &["--name", "six"],
        &py(
            r#"
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::", 7600))
s.listen(8)
f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
f.bind(("0.0.0.0", 7600))
f.listen(8)
print("READY", flush=True)
for l in (s, f):
    c, peer = l.accept()
    print("PEER", peer[0], flush=True)
    c.sendall(b"hi\n")
    c.close()
"#,
            &[],
        ),
    );
    server.wait_for_stdout("READY", SHORT);
    let app = app_named(&d, "six").expect("the server");
    let server_vips = vips(&app);
    assert_eq!(server_vips.len(), 2, "{app}");
    assert!(server_vips[0].starts_with("10.233."), "{server_vips:?}");
    assert!(server_vips[1].starts_with("fd00:a8::"), "{server_vips:?}");
    // `ax get apps` shows both.
    let table = d.get("apps", &[]).stdout;
    let both = format!("{},{}", server_vips[0], server_vips[1]);
    assert!(table.contains(&both), "{table}");
    let client = d.run(
        &[],
        &py(
            r#"
import socket, sys
for host in sys.argv[1:]:
    c = socket.create_connection((host, 7600))
    print("LOCAL", c.getsockname()[0], c.recv(10).decode().strip(), flush=True)
"#,
            &[&server_vips[1], &server_vips[0]],
        ),
    );
    client.assert_success();
    let locals: Vec<&str> = client
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("LOCAL "))
        .collect();
    assert_eq!(locals.len(), 2, "{client}");
    let (v6_local, v4_local) = (
        locals[0].split(' ').next().unwrap_or(""),
        locals[1].split(' ').next().unwrap_or(""),
    );
    assert!(v6_local.starts_with("fd00:a8::"), "{client}");
    assert!(v4_local.starts_with("10.233."), "{client}");
    let v6_peer = server.wait_for_stdout("PEER fd00", SHORT);
    assert!(v6_peer.contains(&format!("PEER {v6_local}\n")), "{v6_peer}");
    assert!(!v6_peer.contains("::ffff:"), "{v6_peer}");
    let both = server.wait_for_stdout("PEER 10.233.", SHORT);
    assert!(both.contains(&format!("PEER {v4_local}\n")), "{both}");
    assert!(server.wait(SHORT).success(), "{}", server.report());
}

/// A server bound on `0.0.0.0` only (python3 -m http.server --bind
/// 0.0.0.0) is still reached at its app's IPv6 VIP, which names resolve
/// to first: by curl at the literal address and by busybox wget (which
/// tries only the first address) by name; the server sees the client's
/// IPv4 VIP, never an unspecified address.
#[test]
fn an_ipv4_only_server_is_reached_at_its_ipv6_vip() {
    require!("python3", "curl", "busybox");
    let d = Daemon::start();
    let dir = ax_e2e::TempDir::new("www");
    dir.write("index.txt", "v4 only\n");
    let mut cmd = d.exec_command(
        &["--name", "four"],
        &["python3", "-m", "http.server", "--bind", "0.0.0.0", "7700"],
    );
    cmd.current_dir(dir.path());
    let mut server = App::spawn(cmd);
    let app = poll(SHORT, Duration::from_millis(50), || app_named(&d, "four"))
        .expect("the server registered");
    let server_vips = vips(&app);
    assert_eq!(server_vips.len(), 2, "{app}");
    let v4 = d.wait_for_service(&mut server, &format!("{}:7700", server_vips[0]));
    assert_eq!(v4["names"][0], "four");
    let by_v6 = d.run(
        &[],
        &[
            "curl",
            "-sS",
            &format!("http://[{}]:7700/index.txt", server_vips[1]),
        ],
    );
    by_v6.assert_success();
    assert_eq!(by_v6.stdout, "v4 only\n", "{by_v6}");
    let by_name = d.run(
        &[],
        &[
            "busybox",
            "wget",
            "-q",
            "-O",
            "-",
            "http://four:7700/index.txt",
        ],
    );
    by_name.assert_success();
    assert_eq!(by_name.stdout, "v4 only\n", "{by_name}");
    let log = poll(SHORT, Duration::from_millis(50), || {
        let err = server.stderr();
        (err.matches("GET /index.txt").count() >= 2).then_some(err)
    })
    .unwrap_or_else(|| panic!("two requests logged: {}", server.report()));
    for line in log.lines().filter(|l| l.contains("GET /index.txt")) {
        assert!(line.starts_with("10.233."), "{log}");
    }
    server.kill();
}

/// Starts a server as app `name` whose listener `l` (made by `listener`,
/// python lines) listens on one family only, and connects to it from
/// another app at its VIP `dial` (0: the IPv4 one, 1: the IPv6 one), the
/// one of the family the server does not listen on. Returns the server's
/// VIPs, the client's `CLIENT` line (its own address, what it read) and
/// the server's `ACCEPTED` line: whether the accepted socket is `AF_INET`,
/// its name, its peer's name and the address `accept` gave.
fn across_families(
    d: &Daemon,
    name: &str,
    listener: &str,
    port: u16,
    dial: usize,
) -> (Vec<String>, String, String) {
    let server_code = format!(
        r#"
import socket
{listener}
l.listen(8)
print("READY", flush=True)
c, peer = l.accept()
print("ACCEPTED", c.family == socket.AF_INET, repr(c.getsockname()), repr(c.getpeername()), repr(peer), flush=True)
c.sendall(b"hi\n")
c.close()
"#
    );
    let mut server = d.spawn(&["--name", name], &py(&server_code, &[]));
    server.wait_for_stdout("READY", SHORT);
    let app = app_named(d, name).expect("the server");
    let server_vips = vips(&app);
    assert_eq!(server_vips.len(), 2, "{app}");
    let client = d.run(
        &[],
        &py(
            r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("CLIENT", repr(c.getsockname()[0]), c.recv(10).decode().strip(), flush=True)
"#,
            &[&server_vips[dial], &port.to_string()],
        ),
    );
    client.assert_success();
    let client_line = client
        .stdout
        .lines()
        .find(|l| l.starts_with("CLIENT "))
        .unwrap_or_else(|| panic!("{client}"))
        .to_string();
    let out = server.wait_for_stdout("ACCEPTED", SHORT);
    let accepted = out
        .lines()
        .find(|l| l.starts_with("ACCEPTED"))
        .unwrap_or_default()
        .to_string();
    assert!(server.wait(SHORT).success(), "{}", server.report());
    (server_vips, client_line, accepted)
}

/// A connection that reached a server bound on `0.0.0.0` only through its
/// app's IPv6 VIP is an `AF_INET` socket: its own name is the app's IPv4
/// VIP and the port (the service reached), its peer the client's IPv4 VIP.
/// (It used to answer an `AF_INET6` name cut to an `AF_INET` buffer: an
/// IPv6 address made of the VIP's first bytes and the program's own
/// memory.)
#[test]
fn an_ipv4_only_servers_connection_names_its_ipv4_vip() {
    require!("python3");
    let d = Daemon::start();
    let (server_vips, client, line) = across_families(
        &d,
        "fourname",
        r#"l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.bind(("0.0.0.0", 7710))"#,
        7710,
        1,
    );
    let client_ip = client
        .split('\'')
        .nth(1)
        .unwrap_or_else(|| panic!("{client}"))
        .trim_start_matches("::ffff:")
        .to_string();
    assert!(client_ip.starts_with("10.233."), "{client}");
    let want_local = format!("('{}', 7710)", server_vips[0]);
    assert!(line.starts_with("ACCEPTED True "), "{line}");
    assert!(line.contains(&want_local), "want {want_local}: {line}");
    assert!(line.contains(&format!("('{client_ip}', ")), "{line}");
    assert!(!line.contains("fd00:"), "{line}");
}

/// The same the other way round: a connection that reached a server on
/// `::` with `IPV6_V6ONLY` through its app's IPv4 VIP names the app's IPv6
/// VIP (the service reached), not a v4-mapped address, which no such
/// socket has natively.
#[test]
fn an_ipv6_only_servers_connection_names_its_ipv6_vip() {
    require!("python3");
    let d = Daemon::start();
    let (server_vips, _, line) = across_families(
        &d,
        "sixname",
        r#"l = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
l.bind(("::", 7711))"#,
        7711,
        0,
    );
    let want = format!("ACCEPTED False ('{}', 7711, ", server_vips[1]);
    assert!(line.starts_with(&want), "want {want}: {line}");
    assert!(!line.contains("::ffff:"), "{line}");
}

/// A daemon killed outright and restarted on the same socket keeps the
/// declared services: same VIPs, still resolving.
#[test]
fn declarations_survive_a_daemon_restart() {
    require!("getent");
    let mut d = Daemon::start();
    let created = service(&d, &["create", "kept", "--ip", "10.233.41.1"]);
    created.assert_success();
    d.kill_hard();
    d.restart();
    let json = d.services();
    assert_eq!(json.len(), 1, "{json:?}");
    assert_eq!(json[0]["addr"], "10.233.41.1:0");
    let out = d.run(&[], &["getent", "hosts", "kept"]);
    out.assert_success();
    assert!(out.stdout.starts_with("10.233.41.1"), "{out}");
    service(&d, &["delete", "kept"]).assert_success();
}
