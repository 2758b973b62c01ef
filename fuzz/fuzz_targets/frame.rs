//! The control socket's frame decoder: `body_len` on the 4-byte prefix,
//! then `decode::<Request>` and `decode::<Response>` on the body, as the
//! daemon and the CLI read them.
//!
//! Properties: nothing panics; the memory decoding holds at once is linear
//! in the body's length (see `alloc_bound`); whatever decodes re-encodes, no
//! longer than its input, into a frame that decodes to the same value and
//! re-encodes to the same bytes.
//!
//! Input: a whole frame (length prefix and body). When the prefix is
//! refused or longer than the data, the rest of the input is decoded
//! anyway, so that mutations of the prefix do not waste runs.

#![no_main]

use ax_proto::{body_len, decode, encode, FrameError, Request, Response, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Counts the bytes held by Rust allocations, and their peak.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to `System` unchanged and only keeps counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let held = HELD.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(held, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HELD.fetch_sub(layout.size(), Relaxed);
            let held = HELD.fetch_add(new_size, Relaxed) + new_size;
            PEAK.fetch_max(held, Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most a body of `len` bytes may make the decoder hold at once.
/// postcard refuses a sequence length larger than the input left, so serde
/// preallocates at most `len` elements per nesting level (an `AppInfo` is
/// 120 bytes), and every decoded element costs at least one input byte (an
/// empty `String` is 1 byte of input and 24 in a `Vec<String>`); a
/// `BTreeMap` node costs a few hundred bytes. Measured peak: about 140
/// bytes per input byte. Trusting a length prefix would blow this at once.
fn alloc_bound(len: usize) -> usize {
    4096 + 256 * len
}

fuzz_target!(|data: &[u8]| {
    let Some((prefix, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let announced = u32::from_be_bytes(*prefix) as usize;
    let body = match body_len(*prefix) {
        Ok(len) => {
            assert_eq!(len, announced);
            assert!(len <= MAX_FRAME_LEN);
            rest.get(..len).unwrap_or(rest)
        }
        Err(FrameError::TooLarge(len)) => {
            assert_eq!(len, announced);
            assert!(len > MAX_FRAME_LEN);
            rest
        }
        Err(e) => panic!("body_len failed otherwise than TooLarge: {e}"),
    };
    check::<Request>(body);
    check::<Response>(body);
});

fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(body: &[u8]) {
    let base = HELD.load(Relaxed);
    PEAK.store(base, Relaxed);
    let decoded = decode::<T>(body);
    let used = PEAK.load(Relaxed) - base;
    assert!(
        used <= alloc_bound(body.len()),
        "decoding {} bytes held {used} bytes at once",
        body.len()
    );
    let value = match decoded {
        Ok(v) => v,
        Err(FrameError::Version(v)) => {
            assert_ne!(v, ax_proto::PROTOCOL_VERSION);
            return;
        }
        Err(FrameError::Malformed(_)) => return,
        Err(e @ FrameError::TooLarge(_)) => panic!("decode: {e}"),
    };
    let frame = encode(&value).expect("a decoded value re-encodes");
    let len = body_len(frame[..4].try_into().unwrap()).expect("re-encoded prefix");
    assert_eq!(len, frame.len() - 4);
    assert!(
        len <= body.len(),
        "re-encoding grew {} bytes into {len}: {value:?}",
        body.len()
    );
    let again: T = decode(&frame[4..]).expect("a re-encoded frame decodes");
    assert_eq!(again, value);
    assert_eq!(encode(&again).unwrap(), frame, "encoding is not canonical");
}
