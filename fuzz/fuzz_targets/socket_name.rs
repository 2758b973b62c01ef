//! `ax_broker::SocketName`: the abstract names of the UNIX sockets ax
//! installs, which the broker parses back from any socket a program holds.
//!
//! Properties: `parse` never panics; whatever parses encodes to at most
//! `MAX_NAME_LEN` bytes and parses back to itself; and the same holds for
//! any name built from arbitrary fields (so that every name the broker can
//! make fits in `sun_path` and is recognised again).

#![no_main]

use ax_broker::{Reuseport, SocketName, MAX_NAME_LEN};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, SocketAddr};

fn check(name: SocketName) {
    let enc = name.encode();
    assert!(
        enc.len() <= MAX_NAME_LEN,
        "{name:?} encodes to {} bytes",
        enc.len()
    );
    assert!(!enc.contains(&0), "{name:?} encodes with a NUL");
    assert_eq!(SocketName::parse(&enc), Some(name));
}

fn addr(u: &mut Unstructured<'_>) -> Result<SocketAddr> {
    Ok(SocketAddr::new(u.arbitrary::<IpAddr>()?, u.arbitrary()?))
}

fn built(u: &mut Unstructured<'_>) -> Result<SocketName> {
    Ok(if u.arbitrary()? {
        SocketName::Listener {
            instance: u.arbitrary()?,
            v6: u.arbitrary()?,
            app: u.arbitrary()?,
            bound: addr(u)?,
            reuseport: if u.arbitrary()? {
                Some(Reuseport {
                    uid: u.arbitrary()?,
                    id: u.arbitrary()?,
                })
            } else {
                None
            },
        }
    } else {
        SocketName::Client {
            instance: u.arbitrary()?,
            v6: u.arbitrary()?,
            local: addr(u)?,
            peer: addr(u)?,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if let Some(name) = SocketName::parse(data) {
        check(name);
    }
    if let Ok(name) = built(&mut Unstructured::new(data)) {
        check(name);
    }
});
