//! Wire types between `ax exec`, the `ax` CLI and `ax daemon`.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! postcard-encoded [`Frame`]. Every frame carries [`PROTOCOL_VERSION`]; a
//! peer that speaks another version gets [`Response::Error`] and the
//! connection is closed. Frames above [`MAX_FRAME_LEN`] are refused before
//! they are read.
//!
//! The launcher hands its notify fd to the daemon as `SCM_RIGHTS` ancillary
//! data on the frame carrying [`Request::AttachListener`].

use ax_registry::{AppId, AppInfo, AppSpec, DeclaredService, LbMode, RegisterError, ServiceInfo};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::net::SocketAddr;

/// Version of this protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 3;

/// Largest accepted frame body, in bytes.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// One message on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame<T> {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// The message.
    pub body: T,
}

/// What a client asks the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness and version check.
    Ping,
    /// Registers an app (reserving its VIPs) before its program starts.
    RegisterApp(AppSpec),
    /// Hands over the notify fd (attached as `SCM_RIGHTS`, optionally
    /// followed by a journal memfd, see `ax_sys::journal`) of a registered
    /// app whose program has pid `pid`. The app lives as long as any of its
    /// processes does.
    AttachListener {
        /// The app, as returned by `RegisterApp`.
        app: AppId,
        /// The program's pid.
        pid: u32,
    },
    /// After a daemon restart: hands over an app registered with a
    /// predecessor, keeping its id and VIPs. Carries the notify fd and the
    /// journal memfd as `SCM_RIGHTS`, like `AttachListener`.
    ReattachApp(AppInfo),
    /// Lists apps.
    ListApps,
    /// Lists services.
    ListServices,
    /// Makes a service reachable from outside ax: the daemon listens on
    /// `host` and hands each connection to the service's server, whose
    /// `accept` returns the TCP connection itself.
    Expose {
        /// A name (`web`, `web.ax`) or a VIP.
        target: String,
        /// The service's port.
        port: u16,
        /// The host address and port to listen on (port 0: any free one).
        host: SocketAddr,
        /// Tie the exposure to this app's life (`ax exec --expose`);
        /// otherwise it lasts while any app holds the target's VIP.
        owner: Option<AppId>,
    },
    /// Stops listening on an exposed host address.
    Unexpose {
        /// The host address and port, as `ListExposures` shows it.
        host: SocketAddr,
    },
    /// Lists exposures.
    ListExposures,
    /// Declares a service before its apps (`ax service create`): its name
    /// resolves at once, and apps started with that `--name` become its
    /// backends.
    CreateService {
        /// The name.
        name: String,
        /// `--ip`: its VIPs (empty: allocated, one of each family).
        ips: Vec<IpAddr>,
        /// `--lb`.
        lb: Option<LbMode>,
    },
    /// Deletes a declared service (`ax service delete`).
    DeleteService {
        /// The name.
        name: String,
        /// Delete even while apps named after it run.
        force: bool,
    },
    /// Lists the hosts of the cluster (`ax get nodes`); empty without
    /// `--cluster`.
    ListNodes,
}

/// Whether a host of a cluster answers, as its failure detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Heard from within the last gossip rounds.
    Alive,
    /// Still counted alive, but silent for longer than usual.
    Suspect,
    /// Silent long enough to be declared dead: its apps and services are
    /// withdrawn.
    Dead,
}

impl NodeState {
    /// `alive`, `suspect` or `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Alive => "alive",
            NodeState::Suspect => "suspect",
            NodeState::Dead => "dead",
        }
    }
}

/// An app as a host of a cluster publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeApp {
    /// Its id on that host.
    pub id: AppId,
    /// Its VIPs.
    pub vips: Vec<IpAddr>,
    /// Its names.
    pub names: Vec<String>,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// `--lb`, if given.
    pub lb: Option<LbMode>,
    /// Its command line.
    pub command: Vec<String>,
}

/// A service as a host of a cluster publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeService {
    /// Its VIP:port.
    pub addr: SocketAddr,
    /// The names it is reached by.
    pub names: Vec<String>,
    /// Its load-balancing mode.
    pub lb: LbMode,
    /// The apps (on that host) serving it.
    pub apps: Vec<AppId>,
}

