//! `ax completions SHELL` and `ax man`: a completion script and the man
//! page, both generated from the clap definition of the command line.

use crate::cli::{Cli, CompletionsArgs, Shell};
use clap::CommandFactory;
use std::io::Write;

/// Prints the completion script for the shell asked for.
pub fn run(args: CompletionsArgs) -> anyhow::Result<i32> {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ax", &mut out);
    std::io::stdout().lock().write_all(&out)?;
    Ok(0)
}

/// Prints the man page, ax(1), in roff.
pub fn man() -> anyhow::Result<i32> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    std::io::stdout().lock().write_all(&out)?;
    Ok(0)
}
