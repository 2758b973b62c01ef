//! The only crate in ax that contains `unsafe` code.
//!
//! It wraps the kernel interfaces the broker and the launcher need and that no
//! safe crate offers: the seccomp user-notification ioctls
//! (`SECCOMP_IOCTL_NOTIF_*`), installing a filter between `fork` and `execve`,
//! pidfds, reading and writing a target's memory, raw `sockaddr` calls made on
//! the broker's own copy of an address, signal waiting for the launcher, and
//! the fd keeper that outlives a killed daemon, and the socket factory in the
//! broker's private network namespace.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment. Everything exported is
//! safe to call with any argument: bad input yields an [`std::io::Error`].

pub mod journal;
pub mod keeper;
pub mod netns;
pub mod notify;
pub mod ns;
pub mod prexec;
pub mod process;
pub mod signal;
pub mod sockaddr;
pub mod sockopt;

pub use notify::{Notification, NotifyFd};
