//! Command-line syntax of `ax`: the clap structures and the validators that
//! reject bad option values before anything runs.

use ax_registry::{LbMode, VipPool};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

const TOP_AFTER_HELP: &str = "\
Examples:
  ax exec --ip 10.233.0.10 --name web -- python3 -m http.server 8000
  ax exec -- curl http://10.233.0.10:8000/
  ax get apps
  ax daemon --vip-pool 10.99.0.0/16

A daemon is started in the background the first time 'ax exec' needs one.
Control socket: --socket PATH, else $AX_SOCKET, else $XDG_RUNTIME_DIR/ax/ax.sock
(root: /run/ax/ax.sock; without XDG_RUNTIME_DIR: /tmp/ax-UID/ax.sock).";

const EXEC_AFTER_HELP: &str = "\
The program and everything it starts keep the terminal, stdin, stdout and
stderr. Their bind, connect and accept calls on virtual IPs are served by the
daemon; data never passes through it.

Exit status: the program's own, or 128+N when signal N killed it;
125 when ax itself fails, 126 when the program cannot be run,
127 when it is not found.

Examples:
  # A web server reachable by programs under ax at 10.233.0.10:8000
  ax exec --ip 10.233.0.10 --name web -- python3 -m http.server 8000

  # A client in another terminal; its virtual IP comes from the pool
  ax exec -- curl -s http://10.233.0.10:8000/

  # Two replicas behind one name: connections to web:8000 alternate
  ax exec --name web -- python3 -m http.server 8000
  ax exec --name web -- python3 -m http.server 8000
  ax exec -- curl -s http://web:8000/

  # Reachable from outside ax too, at 127.0.0.1:18000 (as 'docker run -p')
  ax exec --name web --expose 8000:127.0.0.1:18000 -- python3 -m http.server 8000

  # A client that may start before its server: wait up to 30 s for it
  ax exec --connect-wait 30s -- ./client http://10.233.0.10:8000/

  # The same by name: declare it first, then start both in any order
  ax service create web
  ax exec --connect-wait 30s -- curl -s http://web:8000/ &
  ax exec --name web -- python3 -m http.server 8000

  # Labels decide who may connect: by default, apps sharing a label
  ax exec --label tier=backend --label team=pay -- ./server

Names: every '--name NAME' makes NAME and NAME.ax resolve to the app's VIPs
for programs under ax (glibc, musl, static binaries and Go alike: ax shows
them an /etc/hosts of its own, kept current, in a private mount namespace).
Every app has one IPv4 and one IPv6 VIP unless --ip says otherwise; a VIP
without a name is listed there as app-ID.ax, so reverse lookups stay local.";

const DAEMON_AFTER_HELP: &str = "\
The daemon runs in the foreground and logs to stderr (set RUST_LOG, e.g.
RUST_LOG=debug, for more). SIGINT or SIGTERM stops it and removes its socket.
Programs still running keep their established connections; their next
bind, connect or accept waits until a daemon runs again on the same socket,
and their launchers hand them over to it. SIGHUP reloads the --policy file.

