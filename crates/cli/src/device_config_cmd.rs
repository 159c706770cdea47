//! `fleetpipe device config set|get`: a device's live configuration in the KV bucket
//! `fleetpipe_config` (key = device id), which `fleetpipe-agent` follows. The format and
//! its checks are `fleetpipe_device::live`'s; the device checks again against its own
//! sensors and reports on `vehicle.<ID>._status`, which `set` waits for.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use fleetpipe_device::live::{status_subject, DeviceStatus, LiveConfig};
use fleetpipe_pipeline::Config;
use fleetpipe_proto::is_valid_token;
use futures::StreamExt;
use serde::Serialize;

use crate::args::parse_duration;
use crate::commands::{connect, validate};
use crate::output::print_json;

#[derive(Subcommand, Debug)]
pub enum DeviceConfigCommand {
    /// Put FILE (TOML: `[sensors.NAME]` with enabled, rate_hz, deadband, heartbeat) as
    /// device ID's configuration, then wait for the device to apply or refuse it.
    Set(SetArgs),
    /// Print device ID's configuration and its revision.
    Get(GetArgs),
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// Device id.
    pub id: String,
    /// The configuration file; `-` reads stdin.
    pub file: PathBuf,
    /// How long to wait for the device's answer (0: do not wait).
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub wait: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// Device id.
    pub id: String,
    /// Print JSON (revision, time, the TOML text).
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct SetOutcome {
    device: String,
    revision: u64,
    /// `applied`, `refused` or `no answer`.
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize)]
struct Entry {
    device: String,
    revision: u64,
    created: String,
    config: String,
}

/// `fleetpipe device config …` (see `device_cmd`).
pub async fn run(config: Config, command: DeviceConfigCommand) -> Result<()> {
    validate(&config)?;
    let id = match &command {
        DeviceConfigCommand::Set(a) => &a.id,
        DeviceConfigCommand::Get(a) => &a.id,
    };
    if !is_valid_token(id) {
        bail!("device id {id:?} must be 1 to 128 letters, digits, '-' or '_'");
    }
    match command {
        DeviceConfigCommand::Set(a) => set(config, a).await,
        DeviceConfigCommand::Get(a) => get(config, a).await,
    }
}

async fn set(config: Config, a: SetArgs) -> Result<()> {
    let text = if a.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
    } else {
        std::fs::read_to_string(&a.file)
            .with_context(|| format!("cannot read {}", a.file.display()))?
    };
    // Checked here too, so that a typo never reaches the device.
    if let Err(problems) = LiveConfig::parse(&text) {
        bail!(
            "{}: {} problem(s):\n  - {}",
            a.file.display(),
            problems.len(),
            problems.join("\n  - ")
        );
    }
    let (client, broker) = connect(&config, "fleetpipe-device-config").await?;
    let subject = status_subject(&config.template()?, &a.id, &[])?;
    // Subscribed before the put, so the answer cannot come first.
    let mut answers = client.subscribe(subject).await?;
    let revision = broker
        .device_config
        .put(&a.id, text.into_bytes().into())
        .await
        .context("cannot put the configuration")?;
    let mut outcome = SetOutcome {
        device: a.id.clone(),
        revision,
        outcome: "no answer",
        reason: None,
    };
    let wait = async {
        while let Some(msg) = answers.next().await {
            let Ok(status) = serde_json::from_slice::<DeviceStatus>(&msg.payload) else {
                continue;
            };
            if status.config_revision == revision {
                return Some(("applied", None));
            }
            if status.refused_revision == Some(revision) {
                return Some(("refused", status.refused_reason));
            }
        }
        None
    };
    if !a.wait.is_zero() {
        if let Ok(Some((o, reason))) = tokio::time::timeout(a.wait, wait).await {
            outcome.outcome = o;
            outcome.reason = reason;
        }
    }
    if a.json {
        print_json(&outcome)?;
    } else {
        match outcome.outcome {
            "applied" => eprintln!("device {} applied revision {revision}", a.id),
            "refused" => eprintln!(
                "device {} REFUSED revision {revision}: {}; it keeps its previous configuration",
                a.id,
                outcome.reason.as_deref().unwrap_or("no reason given")
            ),
            _ => eprintln!(
                "stored revision {revision}; device {} did not answer within {:?} (offline?): \
                 it applies the configuration when it connects",
                a.id, a.wait
            ),
        }
    }
    if outcome.outcome == "refused" {
        bail!("the device refused the configuration");
    }
    Ok(())
}

async fn get(config: Config, a: GetArgs) -> Result<()> {
    let (_client, broker) = connect(&config, "fleetpipe-device-config").await?;
    let entry = broker
        .device_config
        .entry(&a.id)
        .await
        .context("cannot read the configuration")?;
    let Some(entry) = entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
    else {
        bail!(
            "device {} has no configuration (its file's settings apply)",
            a.id
        );
    };
    let e = Entry {
        device: a.id,
        revision: entry.revision,
        created: entry.created.to_string(),
        config: String::from_utf8_lossy(&entry.value).into_owned(),
    };
    if a.json {
        return print_json(&e);
    }
    eprintln!(
        "# device {}, revision {}, set {}",
        e.device, e.revision, e.created
    );
    print!("{}", e.config);
    Ok(())
}
