//! `fleetpipe token add|list|revoke`: the HTTP API's bearer tokens, in the token KV bucket
//! every API replica mirrors. Creation and checks live in `fleetpipe_api::auth::tokens`;
//! this is the command line around them. A token is printed once, at creation, on stdout
//! alone (so `TOKEN=$(fleetpipe token add …)` works); nothing here logs it.

use anyhow::Result;
use fleetpipe_api::auth::tokens;
use fleetpipe_pipeline::Config;

use crate::args::{TokenAddArgs, TokenCommand, TokenRevokeArgs};
use crate::commands::{connect, validate};
use crate::output::print_json;

pub async fn run(config: Config, command: TokenCommand) -> Result<()> {
    // Before connecting: a bad name is the user's to fix, whatever the broker says.
    if let TokenCommand::Add(a) = &command {
        tokens::check_name(&a.name)?;
    }
    validate(&config)?;
    let (_client, broker) = connect(&config, "fleetpipe-token").await?;
    let bucket = &broker.tokens;
    match command {
        TokenCommand::Add(a) => add(bucket, a).await,
        TokenCommand::List(a) => list(bucket, a.json).await,
        TokenCommand::Revoke(a) => revoke(bucket, a).await,
    }
}

async fn add(bucket: &async_nats::jetstream::kv::Store, a: TokenAddArgs) -> Result<()> {
    let created = tokens::create(bucket, &a.name, a.role).await?;
    if a.json {
        return print_json(&created);
    }
    eprintln!(
        "created token {:?} (id {}, role {}); it is shown only this once:",
        created.info.name, created.info.id, created.info.role
    );
    println!("{}", created.token);
    Ok(())
}

async fn list(bucket: &async_nats::jetstream::kv::Store, json: bool) -> Result<()> {
    let all = tokens::list(bucket).await?;
    if json {
        return print_json(&all);
    }
    if all.is_empty() {
        eprintln!("no tokens; create one with `fleetpipe token add NAME --role read`");
        return Ok(());
    }
    println!("{:<16}  {:<24} {:<8} CREATED", "ID", "NAME", "ROLE");
    for t in all {
        println!(
            "{:<16}  {:<24} {:<8} {}",
            t.id,
            t.name,
            t.role.as_str(),
            t.created
        );
    }
    Ok(())
}

async fn revoke(bucket: &async_nats::jetstream::kv::Store, a: TokenRevokeArgs) -> Result<()> {
    let revoked = tokens::revoke(bucket, &a.name_or_id).await?;
    eprintln!(
        "revoked token {:?} (id {}, role {})",
        revoked.name, revoked.id, revoked.role
    );
    Ok(())
}
