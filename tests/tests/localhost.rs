//! Localhost keeps its meaning under ax (issue 9): within an app,
//! `127.0.0.1:P` reaches the app's own listener on P and the server sees a
//! loopback peer (redis' protected mode accepts it); two apps may listen on
//! the same port, each reaching its own; from outside the app, a wildcard
//! listener is on the host's `127.0.0.1:P` as it would be natively; and
//! Erlang distribution (epmd on the wildcard port 4369, registered over
//! 127.0.0.1) starts. Real programs: redis-server, redis-cli, erl, epmd.

use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ax_e2e::{free_loopback_port, poll, require, run, App, Daemon, TempDir, SERVICE_READY, SHORT};

/// `redis-server --port P` with its defaults otherwise (protected mode on,
/// bound to every address), keeping nothing on disk.
fn redis_server(port: u16, dir: &TempDir) -> Vec<String> {
    [
        "redis-server",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.path().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A shell script run under ax as one app: starts redis-server on PORT in
/// the background and waits (a readiness loop, at most 15 s) until
/// `redis-cli -p PORT` reaches that very server: `INFO` answers its
/// process id (until it listens, 127.0.0.1:PORT may be another app's
/// server, on the host's loopback). Then prints `OWN <pid>`, the answer to
/// `ping`, and the peer address the server saw for it, and keeps the
/// server until stdin closes.
const REDIS_IN_ONE_APP: &str = r#"
port=$1; dir=$2
redis-server --port "$port" --save "" --appendonly no --dir "$dir" >/dev/null &
pid=$!
reached() { redis-cli -p "$port" info server 2>&1 | tr -d '\r' | sed -n 's/^process_id://p'; }
i=0
until [ "$(reached)" = "$pid" ]; do
    i=$((i+1))
    if [ $i -gt 300 ]; then
        echo "NOT OWN: $(redis-cli -p "$port" info server 2>&1 | head -3)"
        kill $pid; exit 1
    fi
    sleep 0.05
done
echo "OWN $pid"
echo "PING $(redis-cli -p "$port" ping 2>&1)"
echo "V6 $(redis-cli -h ::1 -p "$port" ping 2>&1)"
echo "NAMED $(redis-cli -h localhost -p "$port" ping 2>&1)"
echo "PEER $(redis-cli -p "$port" client info | tr ' ' '\n' | grep '^addr=')"
read -r _
kill $pid
wait $pid
"#;

fn redis_in_one_app(d: &Daemon, port: u16, dir: &TempDir) -> App {
    d.spawn(
        &[],
        &[
            "sh",
            "-c",
            REDIS_IN_ONE_APP,
            "sh",
            &port.to_string(),
            &dir.path().display().to_string(),
        ],
    )
}

/// Waits for [`REDIS_IN_ONE_APP`] to reach its own server and checks
/// that redis, in protected mode, took it for a loopback client; returns
/// the server's pid.
fn own(app: &mut App) -> String {
    let out = app.wait_for_stdout("PEER", SHORT);
    assert!(out.contains("PING PONG"), "{}", app.report());
    assert!(
        out.contains("PEER addr=127.0.0.1:"),
        "redis should see a loopback client: {}",
        app.report()
    );
    out.lines()
        .find_map(|l| l.strip_prefix("OWN "))
        .unwrap_or_else(|| panic!("no OWN line: {out}"))
        .to_string()
}

/// `redis-cli -p PORT ping` run natively (outside ax).
fn native_ping(port: u16) -> String {
    run(
        Command::new("redis-cli").args(["-p", &port.to_string(), "ping"]),
        SHORT,
    )
    .stdout
    .trim()
    .to_string()
}

/// Within one app, redis-cli reaches the app's own redis-server at
/// 127.0.0.1:P ([::1]:P, localhost:P), and redis, in protected mode, sees a loopback client.
#[test]
fn redis_within_one_app_over_localhost_protected_mode() {
    require!("redis-server", "redis-cli");
    let d = Daemon::start();
    let dir = TempDir::new("redis-own");
    let port = free_loopback_port();
    let mut app = redis_in_one_app(&d, port, &dir);
    own(&mut app);
    // [::1] and the name localhost too.
    let out = app.stdout();
    assert!(
        out.contains("V6 PONG") && out.contains("NAMED PONG"),
        "{}",
        app.report()
    );
    app.close_stdin();
    assert!(app.wait(SHORT).success(), "{}", app.report());
}

/// Two apps listen on the same port; each one's localhost is its own, as
/// in a pod. The first holds the host's loopback port; the daemon says
/// once which app holds it when the second cannot have it.
#[test]
fn two_apps_on_one_port_each_reach_their_own_redis() {
    require!("redis-server", "redis-cli");
    let d = Daemon::start();
    let (dir_a, dir_b) = (TempDir::new("redis-a"), TempDir::new("redis-b"));
    let port = free_loopback_port();
    let mut a = redis_in_one_app(&d, port, &dir_a);
    let started_a = own(&mut a);
    // App a's server is on the host's loopback too (native redis-cli).
    let pong = poll(SERVICE_READY, Duration::from_millis(50), || {
        (native_ping(port) == "PONG").then_some(())
    });
    assert!(pong.is_some(), "not on host loopback: {}", d.log());
    let mut b = redis_in_one_app(&d, port, &dir_b);
    let started_b = own(&mut b);
    assert_ne!(started_a, started_b);
    let told = poll(SHORT, Duration::from_millis(50), || {
        d.log()
            .contains("host loopback port held by another app")
            .then_some(())
    });
    assert!(told.is_some(), "{}", d.log());
    for app in [&mut a, &mut b] {
        app.close_stdin();
        assert!(app.wait(SHORT).success(), "{}", app.report());
    }
}

/// `ax exec -- redis-server --port P`: another app under ax, and a
/// redis-cli outside ax, both reach it at 127.0.0.1:P (the host's loopback,
/// through the daemon's doorbell: redis gets the real TCP connection, from
/// a loopback peer, so protected mode lets it in). `ax get services`
/// shows it; the port is the host's again once the server is gone.
#[test]
fn redis_on_host_loopback_from_another_app_and_natively() {
    require!("redis-server", "redis-cli");
    let d = Daemon::start();
    let dir = TempDir::new("redis-host");
    let port = free_loopback_port();
    let mut server = d.spawn(&[], &redis_server(port, &dir));
    let pong = poll(SERVICE_READY, Duration::from_millis(50), || {
        if native_ping(port) == "PONG" {
            return Some(Ok(()));
        }
        server.try_status().map(|_| Err(()))
    });
    assert!(
        matches!(pong, Some(Ok(()))),
        "{}\n{}",
        server.report(),
        d.log()
    );
    let cli = d.run(&[], &["redis-cli", "-p", &port.to_string(), "ping"]);
    cli.assert_success();
    assert_eq!(cli.stdout.trim(), "PONG", "{cli}");
    let host = format!("127.0.0.1:{port}");
    assert!(
        d.services()
            .iter()
            .any(|s| s["host_loopback"] == host.as_str()),
        "{:?}",
        d.services()
    );
    let table = d.get("services", &[]).stdout;
    assert!(
        table.contains("HOST LOOPBACK") && table.contains(&host),
        "{table}"
    );
    server.kill();
    // The server gone, the port is free for anyone again.
    let freed = poll(SHORT, Duration::from_millis(50), || {
        TcpListener::bind(("127.0.0.1", port)).ok()
    });
    assert!(freed.is_some(), "{}", d.log());
}

/// A program under ax that connects to another app's server at
/// 127.0.0.1:P is sent to it as to its VIP, so the label policy decides:
/// an unlabelled redis-cli is refused by a `tier=db` redis-server (no
/// shared label), a `tier=db` one gets PONG; outside ax, redis-cli gets
/// PONG through the host's loopback.
#[test]
fn host_loopback_does_not_go_around_the_policy() {
    require!("redis-server", "redis-cli");
    let d = Daemon::start();
    let dir = TempDir::new("redis-policy");
    let port = free_loopback_port();
    let mut server = d.spawn(&["--label", "tier=db"], &redis_server(port, &dir));
    let pong = poll(SERVICE_READY, Duration::from_millis(50), || {
        if native_ping(port) == "PONG" {
            return Some(Ok(()));
        }
        server.try_status().map(|_| Err(()))
    });
    assert!(
        matches!(pong, Some(Ok(()))),
        "{}\n{}",
        server.report(),
        d.log()
    );
    let p = port.to_string();
    let denied = d.run(&[], &["redis-cli", "-p", &p, "ping"]);
    assert!(
        denied.stdout.contains("Connection refused")
            || denied.stderr.contains("Connection refused"),
        "{denied}"
    );
    let allowed = d.run(&["--label", "tier=db"], &["redis-cli", "-p", &p, "ping"]);
    assert_eq!(allowed.stdout.trim(), "PONG", "{allowed}");
    assert!(d.log().contains("connect denied by policy"), "{}", d.log());
    server.kill();
}

/// An app's own localhost is its own business, as in a pod: a policy that
/// denies everything leaves it alone.
#[test]
fn own_localhost_under_a_deny_all_policy() {
    require!("redis-server", "redis-cli");
    let dir = TempDir::new("redis-deny");
    let policy = dir.write("policy.toml", "default = \"deny\"\n");
    let d = Daemon::start_with(&[], &["--policy", policy.to_str().expect("utf-8")]);
    let mut app = redis_in_one_app(&d, free_loopback_port(), &dir);
    own(&mut app);
    app.close_stdin();
    assert!(app.wait(SHORT).success(), "{}", app.report());
}

/// A program outside ax holds the port: the app's server still works on
/// its VIP and within the app, and the host's port stays the native
/// program's.
#[test]
fn native_program_keeps_its_loopback_port() {
    require!("redis-server", "redis-cli");
    let d = Daemon::start();
    // The native program closes every connection at once (until the app's
    // own server listens, its redis-cli lands here).
    let native = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = native.local_addr().expect("addr").port();
    native.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let closer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match native.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    };
    let dir = TempDir::new("redis-taken");
    let mut app = redis_in_one_app(&d, port, &dir);
    own(&mut app);
    let told = poll(SHORT, Duration::from_millis(50), || {
        d.log()
            .contains("host loopback port taken by a program outside ax")
            .then_some(())
    });
    assert!(told.is_some(), "{}", d.log());
    app.close_stdin();
    assert!(app.wait(SHORT).success(), "{}", app.report());
    stop.store(true, Ordering::Relaxed);
    closer.join().expect("closer thread");
}

/// Erlang distribution: `erl -name a@n1` starts epmd (a wildcard listener
/// on 4369) and registers with it over 127.0.0.1.
#[test]
fn erlang_distribution_starts() {
    require!("erl", "epmd");
    let d = Daemon::start();
    let home = TempDir::new("erl");
    let script = r#"
erl -name a@n1 -noshell -eval 'io:format("NODE ~p~n", [node()]), halt().'
status=$?
epmd -kill >/dev/null 2>&1
exit $status
"#;
    let mut app = d.spawn(
        &[],
        &[
            "env",
            &format!("HOME={}", home.path().display()),
            "sh",
            "-c",
            script,
        ],
    );
    let status = app.wait(SHORT);
    assert!(status.success(), "{}\n{}", app.report(), d.log());
    assert!(app.stdout().contains("NODE a@n1"), "{}", app.report());
    // epmd is gone (epmd -kill reached it within the app), and with it
    // the host loopback port 4369 the daemon held for it.
    let freed = poll(SHORT, Duration::from_millis(50), || {
        TcpListener::bind(("127.0.0.1", 4369)).ok()
    });
    assert!(freed.is_some(), "{}", d.log());
}
