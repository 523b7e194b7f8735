//! `ftvm`: fault-tolerant virtual machines on two commodity servers.

mod cli;
mod console;
mod death_signal;
mod ebpf;
mod ft;
mod host;
mod netns;
mod quorum;
mod run;
mod secret;
mod signals;
mod site;
mod status;

use std::process::ExitCode;


fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse_with_protocol_version();
    let result = match cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::Primary(args) => ft::primary(args),
        cli::Command::Backup(args) => ft::backup(args),
        cli::Command::Host(args) => host::host(args),
        cli::Command::Witness(args) => quorum::witness(args),
        cli::Command::LeaseWatchdog(args) => quorum::watchdog(args),
        cli::Command::Site { command } => site::run(command).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        // A reader that went away (`ftvm site status | head`) is no error of ours.
        Err(err) if err.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => ExitCode::FAILURE,
        Err(err) => {
            // One line: the operator sees the whole chain of causes, joined by ": ". Formatted
            // first and written at once: stderr is unbuffered, and a host's log file is shared
            // with its watchdog, whose lines must not land inside this one.
            let line = format!("ftvm: error: {err:#}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            ExitCode::FAILURE
        }
    }
}
