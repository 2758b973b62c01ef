//! `ax service create|delete`: names declared before their apps, on the
//! CLI side (a request to the daemon) and the daemon side (the registry).

use crate::cli::{ServiceAction, ServiceArgs};
use crate::get::connect_to_daemon;
use crate::Failure;
use anyhow::bail;
use ax_proto::{Request, Response};
use ax_registry::{LbMode, LocalRegistry};
use std::net::IpAddr;

/// Runs `ax service`; returns the exit status.
pub fn run(args: ServiceArgs) -> anyhow::Result<i32> {
    // Declaring is often the first thing a compose-style script does: it
    // starts a daemon as `ax exec` would; deleting never does.
    let (socket, autostart, request) = match args.action {
        ServiceAction::Create(a) => {
            check_families(&a.ips)?;
            (
                a.socket,
                !a.no_autostart,
                Request::CreateService {
                    name: a.name,
                    ips: a.ips,
                    lb: a.lb,
                },
            )
        }
        ServiceAction::Delete(a) => (
            a.socket,
            false,
            Request::DeleteService {
                name: a.name,
                force: a.force,
            },
        ),
    };
    let mut client = if autostart {
        let path = crate::paths::socket_path(socket.socket.as_deref())?;
        crate::exec::connect_or_start(&path, true)?
    } else {
        connect_to_daemon(socket.socket.as_deref())?
    };
    match client.call(&request)? {
        Response::ServiceCreated(d) => {
            let vips: Vec<String> = d.vips.iter().map(IpAddr::to_string).collect();
            println!("service {} declared at {}", d.name, vips.join(","));
            Ok(0)
        }
        Response::ServiceDeleted(d) => {
            println!("service {} deleted", d.name);
            Ok(0)
        }
        Response::Error(e) => Err(Failure::new(1, e).into()),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// At most one `--ip` of each family, as for `ax exec`.
fn check_families(ips: &[IpAddr]) -> anyhow::Result<()> {
    for fam in [true, false] {
        let of: Vec<&IpAddr> = ips.iter().filter(|ip| ip.is_ipv4() == fam).collect();
        if let [first, .., last] = of.as_slice() {
            if first != last {
                let name = if fam { "IPv4" } else { "IPv6" };
                return Err(Failure::new(
                    2,
                    format!(
                        "--ip {first} and --ip {last}: a service has at most one {name} virtual IP"
                    ),
                )
                .into());
            }
        }
    }
    Ok(())
}

/// The daemon's answer to `CreateService`; `saved` persists the registry.
pub fn create(
    registry: &LocalRegistry,
    name: &str,
    ips: &[IpAddr],
    lb: Option<LbMode>,
    uid: u32,
    saved: impl FnOnce(),
) -> Response {
    if let Err(e) = check_families(ips) {
        return Response::Error(e.to_string());
    }
    match registry.declare(name, ips, lb, uid) {
        Ok(d) => {
            tracing::info!(name, uid, vips = ?d.vips, "service declared");
            saved();
            Response::ServiceCreated(d)
        }
        Err(e) => Response::Error(e.to_string()),
    }
}

/// The daemon's answer to `DeleteService`; `saved` persists the registry.
pub fn delete(
    registry: &LocalRegistry,
    name: &str,
    force: bool,
    uid: u32,
    saved: impl FnOnce(),
) -> Response {
    match registry.undeclare(name, force, uid) {
        Ok(d) => {
            tracing::info!(name, uid, force, "declared service deleted");
            saved();
            Response::ServiceDeleted(d)
        }
        Err(e) => Response::Error(e.to_string()),
    }
}
