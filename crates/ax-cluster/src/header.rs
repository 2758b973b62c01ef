//! The header a connection between hosts starts with: which service it is
//! for and which client it comes from, authenticated with the cluster key
//! and protected against replay when there is one.
//!
//! Wire format: `AXC1`, a 2-byte big-endian length, that many bytes of JSON
//! ([`Header`]), then 32 bytes of HMAC-SHA256 over everything before them
//! (zeros without a key). The server reads exactly these bytes and nothing
//! of the program's data behind them.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first bytes of every header.
pub const MAGIC: &[u8; 4] = b"AXC1";
/// Largest JSON body accepted.
pub const MAX_BODY: usize = 8192;
/// Length of the authentication tag.
pub const MAC_LEN: usize = 32;
/// A header older or newer than this (by its sender's clock) is refused.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(30);

type HmacSha256 = Hmac<Sha256>;

/// What a client's host says about a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The VIP:port the client dialled.
    pub dst: SocketAddr,
    /// The client's VIP:port.
    pub from: SocketAddr,
    /// The client app's id on its host.
    pub app: u64,
    /// The client app's labels.
    pub labels: BTreeMap<String, String>,
    /// The client's host (`--node`).
    pub node: String,
    /// When it was written, in milliseconds since the Unix epoch.
    pub ts: u64,
    /// A random number, never accepted twice within the replay window.
    pub nonce: u64,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a header of ax.
    #[error("not an ax cluster header")]
    BadMagic,
    /// Longer than [`MAX_BODY`].
    #[error("header of {0} bytes is too long")]
    TooLong(usize),
    /// The JSON does not parse.
    #[error("malformed header: {0}")]
    Malformed(String),
    /// The tag does not match this cluster's key.
    #[error("header not authenticated by the cluster key")]
    BadMac,
    /// Outside the replay window.
    #[error("header timestamp outside the {}-second window", REPLAY_WINDOW.as_secs())]
    Stale,
    /// Seen before.
    #[error("header replayed")]
    Replayed,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A random number (the time, without a source of randomness).
pub(crate) fn random() -> u64 {
    let mut b = [0u8; 8];
    // Without randomness the nonce is the time: unique enough per host,
    // and the replay check still rejects exact copies.
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        return now_ms();
    }
    u64::from_ne_bytes(b)
}

fn tag(key: &[u8], data: &[u8]) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(data);
    Some(mac)
}

impl Header {
    /// A header for a connection written now.
    pub fn new(
        dst: SocketAddr,
        from: SocketAddr,
        app: u64,
        labels: BTreeMap<String, String>,
        node: String,
    ) -> Self {
        Self {
            dst,
            from,
            app,
            labels,
            node,
            ts: now_ms(),
            nonce: random(),
        }
    }

    /// The bytes on the wire, authenticated with `key` if given.
    pub fn encode(&self, key: Option<&[u8]>) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
        let mut out = Vec::with_capacity(6 + body.len() + MAC_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        let mac = key
            .and_then(|k| tag(k, &out))
            .map(|m| m.finalize().into_bytes().to_vec())
            .unwrap_or_else(|| vec![0; MAC_LEN]);
        out.extend_from_slice(&mac);
        out
    }

    /// The body length announced by the first 6 bytes.
    pub fn body_len(prefix: &[u8; 6]) -> Result<usize, HeaderError> {
        if &prefix[..4] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let len = usize::from(u16::from_be_bytes([prefix[4], prefix[5]]));
        if len > MAX_BODY {
            return Err(HeaderError::TooLong(len));
        }
        Ok(len)
    }