Policy file (TOML), e.g.:
  default = \"deny\"            # or \"shared-label\" (the default), \"allow\"
  [[allow]]
  name = \"web-to-db\"
  from = { tier = \"web\" }
  to = { tier = \"db\" }
  ports = [5432, \"8000-8099\"]

Examples:
  ax daemon
  ax daemon --socket /tmp/ax-test/ax.sock --vip-pool 10.99.0.0/16
  ax daemon --policy /etc/ax/policy.toml --connect-wait 10s
  ax daemon --metrics 127.0.0.1:9464   # Prometheus text at /metrics
  ax daemon --node h2 --cluster 192.0.2.2:7946 --join 192.0.2.1:7946 \\
            --cluster-key-file /etc/ax/cluster.key   # a node of a cluster
  RUST_LOG=debug ax daemon

A daemon that 'ax exec' starts by itself exits once it has had no apps for
--idle-exit (default 10m there; set AX_IDLE_EXIT to change it, 0 = never).
Under systemd (Type=notify) the daemon sends READY=1 once it listens.";

const GET_AFTER_HELP: &str = "\
Examples:
  ax get apps
  ax get services
  ax get exposures
  ax service create db   # declare a name before its apps
  ax get apps -o json | jq '.[].vips'";

/// Run unmodified programs with a network identity of their own.
#[derive(Debug, Parser)]
#[command(
    name = "ax",
    version,
    about = "Run unmodified programs with a virtual network identity",
    long_about = "Run unmodified programs with a virtual network identity.\n\n\
        'ax exec' starts a program whose socket control calls (bind, connect, accept, …) \
        are trapped with seccomp and answered by the ax daemon: programs under ax reach \
        each other at virtual IPs and names, over a UNIX socket on the same host, \
        without root, containers or code changes.",
    after_help = TOP_AFTER_HELP,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a program with a virtual IP (starts a daemon if none is running)
    #[command(
        after_help = EXEC_AFTER_HELP,
        override_usage = "ax exec [OPTIONS] [--] PROGRAM [ARGS]..."
    )]
    Exec(ExecArgs),
    /// Serve programs started with 'ax exec' (foreground)
    #[command(after_help = DAEMON_AFTER_HELP)]
    Daemon(DaemonArgs),
    /// List running apps, listening services, exposures or cluster nodes
    #[command(after_help = GET_AFTER_HELP)]
    Get(GetArgs),
    /// Make a running service reachable from programs not under ax
    #[command(after_help = EXPOSE_AFTER_HELP)]
    Expose(ExposeArgs),
    /// Declare a service by name before its apps start, or delete one
    #[command(after_help = SERVICE_AFTER_HELP)]
    Service(ServiceArgs),
    /// Containers: the seccomp profile that makes runc, crun or podman hand
    /// containers to ax
    #[command(after_help = crate::oci::OCI_AFTER_HELP)]
    Oci(crate::oci::OciArgs),
    /// Print a shell completion script (bash, zsh or fish)
    #[command(after_help = COMPLETIONS_AFTER_HELP)]
    Completions(CompletionsArgs),
    /// Print the man page of ax (roff), e.g. 'ax man | man -l -'
    Man,
}

const COMPLETIONS_AFTER_HELP: &str = "\
Examples:
  ax completions bash > /etc/bash_completion.d/ax
  ax completions zsh > \"${fpath[1]}/_ax\"
  ax completions fish > ~/.config/fish/completions/ax.fish
  source <(ax completions bash)";

/// `ax completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Shells `ax completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    /// GNU bash
    Bash,
    /// Z shell
    Zsh,
    /// fish
    Fish,
}

const SERVICE_AFTER_HELP: &str = "\
A declared name resolves at once, for every program under ax, to VIPs
reserved for it (one IPv4 and one IPv6 from the daemon's pools, or --ip).
Apps started with 'ax exec --name NAME' become its backends and take its VIPs;
a client started with --connect-wait waits for the first one. So a
compose-style start works in any order, by names only. 'ax service create'
starts a daemon if none is running, as 'ax exec' does.

Examples:
  ax service create db
  ax exec --connect-wait 30s -- ./app --database db:5432 &
  ax exec --name db -- postgres -D ./data
  ax service create web --ip 10.233.0.10 --lb random
  ax get services
  ax service delete db            # refused while apps named db run
  ax service delete db --force    # they keep name and VIPs until they exit";

/// `ax service`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ServiceAction,
}

/// `ax service` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServiceAction {
    /// Declare NAME: it resolves at once; apps with '--name NAME' serve it
    #[command(after_help = "\
Examples:
  ax service create db
  ax service create web --ip 10.233.0.10 --ip fd00:a8::10 --lb random")]
    Create(ServiceCreateArgs),
    /// Delete a declared service (refused while apps named after it run)
    #[command(after_help = "\
Without --force, the deletion is refused while apps started with --name NAME
run. With --force, the declaration goes at once: those apps keep the name and
its VIPs until they exit, then both are free again.

Examples:
  ax service delete db
  ax service delete db --force")]
    Delete(ServiceDeleteArgs),
}

/// `ax service create`.
#[derive(Debug, Args)]
pub struct ServiceCreateArgs {
    /// The name: NAME and NAME.ax resolve to the service's VIPs
    #[arg(value_name = "NAME", value_parser = parse_name)]
    pub name: String,

