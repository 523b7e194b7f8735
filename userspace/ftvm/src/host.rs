//! `ftvm host --config /etc/ftvm/host.toml`: the one long-lived service of a host for its VM.
//!
//! The configuration names this host's part in the protected VM with the options of `ftvm
//! primary` and `ftvm backup`: each key is an option's long name (`peer`, `listen`, `disk`,
//! `quorum`, `witness`, …), each value its argument (`true` for a flag, a list for an option
//! given several times); `start-as` is the service's own. Each role takes the keys it knows; a key
//! that neither knows is refused, and so is a value either refuses, naming the file.
//!
//! At start the service asks the quorum to start the VM, with the term stored next to its disk:
//! * granted (nobody runs the VM, and this disk is the current copy): it runs the VM as the
//!   primary, with the backup if the peer's service answers within `connect-timeout`, alone
//!   otherwise (protected as soon as the peer answers);
//! * refused (the other host runs the VM, or this disk is older than the VM's current copy): it
//!   becomes a standby on its A-Link address; the running primary finds it, copies it the VM's
//!   memory and disk while the VM serves, and from then on it is the backup. It takes over if the
//!   primary dies, and then protects the VM again with the peer once that is back.
//!
//! So a repaired server whose service starts at boot becomes the backup by itself, and a host
//! whose copy is stale never serves. Without a quorum nothing can decide: `start-as` (`primary`
//! or `backup`) must say it, and a repaired host must be started as `backup`.
//!
//! The VMM runs inside the service's process (one process per VM): the checkpoint path reads
//! guest memory and vCPU state directly, and a takeover restores into a VM of the same process
//! with no hand-over between processes. The lease watchdog, a separate process, releases the
//! lease and closes the fencing gate if the service dies.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, ValueEnum};

use crate::ft::{self, BackupArgs, BackupEnd, PrimaryArgs, PrimaryStart};
use crate::quorum::QuorumKind;

/// The sample configuration (`deploy/host.toml`, `ftvm host --sample-config`), installed as
/// `/etc/ftvm/host.toml` by the README's procedure.
pub const SAMPLE_CONFIG: &str = include_str!("../../../deploy/host.toml");

#[derive(Debug, Args)]
pub struct HostArgs {
    /// This host's configuration (TOML; see `deploy/host.toml`).
    #[arg(long, default_value = "/etc/ftvm/host.toml")]
    pub config: PathBuf,
    /// How the service starts, overriding the configuration's `start-as`.
    #[arg(long, value_enum)]
    pub start_as: Option<StartAs>,
    /// Print a sample configuration (every key explained) and exit.
    #[arg(long)]
    pub sample_config: bool,
}

/// How a host's service starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StartAs {
    /// Ask the quorum: the primary if it grants the start, the backup otherwise (the default).
    Claim,
    /// Run the VM (without a quorum: only on the host that holds the current copy).
    Primary,
    /// Stand by for the running primary.
    Backup,
}

/// `ftvm primary`'s options, parsed from a configuration.
#[derive(Debug, Parser)]
#[command(name = "ftvm host (primary)", no_binary_name = true)]
struct PrimaryConfig {
    #[command(flatten)]
    args: PrimaryArgs,
}

/// `ftvm backup`'s options, parsed from a configuration.
#[derive(Debug, Parser)]
#[command(name = "ftvm host (backup)", no_binary_name = true)]
struct BackupConfig {
    #[command(flatten)]
    args: BackupArgs,
}

/// The service's own key.
const START_AS: &str = "start-as";

/// A host's configuration: the options of each role, and how to start.
#[derive(Debug)]
pub struct HostConfig {
    pub primary: PrimaryArgs,
    pub backup: BackupArgs,
    pub start_as: StartAs,
}

