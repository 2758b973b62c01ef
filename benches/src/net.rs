//! Addresses, listeners and streams over TCP or AF_UNIX, behind one type so
//! every worker role runs the same code on every transport.
//!
//! Sockets are made with plain `socket`/`bind`/`listen`/`connect` calls, so a
//! worker under `ax exec` is trapped exactly like any other program.

use anyhow::{Context, Result};
use rustix::net::{self, AddressFamily, SocketAddrUnix, SocketType};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Where a worker listens or connects: `IP:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// TCP (or whatever ax turns it into).
    Tcp(SocketAddr),
    /// An AF_UNIX stream socket at a path.
    Unix(PathBuf),
}

impl FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Addr::Unix(p.into()));
        }
        if s.starts_with('/') {
            return Ok(Addr::Unix(s.into()));
        }
        s.parse::<SocketAddr>()
            .map(Addr::Tcp)
            .map_err(|e| format!("{s:?}: expected IP:PORT or unix:PATH ({e})"))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP listener (an AF_UNIX one in disguise under ax).
    Tcp(TcpListener),
    /// AF_UNIX listener.
    Unix(UnixListener),
}

/// A connected stream.
#[derive(Debug)]
pub enum Stream {
    /// TCP stream (AF_UNIX under ax).
    Tcp(TcpStream),
    /// AF_UNIX stream.
    Unix(UnixStream),
}

/// Listens on `addr` with `backlog` (std's own `bind` uses 128, which a
/// connection-rate test overruns).
pub fn listen(addr: &Addr, backlog: i32) -> Result<Listener> {
    match addr {
        Addr::Tcp(sa) => {
            let fam = if sa.is_ipv4() {
                AddressFamily::INET
            } else {
                AddressFamily::INET6
            };
            let fd = net::socket(fam, SocketType::STREAM, None).context("socket")?;
            net::sockopt::set_socket_reuseaddr(&fd, true).context("SO_REUSEADDR")?;
            net::bind(&fd, sa).with_context(|| format!("bind {sa}"))?;
            net::listen(&fd, backlog).with_context(|| format!("listen {sa}"))?;
            Ok(Listener::Tcp(TcpListener::from(fd)))
        }
        Addr::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let fd =
                net::socket(AddressFamily::UNIX, SocketType::STREAM, None).context("socket")?;
            let ua = SocketAddrUnix::new(p.as_path()).context("unix path")?;
            net::bind(&fd, &ua).with_context(|| format!("bind {}", p.display()))?;
            net::listen(&fd, backlog).with_context(|| format!("listen {}", p.display()))?;
            Ok(Listener::Unix(UnixListener::from(fd)))
        }
    }
}

impl Listener {
    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    /// Makes `accept` answer `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self) -> Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
        .context("O_NONBLOCK")
    }

    /// Another handle on the same listening socket (for accept threads).
    pub fn try_clone(&self) -> io::Result<Listener> {
        match self {
            Listener::Tcp(l) => l.try_clone().map(Listener::Tcp),
            Listener::Unix(l) => l.try_clone().map(Listener::Unix),
        }
    }
}

/// Connects to `addr`.
pub fn connect(addr: &Addr) -> io::Result<Stream> {
    match addr {
        Addr::Tcp(sa) => TcpStream::connect(sa).map(Stream::Tcp),
        Addr::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
    }
}

impl Stream {
    /// `TCP_NODELAY` for TCP; nothing for UNIX. Errors are ignored: under ax
    /// a TCP stream may really be AF_UNIX, where the option means nothing.
    pub fn nodelay(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }

    /// Read and write timeouts, so that a stuck peer fails a run instead of
    /// hanging it.
    pub fn timeouts(&self, t: Duration) {
        let t = Some(t);
        let _ = match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "127.0.0.1:80".parse::<Addr>().unwrap(),
            Addr::Tcp("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            "unix:/tmp/x".parse::<Addr>().unwrap(),
            Addr::Unix("/tmp/x".into())
        );
        assert_eq!(
            "/tmp/y".parse::<Addr>().unwrap(),
            Addr::Unix("/tmp/y".into())
        );
        assert!("nonsense".parse::<Addr>().is_err());
        assert!("unix:".parse::<Addr>().is_err());
    }
}
