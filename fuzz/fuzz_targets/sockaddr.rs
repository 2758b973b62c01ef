//! The broker's `sockaddr` parser (`addr::parse`/`addr::encode`, reached
//! through `ax_broker::fuzzing::sockaddr`), for both socket families and
//! both `bind` and `connect`.
//!
//! Properties (besides those `fuzzing::sockaddr` asserts): nothing panics,
//! and bytes past the family's struct never change the answer, as in the
//! kernel, which copies at most `addrlen` bytes and reads only its struct.

#![no_main]

use ax_broker::fuzzing::sockaddr;
use libfuzzer_sys::fuzz_target;

/// `sizeof(struct sockaddr_in)`, `sizeof(struct sockaddr_in6)`.
const IN_LEN: usize = 16;
const IN6_LEN: usize = 28;

fuzz_target!(|data: &[u8]| {
    let all = sockaddr(data);
    if data.len() > IN_LEN {
        assert_eq!(
            sockaddr(&data[..IN_LEN])[0],
            all[0],
            "v4 read past its struct"
        );
    }
    if data.len() > IN6_LEN {
        assert_eq!(
            sockaddr(&data[..IN6_LEN])[1],
            all[1],
            "v6 read past its struct"
        );
    }
});
