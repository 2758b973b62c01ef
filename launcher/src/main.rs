//! `ax`: run unmodified programs with a virtual network identity.
//!
//! `ax exec` registers an app with the daemon, starts the program under ax's
//! seccomp filter and hands the filter's notify fd to the daemon; `ax daemon`
//! serves those fds with the broker; `ax get` lists what the daemon knows;
//! `ax service` declares names before their apps.

#![forbid(unsafe_code)]

mod cli;
mod client;
mod cluster;
mod completions;
mod daemon;
mod exec;
mod expose;
mod get;
mod hosts;
mod instance;
mod localhost;
mod metrics;
mod nodes;
mod oci;
mod paths;
mod peer;
mod sdnotify;
mod service;
mod table;

use clap::Parser;

/// A failure with a chosen exit status; its message is printed after `ax: `.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Exit status.
    pub code: i32,
    /// What went wrong.
    pub message: String,
}

impl Failure {
    /// A failure exiting with `code`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Exit status of `ax exec` when ax itself fails (as `docker run`).
pub const EXIT_AX_FAILED: i32 = 125;

/// True when the command line asks for `ax exec` (its usage errors exit 125).
fn is_exec(args: &[std::ffi::OsString]) -> bool {
    args.iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))
        .is_some_and(|a| a == "exec")
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let exec = is_exec(&args);
    let cli = match cli::Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = match (e.use_stderr(), exec) {
                (false, _) => 0,
                (true, true) => EXIT_AX_FAILED,
                (true, false) => 2,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let (result, default_code) = match cli.command {
        cli::Command::Exec(a) => (exec::run(a), EXIT_AX_FAILED),
        cli::Command::Daemon(a) => (daemon::run(a), 1),
        cli::Command::Get(a) => (get::run(a), 1),
        cli::Command::Expose(a) => (expose::run(a), 1),
        cli::Command::Service(a) => (service::run(a), 1),
        cli::Command::Oci(a) => (oci::run(a), 1),
        cli::Command::Completions(a) => (completions::run(a), 1),
        cli::Command::Man => (completions::man(), 1),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            let code = e.downcast_ref::<Failure>().map_or(default_code, |f| f.code);
            eprintln!("ax: {e:#}");
            code
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_exec() {
        let v = |s: &[&str]| {
            s.iter()
                .map(Into::into)
                .collect::<Vec<std::ffi::OsString>>()
        };
        assert!(is_exec(&v(&["ax", "exec", "--ip", "x"])));
        assert!(is_exec(&v(&["ax", "exec"])));
        assert!(!is_exec(&v(&["ax", "get", "exec"])));
        assert!(!is_exec(&v(&["ax", "--version"])));
        assert!(!is_exec(&v(&["ax"])));
    }
}