    /// Virtual IP of the service (IPv4 or IPv6; at most one of each)
    /// [default: one of each family from the daemon's pools]
    #[arg(long = "ip", value_name = "VIP", value_parser = parse_vip)]
    pub ips: Vec<IpAddr>,

    /// How connections are spread over the apps that serve it, unless an
    /// app gives its own --lb [default: round-robin]
    #[arg(long, value_name = "MODE", value_parser = parse_lb)]
    pub lb: Option<LbMode>,

    #[command(flatten)]
    pub socket: SocketArg,

    /// Fail instead of starting a daemon when none is running
    #[arg(long)]
    pub no_autostart: bool,
}

/// `ax service delete`.
#[derive(Debug, Args)]
pub struct ServiceDeleteArgs {
    /// The declared name
    #[arg(value_name = "NAME", value_parser = parse_name)]
    pub name: String,

    /// Delete even while apps named after it run (they keep the name and
    /// its VIPs until they exit)
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub socket: SocketArg,
}

const EXPOSE_AFTER_HELP: &str = "\
The daemon listens on the host address and hands every connection to the
service's server: its accept returns the TCP connection itself, with the
client's real address, and data never passes through the daemon. Several
apps behind one name share the connections. The exposure ends with
--remove, or when no app holds the service's VIP any more.

Examples:
  ax expose web:8000 127.0.0.1:18000
  ax expose 10.233.0.10:8000 0.0.0.0:8080
  ax expose --remove 127.0.0.1:18000
  ax get exposures";

/// `ax expose`.
#[derive(Debug, Args)]
pub struct ExposeArgs {
    /// The service: NAME:PORT (NAME or NAME.ax) or VIP:PORT
    #[arg(value_name = "SERVICE", required_unless_present = "remove", value_parser = parse_service)]
    pub service: Option<(String, u16)>,

    /// Where to listen: HOSTADDR:HOSTPORT, or HOSTPORT for 127.0.0.1
    #[arg(value_name = "HOSTADDR:HOSTPORT", required_unless_present = "remove", value_parser = parse_host_addr)]
    pub host: Option<SocketAddr>,

    /// Stop listening on this host address instead
    #[arg(long, value_name = "HOSTADDR:HOSTPORT", value_parser = parse_host_addr, conflicts_with_all = ["service", "host"])]
    pub remove: Option<SocketAddr>,

    #[command(flatten)]
    pub socket: SocketArg,
}

/// Options shared by every subcommand that talks to the daemon.
#[derive(Debug, Clone, Args)]
pub struct SocketArg {
    /// Control socket of the daemon [default: $AX_SOCKET, else
    /// $XDG_RUNTIME_DIR/ax/ax.sock, /run/ax/ax.sock for root, /tmp/ax-UID/ax.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// `ax exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Virtual IP of the program (IPv4 or IPv6; at most one of each)
    /// [default: one of each family from the daemon's pools, or those of
    /// the service declared as --name]
    #[arg(long = "ip", value_name = "VIP", value_parser = parse_vip)]
    pub ips: Vec<IpAddr>,

    /// Name of the app (repeatable): NAME and NAME.ax resolve to its VIPs
    /// for every program under ax. Apps started with the same name share its
    /// VIPs and its connections; a name declared with 'ax service create'
    /// brings its VIPs
    #[arg(long = "name", value_name = "NAME", value_parser = parse_name)]
    pub names: Vec<String>,

    /// Label of the program (repeatable). Without a policy file, a client
    /// may connect to a server when they share a label; apps without labels
    /// have zone=default
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// How connections to this app's name or VIP are spread over its
    /// replicas; with --ip of a running app, joins it as a replica
    /// [default: round-robin]
    #[arg(long, value_name = "MODE", value_parser = parse_lb)]
    pub lb: Option<LbMode>,

    /// How long a connect to a VIP whose service is not up yet waits for
    /// it, e.g. 500ms, 10s, 2m (a name resolves once its app has started,
    /// or at once when declared with 'ax service create')
    /// [default: the daemon's --connect-wait]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub connect_wait: Option<Duration>,

    /// Make the app's PORT reachable from programs not under ax at a host
    /// address (repeatable): PORT:HOSTADDR:HOSTPORT, or PORT:HOSTPORT for
    /// 127.0.0.1. The daemon only accepts; the program gets the TCP
    /// connection itself
    #[arg(long = "expose", value_name = "PORT:HOSTADDR:HOSTPORT", value_parser = parse_expose)]
    pub exposes: Vec<(u16, SocketAddr)>,

