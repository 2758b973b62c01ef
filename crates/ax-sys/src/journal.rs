//! A shared-memory journal of notifications a broker has received and not
//! yet answered.
//!
//! The launcher creates a memfd and hands it to the daemon with the notify
//! fd. The broker records each notification before handling it and clears
//! it once answered. If the daemon dies in between, the notification stays
//! "received" in the kernel, where no later `RECV` will show it again; the
//! next daemon reads the journal, finds the entries whose id is still valid,
//! and finishes them. The journal lives in the memfd, which the launcher
//! keeps, so it survives the daemon.
//!
//! The launcher's user can write the memfd: nothing read from it is more
//! than a hint, which the broker checks against the kernel before acting on
//! it. Its size is sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) and
//! [`Journal::map`] refuses a journal without those seals, so that nobody
//! can shrink it under a mapping and make the daemon take `SIGBUS`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Notification;

/// Marks the last word of a record as "installing the socket with this
/// inode" rather than "installed at fd − 1".
const INSTALLING: u64 = 1 << 63;

/// Words per record: id, pid|nr, arch, six arguments, and the install
/// state (0, `INSTALLING | inode`, or fd + 1).
const WORDS: usize = 10;
/// Bytes per record.
pub const RECORD_LEN: usize = WORDS * 8;
/// Records in a journal made by [`create`]: notifications in flight at once
/// beyond this many may overwrite each other's record.
pub const DEFAULT_SLOTS: usize = 16384;

/// The seals a journal must carry: its size is fixed for good.
pub const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Creates a journal memfd sized for [`DEFAULT_SLOTS`] records, its size
/// sealed ([`REQUIRED_SEALS`]).
pub fn create() -> io::Result<OwnedFd> {
    let fd = new_memfd()?;
    let len = libc::off_t::try_from(DEFAULT_SLOTS * RECORD_LEN)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: ftruncate on an fd we own, integer argument.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    add_seals(fd.as_fd(), REQUIRED_SEALS)?;
    Ok(fd)
}

