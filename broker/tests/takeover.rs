//! A broker taking over an app from one that died at the worst moment:
//! after receiving a call and before recording it in the journal. The
//! kernel shows that call to no later `RECV`; the successor must find it
//! (its id above the journal's high-water mark, its thread by `/proc`) and
//! finish it, or the program's thread waits for ever.

use ax_broker::{launch, Broker, BrokerConfig};
use ax_registry::{AppSpec, LocalRegistry};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Two address queries on a fresh TCP socket: both are trapped (and let
/// through, as the socket is not one ax swapped).
const PROGRAM: &str = r#"
import socket
s = socket.socket()
a = s.getsockname()
b = s.getsockname()
print("DONE", a, b, flush=True)
"#;

#[test]
fn a_call_received_but_never_recorded_is_finished_by_the_successor() {
    if Command::new("python3").arg("-V").output().is_err() {
        eprintln!("SKIP: python3 not found");
        return;
    }
    let registry = Arc::new(LocalRegistry::default());
    let app = registry
        .register_app(&AppSpec::default(), 0)
        .expect("register");
    let filter = launch::compile_filter().expect("filter");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PROGRAM])
        .env("HOME", std::env::temp_dir())
        .stdout(Stdio::piped());
    let sandboxed = launch::spawn(&mut cmd, &filter).expect("spawn");
    let mut child = sandboxed.child;
    let listener = sandboxed.listener;
    let journal_fd = ax_sys::journal::create().expect("journal");
    let journal = ax_sys::journal::Journal::map(journal_fd.try_clone().expect("dup")).expect("map");

    // The dying daemon: answers the first getsockname (recording it), then
    // receives the second and dies before recording it.
    let mut getsocknames = 0;
    loop {
        let n = listener.recv().expect("recv");
        if n.nr as libc::c_long == libc::SYS_getsockname {
            getsocknames += 1;
            if getsocknames == 2 {
                break; // received, never recorded, never answered
            }
        }
        journal.record(&n);
        listener.respond_continue(n.id).expect("continue");
        journal.clear(n.id);
    }

    // The successor.
    let broker = Broker::new(registry.clone(), BrokerConfig::default());
    let successor_journal = ax_sys::journal::Journal::map(journal_fd).expect("map");
    let session = broker
        .serve_with_journal(
            app.id,
            listener.try_clone().expect("dup listener"),
            Some(successor_journal),
            None,
            Some(child.id()),
        )
        .expect("serve");
    drop(listener);

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the program still waits in the call the dead broker received");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    assert!(status.success(), "{status:?}: {out}");
    assert!(
        out.starts_with("DONE ('0.0.0.0', 0) ('0.0.0.0', 0)"),
        "{out}"
    );
    session.join();
}