    /// Checks and parses a whole header (`prefix`, `body`, `mac`): with a
    /// key, the tag, the time window and `replay`.
    pub fn decode(
        prefix: &[u8; 6],
        body: &[u8],
        mac: &[u8; MAC_LEN],
        key: Option<&[u8]>,
        replay: &mut Replay,
    ) -> Result<Header, HeaderError> {
        if Self::body_len(prefix)? != body.len() {
            return Err(HeaderError::Malformed("length mismatch".into()));
        }
        if let Some(key) = key {
            let mut signed = Vec::with_capacity(6 + body.len());
            signed.extend_from_slice(prefix);
            signed.extend_from_slice(body);
            let m = tag(key, &signed).ok_or(HeaderError::BadMac)?;
            m.verify_slice(mac).map_err(|_| HeaderError::BadMac)?;
        }
        let header: Header =
            serde_json::from_slice(body).map_err(|e| HeaderError::Malformed(e.to_string()))?;
        if key.is_some() {
            replay.check(header.ts, header.nonce, now_ms())?;
        }
        Ok(header)
    }
}

/// Nonces seen within the replay window.
#[derive(Debug, Default)]
pub struct Replay {
    seen: HashMap<u64, u64>,
}

/// At most this many nonces are remembered; past it, the oldest go first.
const MAX_NONCES: usize = 1 << 20;

impl Replay {
    /// Accepts `(ts, nonce)` once, if `ts` is within the window of `now`.
    pub fn check(&mut self, ts: u64, nonce: u64, now: u64) -> Result<(), HeaderError> {
        let window = u64::try_from(REPLAY_WINDOW.as_millis()).unwrap_or(u64::MAX);
        if ts.abs_diff(now) > window {
            return Err(HeaderError::Stale);
        }
        if self.seen.len() >= MAX_NONCES / 2 {
            self.seen.retain(|_, t| t.abs_diff(now) <= window);
        }
        if self.seen.len() >= MAX_NONCES {
            return Err(HeaderError::Replayed);
        }
        if self.seen.insert(nonce, ts).is_some() {
            return Err(HeaderError::Replayed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(bytes: &[u8]) -> ([u8; 6], Vec<u8>, [u8; MAC_LEN]) {
        let prefix: [u8; 6] = bytes[..6].try_into().unwrap();
        let len = Header::body_len(&prefix).unwrap();
        let body = bytes[6..6 + len].to_vec();
        let mac: [u8; MAC_LEN] = bytes[6 + len..].try_into().unwrap();
        (prefix, body, mac)
    }

    fn header() -> Header {
        Header::new(
            "10.233.0.2:80".parse().unwrap(),
            "10.233.0.9:4000".parse().unwrap(),
            3,
            BTreeMap::from([("tier".into(), "web".into())]),
            "a".into(),
        )
    }

    #[test]
    fn round_trips_with_the_key_and_refuses_another() {
        let h = header();
        let wire = h.encode(Some(b"secret-secret-secret"));
        let (p, b, m) = split(&wire);
        let mut replay = Replay::default();
        assert_eq!(
            Header::decode(&p, &b, &m, Some(b"secret-secret-secret"), &mut replay),
            Ok(h)
        );
        assert_eq!(
            Header::decode(
                &p,
                &b,
                &m,
                Some(b"other-key-other-key"),
                &mut Replay::default()
            ),
            Err(HeaderError::BadMac)
        );
        // The same header again: a replay.
        assert_eq!(
            Header::decode(&p, &b, &m, Some(b"secret-secret-secret"), &mut replay),
            Err(HeaderError::Replayed)
        );
    }

    #[test]
    fn unkeyed_header_is_refused_by_a_keyed_node() {
        let wire = header().encode(None);
        let (p, b, m) = split(&wire);
        assert_eq!(
            Header::decode(&p, &b, &m, Some(b"k"), &mut Replay::default()),
            Err(HeaderError::BadMac)
        );
        assert!(Header::decode(&p, &b, &m, None, &mut Replay::default()).is_ok());
    }

    #[test]
    fn stale_and_garbage_are_refused() {
        let mut r = Replay::default();
        assert_eq!(r.check(0, 1, 100_000), Err(HeaderError::Stale));
        assert_eq!(Header::body_len(b"GET / "), Err(HeaderError::BadMagic));
        assert_eq!(
            Header::body_len(&[b'A', b'X', b'C', b'1', 0xff, 0xff]),
            Err(HeaderError::TooLong(65535))
        );
    }
}