/// `fcntl(F_ADD_SEALS)`: see memfd_create(2).
fn add_seals(fd: std::os::fd::BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a borrowed, open fd with an integer argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fcntl(F_GET_SEALS)`: the seals of a memfd (`EINVAL` for a file that
/// cannot carry seals).
pub fn seals(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a borrowed, open fd, no argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn new_memfd() -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let name = c"ax-journal";
    // SAFETY: `name` is a valid NUL-terminated string; flags are constants.
    let rc =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

/// A mapped journal.
#[derive(Debug)]
pub struct Journal {
    ptr: *mut AtomicU64,
    words: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is only ever accessed through atomics, which are
// Sync; the pointer stays valid until Drop, which needs `&mut self`.
unsafe impl Send for Journal {}
// SAFETY: as above: all access goes through AtomicU64.
unsafe impl Sync for Journal {}

impl Journal {
    /// Maps the journal in `fd` (shared, read-write). The size must be a
    /// non-zero whole number of records, and sealed ([`REQUIRED_SEALS`]):
    /// a file whose size could change under the mapping would let whoever
    /// else holds it make this process take `SIGBUS`.
    ///
    /// # Errors
    /// `EPERM` for a file without the seals (or one that cannot carry
    /// any), `EINVAL` for a bad size, and what `fstat` or `mmap` return.
    pub fn map(fd: OwnedFd) -> io::Result<Self> {
        // The seals first: once they hold, the size read next is final.
        match seals(fd.as_fd()) {
            Ok(s) if s & REQUIRED_SEALS == REQUIRED_SEALS => {}
            Ok(_) | Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "journal is not a memfd sealed against resizing",
                ))
            }
        }
        // SAFETY: fstat on an fd we own into a zeroed, owned struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_fd().as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = usize::try_from(st.st_size).unwrap_or(0);
        if len < 2 * RECORD_LEN || !len.is_multiple_of(RECORD_LEN) || len > 64 << 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "journal size is not a whole number of records (at least two)",
            ));
        }
        // SAFETY: a fresh shared mapping of `len` bytes of a file we hold;
        // the kernel picks the address. Failure is MAP_FAILED, checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            words: len / 8,
            _fd: fd,
        })
    }

    /// Record slots; the last record's place holds the header.
    fn slots(&self) -> usize {
        self.words / WORDS - 1
    }

    /// The header word holding the highest id ever recorded.
    fn high_water_word(&self) -> &AtomicU64 {
        self.word(self.words - WORDS)
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words);
        // SAFETY: `i` is in bounds (checked above); the mapping is
        // page-aligned, so every u64 in it is aligned, and AtomicU64 has the
        // layout of u64. The mapping lives as long as `self`.
        unsafe { &*self.ptr.add(i) }
    }

    fn base(&self, id: u64) -> usize {
        (id % self.slots() as u64) as usize * WORDS
    }

    /// Records `n` as received and not yet answered.
    pub fn record(&self, n: &Notification) {
        let b = self.base(n.id);
        self.word(b).store(0, Ordering::Release);
        self.word(b + 1)
            .store(n.pid as u64 | (n.nr as u32 as u64) << 32, Ordering::Relaxed);
        self.word(b + 2).store(n.arch as u64, Ordering::Relaxed);
        self.word(b + 9).store(0, Ordering::Relaxed);
        for (k, a) in n.args.iter().enumerate() {
            self.word(b + 3 + k).store(*a, Ordering::Relaxed);
        }
        // The id goes last: a reader that sees it sees the rest.
        self.word(b).store(n.id, Ordering::Release);
        self.high_water_word().fetch_max(n.id, Ordering::AcqRel);
    }

    /// The highest id ever recorded (0 for none). Notification ids of one
    /// listener grow by one per trapped call, and `RECV` hands them out
    /// oldest first, so a call a broker received and died before recording
    /// has an id just above this one.
    pub fn high_water(&self) -> u64 {
        self.high_water_word().load(Ordering::Acquire)
    }

    /// Notes that the broker installed fd `fd` in the target for `id` and is
    /// about to answer with it: a successor answers the same rather than
    /// doing the call again.
    pub fn note_installed(&self, id: u64, fd: i32) {
        let b = self.base(id);
        if self.word(b).load(Ordering::Acquire) == id {
            self.word(b + 9)
                .store(fd as u32 as u64 + 1, Ordering::Release);
        }
    }

    /// The fd noted by [`Journal::note_installed`] for a pending `id`.
    pub fn installed(&self, id: u64) -> Option<i32> {
        let b = self.base(id);
        let v = self.word(b + 9).load(Ordering::Acquire);
        (self.word(b).load(Ordering::Acquire) == id && v != 0 && v & INSTALLING == 0)
            .then(|| (v - 1) as u32 as i32)
    }

    /// Notes that the broker is about to install the socket with inode
    /// `inode` in the target for `id`: a successor that finds that inode in
    /// the target answers with its fd, and otherwise installs the socket
    /// itself, rather than handing it to another call.
    pub fn note_installing(&self, id: u64, inode: u64) {
        let b = self.base(id);
        if self.word(b).load(Ordering::Acquire) == id {
            self.word(b + 9)
                .store(INSTALLING | (inode & !INSTALLING), Ordering::Release);
        }
    }

    /// The inode noted by [`Journal::note_installing`] for a pending `id`
    /// (and not followed by [`Journal::note_installed`]).
    pub fn installing(&self, id: u64) -> Option<u64> {
        let b = self.base(id);
        let v = self.word(b + 9).load(Ordering::Acquire);
        (self.word(b).load(Ordering::Acquire) == id && v & INSTALLING != 0)
            .then_some(v & !INSTALLING)
    }

    /// Marks `id` answered.
    pub fn clear(&self, id: u64) {
        let b = self.base(id);
        let _ = self
            .word(b)
            .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Every recorded, unanswered notification.
    pub fn pending(&self) -> Vec<Notification> {
        let mut out = Vec::new();
        for s in 0..self.slots() {
            let b = s * WORDS;
            let id = self.word(b).load(Ordering::Acquire);
            if id == 0 {
                continue;
            }
            let pid_nr = self.word(b + 1).load(Ordering::Relaxed);
            let mut args = [0u64; 6];
            for (k, a) in args.iter_mut().enumerate() {
                *a = self.word(b + 3 + k).load(Ordering::Relaxed);
            }
            let n = Notification {
                id,
                pid: pid_nr as u32,
                nr: (pid_nr >> 32) as u32 as i32,
                arch: self.word(b + 2).load(Ordering::Relaxed) as u32,
                args,
            };
            if self.word(b).load(Ordering::Acquire) == id {
                out.push(n);
            }
        }
        out
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`; no reference
        // into it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.words * 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_clear_pending() {
        let fd = create().unwrap();
        let j = Journal::map(fd.try_clone().unwrap()).unwrap();
        let n = Notification {
            id: 77,
            pid: 1234,
            nr: 42,
            arch: 0xc000003e,
            args: [1, 2, 3, 4, 5, 6],
        };
        j.record(&n);
        // A second mapping (the next daemon) sees it.
        let other = Journal::map(fd).unwrap();
        assert_eq!(other.pending(), vec![n]);
        assert_eq!(other.installed(77), None);
        j.note_installing(77, 4242);
        assert_eq!(other.installing(77), Some(4242));
        assert_eq!(other.installed(77), None);
        j.note_installed(77, 5);
        assert_eq!(other.installed(77), Some(5));
        assert_eq!(other.installing(77), None);
        assert_eq!(other.high_water(), 77);
        j.record(&Notification { id: 70, ..n });
        assert_eq!(
            other.high_water(),
            77,
            "the high-water mark never goes down"
        );
        j.clear(70);
        j.clear(77);
        assert!(other.pending().is_empty());
        assert_eq!(other.installed(77), None);
        // Clearing a stale id leaves a newer record alone.
        let m = Notification {
            id: 77 + DEFAULT_SLOTS as u64,
            ..n
        };
        j.record(&m);
        j.clear(77);
        assert_eq!(other.pending(), vec![m]);
    }

    #[test]
    fn map_rejects_bad_sizes() {
        let fd = new_memfd().unwrap();
        add_seals(fd.as_fd(), REQUIRED_SEALS).unwrap();
        assert!(Journal::map(fd).is_err());
    }

    #[test]
    fn map_requires_the_seals() {
        let fd = new_memfd().unwrap();
        let len = libc::off_t::try_from(4 * RECORD_LEN).unwrap();
        // SAFETY: ftruncate on an fd we own, integer argument.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }, 0);
        let e = Journal::map(fd.try_clone().unwrap()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        add_seals(fd.as_fd(), libc::F_SEAL_SHRINK).unwrap();
        assert!(
            Journal::map(fd.try_clone().unwrap()).is_err(),
            "growing still allowed"
        );
        add_seals(fd.as_fd(), REQUIRED_SEALS).unwrap();
        Journal::map(fd.try_clone().unwrap()).unwrap();
        // SAFETY: as above.
        assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0) }, 0, "sealed");
    }
}
