//! `fleetpipe device add|revoke|list`: device credentials, through
//! `fleetpipe_pipeline::security` (which holds every key and does every signature).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use fleetpipe_pipeline::security::{self, Secure};
use fleetpipe_pipeline::Config;
use fleetpipe_proto::Timestamp;

use crate::output::print_json;

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Issue a device's credentials: a `.creds` file (user JWT + nkey seed) signed by the
    /// account's signing key. The device may publish only on its own subjects (e.g.
    /// `vehicle.ID.>`), must use the inbox prefix `_INBOX_ID` (for JetStream acks) and may
    /// read only its own configuration key. The seed is not kept: keep the file.
    Add(AddArgs),
    /// Revoke a device's credentials: the running managed server disconnects it within
    /// seconds and refuses it afterwards; the revocation is kept across restarts.
    Revoke(RevokeArgs),
    /// List devices with their public key, when their credentials were issued, and revoked.
    List(ListArgs),
    /// A device's live configuration (sensor rates, enabled sensors, deadbands), applied
    /// by its fleetpipe-agent within a second.
    #[command(subcommand)]
    Config(crate::device_config_cmd::DeviceConfigCommand),
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// Device id: 1 to 128 letters, digits, '-' and '_'.
    pub id: String,
    /// Write the `.creds` file here (mode 0600) instead of printing it on stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Issue new credentials for a device that has some; its old key is revoked.
    #[arg(long)]
    pub force: bool,
    /// Print JSON (id, public key, issued, and the creds text or file).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// Device id.
    pub id: String,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Config, command: DeviceCommand) -> Result<()> {
    match command {
        DeviceCommand::Add(a) => add(config, a).await,
        DeviceCommand::Revoke(a) => revoke(config, a).await,
        DeviceCommand::List(a) => list(config, a),
        DeviceCommand::Config(c) => crate::device_config_cmd::run(config, c).await,
    }
}

/// The server a revocation is pushed to: the configured one, else the managed server.
fn server_url(config: &Config) -> String {
    if config.nats.url.is_empty() {
        format!("tls://127.0.0.1:{}", config.nats.port)
    } else {
        config.nats.url.clone()
    }
}

async fn add(config: Config, a: AddArgs) -> Result<()> {
    security::check_device_id(&a.id)?;
    let template = config.template()?;
    let secure = Secure::open(&config.data_dir)?;
    let mut issued = secure.issue_devices(&template, std::slice::from_ref(&a.id), a.force)?;
    let device = issued.remove(0);
    if let Some(out) = &a.out {
        security::files::write_private(out, device.creds.as_bytes()).with_context(|| {
            format!(
                "the credentials are issued but not written to {}",
                out.display()
            )
        })?;
    }
    if a.json {
        let mut value = serde_json::to_value(&device)?;
        match &a.out {
            Some(out) => value["creds_file"] = out.display().to_string().into(),
            None => value["creds"] = device.creds.clone().into(),
        }
        print_json(&value)?;
    } else if a.out.is_none() {
        print!("{}", device.creds);
    }
    if let Some(out) = &a.out {
        eprintln!(
            "device {}: credentials in {} (key {}); give the device this file and {}",
            device.id,
            out.display(),
            device.public_key,
            secure.ca_cert().display()
        );
    }
    if let Some(old) = &device.replaced {
        push(
            &secure,
            &config,
            &format!("old key {old} of device {}", device.id),
        )
        .await?;
    }
    Ok(())
}

async fn revoke(config: Config, a: RevokeArgs) -> Result<()> {
    security::check_device_id(&a.id)?;
    let secure = Secure::open(&config.data_dir)?;
    let device = secure.revoke_device(&a.id)?;
    push(
        &secure,
        &config,
        &format!("device {} (key {})", device.id, device.public_key),
    )
    .await?;
    eprintln!("device {} revoked", device.id);
    Ok(())
}

/// Tells the running server about a revocation already stored.
async fn push(secure: &Secure, config: &Config, what: &str) -> Result<()> {
    let url = server_url(config);
    secure.push_account_jwt(&url).await.with_context(|| {
        format!(
            "{what} is revoked in {} and the server takes it at its next start, but the running \
             server at {url} was not told: run this again while it runs (--nats-url / \
             --nats-port to reach it)",
            config.data_dir.display()
        )
    })
}

fn list(config: Config, a: ListArgs) -> Result<()> {
    let devices = Secure::open(&config.data_dir)?.list_devices()?;
    if a.json {
        return print_json(&devices);
    }
    if devices.is_empty() {
        eprintln!("no devices; `fleetpipe device add ID` issues credentials");
        return Ok(());
    }
    let time = |s: i64| Timestamp::from_micros(s.saturating_mul(1_000_000)).to_rfc3339();
    println!(
        "{:<24} {:<56} {:<20} REVOKED",
        "DEVICE", "PUBLIC KEY", "ISSUED"
    );
    for d in devices {
        println!(
            "{:<24} {:<56} {:<20} {}",
            d.id,
            d.public_key,
            time(d.issued),
            d.revoked.map(time).unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}
