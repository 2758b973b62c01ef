//! The daemon's broker instance: a random id kept in a private file beside
//! the control socket, so that a successor on the same socket takes over
//! with the same one and nobody can work it out from the socket path.

use anyhow::{bail, Context};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The instance recorded in `file`, or a new random one recorded there
/// (mode 0600). Call it under the socket lock: one daemon at a time.
///
/// # Errors
/// A file that is not ours (another owner, readable or writable by others)
/// is refused; so are I/O errors other than "not found".
pub fn load_or_create(file: &Path) -> anyhow::Result<u32> {
    match std::fs::symlink_metadata(file) {
        Ok(meta) => {
            let me = crate::paths::euid();
            if !meta.file_type().is_file() || meta.uid() != me || meta.mode() & 0o077 != 0 {
                bail!(
                    "refusing {}: not a private file of uid {me} (remove it)",
                    file.display()
                );
            }
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            if let Some(id) = parse(&text) {
                return Ok(id);
            }
            tracing::warn!(file = %file.display(), "unreadable instance file; choosing a new instance");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", file.display())),
    }
    let id = random_id()?;
    let tmp = crate::paths::beside(file, ".new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(format!("{id:08x}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot create {}", file.display()))?;
    Ok(id)
}

/// Eight hex digits, not zero.
fn parse(text: &str) -> Option<u32> {
    let t = text.trim();
    if t.len() != 8 {
        return None;
    }
    u32::from_str_radix(t, 16).ok().filter(|&id| id != 0)
}

/// A random, non-zero id from the kernel (`getrandom`).
fn random_id() -> anyhow::Result<u32> {
    loop {
        let mut buf = [0u8; 4];
        let n = rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty())
            .context("getrandom failed")?;
        let id = u32::from_ne_bytes(buf);
        if n == buf.len() && id != 0 {
            return Ok(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_only_its_own_format() {
        assert_eq!(parse("0123abcd\n"), Some(0x0123_abcd));
        assert_eq!(parse("00000000"), None);
        assert_eq!(parse("123"), None);
        assert_eq!(parse("0123abcdef"), None);
        assert_eq!(parse("zzzzzzzz"), None);
    }

    #[test]
    fn kept_private_and_stable() {
        let dir = std::env::temp_dir().join(format!("ax-instance-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ax.sock.instance");
        let a = load_or_create(&file).unwrap();
        assert_eq!(load_or_create(&file).unwrap(), a, "a successor keeps it");
        let mode = std::fs::metadata(&file).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create(&file).is_err(), "readable by others");
        std::fs::remove_file(&file).unwrap();
        let b = load_or_create(&file).unwrap();
        assert_ne!(a, 0);
        assert_ne!(b, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
