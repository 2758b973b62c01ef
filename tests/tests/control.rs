//! The daemon's control socket is out of reach for programs under ax: they
//! may neither register apps nor read the registry, so they cannot change
//! their own identity or another app's. Clients that are not under ax (of
//! the same user) are served as usual.

use ax_e2e::{require, Daemon};

/// Sends one raw, valid `ListApps` frame and prints what comes back.
const RAW_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
# length 3, version 1, Request::ListApps (variant 5)
s.sendall(b"\x00\x00\x00\x03\x01\x00\x05")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print("ANSWER", data[4:].decode("utf-8", "replace"))
"#;

#[test]
fn programs_under_ax_cannot_use_the_control_socket() {
    require!("python3");
    let d = Daemon::start();
    let sock = d.socket().to_str().expect("utf-8 socket path").to_string();
    let ax = ax_e2e::ax_bin();
    let ax = ax.to_str().expect("utf-8 path");

    // A nested `ax get` is refused with a clear message.
    let nested = d.run(&[], &[ax, "get", "apps", "--socket", &sock]);
    assert_eq!(nested.code(), Some(1), "nested ax get: {nested}");
    assert!(
        nested
            .stderr
            .contains("programs under ax may not use the daemon's control socket"),
        "{nested}"
    );
    // So is a nested `ax exec`: no app gets registered by it.
    let nested_exec = d.run(
        &["--no-autostart"],
        &[ax, "exec", "--socket", &sock, "--", "true"],
    );
    assert_ne!(nested_exec.code(), Some(0), "nested ax exec: {nested_exec}");
    // A hand-made client speaking the protocol directly gets the same refusal.
    let raw = d.run(&[], &["python3", "-c", RAW_CLIENT, &sock]);
    assert!(raw.stdout.contains("ANSWER"), "{raw}");
    assert!(raw.stdout.contains("permission denied"), "{raw}");
    assert!(
        !raw.stdout.contains("python3"),
        "the registry leaked: {raw}"
    );
    assert!(
        d.log().contains("refusing a program under ax"),
        "{}",
        d.log()
    );

    // None of the refused programs' attempts registered anything, and a
    // client that is not under ax is still served.
    let apps = d.apps();
    assert!(apps.is_empty(), "apps left behind: {apps:?}");
}
