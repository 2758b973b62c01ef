//! End-to-end tests of issue 11: ax as the OCI seccomp agent. Containers
//! run with runc (rootless as an unprivileged user) from bundles the tests
//! build themselves: a root filesystem of empty directories with the host's
//! `/usr` bind-mounted read-only (busybox, curl and python3 come from
//! there; nothing is pulled). The profile is `ax oci profile`'s; the
//! identity comes from `io.ax.*` annotations. Run in a network namespace
//! with loopback only, as root and as an unprivileged user.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ax_e2e::{note, poll, require, run, App, Daemon, Output, TempDir, SHORT};
use serde_json::{json, Value};

/// A container runtime with a state directory of its own.
struct Runtime {
    bin: &'static str,
    state: TempDir,
    /// crun on a host with cgroup v1: run it, as root, in a mount
    /// namespace that sees cgroup v2 (crun refuses v1 controllers), with
    /// its cgroup manager disabled.
    cgroup2_view: bool,
}

impl Runtime {
    fn runc() -> Runtime {
        Runtime {
            bin: "runc",
            state: TempDir::new("runc-state"),
            cgroup2_view: false,
        }
    }

    /// crun, or why it cannot run containers here.
    fn crun() -> Result<Runtime, &'static str> {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        if !v2 && !is_root() {
            return Err(
                "crun refuses this host's cgroup v1 layout, and only root can show it cgroup v2",
            );
        }
        Ok(Runtime {
            bin: "crun",
            state: TempDir::new("crun-state"),
            cgroup2_view: !v2,
        })
    }

    fn command(&self) -> Command {
        let mut cmd = if self.cgroup2_view {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--", "sh", "-c"])
                .arg(
                    "mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && \
                     exec crun --cgroup-manager=disabled \"$@\"",
                )
                .arg("crun");
            c
        } else {
            Command::new(self.bin)
        };
        cmd.arg("--root").arg(self.state.path());
        cmd
    }

    /// `runc run ID` in the foreground, to completion: the container's
    /// output and exit status.
    fn run(&self, bundle: &Bundle, id: &str) -> Output {
        let mut cmd = self.command();
        cmd.args(["run", "--bundle"])
            .arg(bundle.dir.path())
            .arg(id)
            .stdin(Stdio::null());
        let out = run(&mut cmd, SHORT);
        // A container that outlived its limit is ended here.
        self.remove(id);
        out
    }

    /// `runc run -d ID`: the container keeps running; removed on drop of
    /// the guard. Its output goes to a file in the bundle.
    fn start<'a>(&'a self, bundle: &Bundle, id: &str) -> Container<'a> {
        let log = bundle.dir.join("container.log");
        let file = File::create(&log).expect("container log");
        let mut cmd = self.command();
        cmd.args(["run", "-d", "--bundle"])
            .arg(bundle.dir.path())
            .arg(id)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file);
        let status = cmd.status().expect("start runc");
        let c = Container {
            rt: self,
            id: id.to_string(),
            log,
        };
        assert!(
            status.success(),
            "runc run -d {id}: {status}\n{}",
            c.output()
        );
        c
    }

    fn remove(&self, id: &str) {
        let _ = self
            .command()
            .args(["kill", id, "KILL"])
            .stderr(Stdio::null())
            .status();
        let _ = self
            .command()
            .args(["delete", "-f", id])
            .stderr(Stdio::null())
            .status();
    }
}

/// A running container; killed and deleted on drop.
struct Container<'a> {
    rt: &'a Runtime,
    id: String,
    log: PathBuf,
}

impl Container<'_> {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The container's init pid, from `runc state`.
    fn pid(&self) -> u32 {
        let out = run(self.rt.command().args(["state", &self.id]), SHORT);
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|_| panic!("{out}"));
        u32::try_from(v["pid"].as_u64().unwrap_or(0)).unwrap_or(0)
    }

    fn stop(&mut self) {
        self.rt.remove(&self.id);
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            note(&format!("container {} output:\n{}", self.id, self.output()));
        }
        self.stop();
    }
}

