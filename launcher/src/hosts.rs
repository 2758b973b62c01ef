//! The hosts file a daemon keeps current for the programs it serves: the
//! host's own `/etc/hosts`, then one line per VIP with the names of the
//! apps behind it (`web web.ax`), or of the service declared there, or for
//! a VIP without a name one derived from its app (`app-7.ax`), so that no
//! reverse lookup of a VIP leaves the host. Programs under ax see it as their
//! `/etc/hosts` through a bind mount ([`ax_broker::launch::SpawnOptions`]),
//! so glibc, musl, static binaries and Go's own resolver all read it.
//!
//! The mounts pin the file's inode: it is rewritten in place, never
//! replaced, and never shrinks by truncation while a reader might be
//! halfway (the tail is blanked with newlines instead).

use ax_registry::{Directory, LocalRegistry};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The host's hosts file, copied at the top of ax's.
const HOST_HOSTS: &str = "/etc/hosts";
/// Blank padding beyond this is cut off (a reader then may, very rarely,
/// see a short file: still only whole lines of the old or new text).
const MAX_PADDING: usize = 64 * 1024;

/// Keeps `path` current with the registry's names until `stop` is set.
#[derive(Debug)]
pub struct HostsFile {
    path: PathBuf,
    file: File,
    written: String,
    size: usize,
    /// With `--cluster`: the names of apps on the other nodes too.
    cluster: Option<ax_cluster::Cluster>,
}

impl HostsFile {
    /// Creates (or takes over) the file at `path`, readable by everyone who
    /// can reach its directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o644)
            .open(path)?;
        let size = file.metadata()?.len() as usize;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            written: String::new(),
            size,
            cluster: None,
        })
    }

    /// Rewrites the file if the names changed.
    pub fn refresh(&mut self, registry: &LocalRegistry) -> io::Result<()> {
        let host = std::fs::read_to_string(HOST_HOSTS).unwrap_or_default();
        let mut text = render(&host, registry);
        if let Some(cluster) = &self.cluster {
            render_remote(&mut text, registry, &cluster.remote_names());
        }
        if text == self.written {
            return Ok(());
        }
        let mut bytes = text.clone().into_bytes();
        if bytes.len() < self.size && self.size - bytes.len() <= MAX_PADDING {
            bytes.resize(self.size, b'\n');
        }
        self.file.write_all_at(&bytes, 0)?;
        if bytes.len() < self.size {
            self.file.set_len(bytes.len() as u64)?;
        }
        self.size = bytes.len();
        self.written = text;
        Ok(())
    }

    /// Also writes the names of apps on the other nodes of `cluster`.
    pub fn with_cluster(mut self, cluster: Option<ax_cluster::Cluster>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Refreshes on every registry change until `stop` is set.
    pub fn keep_current(
        hosts: Arc<Mutex<HostsFile>>,
        registry: Arc<LocalRegistry>,
        stop: Arc<AtomicBool>,
    ) {
        let mut seen = None;
        let cluster = lock(&hosts).cluster.clone();
        while !stop.load(Ordering::Relaxed) {
            let generation = registry.generation().wrapping_add(
                cluster
                    .as_ref()
                    .map_or(0, |c| c.generation().wrapping_shl(32)),
            );
            if seen != Some(generation) {
                Self::refresh_now(&hosts, &registry);
                seen = Some(generation);
            }
            // The cluster's table changes by gossip: looked at more often.
            let wait = if cluster.is_some() { 100 } else { 500 };
            let local = registry.generation();
            registry.wait_for_change(local, Instant::now() + Duration::from_millis(wait));
        }
    }

    /// Writes the file now (a registration does, so that a program finds
    /// its own name from its first instruction, not once the thread of
    /// [`HostsFile::keep_current`] has caught up).
    pub fn refresh_now(hosts: &Mutex<HostsFile>, registry: &LocalRegistry) {
        let mut hosts = lock(hosts);
        if let Err(e) = hosts.refresh(registry) {
            tracing::warn!(file = %hosts.path.display(), error = %e, "cannot update the hosts file");
        }
    }
}

fn lock(hosts: &Mutex<HostsFile>) -> std::sync::MutexGuard<'_, HostsFile> {
    hosts.lock().unwrap_or_else(|e| e.into_inner())
}