/// A host of a cluster (`ax get nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `--node`.
    pub name: String,
    /// `--cluster`: its gossip (UDP) and connection (TCP) address.
    pub address: SocketAddr,
    /// Alive, suspect or dead.
    pub state: NodeState,
    /// True for the host that answered.
    pub local: bool,
    /// Its apps.
    pub apps: Vec<NodeApp>,
    /// Its services.
    pub services: Vec<NodeService>,
}

/// A service reachable at a host address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposureInfo {
    /// The VIP and port connections are handed to.
    pub service: SocketAddr,
    /// The name it was asked for by, if any.
    pub name: Option<String>,
    /// Where the daemon listens.
    pub host: SocketAddr,
    /// The app whose life it shares, if any.
    pub owner: Option<AppId>,
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Ping`.
    Pong {
        /// The daemon's version string.
        daemon_version: String,
        /// The daemon's pid.
        pid: u32,
    },
    /// The app was registered.
    AppRegistered(AppInfo),
    /// Registration was refused.
    RegisterFailed(RegisterError),
    /// The notify fd was taken; the daemon now serves the app.
    Attached,
    /// Answer to `ListApps`.
    Apps(Vec<AppInfo>),
    /// Answer to `ListServices`.
    Services(Vec<ServiceInfo>),
    /// Answer to `Expose`: where the daemon listens.
    Exposed(ExposureInfo),
    /// Answer to `Unexpose`.
    Unexposed,
    /// Answer to `ListExposures`.
    Exposures(Vec<ExposureInfo>),
    /// The request could not be served.
    Error(String),
    /// Answer to `CreateService`.
    ServiceCreated(DeclaredService),
    /// Answer to `DeleteService`.
    ServiceDeleted(DeclaredService),
    /// The hosts of the cluster.
    Nodes(Vec<NodeInfo>),
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    /// The peer speaks another protocol version.
    #[error("protocol version {0} is not supported (this side speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Encodes `body` as a complete frame, length prefix included.
pub fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>, FrameError> {
    let frame = Frame {
        version: PROTOCOL_VERSION,
        body,
    };
    let mut out = vec![0u8; 4];
    out = postcard::to_extend(&frame, out)?;
    let len = out.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads the body length from a 4-byte prefix, refusing oversized frames.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        Err(FrameError::TooLarge(len))
    } else {
        Ok(len)
    }
}

/// Decodes a frame body (without its length prefix).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    // Check the version before trusting the rest of the layout.
    let (version, _) = postcard::take_from_bytes::<u16>(body)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    let frame: Frame<T> = postcard::from_bytes(body)?;
    Ok(frame.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let req = Request::RegisterApp(AppSpec {
            names: vec!["web".into()],
            ..AppSpec::default()
        });
        let bytes = encode(&req).unwrap();
        let len = body_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(decode::<Request>(&bytes[4..]).unwrap(), req);
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(matches!(
            body_len((MAX_FRAME_LEN as u32 + 1).to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            decode::<Request>(&[]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Request>(&[0x01, 0x00]),
            Err(FrameError::Version(1))
        ));
        assert!(decode::<Request>(&[0x02, 0xff, 0xff]).is_err());
    }

    #[test]
    fn new_variants_keep_the_old_indices() {
        // postcard encodes a variant by its index (after the 4-byte length and
        // the one-byte version): new ones go at the end.
        assert_eq!(encode(&Request::Ping).unwrap()[5], 0);
        assert_eq!(encode(&Request::ListExposures).unwrap()[5], 8);
        let create = Request::CreateService {
            name: "db".into(),
            ips: vec![],
            lb: None,
        };
        assert_eq!(encode(&create).unwrap()[5], 9);
        let bytes = encode(&create).unwrap();
        assert_eq!(decode::<Request>(&bytes[4..]).unwrap(), create);
        assert_eq!(encode(&Response::Error(String::new())).unwrap()[5], 9);
    }
}
