//! `bind(fd, addr, addrlen)`.
//!
//! * Inputs: an `AF_INET`/`AF_INET6` stream socket and an address read once
//!   from the program's memory.
//! * Decision: a wildcard address or one of the app's VIPs is virtual; a
//!   loopback or host address is left to the kernel; another app's VIP (or
//!   an unowned pool address) is `EADDRNOTAVAIL`.
//! * Effect: the VIP:port (port 0: one from the ephemeral range) is
//!   registered, and an `AF_UNIX` listener named after it replaces the
//!   program's socket at the same fd number. `listen` then runs natively.
//! * A socket this broker installed is bound already: the call fails, with
//!   the error the kernel finds first in the address, else `EINVAL`.

use super::{
    classify_expecting, copy_nonblock, endpoint_addr, endpoint_alive, install_over, Call, Expect,
    Outcome, Sock,
};
use crate::addr::{self, Purpose};
use crate::names::{Reuseport, SocketName};
use crate::target::{Errno, Target};
use ax_registry::{BindRequest, UnixEndpoint};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

/// How often a listener's name found taken is tried again (200 µs apart):
/// a liveness probe holds a name for microseconds.
const NAME_PROBE_RETRIES: u32 = 50;

pub(super) fn handle(call: &Call<'_>, target: &Target) -> Outcome {
    run(call, target).into()
}

fn run(call: &Call<'_>, target: &Target) -> Result<Outcome, Errno> {
    let fd_arg = call.arg(0);
    let (v6, copy, swapped) = match classify_expecting(call, target, fd_arg, Expect::Kernel) {
        Ok(Sock::Inet { v6, fd, .. }) => (v6, fd, false),
        // An earlier daemon installed it and died before answering.
        Ok(Sock::Swapped { .. }) if call.replay => return Ok(Outcome::Value(0)),
        Ok(Sock::Swapped { name, fd, .. }) => (name.is_v6(), fd, true),
        Ok(Sock::Other) if super::not_a_socket(target, fd_arg) => {
            return Ok(Outcome::Errno(libc::ENOTSOCK))
        }
        Ok(Sock::Other) => return Ok(Outcome::Continue),
        Err(e) => return Ok(super::fd_error(call, e)),
    };
    // move_addr_to_kernel: the length, then the bytes.
    let addrlen = call.int_arg(2);
    if addrlen < 0 || addrlen as usize > ax_sys::sockaddr::SOCKADDR_STORAGE_LEN {
        return Ok(Outcome::Errno(libc::EINVAL));
    }
    let bytes = target.read(call.arg(1), addrlen as usize)?;
    call.check_valid()?;
    if swapped {
        // A socket we installed is bound (or connected): the bind fails,
        // with the first error the kernel finds in the address.
        let vips = call.shared.directory.app_vips(call.app);
        let is_local = |ip: IpAddr| {
            if ip.is_unspecified() || ip.is_loopback() || vips.contains(&ip) {
                true
            } else if call.shared.directory.is_virtual(ip) {
                false
            } else {
                host_may_bind(&bytes, v6)
            }
        };
        return Ok(Outcome::Errno(addr::bind_when_bound(&bytes, v6, is_local)));
    }
    let Some(want) = addr::parse(&bytes, v6, Purpose::Bind) else {
        // Malformed for this family. Not CONTINUE: another thread could
        // make the program's bytes a wildcard before the kernel reads them
        // again. The kernel's answer to the broker's copy, from a fresh
        // socket of the family (length and family are checked first).
        return Ok(Outcome::Errno(malformed_errno(&bytes, v6)));
    };
    let ip = want.ip();
    if ip.is_loopback() {
        return Ok(Outcome::Continue);
    }
    let dir = &call.shared.directory;
    let vips = dir.app_vips(call.app);
    let ips: Vec<IpAddr> = if ip.is_unspecified() {
        let v6only = v6 && rustix::net::sockopt::ipv6_v6only(&copy).unwrap_or(false);
        vips.iter()
            .copied()
            .filter(|vip| match (v6, v6only) {
                (false, _) => vip.is_ipv4(),
                (true, true) => vip.is_ipv6(),
                (true, false) => true,
            })
            .collect()
    } else if vips.contains(&ip) {
        vec![ip]
    } else if dir.is_virtual(ip) {
        return Ok(Outcome::Errno(libc::EADDRNOTAVAIL));
    } else {
        // A host address: nothing virtual about it.
        return Ok(Outcome::Continue);
    };
    if ips.is_empty() {
        // e.g. an IPV6_V6ONLY wildcard in an app without an IPv6 VIP.
        return Ok(Outcome::Continue);
    }
    // Binding twice is EINVAL, as the kernel says for a bound socket.
    if let Ok(local) = rustix::net::getsockname(&copy) {
        if let Ok(sa) = SocketAddr::try_from(local) {
            if sa.port() != 0 {
                return Ok(Outcome::Errno(libc::EINVAL));
            }
        }
    }
    let instance = call.instance();
    let app = call.app;
    let spare = call.shared.sockets.take_spare()?;
    let (spare_inode, spare_cookie) = (spare.inode, spare.cookie);
    let sock = spare.fd;
    let reuseport = reuseport_of(&copy, &sock)?;
    let name_for = |port: u16| {
        UnixEndpoint::Abstract(
            SocketName::Listener {
                instance,
                v6,
                app,
                bound: SocketAddr::new(ip, port),
                reuseport,
            }
            .encode(),
        )
    };
    let req = BindRequest {
        app,
        ips,
        port: want.port(),
        reuseport: reuseport.map(|r| r.uid),
    };
    let mut sock = Some(sock);
    // A liveness probe (`endpoint_alive`, from a connect or the daemon's
    // host-loopback watch) binds a name for an instant: a name that is
    // taken is tried again for a little while before the bind fails.
    let mut bound_socket = |endpoint: &UnixEndpoint| -> Result<OwnedFd, Errno> {
        let sock = sock.take().ok_or(libc::EINVAL)?;
        let addr = endpoint_addr(endpoint)?;
        let mut tries = 0;
        loop {
            match rustix::net::bind(&sock, &addr) {
                Ok(()) => return Ok(sock),
                Err(rustix::io::Errno::ADDRINUSE) if tries < NAME_PROBE_RETRIES => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err(e) => return Err(e.raw_os_error()),
            }
        }
    };
    // With the port known, the listener's name is taken before the
    // service is registered: a connect that finds the service then finds
    // a socket too (it never mistakes a listener still being set up for a
    // dead one). Port 0 gets its port from the registry first.
    let early = if want.port() != 0 {
        Some(bound_socket(&name_for(want.port()))?)
    } else {
        None
    };
    let port = dir
        .bind(&req, &name_for, &|ep: &UnixEndpoint| {
            endpoint_alive(call.shared, ep)
        })
        .map_err(|e| {
            tracing::debug!(app, %ip, port = want.port(), reuseport = reuseport.is_some(), error = %e, "bind refused");
            e.errno()
        })?;
    let endpoint = name_for(port);
    let installed = (|| {
        let sock = match early {
            Some(sock) => sock,
            None => bound_socket(&endpoint)?,
        };
        copy_nonblock(&copy, &sock)?;
        super::copy_timeouts(&copy, &sock);
        let swapped = super::carry::Swapped {
            fd: sock.as_fd(),
            inode: spare_inode,
            listener: Some(spare_cookie),
        };
        super::carry::carry(call, &copy, v6, swapped);
        call.check_valid()?;
        Ok(install_over(call, target, fd_arg, &sock))
    })();
    match installed {
        Ok(Outcome::Value(v)) => {
            tracing::debug!(app, %ip, port, "bound virtual listener");
            Ok(Outcome::Value(v))
        }
        other => {
            dir.release(&endpoint);
            other
        }
    }
}