    #[command(flatten)]
    pub socket: SocketArg,

    /// Fail instead of starting a daemon when none is running
    #[arg(long)]
    pub no_autostart: bool,

    /// Run the program in ax's filter only, without the user and mount
    /// namespaces ax makes to show it ax's /etc/hosts and hide the daemon's
    /// directory: for wrapping a container runtime ('runc exec', subuid
    /// mappings, podman) that must make namespaces of its own. The program
    /// then resolves no ax names through /etc/hosts and can reach the
    /// daemon's socket. For containers, prefer 'ax oci profile' (see 'ax oci
    /// --help')
    #[arg(long)]
    pub no_hosts_mount: bool,

    /// The program to run and its arguments
    #[arg(
        value_name = "PROGRAM",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_hint = clap::ValueHint::CommandWithArguments
    )]
    pub command: Vec<OsString>,
}

/// `ax daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub socket: SocketArg,

    /// Block to allocate virtual IPs from (repeatable)
    /// [default: 10.233.0.0/16 and fd00:a8::/64]
    #[arg(long = "vip-pool", value_name = "CIDR", value_parser = parse_pool)]
    pub vip_pools: Vec<VipPool>,

    /// Who may connect to whom: a TOML file of allow rules by label
    /// selector and port (see below); reloaded on SIGHUP
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// How long a blocking connect to a service that is not up yet waits
    /// for it, unless the app sets its own --connect-wait
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s")]
    pub connect_wait: Duration,

    /// Write "ready" and a newline to this inherited fd (a pipe or file)
    /// once the socket listens
    #[arg(long, value_name = "N")]
    pub ready_fd: Option<u32>,

    /// Serve Prometheus metrics over plain HTTP at http://ADDR:PORT/metrics
    /// (no authentication: use a loopback address)
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,

    /// Exit once no app has run for this long (0: never) [default: never;
    /// 10m for a daemon 'ax exec' starts]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, env = "AX_IDLE_EXIT")]
    pub idle_exit: Option<Duration>,

    /// Make this host a node of a cluster: gossip (UDP) and connections
    /// from other nodes (TCP) on this address of this host, same port
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Cluster")]
    pub cluster: Option<SocketAddr>,

    /// This node's name in the cluster [default: the host name]
    #[arg(
        long,
        value_name = "NAME",
        requires = "cluster",
        help_heading = "Cluster"
    )]
    pub node: Option<String>,

    /// A member to join the cluster through (repeatable); a node that joins
    /// nobody starts a cluster
    #[arg(
        long,
        value_name = "ADDR:PORT",
        requires = "cluster",
        help_heading = "Cluster"
    )]
    pub join: Vec<SocketAddr>,

    /// A file holding the cluster's shared secret (at least 16 bytes, the
    /// same on every node), which authenticates gossip and connections
    /// between nodes; without it cluster traffic is unauthenticated
    #[arg(
        long,
        value_name = "FILE",
        requires = "cluster",
        help_heading = "Cluster"
    )]
    pub cluster_key_file: Option<PathBuf>,
}

/// `ax get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to list
    #[arg(value_enum)]
    pub resource: Resource,

    /// Output format
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    #[command(flatten)]
    pub socket: SocketArg,
}

/// Resources `ax get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    /// Running apps (one per 'ax exec')
    #[value(alias = "app")]
    Apps,
    /// Listening virtual IP:port services, and declared ones with no
    /// backend yet
    #[value(alias = "service", alias = "svc")]
    Services,
    /// Services reachable at host addresses ('ax expose', 'ax exec --expose')
    #[value(alias = "exposure")]
    Exposures,
    /// Hosts of the cluster ('ax daemon --cluster'): address, state, apps
    /// and services
    #[value(alias = "node")]
    Nodes,
}

/// Output formats of `ax get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns with a header row
    Table,
    /// A JSON array
    Json,
}

/// Parses a `--ip` value.
pub fn parse_vip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("'{s}' is not an IPv4 or IPv6 address"))?;
    let reason = if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address (ax leaves loopback to the kernel)")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else if matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        Some("an IPv4-mapped IPv6 address (give the IPv4 address instead)")
    } else {
        None
    };
    match reason {
        Some(r) => Err(format!("{ip} cannot be a virtual IP: it is {r}")),
        None => Ok(ip),
    }
}