impl HostConfig {
    /// Reads and checks the configuration at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the host configuration {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("bad host configuration {}", path.display()))
    }

    /// Parses a configuration's text.
    pub fn parse(text: &str) -> Result<Self> {
        let table: toml::Table = text.parse().context("not valid TOML")?;
        let primary_keys = long_names(&PrimaryConfig::command());
        let backup_keys = long_names(&BackupConfig::command());
        let mut start_as = StartAs::Claim;
        let (mut primary_argv, mut backup_argv) = (Vec::new(), Vec::new());
        for (key, value) in &table {
            if key == START_AS {
                let name = value.as_str().with_context(|| format!("`{START_AS}` must be a string"))?;
                start_as = StartAs::from_str(name, false)
                    .map_err(|_| anyhow::anyhow!("`{START_AS}` must be \"claim\", \"primary\" or \"backup\", not {name:?}"))?;
                continue;
            }
            let (in_primary, in_backup) = (primary_keys.contains(key), backup_keys.contains(key));
            if !in_primary && !in_backup {
                bail!("unknown key `{key}` (the keys are the long options of `ftvm primary` and `ftvm backup`)");
            }
            let argv = option_argv(key, value)?;
            if in_primary {
                primary_argv.extend(argv.iter().cloned());
            }
            if in_backup {
                backup_argv.extend(argv);
            }
        }
        // The service never fails for want of a backup at start: the VM is protected once the
        // peer's service answers.
        primary_argv.push("--alone-if-no-backup".into());
        let primary = PrimaryConfig::try_parse_from(&primary_argv).map_err(|e| clap_error("the primary's options", &e))?.args;
        let backup = BackupConfig::try_parse_from(&backup_argv).map_err(|e| clap_error("the backup's options", &e))?.args;
        if backup.peer.is_none() {
            bail!("`peer` is missing: the other host's A-Link address");
        }
        Ok(Self { primary, backup, start_as })
    }
}

/// Every long option name of `cmd`.
fn long_names(cmd: &clap::Command) -> BTreeSet<String> {
    cmd.get_arguments().filter_map(|a| a.get_long()).map(str::to_string).collect()
}

/// `--key value` for one configuration entry: a flag for `true`, nothing for `false`, the option
/// once per element for a list.
fn option_argv(key: &str, value: &toml::Value) -> Result<Vec<String>> {
    let flag = format!("--{key}");
    let scalar = |v: &toml::Value| -> Result<String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            other => bail!("`{key}`: a {} is not a value for this option", other.type_str()),
        }
    };
    Ok(match value {
        toml::Value::Boolean(true) => vec![flag],
        toml::Value::Boolean(false) => Vec::new(),
        toml::Value::Array(items) => {
            let mut v = Vec::new();
            for item in items {
                v.extend([flag.clone(), scalar(item)?]);
            }
            v
        }
        other => vec![flag, scalar(other)?],
    })
}

/// clap's message for a configuration, on one line.
fn clap_error(what: &str, e: &clap::Error) -> anyhow::Error {
    let text = e.to_string();
    // The message, and the list that follows it for missing options; not the usage and help.
    let said: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let said = said.join(" ");
    anyhow::anyhow!("{what}: {} (each key is an option's long name without its dashes)", said.trim_start_matches("error: "))
}

