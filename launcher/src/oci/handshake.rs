//! The runtime's side of the OCI seccomp agent protocol: one message on a
//! UNIX stream connection, the container's state as JSON (the OCI
//! `ContainerProcessState`) with the notify fd attached (`SCM_RIGHTS`),
//! then the runtime closes its end.

use serde::Deserialize;
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long a runtime may take to send its message.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest state message read (annotations included).
const MAX_MESSAGE: usize = 1 << 20;

/// The message a runtime sends (the OCI `ContainerProcessState`).
#[derive(Debug, Deserialize)]
pub struct ProcessState {
    /// The OCI runtime-spec version.
    #[serde(rename = "ociVersion", default)]
    pub oci_version: String,
    /// What each fd sent with the message is (`"seccompFd"`).
    #[serde(default)]
    pub fds: Vec<String>,
    /// The container process's pid (0 when the runtime does not say, as
    /// crun for an `exec`).
    #[serde(default)]
    pub pid: i64,
    /// The profile's `listenerMetadata`.
    #[serde(default)]
    pub metadata: String,
    /// The container's state.
    pub state: ContainerState,
}

/// The OCI state of the container.
#[derive(Debug, Deserialize)]
pub struct ContainerState {
    /// Its id.
    pub id: String,
    /// `creating`, `created`, `running`, …
    #[serde(default)]
    pub status: String,
    /// Its init process.
    #[serde(default)]
    pub pid: i64,
    /// Its bundle directory.
    #[serde(default)]
    pub bundle: String,
    /// Its annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// The runtime's name from its `comm`: crun runs from a sealed memfd copy
/// of itself (`memfd:crun_clon`), runc's helpers are `runc:[…]`.
pub fn runtime_name(comm: &str) -> String {
    let comm = comm.trim();
    let comm = comm.strip_prefix("memfd:").unwrap_or(comm);
    let name = comm
        .split(['_', ':', '['])
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("unknown");
    name.to_string()
}

/// True for a seccomp notify fd.
pub fn is_notify_fd(fd: &OwnedFd) -> bool {
    ax_sys::keeper::is_notify_fd(fd.as_fd())
}

/// Reads the runtime's message until it closes its end (or a whole JSON
/// object arrived), with the fds that came with it.
pub fn read_message(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut bytes = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the runtime sent no complete state",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            stream.as_fd(),
            &mut [IoSliceMut::new(&mut chunk)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        for m in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if got.bytes == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..got.bytes]);
        if bytes.len() > MAX_MESSAGE {
            return Err(io::Error::other("the runtime's state is larger than 1 MiB"));
        }
        // runc and crun close after one message; others may wait.
        if serde_json::from_slice::<serde_json::Value>(&bytes).is_ok() {
            break;
        }
    }
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the runtime closed the connection before sending the container state",
        ));
    }
    Ok((bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_runtime() {
        assert_eq!(runtime_name("runc\n"), "runc");
        assert_eq!(runtime_name("memfd:crun_clon\n"), "crun");
        assert_eq!(runtime_name("runc:[2:INIT]"), "runc");
        assert_eq!(runtime_name(""), "unknown");
    }

    #[test]
    fn reads_a_message_sent_in_pieces_and_refuses_an_empty_one() {
        use std::io::Write;
        let (mut runtime, agent) = UnixStream::pair().unwrap();
        runtime.write_all(br#"{"fds":["seccompFd"],"#).unwrap();
        runtime.write_all(br#""state":{"id":"x"}}"#).unwrap();
        let (bytes, fds) = read_message(&agent).unwrap();
        let s: ProcessState = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(s.state.id, "x");
        assert!(fds.is_empty());
        let (runtime, agent) = UnixStream::pair().unwrap();
        drop(runtime);
        assert_eq!(
            read_message(&agent).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn parses_runc_and_crun_states() {
        let runc = r#"{"ociVersion":"1.0.2","fds":["seccompFd"],"pid":4242,
            "metadata":"io.ax.ip=10.233.0.9",
            "state":{"ociVersion":"1.0.2","id":"web","status":"creating","pid":4242,
            "bundle":"/b","annotations":{"io.ax.name":"web"}}}"#;
        let s: ProcessState = serde_json::from_str(runc).unwrap();
        assert_eq!((s.pid, s.state.id.as_str()), (4242, "web"));
        assert_eq!(s.fds, vec!["seccompFd"]);
        assert_eq!(s.state.annotations["io.ax.name"], "web");
        // crun, for an exec: pid 0, no annotations.
        let crun = r#"{"ociVersion":"1.0.0","fds":["seccompFd"],"pid":0,
            "state":{"id":"web","status":"running","pid":0,"bundle":"/b"}}"#;
        let s: ProcessState = serde_json::from_str(crun).unwrap();
        assert_eq!(s.pid, 0);
        assert!(s.metadata.is_empty() && s.state.annotations.is_empty());
    }
}