/// Parses a `--name` value: dot-separated labels of `a-z`, `0-9` and `-`,
/// each 1 to 63 characters, not starting or ending with `-`.
pub fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a name cannot be empty".into());
    }
    if s.len() > 253 {
        return Err(format!("'{s}' is longer than 253 characters"));
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err(format!(
                "'{s}' has an empty part between dots (use e.g. 'web' or 'web.shop')"
            ));
        }
        if label.len() > 63 {
            return Err(format!("'{label}' in '{s}' is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            let hint = if c.is_ascii_uppercase() {
                " (names are lowercase)"
            } else {
                ""
            };
            return Err(format!(
                "'{s}' contains '{c}': names use a-z, 0-9, '-' and '.'{hint}"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("'{label}' in '{s}' starts or ends with '-'"));
        }
    }
    Ok(s.to_string())
}

fn label_part_ok(part: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    part.len() <= 63
        && part
            .chars()
            .all(|c| alnum(c) || c == '-' || c == '_' || c == '.')
        && (part.is_empty() || (part.starts_with(alnum) && part.ends_with(alnum)))
}

/// Parses a `--label KEY=VALUE` value, with the rules Kubernetes uses: the
/// key is `[PREFIX/]NAME`, NAME 1–63 characters of letters, digits, `-`, `_`
/// and `.`, starting and ending with a letter or digit, PREFIX a DNS name;
/// the value follows NAME's rules but may be empty.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE (e.g. --label tier=backend)"))?;
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        parse_name(p).map_err(|e| format!("label key prefix of '{key}': {e}"))?;
    }
    if name.is_empty() {
        return Err(format!("'{s}' has an empty label key"));
    }
    if !label_part_ok(name) {
        return Err(format!(
            "label key '{key}' is not valid: up to 63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ));
    }
    if !label_part_ok(value) {
        return Err(format!(
            "label value '{value}' is not valid: up to 63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Parses a `--lb` value.
pub fn parse_lb(s: &str) -> Result<LbMode, String> {
    s.parse()
}

/// Parses a duration: a number with a unit `ms`, `s`, `m` or `h` (a bare
/// number is seconds), e.g. `500ms`, `10s`, `1.5m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 500ms, 10s, 2m)"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "'{other}' in '{s}' is not a unit: use ms, s, m or h"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a host address: `HOSTADDR:HOSTPORT` (`[v6]:port` for IPv6) or a
/// bare `HOSTPORT`, which listens on 127.0.0.1 only.
pub fn parse_host_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    s.parse().map_err(|_| {
        format!("'{s}' is not HOSTADDR:HOSTPORT (e.g. 127.0.0.1:18000, [::1]:18000 or 18000)")
    })
}

/// Parses a `--expose` value: `PORT:HOSTADDR:HOSTPORT` or `PORT:HOSTPORT`.
pub fn parse_expose(s: &str) -> Result<(u16, SocketAddr), String> {
    let (port, host) = s.split_once(':').ok_or_else(|| {
        format!("'{s}' is not PORT:HOSTADDR:HOSTPORT (e.g. 8000:127.0.0.1:18000)")
    })?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("'{port}' in '{s}' is not a port (1-65535)"))?;
    Ok((port, parse_host_addr(host)?))
}

/// Parses a service for `ax expose`: `NAME:PORT` or `VIP:PORT`
/// (`[v6]:port` for IPv6).
pub fn parse_service(s: &str) -> Result<(String, u16), String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    let (name, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}' is not NAME:PORT or VIP:PORT (e.g. web:8000)"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("'{port}' in '{s}' is not a port (1-65535)"))?;
    let name = parse_name(name)?;
    Ok((name, port))
}

/// Parses a `--vip-pool` value.
pub fn parse_pool(s: &str) -> Result<VipPool, String> {
    VipPool::parse(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn names() {
        for ok in ["web", "web.ax", "a", "db-1", "x1.y2.z3", &"a".repeat(63)] {
            assert_eq!(parse_name(ok).as_deref(), Ok(ok), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "web_1",
            "-web",
            "web-",
            "a..b",
            ".a",
            "a.",
            "wéb",
            "a b",
            &"a".repeat(64),
        ] {
            assert!(parse_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_name("Web").unwrap_err().contains("lowercase"));
    }

    #[test]
    fn labels() {
        assert_eq!(
            parse_label("tier=backend"),
            Ok(("tier".into(), "backend".into()))
        );
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        assert_eq!(
            parse_label("ax.dev/role=db_1.x"),
            Ok(("ax.dev/role".into(), "db_1.x".into()))
        );
        assert!(parse_label("k=a=b").is_err(), "'=' in value");
        for bad in [
            "novalue",
            "=v",
            "-k=v",
            "k-=v",
            "k=-v",
            "k=v v",
            "Bad Prefix/k=v",
            "/k=v",
            "p/=v",
        ] {
            assert!(parse_label(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_label(&format!("k={}", "v".repeat(64))).is_err());
    }

    #[test]
    fn durations_and_lb() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "s", "10x", "-1s", "1e999s", "ten"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_lb("random"), Ok(LbMode::Random));
        assert_eq!(parse_lb("round-robin"), Ok(LbMode::RoundRobin));
        assert!(parse_lb("least-conn").is_err());
    }

    #[test]
    fn exposures() {
        let lo = |p: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        assert_eq!(parse_expose("8000:127.0.0.1:18000"), Ok((8000, lo(18000))));
        assert_eq!(parse_expose("8000:18000"), Ok((8000, lo(18000))));
        assert_eq!(
            parse_expose("80:[::1]:8080"),
            Ok((80, "[::1]:8080".parse().unwrap()))
        );
        for bad in [
            "8000",
            "0:18000",
            "x:18000",
            "8000:localhost:1",
            "8000:1.2.3.4",
        ] {
            assert!(parse_expose(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_service("web:8000"), Ok(("web".into(), 8000)));
        assert_eq!(parse_service("web.ax:80"), Ok(("web.ax".into(), 80)));
        assert_eq!(
            parse_service("10.233.0.10:80"),
            Ok(("10.233.0.10".into(), 80))
        );
        assert_eq!(
            parse_service("[fd00:a8::1]:80"),
            Ok(("fd00:a8::1".into(), 80))
        );
        for bad in ["web", "web:0", "Web:80", ":80"] {
            assert!(parse_service(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Cli::try_parse_from(["ax", "expose", "web:80", "18000"]).is_ok());
        assert!(Cli::try_parse_from(["ax", "expose", "--remove", "18000"]).is_ok());
        assert!(Cli::try_parse_from(["ax", "expose", "web:80"]).is_err());
        assert!(Cli::try_parse_from(["ax", "get", "exposures"]).is_ok());
    }

    #[test]
    fn vips() {
        assert!(parse_vip("10.233.0.10").is_ok());
        assert!(parse_vip("fd00:a8::10").is_ok());
        for bad in [
            "10.233.0",
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:10.0.0.1",
            "web",
        ] {
            assert!(parse_vip(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn exec_takes_program_and_args_verbatim() {
        let cli = Cli::try_parse_from([
            "ax", "exec", "--ip", "10.1.2.3", "--name", "web", "--", "ls", "-l", "--ip",
        ])
        .unwrap();
        let Command::Exec(e) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(e.ips, vec!["10.1.2.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(e.command, vec!["ls", "-l", "--ip"]);
        // Without "--", the first positional starts the command.
        let cli = Cli::try_parse_from(["ax", "exec", "sh", "-c", "exit 3"]).unwrap();
        let Command::Exec(e) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(e.command, vec!["sh", "-c", "exit 3"]);
        assert!(Cli::try_parse_from(["ax", "exec"]).is_err());
        assert!(Cli::try_parse_from(["ax", "exec", "--ip", "nope", "--", "true"]).is_err());
    }

    #[test]
    fn get_resources() {
        assert!(Cli::try_parse_from(["ax", "get", "apps"]).is_ok());
        assert!(Cli::try_parse_from(["ax", "get", "services", "-o", "json"]).is_ok());
        assert!(Cli::try_parse_from(["ax", "get", "pods"]).is_err());
        assert!(Cli::try_parse_from(["ax", "get", "apps", "-o", "yaml"]).is_err());
    }
}
