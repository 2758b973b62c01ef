//! A blocking client of the daemon's control socket: length-prefixed
//! postcard frames, with the notify fd passed as `SCM_RIGHTS`.

use anyhow::{anyhow, bail, Context};
use ax_proto::{Request, Response};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long to wait for an answer before giving up on the daemon.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens there (no socket file, or a stale one).
    #[error("no daemon is listening on {}", .0.display())]
    NoDaemon(PathBuf),
    /// The process listening there runs as another user than this one and
    /// root: it is not our daemon, and gets nothing (no request, no fd).
    #[error(
        "refusing the daemon at {}: it runs as uid {uid}, not as you (uid {me}) or root; \
         someone else's process listens there",
        path.display()
    )]
    Impostor {
        /// The socket.
        path: PathBuf,
        /// The listener's uid (`SO_PEERCRED`).
        uid: u32,
        /// Ours.
        me: u32,
    },
    /// Something else went wrong (permissions, …).
    #[error("cannot connect to the daemon at {}: {source}", path.display())]
    Other {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// True for connect errors that mean "no daemon there".
pub fn is_no_daemon(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// One connection to the daemon.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
}

impl Client {
    /// Connects to the daemon at `path`, whoever runs it (root may query
    /// any user's daemon). Before handing a daemon anything that gives
    /// power over a program, use [`Client::connect_own`].
    pub fn connect(path: &Path) -> Result<Self, ConnectError> {
        match UnixStream::connect(path) {
            Ok(stream) => {
                let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
                Ok(Self {
                    stream,
                    path: path.to_path_buf(),
                })
            }
            Err(e) if is_no_daemon(&e) => Err(ConnectError::NoDaemon(path.to_path_buf())),
            Err(source) => Err(ConnectError::Other {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Connects to the daemon at `path`, which must run as this user or as
    /// root (`SO_PEERCRED`): a launcher hands the daemon its program's
    /// notify fd, which is power over the program, and nothing may reach
    /// a process of another user listening there, not even the request.
    pub fn connect_own(path: &Path) -> Result<Self, ConnectError> {
        let client = Self::connect(path)?;
        client.check_own()?;
        Ok(client)
    }

    /// `Ok` if the daemon runs as this user or as root.
    fn check_own(&self) -> Result<(), ConnectError> {
        let me = crate::paths::euid();
        match rustix::net::sockopt::socket_peercred(&self.stream) {
            Ok(cred) if cred.uid.as_raw() == me || cred.uid.is_root() => Ok(()),
            Ok(cred) => Err(ConnectError::Impostor {
                path: self.path.clone(),
                uid: cred.uid.as_raw(),
                me,
            }),
            Err(e) => Err(ConnectError::Other {
                path: self.path.clone(),
                source: e.into(),
            }),
        }
    }

    /// Sends `req` and waits for the answer.
    pub fn call(&mut self, req: &Request) -> anyhow::Result<Response> {
        let frame = ax_proto::encode(req)?;
        if let Err(e) = self.stream.write_all(&frame) {
            return self.answer_after_failed_send(e, "sending a request");
        }
        self.read_response()
    }

    /// A daemon that refuses a client (another user, say) answers and
    /// closes before reading anything: show its answer, not "broken pipe".
    fn answer_after_failed_send(&mut self, e: io::Error, doing: &str) -> anyhow::Result<Response> {
        match self.read_response() {
            Ok(resp @ Response::Error(_)) => Ok(resp),
            _ => Err(e).with_context(|| self.lost(doing)),
        }
    }

    /// Sends `req` with `fds` (at most four) attached as `SCM_RIGHTS`, and
    /// waits for the answer.
    pub fn call_with_fds(
        &mut self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> anyhow::Result<Response> {
        // Whatever the caller checked: fds go to our own daemon only.
        self.check_own()?;
        let frame = ax_proto::encode(req)?;
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        if !anc.push(SendAncillaryMessage::ScmRights(fds)) {
            bail!("internal error: no room for the fd in the control message");
        }
        let sent = loop {
            match rustix::net::sendmsg(
                &self.stream,
                &[IoSlice::new(&frame)],
                &mut anc,
                SendFlags::NOSIGNAL,
            ) {
                Ok(n) => break n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return self.answer_after_failed_send(e.into(), "handing over the program")
                }
            }
        };
        // The fd went with the first byte; the rest of the frame is plain data.
        if let Err(e) = self.stream.write_all(&frame[sent..]) {
            return self.answer_after_failed_send(e, "handing over the program");
        }
        self.read_response()
    }

    /// Blocks until the daemon closes the connection (it never speaks
    /// unasked): how a launcher learns that its daemon died.
    pub fn wait_closed(&mut self) {
        let _ = self.stream.set_read_timeout(None);
        let mut buf = [0u8; 256];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn read_response(&mut self) -> anyhow::Result<Response> {
        let mut prefix = [0u8; 4];
        self.stream.read_exact(&mut prefix).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                anyhow!(
                    "the daemon at {} closed the connection",
                    self.path.display()
                )
            } else if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                anyhow!(
                    "the daemon at {} did not answer within {} s",
                    self.path.display(),
                    ANSWER_TIMEOUT.as_secs()
                )
            } else {
                anyhow!(e).context(self.lost("reading the answer"))
            }
        })?;
        let len = ax_proto::body_len(prefix).context("bad answer from the daemon")?;
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .with_context(|| self.lost("reading the answer"))?;
        ax_proto::decode::<Response>(&body).context("bad answer from the daemon")
    }

    fn lost(&self, doing: &str) -> String {
        format!("lost the daemon at {} while {doing}", self.path.display())
    }
}
