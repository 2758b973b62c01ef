//! Where the daemon's control socket lives, and making sure its directory
//! is private before anyone trusts a socket in it.

use anyhow::{bail, Context};
use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The socket's file name inside its directory.
const SOCKET_NAME: &str = "ax.sock";

/// The effective uid of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The control socket path: `flag`, else `$AX_SOCKET`, else
/// `$XDG_RUNTIME_DIR/ax/ax.sock` for a non-root user, else
/// `/run/ax/ax.sock` for root, else `/tmp/ax-<uid>/ax.sock`. Empty variables
/// count as unset, and so does a relative `XDG_RUNTIME_DIR` (the XDG spec
/// requires it absolute). A relative result is made absolute against `cwd`.
pub fn resolve_socket(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<OsString>,
    uid: u32,
    cwd: &Path,
) -> PathBuf {
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let path = if let Some(p) = flag {
        p.to_path_buf()
    } else if let Some(p) = var("AX_SOCKET") {
        p
    } else if let Some(dir) = var("XDG_RUNTIME_DIR").filter(|d| d.is_absolute() && uid != 0) {
        dir.join("ax").join(SOCKET_NAME)
    } else if uid == 0 {
        PathBuf::from("/run/ax").join(SOCKET_NAME)
    } else {
        PathBuf::from(format!("/tmp/ax-{uid}")).join(SOCKET_NAME)
    };
    if path.is_absolute() {
        path
    } else {
        cwd.join(path)
    }
}

/// [`resolve_socket`] with this process's environment, uid and directory.
pub fn socket_path(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    Ok(resolve_socket(flag, &|k| std::env::var_os(k), euid(), &cwd))
}

/// A file kept beside the daemon's socket: `<socket><suffix>` (the state,
/// the lock, the hosts file, the fd keeper's record).
pub fn beside(socket: &Path, suffix: &str) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The hosts file the daemon on `socket` keeps current: programs under ax
/// see it as their `/etc/hosts`.
pub fn hosts_path(socket: &Path) -> PathBuf {
    beside(socket, ".hosts")
}

/// The directory holding `socket`.
pub fn socket_dir(socket: &Path) -> &Path {
    socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/"))
}

/// Whether a directory with this owner and mode may hold the control socket
/// of user `uid`: it must belong to that user or to root, and nobody else may
/// write to it (else someone could put their own socket in our place).
pub fn check_dir_owner_mode(dir: &Path, owner: u32, mode: u32, uid: u32) -> Result<(), String> {
    if owner != uid && owner != 0 {
        return Err(format!(
            "refusing to use {} for the control socket: it belongs to uid {owner}, not to you \
             (uid {uid}); choose another --socket",
            dir.display()
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "refusing to use {} for the control socket: other users can write to it \
             (mode {:04o}); run 'chmod go-w {}' or choose another --socket",
            dir.display(),
            mode & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

/// Checks an existing socket directory (see [`check_dir_owner_mode`]). A
/// symbolic link must itself belong to us or root; its target is checked.
pub fn check_dir(dir: &Path) -> anyhow::Result<()> {
    let uid = euid();
    let lmeta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect {}", dir.display()))?;
    if lmeta.file_type().is_symlink() && lmeta.uid() != uid && lmeta.uid() != 0 {
        bail!(
            "refusing to use {}: it is a symbolic link owned by uid {}",
            dir.display(),
            lmeta.uid()
        );
    }
    let meta =
        std::fs::metadata(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    check_dir_owner_mode(dir, meta.uid(), meta.mode(), uid).map_err(anyhow::Error::msg)
}

/// Creates the socket directory (mode 0700, parents as needed) or checks an
/// existing one.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(_) => check_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            // The umask may have taken bits away; it cannot have added any,
            // but be explicit.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot chmod {}", dir.display()))?;
            check_dir(dir)
        }
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(flag: Option<&str>, vars: &[(&str, &str)], uid: u32) -> PathBuf {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        resolve_socket(
            flag.map(Path::new),
            &|k| vars.get(k).cloned(),
            uid,
            Path::new("/home/u"),
        )
    }

    #[test]
    fn precedence() {
        let all = [
            ("AX_SOCKET", "/s/env.sock"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ];
        assert_eq!(
            resolve(Some("/s/flag.sock"), &all, 1000),
            PathBuf::from("/s/flag.sock")
        );
        assert_eq!(resolve(None, &all, 1000), PathBuf::from("/s/env.sock"));
        assert_eq!(
            resolve(None, &all[1..], 1000),
            PathBuf::from("/run/user/1000/ax/ax.sock")
        );
        assert_eq!(
            resolve(None, &[], 1000),
            PathBuf::from("/tmp/ax-1000/ax.sock")
        );
    }

    #[test]
    fn root_ignores_xdg_runtime_dir() {
        let xdg = [("XDG_RUNTIME_DIR", "/run/user/0")];
        assert_eq!(resolve(None, &xdg, 0), PathBuf::from("/run/ax/ax.sock"));
        assert_eq!(resolve(None, &[], 0), PathBuf::from("/run/ax/ax.sock"));
        // An explicit choice still wins for root.
        assert_eq!(
            resolve(None, &[("AX_SOCKET", "/x/y.sock")], 0),
            PathBuf::from("/x/y.sock")
        );
    }

    #[test]
    fn empty_or_relative_variables_are_unset() {
        let vars = [("AX_SOCKET", ""), ("XDG_RUNTIME_DIR", "relative/dir")];
        assert_eq!(
            resolve(None, &vars, 1000),
            PathBuf::from("/tmp/ax-1000/ax.sock")
        );
        assert_eq!(
            resolve(None, &[("XDG_RUNTIME_DIR", "")], 1000),
            PathBuf::from("/tmp/ax-1000/ax.sock")
        );
    }

    #[test]
    fn relative_paths_become_absolute() {
        assert_eq!(
            resolve(Some("ax.sock"), &[], 1000),
            PathBuf::from("/home/u/ax.sock")
        );
        assert_eq!(
            resolve(None, &[("AX_SOCKET", "run/a.sock")], 1000),
            PathBuf::from("/home/u/run/a.sock")
        );
    }

    #[test]
    fn socket_dir_of_paths() {
        assert_eq!(
            socket_dir(Path::new("/tmp/ax-1/ax.sock")),
            Path::new("/tmp/ax-1")
        );
        assert_eq!(socket_dir(Path::new("/ax.sock")), Path::new("/"));
    }

    #[test]
    fn dir_checks() {
        let d = Path::new("/d");
        assert!(check_dir_owner_mode(d, 1000, 0o40700, 1000).is_ok());
        assert!(check_dir_owner_mode(d, 0, 0o40755, 1000).is_ok());
        assert!(check_dir_owner_mode(d, 0, 0o40700, 0).is_ok());
        let other = check_dir_owner_mode(d, 1001, 0o40700, 1000).unwrap_err();
        assert!(other.contains("uid 1001"), "{other}");
        let writable = check_dir_owner_mode(d, 1000, 0o40770, 1000).unwrap_err();
        assert!(writable.contains("0770"), "{writable}");
        assert!(
            check_dir_owner_mode(d, 0, 0o41777, 0).is_err(),
            "/tmp itself"
        );
    }

    #[test]
    fn prepare_creates_private_dir() {
        let base = std::env::temp_dir().join(format!("ax-paths-test-{}", std::process::id()));
        let dir = base.join("a/b");
        prepare_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        prepare_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare_dir(&dir).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
