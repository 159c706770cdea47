//! `fleetpipe-agent`: the device side of fleetpipe. See `crates/agent/README` in the
//! repository's README ("The device agent") and `ARCHITECTURE.md`.
//!
//! **Invariant:** links the wire contract, the device crate and the NATS client only: no
//! HTTP server, no database, no pipeline code.

mod config;
mod link;
mod live;
mod run;
mod sensors;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use config::{Config, DEFAULT_PATH};

const HELP: &str = "\
fleetpipe-agent: samples a device's sensors and publishes the readings to fleetpipe
through NATS JetStream, buffering them on disk while the link is down.

USAGE:
    fleetpipe-agent [--config FILE]              run the agent
    fleetpipe-agent --check [--config FILE]      check the configuration, print every problem
    fleetpipe-agent status [--json] [--config FILE]
                                                 the running agent's link, buffer and counters

OPTIONS:
    -c, --config FILE   configuration file (default: $FLEETPIPE_AGENT_CONFIG, else
                        /etc/fleetpipe-agent/agent.toml)
        --check         check the configuration and exit (0: good, 2: problems)
        --json          with `status`: the status file as JSON
        --log LEVEL     error, warn, info (default), debug or trace ($FLEETPIPE_AGENT_LOG)
    -h, --help          this text
    -V, --version       the version

ENVIRONMENT (override the file):
    FLEETPIPE_AGENT_DEVICE        device id
    FLEETPIPE_AGENT_URLS          NATS URLs, comma-separated
    FLEETPIPE_AGENT_CREDENTIALS   the device's .creds file
    FLEETPIPE_AGENT_CA            CA certificate (PEM) for TLS
    FLEETPIPE_AGENT_BUFFER_DIR    buffer and status directory
";

struct Args {
    config: PathBuf,
    check: bool,
    status: bool,
    json: bool,
    log: String,
}

fn parse_args(env: &config::Env) -> Result<Option<Args>, String> {
    let mut args = Args {
        config: env
            .get("FLEETPIPE_AGENT_CONFIG")
            .map_or_else(|| PathBuf::from(DEFAULT_PATH), PathBuf::from),
        check: false,
        status: false,
        json: false,
        log: env
            .get("FLEETPIPE_AGENT_LOG")
            .cloned()
            .unwrap_or_else(|| "info".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("fleetpipe-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "-c" | "--config" => {
                args.config = it.next().ok_or("--config needs a file")?.into();
            }
            "--log" => args.log = it.next().ok_or("--log needs a level")?,
            "--check" => args.check = true,
            "--json" => args.json = true,
            "status" => args.status = true,
            other => {
                return Err(format!(
                    "unexpected argument {other:?}; see fleetpipe-agent --help"
                ))
            }
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let env = config::process_env();
    let args = match parse_args(&env) {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let level = args
        .log
        .parse::<tracing::Level>()
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cfg = match Config::load(&args.config, &env) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!(
                "{}: {} problem{}:",
                args.config.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            );
            for p in problems {
                eprintln!("  - {p}");
            }
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: good ({} sensors, device {})",
            args.config.display(),
            cfg.sensors.len(),
            cfg.device
        );
        return ExitCode::SUCCESS;
    }
    if args.status {
        return match status::read(&cfg.status_path()) {
            Ok(s) if args.json => {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(s) => {
                print!("{}", status::render(&s));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
