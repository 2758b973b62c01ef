//! Gossip authenticated with the cluster key.
//!
//! chitchat's own UDP transport sends its messages as they are; with a
//! cluster key every datagram is sealed instead: `AXG1`, a flag (0: as is,
//! 1: zstd-compressed, for a message that would not fit a datagram with
//! the tag), the message, and an HMAC-SHA256 tag over all of it. Datagrams
//! without a valid tag are dropped unread.
//!
//! chitchat keeps its wire format to itself, so the message is encoded and
//! decoded by chitchat's own UDP socket, bound to a loopback port, talking
//! only to a relay socket of this transport on another loopback port: a
//! message to send goes inner → relay, is sealed and leaves by the outer
//! socket (`--cluster`); a datagram received there is checked, opened and
//! goes relay → inner, where chitchat decodes it.

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use chitchat::ChitchatEnvelope;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;
/// First bytes of a sealed datagram.
const MAGIC: &[u8; 4] = b"AXG1";
/// Length of the tag.
const TAG: usize = 32;
/// How long a message handed to chitchat's decoder may take to come back.
const DECODE_WAIT: Duration = Duration::from_millis(200);

type HmacSha256 = Hmac<Sha256>;

fn tag(key: &[u8], data: &[u8]) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(data);
    Some(mac)
}

/// `message` sealed with `key`, or `None` if it cannot fit a datagram.
pub(crate) fn seal(key: &[u8], message: &[u8]) -> Option<Vec<u8>> {
    let fits = MAGIC.len() + 1 + message.len() + TAG <= MAX_DATAGRAM;
    let (flag, body) = if fits {
        (0u8, message.to_vec())
    } else {
        (1u8, zstd::bulk::compress(message, 3).ok()?)
    };
    let mut out = Vec::with_capacity(MAGIC.len() + 1 + body.len() + TAG);
    out.extend_from_slice(MAGIC);
    out.push(flag);
    out.extend_from_slice(&body);
    let mac = tag(key, &out)?.finalize().into_bytes();
    out.extend_from_slice(&mac);
    (out.len() <= MAX_DATAGRAM).then_some(out)
}

/// The message in `datagram`, if `key` sealed it.
pub(crate) fn open(key: &[u8], datagram: &[u8]) -> Option<Vec<u8>> {
    let body_end = datagram.len().checked_sub(TAG)?;
    if body_end < MAGIC.len() + 1 || &datagram[..MAGIC.len()] != MAGIC {
        return None;
    }
    let (signed, mac) = datagram.split_at(body_end);
    tag(key, signed)?.verify_slice(mac).ok()?;
    let body = &signed[MAGIC.len() + 1..];
    match signed[MAGIC.len()] {
        0 => Some(body.to_vec()),
        1 => zstd::bulk::decompress(body, 2 * MAX_DATAGRAM).ok(),
        _ => None,
    }
}

/// chitchat's transport with sealed datagrams.
#[derive(Debug)]
pub(crate) struct SealedTransport {
    pub(crate) key: Arc<Vec<u8>>,
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let outer = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let relay = tokio::net::UdpSocket::bind(loopback)
            .await
            .context("failed to bind a loopback UDP port for gossip (is lo up?)")?;
        let inner = UdpSocket::open(loopback).await?;
        let inner_addr = inner.local_addr()?;
        let relay_addr = relay.local_addr()?;
        Ok(Box::new(SealedSocket {
            key: self.key.clone(),
            outer,
            relay,
            relay_addr,
            inner,
            inner_addr,
            buf: vec![0; MAX_DATAGRAM],
            pending: VecDeque::new(),
            warned: None,
        }))
    }
}

struct SealedSocket {
    key: Arc<Vec<u8>>,
    /// On `--cluster`: sealed datagrams to and from the other nodes.
    outer: tokio::net::UdpSocket,
    /// On loopback: chitchat's encoded messages to and from `inner`.
    relay: tokio::net::UdpSocket,
    relay_addr: SocketAddr,
    /// chitchat's own socket, which encodes and decodes.
    inner: UdpSocket,
    inner_addr: SocketAddr,
    buf: Vec<u8>,
    /// Senders (and sizes) of messages handed to `inner`, not decoded yet.
    pending: VecDeque<(SocketAddr, usize)>,
    /// When an unauthenticated datagram was last logged.
    warned: Option<Instant>,
}

fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::OutOfMemory
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
    ) || matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::NETUNREACH | rustix::io::Errno::HOSTUNREACH)
    )
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.outer
            .local_addr()
            .context("failed to get UDP socket address")
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.inner.send(self.relay_addr, envelope).await?;
        let n = loop {
            let (n, from) = self.relay.recv_from(&mut self.buf).await?;
            if from == self.inner_addr {
                break n;
            }
        };
        let Some(sealed) = seal(&self.key, &self.buf[..n]) else {
            tracing::warn!(bytes = n, %to, "gossip message too large to seal; not sent");
            return Ok(SendOutcome { num_bytes_sent: 0 });
        };
        match self.outer.send_to(&sealed, to).await {
            Ok(_) => {}
            Err(e) if transient(&e) => tracing::debug!(%to, error = %e, "gossip not sent"),
            Err(e) => return Err(e).context("failed to send gossip"),
        }
        Ok(SendOutcome { num_bytes_sent: n })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if self.pending.is_empty() {
                let (n, from) = match self.outer.recv_from(&mut self.buf).await {
                    Ok(r) => r,
                    Err(e) if transient(&e) => continue,
                    Err(e) => return Err(e).context("fatal UDP recv error"),
                };
                let Some(message) = open(&self.key, &self.buf[..n]) else {
                    if self
                        .warned
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                    {
                        self.warned = Some(Instant::now());
                        tracing::warn!(%from, "gossip datagram not authenticated by the cluster key: dropped (logged at most every 10 s)");
                    }
                    continue;
                };
                self.relay.send_to(&message, self.inner_addr).await?;
                self.pending.push_back((from, n));
            }
            let decoded = match tokio::time::timeout(DECODE_WAIT, self.inner.recv()).await {
                Ok(r) => r?,
                Err(_) => {
                    // chitchat did not decode it (a message it rejects).
                    self.pending.pop_front();
                    continue;
                }
            };
            // Only what the relay handed over (loopback sources cannot be
            // forged without privileges).
            if decoded.from_addr != self.relay_addr {
                continue;
            }
            if let Some((from, n)) = self.pending.pop_front() {
                return Ok(RecvOutcome {
                    from_addr: from,
                    envelope: decoded.envelope,
                    num_bytes_received: n,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_refuses_other_keys() {
        let key = b"0123456789abcdef";
        let sealed = seal(key, b"hello").unwrap();
        assert_eq!(open(key, &sealed).as_deref(), Some(&b"hello"[..]));
        assert_eq!(open(b"another key 1234", &sealed), None);
        let mut tampered = sealed.clone();
        tampered[5] ^= 1;
        assert_eq!(open(key, &tampered), None);
        assert_eq!(open(key, b"AXG1"), None);
        assert_eq!(open(key, b""), None);
    }

    #[test]
    fn large_messages_are_compressed_to_fit() {
        let key = b"0123456789abcdef";
        let big = vec![b'x'; MAX_DATAGRAM - 10];
        let sealed = seal(key, &big).unwrap();
        assert!(sealed.len() <= MAX_DATAGRAM);
        assert_eq!(open(key, &sealed), Some(big));
    }
}
