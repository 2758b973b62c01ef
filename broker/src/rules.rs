//! The one definition of what ax's seccomp filter traps: [`rules`].
//!
//! `ax exec`'s filter ([`crate::launch::compile_filter`]) and the OCI
//! profile `ax oci profile` prints for container runtimes are both built
//! from this table, so that a container is trapped exactly as a program
//! started with `ax exec` is.

/// What the filter does with a call that matches a [`Rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `SECCOMP_RET_USER_NOTIF`: the broker answers it.
    Notify,
    /// Fails with this errno without reaching the kernel's handler.
    Errno(i32),
}

/// A comparison of one system-call argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// `(arg & mask) == value`.
    MaskedEqual {
        /// Bits compared.
        mask: u64,
        /// What they must equal.
        value: u64,
    },
    /// `arg != value` (all 64 bits).
    NotEqual(u64),
}

/// One condition on argument `index` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arg {
    /// Which argument.
    pub index: u32,
    /// How it is compared.
    pub compare: Compare,
}

/// One rule: `syscall`, when all of `args` hold, gets `action`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The call's name, as libseccomp and OCI profiles spell it.
    pub syscall: &'static str,
    /// Its number on every architecture, for calls newer than some
    /// libseccomp tables (used only when the name is unknown there).
    pub number: Option<i32>,
    /// What happens when it matches.
    pub action: Action,
    /// Conditions, all of which must hold (none: every call).
    pub args: Vec<Arg>,
}

/// The system calls ax traps unconditionally.
pub const TRAPPED_SYSCALLS: &[&str] = &[
    "bind",
    "connect",
    "accept",
    "accept4",
    "getsockname",
    "getpeername",
];

const SOL_SOCKET: u64 = libc::SOL_SOCKET as u64;
const SOCKOPT_LEVELS: &[u64] = &[
    libc::IPPROTO_TCP as u64,
    libc::IPPROTO_IP as u64,
    libc::IPPROTO_IPV6 as u64,
];
/// `SO_DOMAIN`/`SO_PROTOCOL`, and the socket-level options TCP and UNIX
/// sockets answer differently (`SO_PASSCRED`, `SO_PASSSEC`, `SO_PASSPIDFD`
/// are UNIX-only, `SO_TXREHASH` and `SO_REUSEPORT` IP-only; `SO_ACCEPTCONN`
/// stays set on a UNIX listener shut down, where TCP's is closed).
const SOCKOPT_SOCKET_NAMES: &[u64] = &[
    libc::SO_DOMAIN as u64,
    libc::SO_PROTOCOL as u64,
    libc::SO_ACCEPTCONN as u64,
    libc::SO_PASSCRED as u64,
    libc::SO_PASSSEC as u64,
    SO_TXREHASH,
    SO_PASSPIDFD,
    libc::SO_REUSEPORT as u64,
];
/// Socket-level options whose `setsockopt` alone is trapped: a TCP socket
/// keeps them across a connect and passes them on to the connections it
/// accepts, which a UNIX socket swapped in, or accepted on a swapped
/// listener, would not. The broker notes who set them and carries them
/// (see `handlers::carry`); the kernel sets them, on either family alike.
/// Not among them, as programs set them on every connection, where a trap
/// would cost each one a notification: `SO_KEEPALIVE` (Go; a UNIX socket
/// has nothing to keep alive) and the timeouts (Rust's `set_read_timeout`,
/// hiredis…), which the broker copies at every swap and accept instead.
pub const CARRIED_SOCKET_OPTIONS: &[i32] = &[
    libc::SO_SNDBUF,
    libc::SO_RCVBUF,
    libc::SO_SNDBUFFORCE,
    libc::SO_RCVBUFFORCE,
    libc::SO_LINGER,
    libc::SO_PRIORITY,
    libc::SO_RCVLOWAT,
];
/// `SO_TXREHASH` (Linux 5.18), not in the libc crate.
const SO_TXREHASH: u64 = 74;
/// `SO_PASSPIDFD` (Linux 6.5).
const SO_PASSPIDFD: u64 = 76;
/// `MSG_FASTOPEN`: a send that connects (TCP Fast Open).
const MSG_FASTOPEN: u64 = libc::MSG_FASTOPEN as u64;
/// The send calls trapped with `MSG_FASTOPEN`, and their flags argument.
const FASTOPEN_CALLS: &[(&str, u32)] = &[("sendto", 3), ("sendmsg", 2), ("sendmmsg", 3)];
/// `landlock_restrict_self` (Linux 5.13: 446 on every architecture).
const LANDLOCK_RESTRICT_SELF: i32 = 446;