/// An OCI bundle: `config.json` and a root filesystem of empty
/// directories with the host's `/usr` mounted read-only.
struct Bundle {
    dir: TempDir,
}

/// How a bundle is made.
struct Spec<'a> {
    args: &'a [&'a str],
    annotations: &'a [(&'a str, &'a str)],
    /// A network namespace of its own (else the host's).
    netns: bool,
    /// ax's hosts file mounted as /etc/hosts.
    hosts: bool,
}

impl Bundle {
    fn new(d: &Daemon, spec: &Spec<'_>) -> Bundle {
        let dir = TempDir::new("bundle");
        let rootfs = dir.join("rootfs");
        for sub in ["usr", "proc", "dev", "etc", "tmp", "sys", "www"] {
            std::fs::create_dir_all(rootfs.join(sub)).expect("rootfs dirs");
        }
        for (link, to) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(to, rootfs.join(link)).expect("rootfs links");
        }
        std::fs::write(rootfs.join("www/index.html"), "hello from the container\n").expect("index");
        std::fs::write(rootfs.join("etc/hosts"), "127.0.0.1 localhost\n").expect("hosts");
        let out = run(
            Command::new("runc")
                .args(["spec", "--rootless", "--bundle"])
                .arg(dir.path()),
            SHORT,
        );
        out.assert_success();
        let path = dir.join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
        config["process"]["args"] = json!(spec.args);
        config["process"]["terminal"] = json!(false);
        config["process"]["env"] = json!(["PATH=/usr/bin:/bin", "HOME=/tmp"]);
        config["root"]["readonly"] = json!(false);
        config["linux"]["seccomp"] = profile(d, &[]);
        config["annotations"] = spec
            .annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        let mounts = config["mounts"].as_array_mut().expect("mounts");
        mounts.push(
            json!({"destination": "/usr", "type": "bind", "source": "/usr",
            "options": ["rbind", "ro"]}),
        );
        if spec.hosts {
            mounts.push(json!({"destination": "/etc/hosts", "type": "bind",
                "source": hosts_file(d), "options": ["bind", "ro"]}));
        }
        let namespaces = config["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces");
        namespaces.retain(|n| n["type"] != "network");
        if spec.netns {
            namespaces.push(json!({"type": "network"}));
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("write");
        Bundle { dir }
    }
}

/// The daemon's hosts file (beside its socket).
fn hosts_file(d: &Daemon) -> PathBuf {
    let mut p = d.socket().as_os_str().to_owned();
    p.push(".hosts");
    PathBuf::from(p)
}

/// `ax oci profile --socket SOCK EXTRA…`, parsed.
fn profile(d: &Daemon, extra: &[&str]) -> Value {
    let out = profile_output(d, extra);
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn profile_output(d: &Daemon, extra: &[&str]) -> Output {
    let mut cmd = d.ax();
    cmd.args(["oci", "profile", "--socket"])
        .arg(d.socket())
        .args(extra);
    run(&mut cmd, SHORT)
}

/// The app of container `id`, per `ax get apps -o json`.
fn container_app(d: &Daemon, id: &str) -> Option<Value> {
    d.apps().into_iter().find(|a| a["container"]["id"] == id)
}

/// Waits until `addr` is listed by `ax get services`.
fn wait_for_listing(d: &Daemon, addr: &str, c: &Container<'_>) {
    poll(SHORT, Duration::from_millis(50), || {
        d.services().iter().any(|s| s["addr"] == addr).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{addr} never listed; container output:\n{}\ndaemon log:\n{}",
            c.output(),
            d.log()
        )
    });
}

fn curl_under_ax(d: &Daemon, url: &str) -> Output {
    d.run(&[], &["curl", "-sS", "--max-time", "10", url])
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

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
            annotations: &[("io.ax.ip", "10.233.0.20"), ("io.ax.name", "web")],
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
