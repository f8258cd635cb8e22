//! The `isthmus` command line. Exit codes follow sysexits(3); they are listed
//! in [`crate::exit::Exit`], the one place that defines them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::Duration;

use clap::{Parser, Subcommand};
use isthmus_federation::{SpiffeId, TrustDomain};

use crate::config;
use crate::exit::{Exit, print_config_errors};

/// Where the packages install the configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/isthmus/isthmus.toml";

/// Isthmus: a multi-cluster mesh gateway.
#[derive(Debug, Parser)]
#[command(name = "isthmus", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Validate a configuration file (with environment overrides) and exit.
    CheckConfig(ConfigArg),
    /// Print the effective configuration after environment overrides, as TOML.
    PrintConfig(ConfigArg),
    /// Development PKI: trust domain CAs and SVIDs (not for production use).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run a self-contained demo federation on loopback (two clusters, one VM)
    /// until Ctrl-C, printing the commands to try.
    Demo(DemoArgs),
    /// Exit 0 when URL answers 200, else 1: a health check for containers,
    /// which have no curl.
    Probe {
        /// An http:// URL of the admin API.
        #[arg(value_name = "URL", default_value = DEFAULT_PROBE_URL)]
        url: String,
    },
    /// Print the version.
    Version,
}

/// What `isthmus probe` asks by default: readiness on the default admin port.
const DEFAULT_PROBE_URL: &str = "http://127.0.0.1:15000/readyz";
/// Longest wait for the probe's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Take over the listening sockets of the gateway with this pid (a binary
    /// upgrade; a running gateway starts this itself on SIGUSR2). The
    /// configuration is checked first; only then is that gateway told to hand
    /// its sockets over (SIGQUIT).
    #[arg(long, value_name = "PID")]
    upgrade_from: Option<u32>,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Keep the demo's files (PKI, configurations, logs) in DIR instead of a
    /// temporary directory removed on exit.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a CA for a trust domain: ca.crt, ca.key, bundle.pem, bundle.json.
    Init {
        /// The trust domain, e.g. cluster-a.example.org.
        #[arg(long, value_name = "TD")]
        trust_domain: TrustDomain,
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity of the CA certificate.
        #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = humantime::parse_duration)]
        validity: Duration,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue an X509-SVID from a CA directory: svid.crt, svid.key.
    Issue {
        /// Directory made by `isthmus ca init`.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The SPIFFE ID, e.g. spiffe://cluster-a.example.org/isthmus/gateway/gw-1.
        #[arg(long, value_name = "ID")]
        spiffe_id: SpiffeId,
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity of the SVID.
        #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = humantime::parse_duration)]
        validity: Duration,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file (TOML). Keys can be overridden as ISTHMUS__SECTION__KEY.
    #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let exit = if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Success
            };
            // clap writes help/version to stdout and errors to stderr.
            let _ = e.print();
            return exit.into();
        }
    };
    match cli.command {
        Command::Run(args) => crate::server::run(&args.config.config, args.upgrade_from),
        Command::CheckConfig(arg) => check_config(&arg.config),
        Command::PrintConfig(arg) => print_config(&arg.config),
        Command::Ca(command) => ca(command),
        Command::Demo(args) => crate::demo::run(args.work_dir),
        Command::Probe { url } => probe(&url),
        Command::Version => {
            print_stdout(&version_text());
            ExitCode::SUCCESS
        }
    }
}

fn ca(command: CaCommand) -> ExitCode {
    let written = match command {
        CaCommand::Init {
            trust_domain,
            out,
            validity,
            force,
        } => crate::devpki::init(&trust_domain, &out, validity, force),
        CaCommand::Issue {
            ca,
            spiffe_id,
            out,
            validity,
            force,
        } => crate::devpki::issue(&ca, &spiffe_id, &out, validity, force),
    };
    match written {
        Ok(paths) => {
            let list: String = paths
                .iter()
                .map(|p| format!("wrote {}\n", p.display()))
                .collect();
            print_stdout(&list);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("isthmus: {e}");
            Exit::Failure.into()
        }
    }
}

fn probe(url: &str) -> ExitCode {
    match http_status(url) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("isthmus: {url} answered {status}");
            Exit::Failure.into()
        }
        Err(e) => {
            eprintln!("isthmus: {url}: {e}");
            Exit::Failure.into()
        }
    }
}

/// The status of `GET url` (plain http://ip:port/path only).
fn http_status(url: &str) -> Result<u16, String> {
    use std::io::{BufRead, BufReader};
    use std::net::TcpStream;
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    // The admin API listens on an address, not a name: nothing to resolve.
    let addr: std::net::SocketAddr = authority
        .parse()
        .map_err(|_| format!("{authority} is not an IP address and port"))?;
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(PROBE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(PROBE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut status_line = String::new();
    BufReader::new(stream)
        .read_line(&mut status_line)
        .map_err(|e| e.to_string())?;
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {status_line:?}"))
}

fn version_text() -> String {
    format!(
        "isthmus {} (rustc {}, {} build)\n",
        env!("CARGO_PKG_VERSION"),
        env!("ISTHMUS_RUSTC_VERSION"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    )
}

fn check_config(path: &Path) -> ExitCode {
    match crate::server::load(path, prometheus::Registry::new()) {
        Ok(loaded) => {
            let c = &loaded.config;
            print_stdout(&format!(
                "{}: configuration is valid (gateway {}, cluster {}, {})\n",
                path.display(),
                c.gateway.name,
                c.gateway.cluster,
                c.spiffe_id()
            ));
            ExitCode::SUCCESS
        }
        Err(e) => e.report(),
    }
}

fn print_config(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            print_config_errors(path, &errors);
            return Exit::Config.into();
        }
    };
    match toml::to_string_pretty(&config) {
        Ok(text) => {
            print_stdout(&format!(
                "# Effective configuration of {} after environment overrides.\n{text}",
                path.display()
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("isthmus: cannot print the configuration: {e}");
            Exit::Failure.into()
        }
    }
}

/// Writes to stdout, ignoring a closed pipe (`isthmus print-config | head`).
fn print_stdout(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_command_lines_are_usage_errors() {
        for args in [
            &["isthmus"][..],
            &["isthmus", "frobnicate"],
            &["isthmus", "run", "--bogus"],
            &["isthmus", "check-config", "--config"],
        ] {
            let e = Cli::try_parse_from(args).expect_err("should not parse");
            assert!(e.use_stderr(), "{args:?} should be an error, not help");
        }
    }

    #[test]
    fn config_defaults_to_the_packaged_path() {
        let cli = Cli::try_parse_from(["isthmus", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.config.config, Path::new(DEFAULT_CONFIG_PATH));
        assert_eq!(args.upgrade_from, None);
    }
}
