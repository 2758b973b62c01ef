//! `ax-bench`: measures ax against native TCP loopback, AF_UNIX, a veth
//! pair, a Linux bridge and the rootless peers slirp4netns and pasta.
//!
//! One binary, two kinds of subcommand: worker roles (`serve`, `client`,
//! `syscall`, `egress`, `many-listeners`, `unixpair`) that run natively, in
//! a network namespace or under `ax exec`, `null-supervisor` (a program
//! under ax's filter with nothing behind it), and the orchestrator (`run`) that
//! starts them and writes the report. The documented entry point is
//! `scripts/bench.sh`.

mod net;
mod nullsup;
mod procs;
mod report;
mod run;
mod stats;
mod worker;

use clap::{Parser, Subcommand};
use std::net::IpAddr;
use std::time::Duration;
use worker::{ClientMode, ClientOpts, ServeMode};

const AFTER_HELP: &str = "\
Examples:
  sudo bash scripts/bench.sh --quick          # the documented way: all rows, in a private netns
  ax-bench run --unprivileged                 # ax local, TCP loopback, AF_UNIX, trapped TCP
  ax-bench serve --bind 127.0.0.1:5201        # a worker, by hand
  ax-bench client --connect 127.0.0.1:5201 --mode pingpong --iterations 10000
  ax exec --ip 10.233.0.10 -- ax-bench serve --bind 0.0.0.0:5201
  ax exec -- ax-bench client --connect 10.233.0.10:5201 --mode connrate --iterations 20000";