pub fn host(args: HostArgs) -> Result<ExitCode> {
    if args.sample_config {
        print!("{SAMPLE_CONFIG}");
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = HostConfig::load(&args.config)?;
    let start_as = args.start_as.unwrap_or(cfg.start_as);
    if start_as == StartAs::Claim && cfg.primary.quorum.quorum == QuorumKind::None {
        bail!(
            "{}: with `quorum = \"none\"` nothing decides which host runs the VM: set `start-as` to \"primary\" on the host with the current copy and \"backup\" on the other",
            args.config.display()
        );
    }
    let mut cfg = Some(cfg);
    let mut start_as = start_as;
    // What this host kept of the VM it handed over: its next standby starts from it.
    let mut kept = None;
    // Bounded by what ends the service (a stop, the VM's end, an error); a switchover makes the
    // host that ran the VM stand by again, in the same process, as often as it happens.
    loop {
        let cfg = match cfg.take() {
            Some(c) => c,
            None => HostConfig::load(&args.config)?,
        };
        if start_as == StartAs::Backup {
            tracing::info!("standing by to become the backup of the VM");
        } else {
            match ft::start_primary(cfg.primary)? {
                PrimaryStart::Ran(code) => return Ok(code),
                PrimaryStart::NotCurrent(refusal) => {
                    tracing::info!(refusal = %format_args!("{:#}", anyhow::Error::from(refusal)), "this host does not run the VM now: standing by to become its backup");
                }
                PrimaryStart::HandedOver(k) => {
                    tracing::info!("the VM was handed over to the other host: standing by as its backup");
                    kept = k;
                }
            }
        }
        match ft::run_backup(cfg.backup, kept.take())? {
            BackupEnd::Exit(code) => return Ok(code),
            BackupEnd::HandedOver(k) => {
                tracing::info!("the VM was handed back to the other host: standing by as its backup");
                start_as = StartAs::Backup;
                kept = k;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_configuration_parses_into_both_roles() {
        let cfg = HostConfig::parse(SAMPLE_CONFIG).unwrap();
        assert_eq!(cfg.start_as, StartAs::Claim);
        assert_eq!(cfg.primary.peer, "10.99.0.2:7700".parse().unwrap());
        assert_eq!(cfg.backup.listen, "10.99.0.1:7700".parse().unwrap());
        assert_eq!(cfg.backup.peer, Some("10.99.0.2:7700".parse().unwrap()));
        assert_eq!(cfg.primary.vm.disk, cfg.backup.disk);
        assert_eq!(cfg.primary.vm.memory, cfg.backup.memory);
        assert!(cfg.primary.alone_if_no_backup);
        assert_eq!(cfg.primary.quorum.quorum, QuorumKind::Witness);
    }

    #[test]
    fn flags_lists_and_numbers_become_options() {
        let text = r#"
            listen = "10.99.0.1:7700"
            peer = "10.99.0.2:7700"
            secret-file = "/etc/ftvm/alink.secret"
            disk = "/var/lib/ftvm/vm.img"
            quorum = "none"
            start-as = "backup"
            sync-every-epoch = true
            epoch-us = 2000
            dirty-tracker = "uffd"
            test-mask-cpuid = ["1:0:edx:26", "7:0:ebx:5"]
        "#;
        let cfg = HostConfig::parse(text).unwrap();
        assert_eq!(cfg.start_as, StartAs::Backup);
        assert!(cfg.backup.sync_every_epoch);
        assert_eq!((cfg.backup.engine.epoch_us, cfg.primary.engine.epoch_us), (2000, 2000));
        let uffd = crate::cli::DirtyTrackerArg::Uffd;
        assert_eq!((cfg.backup.engine.dirty_tracker, cfg.primary.engine.dirty_tracker), (uffd, uffd));
        assert_eq!(cfg.backup.test_mask_cpuid.len(), 2);
    }

    #[test]
    fn mistakes_are_named() {
        let base = "listen = \"10.99.0.1:7700\"\npeer = \"10.99.0.2:7700\"\nsecret-file = \"/s\"\ndisk = \"/d\"\nquorum = \"none\"\n";
        let err = |extra: &str| format!("{:#}", HostConfig::parse(&format!("{base}{extra}")).unwrap_err());
        assert!(err("colour = \"blue\"").contains("unknown key `colour`"), "{}", err("colour = \"blue\""));
        assert!(err("start-as = \"both\"").contains("\"claim\", \"primary\" or \"backup\""));
        assert!(err("memory = \"lots\"").contains("lots"), "{}", err("memory = \"lots\""));
        assert!(err("epoch-us = { a = 1 }").contains("epoch-us"));
        let no_peer = format!("{:#}", HostConfig::parse(&base.replace("peer = \"10.99.0.2:7700\"\n", "")).unwrap_err());
        assert!(no_peer.contains("peer"), "{no_peer}");
        assert!(format!("{:#}", HostConfig::parse("listen = [").unwrap_err()).contains("not valid TOML"));
    }
}
