//! Writes the committed seed inputs of the fuzz targets, as
//! `fuzz/corpus/<target>/seed-<what>`; other files there (inputs the fuzzer
//! found and `cargo fuzz cmin` kept) are left alone.

use ax_broker::SocketName;
use ax_proto::{encode, Request, Response};
use ax_registry::{AppInfo, AppSpec, Backend, LbMode, RegisterError, ServiceInfo, UnixEndpoint};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn frames(dir: &Path) {
    let spec = AppSpec {
        requested_ips: vec![ip("10.233.0.10"), ip("fd00:a8::30")],
        names: vec!["web".into()],
        labels: BTreeMap::from([("tier".into(), "front".into())]),
        command: vec!["python3".into(), "-m".into(), "http.server".into()],
        lb: Some(LbMode::Random),
        connect_wait: Some(std::time::Duration::from_millis(1500)),
        container: None,
        no_hosts_mount: false,
    };
    let info = AppInfo {
        id: 3,
        pid: 4242,
        uid: 1000,
        vips: spec.requested_ips.clone(),
        names: spec.names.clone(),
        labels: spec.labels.clone(),
        command: spec.command.clone(),
        started_unix: 1_760_000_000,
        lb: spec.lb,
        connect_wait: spec.connect_wait,
        container: None,
        no_hosts_mount: false,
    };
    let services = vec![
        ServiceInfo {
            addr: sa("10.233.0.10:8000"),
            names: vec!["web".into()],
            lb: LbMode::RoundRobin,
            backends: vec![
                Backend {
                    app: 3,
                    endpoint: UnixEndpoint::Abstract(
                        b"ax/00000001/l4/3/10.233.0.10/8000".to_vec(),
                    ),
                },
                Backend {
                    app: 4,
                    endpoint: UnixEndpoint::Abstract(
                        b"ax/00000001/l4/4/10.233.0.10/8000".to_vec(),
                    ),
                },
            ],
            host_loopback: None,
        },
        ServiceInfo {
            addr: sa("[fd00:a8::30]:9000"),
            names: vec![],
            lb: LbMode::Random,
            backends: vec![Backend {
                app: 3,
                endpoint: UnixEndpoint::Path("/run/ax/svc.sock".into()),
            }],
            host_loopback: None,
        },
    ];
    let requests = [
        ("ping", Request::Ping),
        ("register-default", Request::RegisterApp(AppSpec::default())),
        ("register", Request::RegisterApp(spec)),
        ("attach", Request::AttachListener { app: 3, pid: 4242 }),
        ("list-apps", Request::ListApps),
        ("list-services", Request::ListServices),
    ];
    for (name, req) in requests {
        write(dir, &format!("req-{name}"), &encode(&req).unwrap());
    }
    let responses = [
        (
            "pong",
            Response::Pong {
                daemon_version: "0.1.0".into(),
                pid: 1,
            },
        ),
        ("registered", Response::AppRegistered(info.clone())),
        (
            "failed-in-use",
            Response::RegisterFailed(RegisterError::IpInUse {
                ip: ip("10.233.0.10"),
                owner: 2,
            }),
        ),
        (
            "failed-invalid",
            Response::RegisterFailed(RegisterError::InvalidIp {
                ip: ip("127.0.0.1"),
                reason: "loopback".into(),
            }),
        ),
        (
            "failed-exhausted",
            Response::RegisterFailed(RegisterError::PoolExhausted("10.233.0.0/30".into())),
        ),
        (
            "failed-no-app",
            Response::RegisterFailed(RegisterError::NoSuchApp(9)),
        ),
        ("attached", Response::Attached),
        ("apps", Response::Apps(vec![info])),
        ("services", Response::Services(services)),
        ("error", Response::Error("permission denied".into())),
    ];
    for (name, resp) in responses {
        write(dir, &format!("resp-{name}"), &encode(&resp).unwrap());
    }
}

/// `struct sockaddr_in` / `sockaddr_in6` bytes as a program passes them.
fn sockaddr(family: u16, port: u16, ip: &[u8], scope: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len.max(28)];
    out[0..2].copy_from_slice(&family.to_ne_bytes());
    out[2..4].copy_from_slice(&port.to_be_bytes());
    if ip.len() == 4 {
        out[4..8].copy_from_slice(ip);
    } else {
        out[8..24].copy_from_slice(ip);
        out[24..28].copy_from_slice(&scope.to_ne_bytes());
    }
    out.truncate(len);
    out
}

fn sockaddrs(dir: &Path) {
    const UNSPEC: u16 = 0;
    const INET: u16 = 2;
    const INET6: u16 = 10;
    let v4 = ip("10.233.0.10");
    let IpAddr::V4(v4) = v4 else { unreachable!() };
    let v4 = v4.octets();
    let v6 = |s: &str| match ip(s) {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => unreachable!(),
    };
    let cases: [(&str, Vec<u8>); 10] = [
        ("in", sockaddr(INET, 8000, &v4, 0, 16)),
        ("in-any", sockaddr(INET, 0, &[0; 4], 0, 16)),
        ("in-unspec-any", sockaddr(UNSPEC, 80, &[0; 4], 0, 16)),
        ("in-short", sockaddr(INET, 8000, &v4, 0, 15)),
        ("in-storage", sockaddr(INET, 8000, &v4, 0, 128)),
        ("in6", sockaddr(INET6, 9000, &v6("fd00:a8::30"), 0, 28)),
        (
            "in6-rfc2133",
            sockaddr(INET6, 9000, &v6("fd00:a8::30"), 0, 24),
        ),
        ("in6-any", sockaddr(INET6, 0, &v6("::"), 0, 28)),
        (
            "in6-mapped",
            sockaddr(INET6, 80, &v6("::ffff:10.233.0.10"), 0, 28),
        ),
        ("in6-scoped", sockaddr(INET6, 80, &v6("fe80::1"), 2, 28)),
    ];
    for (name, bytes) in cases {
        write(dir, &format!("sockaddr-{name}"), &bytes);
    }
}

fn names(dir: &Path) {
    let cases = [
        (
            "listener4",
            SocketName::Listener {
                instance: 1,
                v6: false,
                app: 3,
                bound: sa("0.0.0.0:8000"),
                reuseport: None,
            },
        ),
        (
            "listener6",
            SocketName::Listener {
                instance: 0xdead_beef,
                v6: true,
                app: u64::MAX,
                bound: sa("[fd00:a8::30]:9000"),
                reuseport: None,
            },
        ),
        (
            "listener_reuseport",
            SocketName::Listener {
                instance: 2,
                v6: true,
                app: 5,
                bound: sa("[::]:8080"),
                reuseport: Some(ax_broker::Reuseport {
                    uid: 1000,
                    id: 0x1234,
                }),
            },
        ),
        (
            "client4",
            SocketName::Client {
                instance: 7,
                v6: false,
                local: sa("10.233.0.11:40000"),
                peer: sa("10.233.0.10:8000"),
            },
        ),
        (
            "client6-mapped",
            SocketName::Client {
                instance: u32::MAX,
                v6: true,
                local: sa("[::ffff:10.233.0.11]:65535"),
                peer: sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            },
        ),
    ];
    for (name, n) in cases {
        write(dir, &format!("name-{name}"), &n.encode());
    }
}

fn main() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("corpus");
    frames(&corpus.join("frame"));
    sockaddrs(&corpus.join("sockaddr"));
    names(&corpus.join("socket_name"));
    println!("seeds written under {}", corpus.display());
}
