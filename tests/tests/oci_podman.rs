//! End-to-end test of issue 11 with podman: `podman run --rootfs DIR
//! --network none --security-opt seccomp=<ax oci profile> --annotation
//! io.ax.ip=…` (rootless as an unprivileged user with subuids), the server
//! container reached by VIP and name from an app under ax and from another
//! container (ax's names through `--no-hosts -v <hosts file>:/etc/hosts:ro`),
//! `podman exec` joining the container's app, and `podman rm` leaving
//! nothing. podman runs its containers with runc here: crun refuses this
//! host's cgroup v1 layout ("cgroups in hybrid mode not supported"). The
//! root filesystem is empty directories with the host's `/usr` mounted
//! read-only: nothing is pulled.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ax_e2e::{note, poll, require, run, signal_pid, Daemon, Output, TempDir, SHORT};
// The runc harness there is oci.rs's; this file uses the shared parts.
#[allow(dead_code)]
mod oci_support;
use oci_support::{container_app, curl_under_ax, hosts_file, profile_output, rootfs};
use rustix::process::Signal;
use serde_json::{json, Value};

/// podman with its state in a directory of its own.
struct Podman {
    home: TempDir,
    runtime_dir: PathBuf,
}

impl Podman {
    fn new() -> Podman {
        let home = TempDir::new("podman");
        // podman refuses a run root longer than 50 characters.
        let tmp = std::env::temp_dir();
        let base = if tmp.as_os_str().len() <= 20 {
            tmp
        } else {
            PathBuf::from("/tmp")
        };
        let runtime_dir = base.join(format!("pr{}", ax_e2e::unique()));
        std::fs::create_dir_all(&runtime_dir).expect("runtime dir");
        let mut perms = std::fs::metadata(&runtime_dir).expect("stat").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o700);
        std::fs::set_permissions(&runtime_dir, perms).expect("chmod");
        Podman { home, runtime_dir }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("HOME", self.home.path())
            .env("XDG_RUNTIME_DIR", &self.runtime_dir)
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--root"])
            .arg(self.home.join("storage"))
            .arg("--runroot")
            .arg(self.runtime_dir.join("s"))
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str], limit: Duration) -> Output {
        run(self.command().args(args), limit)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["rm", "-f", "-t", "0", "--all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Rootless podman leaves a pause process holding its user
        // namespace: end it, by its pid.
        let pause = self.runtime_dir.join("libpod/tmp/pause.pid");
        if let Some(pid) = std::fs::read_to_string(pause)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            let _ = signal_pid(pid, Signal::KILL);
        }
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
    }
}

/// `ax oci profile` (merged into `base`, if any), written to `dir/name`.
fn ax_profile(d: &Daemon, dir: &TempDir, name: &str, base: Option<&Path>) -> PathBuf {
    let base = base.map(|b| b.to_str().expect("utf-8 path"));
    let out = profile_output(d, &base.map_or(vec![], |b| vec!["--base", b]));
    out.assert_success();
    let v: Value = serde_json::from_str(&out.stdout).expect("profile is JSON");
    assert!(v["listenerPath"].is_string());
    dir.write(name, &out.stdout)
}

/// Connects to VIP:port, sets TCP_NODELAY (a UNIX socket would refuse it
/// unless ax answers it as TCP would) and prints SO_DOMAIN and the reply.
const SOCKOPT_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print("domain", s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN))
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    data += b
print(data.decode(errors="replace"))
"#;

#[test]
fn rootless_podman_with_network_none_is_served_by_ax() {
    require!("podman", "runc", "curl", "busybox", "python3");
    if rustix::process::geteuid().is_root() && !has_cap_sys_resource() {
        note(
            "SKIP: rootless_podman_with_network_none_is_served_by_ax: rootful podman sets \
             container rlimits, which needs CAP_SYS_RESOURCE (this root lacks it)",
        );
        return;
    }
    let d = Daemon::start();
    let pod = Podman::new();
    let dir = TempDir::new("podman-files");
    let root = rootfs(&dir, "hello from podman\n");
    let root = root.to_str().expect("utf-8 path");
    // The server with podman's default profile merged in, when there is one.
    let default = Path::new("/usr/share/containers/seccomp.json");
    let merged = ax_profile(
        &d,
        &dir,
        "merged.json",
        default.is_file().then_some(default),
    );
    let plain = ax_profile(&d, &dir, "plain.json", None);
    let seccomp = |p: &Path| format!("seccomp={}", p.display());
    let hosts = format!("{}:/etc/hosts:ro", hosts_file(&d).display());

    let out = pod.run(
        &[
            "run",
            "-d",
            "--name",
            "pweb",
            "--network",
            "none",
            "--security-opt",
            &seccomp(&merged),
            "--annotation",
            "io.ax.ip=10.233.0.70",
            "--annotation",
            "io.ax.name=pweb",
            "-v",
            "/usr:/usr:ro",
            "--rootfs",
            root,
            "busybox",
            "httpd",
            "-f",
            "-p",
            "8000",
            "-h",
            "/www",
        ],
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "podman run: {out}\n{}", d.log());
    let id = out.stdout.trim().to_string();
    poll(SHORT, Duration::from_millis(50), || {
        d.services()
            .iter()
            .any(|s| s["addr"] == "10.233.0.70:8000")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the podman container's service never appeared:\n{}",
            d.log()
        )
    });
    let app = container_app(&d, &id)
        .unwrap_or_else(|| panic!("no app for container {id}: {:?}", d.apps()));
    assert_eq!(app["names"], json!(["pweb"]));

    // From an app under ax, by VIP and name.
    for url in ["http://10.233.0.70:8000/", "http://pweb:8000/"] {
        let out = curl_under_ax(&d, url);
        assert!(out.stdout.contains("hello from podman"), "{url}: {out}");
    }
    // `podman exec` joins the container's app; the merged profile still
    // traps TCP-level options (else TCP_NODELAY would fail on ax's UNIX
    // socket) and SO_DOMAIN answers AF_INET.
    let out = pod.run(
        &[
            "exec",
            "pweb",
            "python3",
            "-c",
            SOCKOPT_CLIENT,
            "pweb",
            "8000",
        ],
        SHORT,
    );
    assert!(
        out.stdout.contains("domain 2") && out.stdout.contains("hello from podman"),
        "podman exec: {out}\n{}",
        d.log()
    );
    assert!(d.log().contains("process joined its container's app"));
    // Another container, with ax's names through the hosts file.
    let out = pod.run(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--security-opt",
            &seccomp(&plain),
            "--annotation",
            "io.ax.name=pclient",
            "--no-hosts",
            "-v",
            &hosts,
            "-v",
            "/usr:/usr:ro",
            "--rootfs",
            root,
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://pweb.ax:8000/",
        ],
        Duration::from_secs(120),
    );
    assert!(
        out.stdout.contains("hello from podman"),
        "client container: {out}\n{}",
        d.log()
    );

    let out = pod.run(&["rm", "-f", "-t", "0", "pweb"], SHORT);
    out.assert_success();
    poll(SHORT, Duration::from_millis(50), || {
        (d.apps().is_empty() && d.services().is_empty()).then_some(())
    })
    .unwrap_or_else(|| {
        note(&d.log());
        panic!("podman containers left something behind: {:?}", d.apps())
    });
}

/// Whether this process has `CAP_SYS_RESOURCE` (bit 24 of `CapEff`).
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}