/// An `int` argument equal to `value`: the low 32 bits only, as the kernel
/// reads them.
fn int(index: u32, value: u64) -> Arg {
    Arg {
        index,
        compare: Compare::MaskedEqual {
            mask: 0xffff_ffff,
            value,
        },
    }
}

fn notify(syscall: &'static str, args: Vec<Arg>) -> Rule {
    Rule {
        syscall,
        number: None,
        action: Action::Notify,
        args,
    }
}

/// Every rule of ax's filter, in the order it is built. Calls no rule
/// matches are allowed.
///
/// * the calls in [`TRAPPED_SYSCALLS`] are trapped (`SECCOMP_RET_USER_NOTIF`);
/// * `setsockopt`/`getsockopt` are trapped only at the TCP, IP and IPv6
///   levels and for the socket-level names in `SOCKOPT_SOCKET_NAMES` —
///   the cases a swapped socket must answer as TCP would — and
///   `setsockopt` for those in [`CARRIED_SOCKET_OPTIONS`], which a swap
///   or an accept passes on; every other option runs untouched (a UNIX
///   socket answers it as TCP does);
/// * `sendto` is trapped when it names a destination (its address argument
///   is not NULL) or has `MSG_FASTOPEN`, and `sendmsg`/`sendmmsg` when they
///   have `MSG_FASTOPEN` (a masked comparison of the flags argument): a
///   Fast Open send connects without `connect`;
/// * `io_uring_setup` fails with `ENOSYS`: io_uring's connect and accept
///   would not be seen by seccomp, and programs fall back to plain calls;
/// * a program restricting itself (Landlock, seccomp) is trapped, and
///   answered `CONTINUE` once the broker took note.
pub fn rules() -> Vec<Rule> {
    let mut out: Vec<Rule> = TRAPPED_SYSCALLS
        .iter()
        .map(|name| notify(name, Vec::new()))
        .collect();
    for name in ["setsockopt", "getsockopt"] {
        for &level in SOCKOPT_LEVELS {
            out.push(notify(name, vec![int(1, level)]));
        }
        for &opt in SOCKOPT_SOCKET_NAMES {
            out.push(notify(name, vec![int(1, SOL_SOCKET), int(2, opt)]));
        }
    }
    for &opt in CARRIED_SOCKET_OPTIONS {
        out.push(notify(
            "setsockopt",
            vec![int(1, SOL_SOCKET), int(2, opt as u64)],
        ));
    }
    // TCP Fast Open: the flag bit alone decides, whatever else is set.
    for &(name, flags) in FASTOPEN_CALLS {
        let flag = Arg {
            index: flags,
            compare: Compare::MaskedEqual {
                mask: MSG_FASTOPEN,
                value: MSG_FASTOPEN,
            },
        };
        out.push(notify(name, vec![flag]));
    }
    // sendto with a destination (a pointer: all 64 bits).
    out.push(notify(
        "sendto",
        vec![Arg {
            index: 4,
            compare: Compare::NotEqual(0),
        }],
    ));
    out.push(Rule {
        syscall: "io_uring_setup",
        number: None,
        action: Action::Errno(libc::ENOSYS),
        args: Vec::new(),
    });
    // A program restricting itself: see `handlers::restrict`.
    out.push(Rule {
        number: Some(LANDLOCK_RESTRICT_SELF),
        ..notify("landlock_restrict_self", Vec::new())
    });
    out.push(notify(
        "seccomp",
        vec![int(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))],
    ));
    out.push(notify(
        "prctl",
        vec![int(0, u64::from(libc::PR_SET_SECCOMP.unsigned_abs()))],
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trapped_call_has_a_rule_and_io_uring_is_enosys() {
        let rules = rules();
        for name in TRAPPED_SYSCALLS {
            assert!(rules
                .iter()
                .any(|r| r.syscall == *name && r.args.is_empty() && r.action == Action::Notify));
        }
        let uring: Vec<_> = rules
            .iter()
            .filter(|r| r.syscall == "io_uring_setup")
            .collect();
        assert_eq!(uring.len(), 1);
        assert_eq!(uring[0].action, Action::Errno(libc::ENOSYS));
    }

    #[test]
    fn conditions_never_repeat_an_argument() {
        // OCI runtimes split conditions on one argument into separate
        // rules (an OR): each rule here compares each argument once.
        for r in rules() {
            let mut seen: Vec<u32> = r.args.iter().map(|a| a.index).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), r.args.len(), "{r:?}");
        }
    }
}
