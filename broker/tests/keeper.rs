//! The fd keeper, end to end: a process that accepted a connection for a
//! server (as a daemon does) is killed with SIGKILL; its keeper closes
//! everything else at once and holds that connection until a successor
//! collects it, data intact.
//!
//! The "daemon" is this test binary run again as a child (with
//! `AX_KEEPER_TEST_CHILD` set), so that the parent can kill it.

use ax_broker::keeper::{salvage, FdKeeper};
use ax_broker::BrokerConfig;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const INSTANCE: u32 = 0x5eed_0001;

fn config() -> BrokerConfig {
    BrokerConfig {
        instance: INSTANCE,
        ..BrokerConfig::default()
    }
}

/// The child: listens under an ax listener name, connects an unbound
/// client as ax does, accepts (holding the server end, as a daemon does
/// between `accept` and handing it over), starts its keeper, says so, and
/// waits to be killed. The client end goes to the parent by path.
#[test]
fn child_role() {
    let Ok(dir) = std::env::var("AX_KEEPER_TEST_CHILD") else {
        return;
    };
    let tag = format!("ax/{INSTANCE:08x}/");
    // Names unique to this run: the port is taken from the pid.
    let port = std::process::id() % 60000 + 1;
    let l_text = format!("{tag}l4/7/0.0.0.0/{port}");
    let listener =
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(&l_text).unwrap()).unwrap();
    // A client connected to the listener: through
    // a plain path socket the parent can reach, the parent gets the bytes.
    let relay = UnixListener::bind(format!("{dir}/relay.sock")).unwrap();
    let c = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        None,
    )
    .unwrap();
    // Unbound, as the broker's client sockets are (their identity travels
    // apart, see the broker's `idents`).
    let l_name = rustix::net::SocketAddrUnix::new_abstract_name(l_text.as_bytes()).unwrap();
    rustix::net::connect(&c, &l_name).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    // Hand the client end to the parent (it outlives us there).
    let (to_parent, _) = relay.accept().unwrap();
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = rustix::net::SendAncillaryBuffer::new(&mut space);
    let fds = [std::os::fd::AsFd::as_fd(&c)];
    anc.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(
        &to_parent,
        &[std::io::IoSlice::new(b"c")],
        &mut anc,
        rustix::net::SendFlags::empty(),
    )
    .unwrap();
    let keeper = FdKeeper::start(&config()).unwrap();
    println!("READY {}", keeper.pid());
    std::io::stdout().flush().unwrap();
    let _hold = (accepted, listener, keeper);
    std::thread::sleep(Duration::from_secs(60));
}

/// Kills a pid when dropped (also on panic): nothing this test starts may
/// outlive it.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.0 as i32).expect("pid"),
            rustix::process::Signal::KILL,
        );
    }
}

#[test]
fn a_killed_process_keeps_its_accepted_connection_for_a_successor() {
    if std::env::var_os("AX_KEEPER_TEST_CHILD").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ax-keeper-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env("AX_KEEPER_TEST_CHILD", &dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _child_guard = KillOnDrop(child.id());
    // The client end, from the child.
    let relay_path = dir.join("relay.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    let relay = loop {
        if let Ok(s) = UnixStream::connect(&relay_path) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "child never offered the client end"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        &relay,
        &mut [std::io::IoSliceMut::new(&mut byte)],
        &mut anc,
        rustix::net::RecvFlags::empty(),
    )
    .unwrap();
    let client = anc
        .drain()
        .find_map(|m| match m {
            rustix::net::RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .expect("client fd");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let keeper_pid: u32 = loop {
        let line = lines.next().expect("child output").unwrap();
        // libtest prints "test child_role ... " without a newline first.
        if let Some(at) = line.find("READY ") {
            break line[at + 6..].trim().parse().unwrap();
        }
    };
    let start = std::fs::read_to_string(format!("/proc/{keeper_pid}/stat"))
        .ok()
        .and_then(|s| {
            s[s.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .nth(19)?
                .parse::<u64>()
                .ok()
        })
        .unwrap();
    let _keeper_guard = KillOnDrop(keeper_pid);

    // The client writes; the "daemon" dies holding the server end.
    let mut client = UnixStream::from(client);
    client.write_all(b"in flight\n").unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    drop(relay);

    // The keeper closed all but the accepted connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fds = std::fs::read_dir(format!("/proc/{keeper_pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        if fds == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "keeper still holds {fds} fds");
        std::thread::sleep(Duration::from_millis(10));
    }

    // A successor collects it, by app, and the keeper ends.
    let mut saved = salvage(keeper_pid, start, &config());
    let conns = saved.remove(&7).expect("the connection of app 7");
    assert_eq!(conns.len(), 1);
    assert!(saved.is_empty());
    let mut server = UnixStream::from(conns.into_iter().next().unwrap());
    let mut got = [0u8; 10];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"in flight\n");
    server.write_all(b"answered\n").unwrap();
    let mut back = [0u8; 9];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"answered\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{keeper_pid}/comm"))
        .is_ok_and(|c| c.trim() == ax_sys::keeper::KEEPER_COMM)
        && std::fs::read_to_string(format!("/proc/{keeper_pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z"))
    {
        assert!(Instant::now() < deadline, "the keeper outlived its salvage");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
