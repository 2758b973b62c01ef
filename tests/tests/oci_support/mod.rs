//! Shared harness of the OCI tests: container runtimes with state
//! directories of their own, running containers (removed on drop) and
//! bundles whose root filesystem is the host's `/usr`, read-only.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ax_e2e::{note, poll, run, Daemon, Output, TempDir, SHORT};
use serde_json::{json, Value};

/// A container runtime with a state directory of its own.
pub struct Runtime {
    bin: &'static str,
    state: TempDir,
    /// crun on a host with cgroup v1: run it, as root, in a mount
    /// namespace that sees cgroup v2 (crun refuses v1 controllers), with
    /// its cgroup manager disabled.
    cgroup2_view: bool,
}

impl Runtime {
    pub fn runc() -> Runtime {
        Runtime {
            bin: "runc",
            state: TempDir::new("runc-state"),
            cgroup2_view: false,
        }
    }

    /// crun, or why it cannot run containers here.
    pub fn crun() -> Result<Runtime, &'static str> {
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

    pub fn command(&self) -> Command {
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
    pub fn run(&self, bundle: &Bundle, id: &str) -> Output {
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
    pub fn start<'a>(&'a self, bundle: &Bundle, id: &str) -> Container<'a> {
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

    pub fn remove(&self, id: &str) {
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
pub struct Container<'a> {
    rt: &'a Runtime,
    id: String,
    log: PathBuf,
}

impl Container<'_> {
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The container's init pid, from `runc state`.
    pub fn pid(&self) -> u32 {
        let out = run(self.rt.command().args(["state", &self.id]), SHORT);
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|_| panic!("{out}"));
        u32::try_from(v["pid"].as_u64().unwrap_or(0)).unwrap_or(0)
    }

    pub fn stop(&mut self) {
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
pub struct Bundle {
    pub dir: TempDir,
}

/// How a bundle is made.
pub struct Spec<'a> {
    pub args: &'a [&'a str],
    pub annotations: &'a [(&'a str, &'a str)],
    /// A network namespace of its own (else the host's).
    pub netns: bool,
    /// ax's hosts file mounted as /etc/hosts.
    pub hosts: bool,
}

impl Bundle {
    pub fn new(d: &Daemon, spec: &Spec<'_>) -> Bundle {
        let dir = TempDir::new("bundle");
        let rootfs = rootfs(&dir, "hello from the container\n");
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

/// A root filesystem in `dir`: empty directories (the host's `/usr` is to
/// be mounted over `usr`) and `www/index.html` saying `index`.
pub fn rootfs(dir: &TempDir, index: &str) -> PathBuf {
    let root = dir.join("rootfs");
    for sub in ["usr", "proc", "dev", "etc", "tmp", "sys", "www"] {
        std::fs::create_dir_all(root.join(sub)).expect("rootfs dirs");
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(to, root.join(link)).expect("rootfs links");
    }
    std::fs::write(root.join("www/index.html"), index).expect("index");
    root
}

/// The daemon's hosts file (beside its socket).
pub fn hosts_file(d: &Daemon) -> PathBuf {
    let mut p = d.socket().as_os_str().to_owned();
    p.push(".hosts");
    PathBuf::from(p)
}

/// `ax oci profile --socket SOCK EXTRA…`, parsed.
pub fn profile(d: &Daemon, extra: &[&str]) -> Value {
    let out = profile_output(d, extra);
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

pub fn profile_output(d: &Daemon, extra: &[&str]) -> Output {
    let mut cmd = d.ax();
    cmd.args(["oci", "profile", "--socket"])
        .arg(d.socket())
        .args(extra);
    run(&mut cmd, SHORT)
}

/// The app of container `id`, per `ax get apps -o json`.
pub fn container_app(d: &Daemon, id: &str) -> Option<Value> {
    d.apps().into_iter().find(|a| a["container"]["id"] == id)
}

/// Waits until `addr` is listed by `ax get services`.
pub fn wait_for_listing(d: &Daemon, addr: &str, c: &Container<'_>) {
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

pub fn curl_under_ax(d: &Daemon, url: &str) -> Output {
    d.run(&[], &["curl", "-sS", "--max-time", "10", url])
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