/// Benchmarks for ax.
#[derive(Debug, Parser)]
#[command(name = "ax-bench", version, after_help = AFTER_HELP, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the tests on ADDR (IP:PORT or unix:PATH); prints READY once listening
    Serve {
        /// Where to listen
        #[arg(long, value_name = "ADDR")]
        bind: net::Addr,
        /// Which tests to serve (the client's first byte chooses)
        #[arg(long, value_enum, default_value = "any")]
        mode: ServeMode,
        /// Accept threads
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// listen() backlog
        #[arg(long, default_value_t = 4096)]
        backlog: i32,
        /// Accept in a busy loop that never sleeps, closing each connection
        /// at once (the egress rows' server: with no wake-up to receive, its
        /// scheduling stays out of the connects measured)
        #[arg(long)]
        spin: bool,
    },
    /// Run one test against a server and print one JSON line
    Client {
        /// Server address (IP:PORT or unix:PATH)
        #[arg(long, value_name = "ADDR")]
        connect: net::Addr,
        /// The test
        #[arg(long, value_enum)]
        mode: ClientMode,
        /// Round trips (pingpong) or connections (connrate, egress)
        #[arg(long, default_value_t = 10_000)]
        iterations: u64,
        /// Bytes to send (bulk)
        #[arg(long, default_value_t = 2 << 30)]
        bytes: u64,
        /// Print READY, then wait for EOF on stdin before starting
        #[arg(long)]
        wait_stdin: bool,
        /// Timeout of each blocking call, seconds
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// connrate/egress: stop after this many seconds even if fewer
        /// connections were made
        #[arg(long, value_name = "S")]
        max_seconds: Option<f64>,
        /// bulk: print "SYNC start"/"SYNC end" around the transfer and wait
        /// for a line on stdin at each
        #[arg(long)]
        sync_stdin: bool,
    },
    /// Median ns of getppid(), a syscall no filter rule concerns
    Syscall {
        /// Calls (in batches of 10,000)
        #[arg(long, default_value_t = 1_000_000)]
        iterations: u64,
    },
    /// Connect + close loop to a native TCP server (run natively and under ax)
    Egress {
        /// Server address, e.g. 127.0.0.1:5203
        #[arg(long, value_name = "ADDR")]
        connect: net::Addr,
        /// Connections
        #[arg(long, default_value_t = 5_000)]
        iterations: u64,
    },
    /// Listen on COUNT consecutive ports (under ax: register COUNT services), then sleep
    ManyListeners {
        /// Address to bind (under `ax exec --ip VIP` the wildcard means the VIP)
        #[arg(long, default_value = "0.0.0.0")]
        ip: IpAddr,
        /// First port
        #[arg(long, default_value_t = 20_000)]
        base_port: u16,
        /// Number of listeners
        #[arg(long)]
        count: u32,
    },
    /// One test over native AF_UNIX: starts a server at a path, runs the client
    Unixpair {
        /// The test
        #[arg(long, value_enum)]
        mode: ClientMode,
        /// Round trips or connections
        #[arg(long, default_value_t = 10_000)]
        iterations: u64,
        /// Bytes (bulk)
        #[arg(long, default_value_t = 2 << 30)]
        bytes: u64,
        /// Socket path [default: /tmp/ax-bench-unixpair-PID.sock]
        #[arg(long)]
        path: Option<String>,
    },
    /// Run COMMAND under ax's seccomp filter, every trapped call answered
    /// CONTINUE: the cost of trapping alone, with no broker work at all
    #[command(
        after_help = "Prints \"null-supervisor: CALLS trapped calls, CPU_US us of CPU\" \
        on stderr when COMMAND exits, and exits with its status.\n\nExample:\n  \
        ax-bench null-supervisor -- curl -s http://127.0.0.1:8080/"
    )]
    NullSupervisor {
        /// Also install a copy of the fd of each connect, accept and
        /// accept4 over itself before answering (SECCOMP_IOCTL_NOTIF_ADDFD,
        /// the round trip with which ax installs every socket it swaps in)
        #[arg(long)]
        install: bool,
        /// The program and its arguments
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Run the whole benchmark and write the report (needs root, or --unprivileged)
    Run(run::RunArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve {
            bind,
            mode,
            threads,
            backlog,
            spin,
        } => if spin {
            worker::serve_spinning(&bind, backlog)
        } else {
            worker::serve(&bind, mode, threads, backlog)
        }
        .map(|_| 0),
        Cmd::Client {
            connect,
            mode,
            iterations,
            bytes,
            wait_stdin,
            timeout,
            max_seconds,
            sync_stdin,
        } => {
            if wait_stdin {
                worker::wait_stdin();
            }
            worker::client(&ClientOpts {
                addr: connect,
                mode,
                iterations,
                bytes,
                timeout: Duration::from_secs(timeout),
                max_time: max_seconds.map(Duration::from_secs_f64),
                sync: sync_stdin,
            })
            .and_then(|r| worker::print_report(&r))
            .map(|_| 0)
        }
        Cmd::Syscall { iterations } => {
            worker::print_report(&worker::Report::Syscall(worker::syscall(iterations))).map(|_| 0)
        }
        Cmd::Egress {
            connect,
            iterations,
        } => worker::client(&ClientOpts {
            addr: connect,
            mode: ClientMode::Egress,
            iterations,
            bytes: 0,
            timeout: Duration::from_secs(60),
            max_time: None,
            sync: false,
        })
        .and_then(|r| worker::print_report(&r))
        .map(|_| 0),
        Cmd::ManyListeners {
            ip,
            base_port,
            count,
        } => worker::many_listeners(ip, base_port, count).map(|_| 0),
        Cmd::Unixpair {
            mode,
            iterations,
            bytes,
            path,
        } => worker::unixpair(mode, iterations, bytes, path.as_deref())
            .and_then(|r| worker::print_report(&r))
            .map(|_| 0),
        Cmd::NullSupervisor { install, command } => nullsup::run(
            &command,
            if install {
                nullsup::Work::Install
            } else {
                nullsup::Work::None
            },
        ),
        Cmd::Run(args) => {
            let r = run::run(args);
            procs::cleanup_all();
            r
        }
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ax-bench: {e:#}");
            std::process::exit(1);
        }
    }
}
