//! End-to-end tests of issue 11: ax as the OCI seccomp agent. Containers
//! run with runc (rootless as an unprivileged user) from bundles the tests
//! build themselves: a root filesystem of empty directories with the host's
//! `/usr` bind-mounted read-only (busybox, curl and python3 come from
//! there; nothing is pulled). The profile is `ax oci profile`'s; the
//! identity comes from `io.ax.*` annotations. Run in a network namespace
//! with loopback only, as root and as an unprivileged user.

mod oci_support;

use std::path::Path;
use std::time::Duration;

use ax_e2e::{note, poll, require, run, App, Daemon, TempDir, SHORT};
use oci_support::{
    container_app, curl_under_ax, is_root, profile, profile_output, wait_for_listing, Bundle,
    Runtime, Spec,
};
use serde_json::{json, Value};

#[test]
fn profile_traps_what_the_filter_traps_and_merges_into_a_base() {
    require!();
    let d = Daemon::start();
    let p = profile(&d, &[]);
    let mut want = d.socket().as_os_str().to_owned();
    want.push(".oci");
    assert_eq!(p["listenerPath"], json!(Path::new(&want)));
    assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
    let entries = p["syscalls"].as_array().expect("syscalls");
    let notify: Vec<&str> = entries
        .iter()
        .filter(|e| e["action"] == "SCMP_ACT_NOTIFY")
        .flat_map(|e| e["names"].as_array().unwrap())
        .filter_map(Value::as_str)
        .collect();
    for call in [
        "bind",
        "connect",
        "accept",
        "accept4",
        "getsockname",
        "getpeername",
        "setsockopt",
        "getsockopt",
        "sendto",
        "sendmsg",
    ] {
        assert!(notify.contains(&call), "{call} not trapped: {p:#}");
    }
    let uring = entries
        .iter()
        .find(|e| e["names"] == json!(["io_uring_setup"]))
        .expect("io_uring_setup rule");
    assert_eq!(uring["action"], "SCMP_ACT_ERRNO");
    assert_eq!(uring["errnoRet"], 38, "ENOSYS");
    // sendto is trapped only with a destination: a condition, not all of it.
    assert!(entries
        .iter()
        .filter(|e| e["names"] == json!(["sendto"]))
        .all(|e| e["args"].as_array().is_some_and(|a| !a.is_empty())));

    let dir = TempDir::new("base");
    let base = dir.write(
        "base.json",
        r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
              {"names": ["read", "write", "bind", "setsockopt"], "action": "SCMP_ACT_ALLOW"},
              {"names": ["reboot"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
            ]}"#,
    );
    let merged = profile(&d, &["--base", base.to_str().unwrap()]);
    assert_eq!(merged["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(merged["listenerPath"], p["listenerPath"]);
    let s = merged["syscalls"].to_string();
    assert!(
        s.contains("\"read\"") && s.contains("\"reboot\""),
        "{merged:#}"
    );
    let allowed_plain: Vec<&str> = merged["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "SCMP_ACT_ALLOW" && e.get("args").is_none())
        .flat_map(|e| e["names"].as_array().unwrap())
        .filter_map(Value::as_str)
        .collect();
    assert!(allowed_plain.contains(&"write"));
    assert!(!allowed_plain.contains(&"bind") && !allowed_plain.contains(&"setsockopt"));

    let other = dir.write(
        "other.json",
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/other-agent.sock"}"#,
    );
    let out = profile_output(&d, &["--base", other.to_str().unwrap()]);
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr.contains("listenerPath") && out.stderr.contains("other-agent"),
        "{out}"
    );
}

#[test]
fn runc_container_server_is_reached_by_vip_and_name_and_leaves_nothing() {
    require!("runc", "curl", "busybox");
    let d = Daemon::start();
    let rt = Runtime::runc();
    let bundle = Bundle::new(
        &d,
        &Spec {
            args: &["busybox", "httpd", "-f", "-p", "8000", "-h", "/www"],
            annotations: &[
                ("io.ax.ip", "10.233.0.20"),
                ("io.ax.name", "web"),
                ("io.ax.expose", "8000:127.0.0.1:18081"),
            ],
            netns: true,
            hosts: false,
        },
    );
    let mut c = rt.start(&bundle, "web1");
    wait_for_listing(&d, "10.233.0.20:8000", &c);
    for url in ["http://10.233.0.20:8000/", "http://web:8000/"] {
        let out = curl_under_ax(&d, url);
        assert!(
            out.stdout.contains("hello from the container"),
            "{url}: {out}\n{}",
            d.log()
        );
    }
    let app = container_app(&d, "web1").expect("the container is an app");
    // The runtime is named from its process, read as it connects: runc run
    // -d may be gone by then on a loaded machine.
    let runtime = app["container"]["runtime"].as_str().unwrap_or_default();
    assert!(runtime == "runc" || runtime == "unknown", "{app}");
    assert_eq!(app["vips"], json!(["10.233.0.20"]));
    assert_eq!(app["pid"], json!(c.pid()));
    let table = d.get("apps", &[]).stdout;
    assert!(table.contains("runc container web1"), "{table}");
    // In the kernel's view of the container's own network namespace,
    // httpd listens on no TCP port: its socket is ax's UNIX listener.
    let pid = c.pid();
    for table in ["tcp", "tcp6"] {
        let t = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        assert!(
            !t.lines()
                .any(|l| l.contains(":1F40 ") && l.contains(" 0A ")),
            "{table}:\n{t}"
        );
    }

    // From the host, outside ax: `io.ax.expose` and `ax expose`; the
    // connection goes to the container's httpd itself.
    let out = run(
        std::process::Command::new("curl").args([
            "-sS",
            "--max-time",
            "10",
            "http://127.0.0.1:18081/",
        ]),
        SHORT,
    );
    assert!(
        out.stdout.contains("hello from the container"),
        "io.ax.expose: {out}"
    );
    let mut expose = d.ax();
    expose
        .args(["expose", "web:8000", "127.0.0.1:18080", "--socket"])
        .arg(d.socket());
    run(&mut expose, SHORT).assert_success();
    let out = run(
        std::process::Command::new("curl").args([
            "-sS",
            "--max-time",
            "10",
            "http://127.0.0.1:18080/",
        ]),
        SHORT,
    );
    assert!(
        out.stdout.contains("hello from the container"),
        "exposed: {out}"
    );

    c.stop();
    poll(SHORT, Duration::from_millis(50), || {
        (d.apps().is_empty() && d.services().is_empty()).then_some(())
    })
    .unwrap_or_else(|| panic!("the container left something behind:\n{}", d.log()));
    poll(SHORT, Duration::from_millis(50), || {
        d.log().contains("container exited").then_some(())
    })
    .unwrap_or_else(|| panic!("{}", d.log()));
}

#[test]
fn runc_container_client_reaches_apps_under_ax_by_vip_and_name() {
    require!("runc", "curl", "busybox");
    let d = Daemon::start();
    let www = TempDir::new("www");
    www.write("index.html", "hello from the app\n");
    let mut server = d.spawn(
        &["--ip", "10.233.0.31", "--name", "api"],
        &[
            "busybox",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            www.path().to_str().unwrap(),
        ],
    );
    d.wait_for_service(&mut server, "10.233.0.31:8080");
    let rt = Runtime::runc();
    // Own network namespace and ax's names (the hosts file mounted), then
    // the host's network namespace.
    for (netns, id) in [(true, "client1"), (false, "client2")] {
        let bundle = Bundle::new(
            &d,
            &Spec {
                args: &[
                    "sh",
                    "-c",
                    "curl -sS --max-time 10 http://10.233.0.31:8080/ && \
                     curl -sS --max-time 10 http://api:8080/ && curl -sS --max-time 10 http://api.ax:8080/",
                ],
                annotations: &[("io.ax.name", id)],
                netns,
                hosts: true,
            },
        );
        let out = rt.run(&bundle, id);
        assert_eq!(
            out.stdout.matches("hello from the app").count(),
            3,
            "netns {netns}: {out}\n{}",
            d.log()
        );
        assert!(out.status.success(), "{out}");
    }
    poll(SHORT, Duration::from_millis(50), || {
        (d.apps().len() == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("client containers left apps behind: {:?}", d.apps()));
}

#[test]
fn bad_annotation_is_refused_with_eperm_and_a_log_line() {
    require!("runc", "busybox");
    let d = Daemon::start();
    let rt = Runtime::runc();
    let bundle = Bundle::new(
        &d,
        &Spec {
            args: &["busybox", "httpd", "-f", "-p", "8000", "-h", "/www"],
            annotations: &[("io.ax.ip", "10.233.0.999")],
            netns: true,
            hosts: false,
        },
    );
    // Never hung: it fails at once.
    let out = rt.run(&bundle, "bad1");
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr.contains("Operation not permitted")
            || out.stdout.contains("Operation not permitted"),
        "{out}"
    );
    let log = d.log();
    assert!(
        log.contains("refusing container bad1") && log.contains("io.ax.ip=10.233.0.999"),
        "{log}"
    );
    assert!(d.apps().is_empty(), "{:?}", d.apps());
}

#[test]
fn runtime_dying_mid_handshake_leaves_nothing() {
    require!();
    let d = Daemon::start();
    let mut path = d.socket().as_os_str().to_owned();
    path.push(".oci");
    // Half a state message, then the "runtime" dies (its socket closes).
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&path).expect("runtime socket");
        s.write_all(br#"{"ociVersion":"1.0.2","fds":["seccompFd"],"pid":1,"state":{"id":"half"#)
            .expect("write");
    }
    poll(SHORT, Duration::from_millis(20), || {
        d.log().contains("nothing registered").then_some(())
    })
    .unwrap_or_else(|| panic!("{}", d.log()));
    assert!(d.apps().is_empty());
    // The socket has the control socket's access rules.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn exec_into_a_container_joins_its_app() {
    require!("runc", "curl", "busybox");
    if !is_root() {
        // runc 1.1.x cannot `exec` rootless into a container whose profile
        // has a listener (pidfd_getfd: EPERM), a runc bug fixed later.
        note("SKIP: exec_into_a_container_joins_its_app: rootless runc 1.1 cannot exec with a notify profile");
        return;
    }
    let d = Daemon::start();
    let rt = Runtime::runc();
    let bundle = Bundle::new(
        &d,
        &Spec {
            args: &["busybox", "httpd", "-f", "-p", "8000", "-h", "/www"],
            annotations: &[("io.ax.ip", "10.233.0.40"), ("io.ax.name", "joined")],
            netns: true,
            hosts: true,
        },
    );
    let c = rt.start(&bundle, "web2");
    wait_for_listing(&d, "10.233.0.40:8000", &c);
    // A second server, started by exec, belongs to the same app.
    let out = run(
        rt.command().args([
            "exec", "-d", "web2", "busybox", "httpd", "-f", "-p", "8001", "-h", "/www",
        ]),
        SHORT,
    );
    out.assert_success();
    wait_for_listing(&d, "10.233.0.40:8001", &c);
    let out = run(
        rt.command().args([
            "exec",
            "web2",
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://joined:8001/",
        ]),
        SHORT,
    );
    assert!(out.stdout.contains("hello from the container"), "{out}");
    let apps = d.apps();
    assert_eq!(apps.len(), 1, "{apps:?}");
    assert!(d.log().contains("process joined its container's app"));
    // The exec'd client exited; the container's app stays served.
    let out = curl_under_ax(&d, "http://joined:8000/");
    assert!(out.stdout.contains("hello from the container"), "{out}");
}

#[test]
fn exec_without_hosts_mount_shows_the_real_hosts_file() {
    require!("cat", "busybox");
    let d = Daemon::start();
    let ax_view = d.run(&[], &["cat", "/etc/hosts"]);
    assert!(ax_view.stdout.contains(".ax"), "{ax_view}");
    let real = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let plain = d.run(&["--no-hosts-mount"], &["cat", "/etc/hosts"]);
    plain.assert_success();
    assert_eq!(plain.stdout, real);
    // Still under ax: its socket calls are served.
    let mut server = d.spawn(
        &["--no-hosts-mount", "--ip", "10.233.0.50"],
        &["busybox", "nc", "-l", "-p", "7000"],
    );
    d.wait_for_service(&mut server, "10.233.0.50:7000");
    let _ = App::kill(&mut server);
}

#[test]
fn daemon_killed_and_restarted_keeps_serving_a_running_container() {
    require!("runc", "curl", "busybox");
    let mut d = Daemon::start();
    let rt = Runtime::runc();
    let bundle = Bundle::new(
        &d,
        &Spec {
            args: &["busybox", "httpd", "-f", "-p", "8000", "-h", "/www"],
            annotations: &[("io.ax.ip", "10.233.0.60"), ("io.ax.name", "kept")],
            netns: true,
            hosts: false,
        },
    );
    let mut c = rt.start(&bundle, "kept1");
    wait_for_listing(&d, "10.233.0.60:8000", &c);
    let before = curl_under_ax(&d, "http://kept:8000/");
    assert!(
        before.stdout.contains("hello from the container"),
        "{before}"
    );
    let pid = c.pid();

    d.kill_hard();
    d.restart();
    poll(SHORT, Duration::from_millis(20), || {
        d.log()
            .contains("container served again after a daemon restart")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{}", d.log()));
    // The same container, unaware: its listener is found again, its
    // accepts are answered, by VIP and by name.
    assert_eq!(c.pid(), pid);
    for url in ["http://10.233.0.60:8000/", "http://kept:8000/"] {
        let out = curl_under_ax(&d, url);
        assert!(
            out.stdout.contains("hello from the container"),
            "{url} after the restart: {out}\n{}",
            d.log()
        );
    }
    let app = container_app(&d, "kept1").expect("still an app");
    assert_eq!(app["vips"], json!(["10.233.0.60"]));

    c.stop();
    poll(SHORT, Duration::from_millis(50), || {
        (d.apps().is_empty() && d.services().is_empty()).then_some(())
    })
    .unwrap_or_else(|| panic!("the container left something behind:\n{}", d.log()));
}

#[test]
fn crun_exec_with_pid_zero_joins_the_container_app() {
    require!("crun", "runc", "curl", "busybox", "unshare");
    let rt = match Runtime::crun() {
        Ok(rt) => rt,
        Err(why) => {
            note(&format!(
                "SKIP: crun_exec_with_pid_zero_joins_the_container_app: {why}"
            ));
            return;
        }
    };
    let d = Daemon::start();
    let bundle = Bundle::new(
        &d,
        &Spec {
            args: &["busybox", "httpd", "-f", "-p", "8000", "-h", "/www"],
            annotations: &[("io.ax.ip", "10.233.0.80"), ("io.ax.name", "cweb")],
            netns: true,
            hosts: true,
        },
    );
    let mut c = rt.start(&bundle, "cweb1");
    wait_for_listing(&d, "10.233.0.80:8000", &c);
    let app = container_app(&d, "cweb1").expect("the container is an app");
    let runtime = app["container"]["runtime"].as_str().unwrap_or_default();
    assert!(runtime == "crun" || runtime == "unknown", "{app}");
    // crun sends "pid": 0 for an exec: the exec joins by container id.
    let out = run(
        rt.command().args([
            "exec",
            "cweb1",
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://cweb:8000/",
        ]),
        SHORT,
    );
    assert!(
        out.stdout.contains("hello from the container"),
        "{out}\n{}",
        d.log()
    );
    assert_eq!(d.apps().len(), 1, "{:?}", d.apps());
    assert!(
        d.log().contains("process joined its container's app"),
        "{}",
        d.log()
    );
    let out = curl_under_ax(&d, "http://10.233.0.80:8000/");
    assert!(out.stdout.contains("hello from the container"), "{out}");
    c.stop();
    poll(SHORT, Duration::from_millis(50), || {
        (d.apps().is_empty() && d.services().is_empty()).then_some(())
    })
    .unwrap_or_else(|| panic!("the container left something behind:\n{}", d.log()));
}
