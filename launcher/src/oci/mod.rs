//! `ax oci`: ax as the OCI seccomp agent of container runtimes (runc, crun,
//! podman on top of them), and the profile that sends containers to it.

pub mod agent;
pub mod handshake;
pub mod identity;
pub mod profile;

use crate::cli::SocketArg;
use crate::paths;
use anyhow::Context;
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The daemon's runtime socket for the control socket `socket`: the
/// profile's `listenerPath`.
pub fn runtime_socket(socket: &Path) -> PathBuf {
    paths::beside(socket, ".oci")
}

pub(crate) const OCI_AFTER_HELP: &str = "\
Containers get their network from ax through the runtime's seccomp agent
support (runc >= 1.1, crun >= 1.6, podman on top of them): the profile traps
the same socket calls 'ax exec' does and sends each container's notify fd to
the daemon's runtime socket (the control socket's path + '.oci').
Annotations give the container its identity: io.ax.ip (one VIP per family,
comma-separated), io.ax.name, io.ax.labels (KEY=VALUE,...), io.ax.lb,
io.ax.connect-wait, io.ax.expose (PORT:HOSTADDR:HOSTPORT,...); a profile's listenerMetadata may carry the same keys
('io.ax.ip=10.233.0.20;io.ax.name=web') for runtimes that drop annotations.

Examples:
  ax oci profile > ax-seccomp.json
  podman run --rootfs ./rootfs --network none \\
      --security-opt seccomp=ax-seccomp.json \\
      --annotation io.ax.ip=10.233.0.20 --annotation io.ax.name=web \\
      --no-hosts -v \"$XDG_RUNTIME_DIR/ax/ax.sock.hosts:/etc/hosts:ro\" \\
      /bin/httpd -f -p 8000
  ax oci profile --base /usr/share/containers/seccomp.json > merged.json

When to use which route: the profile is the one for containers ('runc exec',
subuid mappings and podman all work). Wrapping a runtime in 'ax exec
--no-hosts-mount -- runc run ...' serves everything it starts as one app.";

/// `ax oci`.
#[derive(Debug, Args)]
pub struct OciArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: OciCommand,
}

/// The `ax oci` subcommands.
#[derive(Debug, Subcommand)]
pub enum OciCommand {
    /// Print the OCI seccomp profile (linux.seccomp JSON) that makes a
    /// container runtime hand containers to the daemon
    Profile(ProfileArgs),
}

/// `ax oci profile`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Merge ax's rules into this profile (e.g. podman's default
    /// seccomp.json), keeping its other rules; refused when it has a
    /// listenerPath of its own
    #[arg(long, value_name = "FILE")]
    pub base: Option<PathBuf>,

    #[command(flatten)]
    pub socket: SocketArg,
}

/// Runs `ax oci …`; returns the exit status.
pub fn run(args: OciArgs) -> anyhow::Result<i32> {
    match args.command {
        OciCommand::Profile(p) => print_profile(&p),
    }
}

fn print_profile(args: &ProfileArgs) -> anyhow::Result<i32> {
    let socket = paths::socket_path(args.socket.socket.as_deref())?;
    let listener = runtime_socket(&socket);
    let listener = listener
        .to_str()
        .context("the runtime socket's path is not UTF-8, which a JSON profile cannot hold")?;
    let profile = match &args.base {
        None => profile::standalone(listener),
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let base: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            profile::merged(base, listener)
                .map_err(|e| crate::Failure::new(1, format!("{}: {e}", file.display())))?
        }
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &profile)?;
    writeln!(out)?;
    out.flush()?;
    Ok(0)
}