/// `SO_REUSEPORT` as the program set it on its socket `copy` (the option
/// runs natively before the swap), with the owner the kernel compares
/// and, to tell group members apart, the inode of the broker's `listener`.
fn reuseport_of(copy: &OwnedFd, listener: &OwnedFd) -> Result<Option<Reuseport>, Errno> {
    if !rustix::net::sockopt::socket_reuseport(copy).map_err(|e| e.raw_os_error())? {
        return Ok(None);
    }
    let uid = rustix::fs::fstat(copy)
        .map_err(|e| e.raw_os_error())?
        .st_uid;
    let ino = rustix::fs::fstat(listener)
        .map_err(|e| e.raw_os_error())?
        .st_ino;
    // sockfs numbers its inodes with an unsigned int.
    let id = u32::try_from(ino & u64::from(u32::MAX)).map_err(|_| libc::EINVAL)?;
    Ok(Some(Reuseport { uid, id }))
}

/// What the kernel answers a `bind` of the malformed address `bytes` on a
/// socket of the program's family.
fn malformed_errno(bytes: &[u8], v6: bool) -> Errno {
    let family = if v6 {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let probe =
        match rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None) {
            Ok(p) => p,
            Err(e) => return super::shortage_errno(e.raw_os_error()),
        };
    match ax_sys::sockaddr::bind_raw(probe.as_fd(), bytes) {
        Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
        Ok(()) => libc::EINVAL,
    }
}

/// Whether the kernel lets a socket of this host bind the address in
/// `bytes` (port cleared, so that neither a taken nor a privileged port
/// gets in the way): it answers `EADDRNOTAVAIL` for an address that is not
/// this host's.
fn host_may_bind(bytes: &[u8], v6: bool) -> bool {
    let family = if v6 {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let Ok(probe) =
        rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)
    else {
        return true;
    };
    let mut any_port = bytes.to_vec();
    if let Some(port) = any_port.get_mut(2..4) {
        port.fill(0);
    }
    !matches!(
        ax_sys::sockaddr::bind_raw(probe.as_fd(), &any_port),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
    )
}
