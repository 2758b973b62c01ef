//! The broker embedded without the daemon: real python3 programs under the
//! filter, served by a `Broker` over a `LocalRegistry`.

use ax_broker::{launch, Broker, BrokerConfig};
use ax_registry::{AppSpec, LocalRegistry};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn have_python() -> bool {
    Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

const SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen(5)
print("listening", s.getsockname(), flush=True)
c, peer = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
data = c.recv(100)
c.sendall(b"echo:" + data + b" peer=" + repr(peer).encode() + b" local=" + repr(c.getsockname()).encode())
c.close()
"#;

const CLIENT: &str = r#"
import socket, sys
c = socket.create_connection(("10.233.0.10", 7000), timeout=10)
c.sendall(b"hi")
print(c.recv(200).decode(), "me=", c.getsockname(), "them=", c.getpeername(), flush=True)
print("domain", c.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN), flush=True)
try:
    socket.create_connection(("10.233.0.10", 7001), timeout=10)
except OSError as e:
    print("second", e.errno, flush=True)
"#;

#[test]
fn python_server_and_client_talk_over_unix() {
    if !have_python() {
        eprintln!("SKIP: python3 not found");
        return;
    }
    let registry = Arc::new(LocalRegistry::default());
    let broker = Broker::new(registry.clone(), BrokerConfig::default());
    let server_app = registry
        .register_app(
            &AppSpec {
                requested_ips: vec!["10.233.0.10".parse().unwrap()],
                ..AppSpec::default()
            },
            0,
        )
        .unwrap();
    let client_app = registry
        .register_app(
            &AppSpec {
                requested_ips: vec!["10.233.0.11".parse().unwrap()],
                ..AppSpec::default()
            },
            0,
        )
        .unwrap();
    let filter = launch::compile_filter().unwrap();

    let mut server_cmd = Command::new("python3");
    server_cmd.args(["-c", SERVER]).stdout(Stdio::piped());
    let server = launch::spawn(&mut server_cmd, &filter).unwrap();
    let server_session = broker.serve(server_app.id, server.listener).unwrap();

    // Readiness: the registry lists the service once bind was answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.services().is_empty() {
        assert!(Instant::now() < deadline, "server never bound");
        std::thread::sleep(Duration::from_millis(10));
    }
    let services = registry.services();
    assert_eq!(services[0].addr, "10.233.0.10:7000".parse().unwrap());

    let mut client_cmd = Command::new("python3");
    client_cmd.args(["-c", CLIENT]).stdout(Stdio::piped());
    let client = launch::spawn(&mut client_cmd, &filter).unwrap();
    let client_session = broker.serve(client_app.id, client.listener).unwrap();
    let out = client.child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let server_out = server.child.wait_with_output().unwrap();
    let server_text = String::from_utf8_lossy(&server_out.stdout);
    assert!(out.status.success(), "client failed: {text}");
    assert!(
        server_text.contains("listening ('0.0.0.0', 7000)"),
        "{server_text}"
    );
    assert!(text.contains("echo:hi peer=('10.233.0.11', "), "{text}");
    assert!(text.contains("local=('10.233.0.10', 7000)"), "{text}");
    assert!(text.contains("them= ('10.233.0.10', 7000)"), "{text}");
    assert!(text.contains("me= ('10.233.0.11', "), "{text}");
    assert!(text.contains("domain 2"), "{text}");
    assert!(text.contains("second 111"), "{text}");
    server_session.join();
    client_session.join();
    // Both apps exited: the broker released their services.
    assert!(registry.services().is_empty());
    assert!(registry.apps().is_empty());
}