/// The file's text: the host's hosts file, then ax's names.
/// Appends the names of apps on other nodes of the cluster that no app
/// here holds.
fn render_remote(out: &mut String, registry: &LocalRegistry, remote: &[(String, Vec<IpAddr>)]) {
    let local: Vec<String> = registry.names().into_iter().map(|e| e.name).collect();
    let mut first = true;
    for (name, vips) in remote {
        if local.contains(name) {
            continue;
        }
        if first {
            out.push_str("# Names of apps on other hosts of the cluster.\n");
            first = false;
        }
        for ip in vips {
            let _ = writeln!(out, "{ip}\t{name} {name}.ax");
        }
    }
}

pub fn render(host: &str, registry: &LocalRegistry) -> String {
    let mut out = String::with_capacity(host.len() + 256);
    out.push_str(host);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("# Names of apps under ax (kept current by the ax daemon; do not edit).\n");
    // One line per VIP, with every name that resolves to it.
    let mut by_vip: Vec<(std::net::IpAddr, Vec<String>)> = Vec::new();
    for entry in registry.names() {
        for ip in entry.vips {
            let aliases = [entry.name.clone(), format!("{}.ax", entry.name)];
            match by_vip.iter_mut().find(|(v, _)| *v == ip) {
                Some((_, names)) => names.extend(aliases),
                None => by_vip.push((ip, aliases.to_vec())),
            }
        }
    }
    // Every other VIP gets a name derived from its app, so that a reverse
    // lookup of any VIP is answered here and never asks the host's DNS.
    for (ip, app) in registry.unnamed_vips() {
        if !by_vip.iter().any(|(v, _)| *v == ip) {
            by_vip.push((ip, vec![ax_registry::app_host_name(app)]));
        }
    }
    by_vip.sort_by_key(|(ip, _)| (ip.is_ipv6(), *ip));
    for (ip, names) in by_vip {
        let _ = writeln!(out, "{ip}\t{}", names.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ax_registry::AppSpec;

    #[test]
    fn renders_names_after_the_host_file() {
        let r = LocalRegistry::default();
        let spec = |names: &[&str], ips: &[&str]| AppSpec {
            names: names.iter().map(|s| s.to_string()).collect(),
            requested_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ..AppSpec::default()
        };
        r.register_app(&spec(&["web"], &["10.233.0.10", "fd00:a8::10"]), 0)
            .unwrap();
        r.register_app(&spec(&["web"], &[]), 0).unwrap();
        r.register_app(&spec(&["db", "pg"], &["10.233.0.20"]), 0)
            .unwrap();
        let anonymous = r.register_app(&spec(&[], &[]), 0).unwrap();
        assert_eq!(anonymous.id, 4);
        r.declare("cache", &["10.233.0.30".parse().unwrap()], None, 0)
            .unwrap();
        let text = render("127.0.0.1\tlocalhost", &r);
        assert_eq!(
            text,
            "127.0.0.1\tlocalhost\n\
             # Names of apps under ax (kept current by the ax daemon; do not edit).\n\
             10.233.0.2\tapp-4.ax\n\
             10.233.0.10\tweb web.ax\n\
             10.233.0.20\tdb db.ax pg pg.ax\n\
             10.233.0.30\tcache cache.ax\n\
             fd00:a8::2\tapp-4.ax\n\
             fd00:a8::10\tweb web.ax\n"
        );
    }

    #[test]
    fn rewrites_in_place_and_never_replaces_the_file() {
        let dir = std::env::temp_dir().join(format!("ax-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        let r = LocalRegistry::default();
        let mut hosts = HostsFile::open(&path).unwrap();
        let app = r
            .register_app(
                &AppSpec {
                    names: vec!["a-rather-long-name".into()],
                    ..AppSpec::default()
                },
                0,
            )
            .unwrap();
        hosts.refresh(&r).unwrap();
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&path).unwrap().ino();
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(first.contains("a-rather-long-name.ax"), "{first}");
        r.app_exited(app.id);
        hosts.refresh(&r).unwrap();
        let second = std::fs::read_to_string(&path).unwrap();
        assert!(!second.contains("a-rather-long-name"), "{second}");
        // Shorter text is padded with blank lines, in the same inode.
        assert_eq!(second.len(), first.len());
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
