//! The filter's hard edges, checked on the running kernel: io_uring is
//! refused, calls through another ABI (x32, 32-bit `int 0x80`) fail
//! instead of slipping past the trap, and a send with `MSG_FASTOPEN` is
//! trapped whatever other flags it carries while plain sends are not.

use ax_broker::{launch, Broker, BrokerConfig};
use ax_registry::{AppSpec, LocalRegistry};
use std::process::Command;
use std::sync::Arc;

/// Runs `program` under the filter, served by a real broker: whatever the
/// program's start-up traps (a libc lookup that connects to a UNIX socket,
/// say) is answered instead of waiting for a listener nobody reads.
fn run_under_filter(program: &str, args: &[&str]) -> String {
    let registry = Arc::new(LocalRegistry::default());
    let broker = Broker::new(registry.clone(), BrokerConfig::default());
    let app = registry
        .register_app(&AppSpec::default(), 0)
        .expect("register app");
    let filter = launch::compile_filter().expect("filter compiles");
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(std::process::Stdio::piped());
    let sandboxed = launch::spawn(&mut cmd, &filter).expect("spawn under filter");
    let session = broker
        .serve(app.id, sandboxed.listener)
        .expect("serve the program");
    let out = sandboxed.child.wait_with_output().expect("wait");
    session.join();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_native(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("run natively");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const RAW_SYSCALLS: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return r if r >= 0 else -ctypes.get_errno()
params = ctypes.create_string_buffer(120)
# io_uring_setup(1, &params)
print("io_uring_setup", call(425, 1, ctypes.addressof(params)))
# x32 getpid: __X32_SYSCALL_BIT | 39
print("x32_getpid", call(0x40000000 | 39))
print("getpid_ok", call(39) == os.getpid())
"#;

#[test]
fn io_uring_and_x32_are_refused() {
    if Command::new("python3").arg("-V").output().is_err() {
        eprintln!("SKIP: python3 not found");
        return;
    }
    let under = run_under_filter("python3", &["-c", RAW_SYSCALLS]);
    assert!(under.contains("io_uring_setup -38"), "{under}");
    assert!(under.contains("x32_getpid -38"), "{under}");
    assert!(under.contains("getpid_ok True"), "{under}");
    let native = run_native("python3", &["-c", RAW_SYSCALLS]);
    assert!(
        !native.contains("io_uring_setup -38"),
        "natively io_uring is not ENOSYS: {native}"
    );
}

const INT80: &str = r#"
#include <stdio.h>
int main(void) {
    long ret;
    /* socketcall(SYS_CONNECT, NULL) through the 32-bit ABI. */
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(102L), "b"(3L), "c"(0L) : "memory");
    printf("int80_socketcall %ld\n", ret);
    /* getpid through the 32-bit ABI. */
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
    printf("int80_getpid %ld\n", ret);
    return 0;
}
"#;

#[test]
#[cfg(target_arch = "x86_64")]
fn int80_cannot_bypass_the_trap() {
    let dir = std::env::temp_dir().join(format!("ax-int80-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("int80.c");
    let bin = dir.join("int80");
    std::fs::write(&src, INT80).unwrap();
    let built = Command::new("cc")
        .arg("-O0")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status();
    if !matches!(built, Ok(s) if s.success()) {
        eprintln!("SKIP: no C compiler");
        return;
    }
    let bin_s = bin.to_str().unwrap();
    let native = run_native(bin_s, &[]);
    let under = run_under_filter(bin_s, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    if native.contains("int80_getpid -38") {
        eprintln!("SKIP: this kernel has no 32-bit emulation ({native})");
        return;
    }
    // Natively the 32-bit socketcall reaches the socket layer (EFAULT on a
    // NULL argument block); under ax the whole foreign ABI is ENOSYS.
    assert!(!native.contains("int80_socketcall -38"), "{native}");
    assert!(under.contains("int80_socketcall -38"), "{under}");
    assert!(under.contains("int80_getpid -38"), "{under}");
}

/// Sends on a UNIX socket pair only (nothing leaves the machine, in or out
/// of a network namespace). The kernel ignores `MSG_FASTOPEN` there; the
/// broker refuses it (`EOPNOTSUPP`, 95), which shows the call was trapped.
const SENDS: &str = r#"
import socket
a, b = socket.socketpair()
def attempt(name, f):
    try:
        f()
        print(name, "sent", b.recv(16))
    except OSError as e:
        print(name, "errno", e.errno)
attempt("send", lambda: a.send(b"x"))
attempt("sendmsg", lambda: a.sendmsg([b"y"], [], socket.MSG_DONTWAIT))
attempt("fastopen", lambda: a.sendmsg([b"z"], [], socket.MSG_FASTOPEN))
attempt("fastopen_more_flags",
        lambda: a.sendmsg([b"w"], [], socket.MSG_FASTOPEN | socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL))
"#;

#[test]
fn fast_open_is_trapped_and_plain_sends_are_not() {
    if Command::new("python3").arg("-V").output().is_err() {
        eprintln!("SKIP: python3 not found");
        return;
    }
    let native = run_native("python3", &["-c", SENDS]);
    assert!(native.contains("fastopen sent b'z'"), "{native}");
    let under = run_under_filter("python3", &["-c", SENDS]);
    assert!(under.contains("send sent b'x'"), "{under}");
    assert!(under.contains("sendmsg sent b'y'"), "{under}");
    assert!(under.contains("fastopen errno 95"), "{under}");
    assert!(under.contains("fastopen_more_flags errno 95"), "{under}");
}
