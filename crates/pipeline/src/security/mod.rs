//! Credentials and TLS material: everything `fleetpipe up --secure` and `fleetpipe device`
//! need, in one place. The CLI and `up` only call this module.
//!
//! Decentralised JWT authentication: an operator signs two accounts, the system account
//! and the `fleetpipe` account (JetStream on); the `fleetpipe` account has a signing key,
//! which signs every user of it: fleetpipe's services (each with only the subjects it
//! needs, see [`perms`]) and the devices. The server resolves accounts (a `full` resolver
//! with the accounts preloaded) and never lists users, so issuing credentials touches
//! nothing on the server; revoking one re-signs the account JWT with the key in its
//! `revocations` and pushes it to the server as the system account's user.
//!
//! Layout under the data directory (directories 0700, files holding keys 0600):
//!
//! ```text
//! security/operator.nk, operator.jwt            the operator's seed and JWT
//! security/system-account.nk, system-account.jwt
//! security/account.nk, account-signing.nk, account.jwt
//! security/creds/<service>.creds                admin, collector, aggregator, api, simulator, system
//! security/devices.log, devices.lock            the device registry (public keys only)
//! security/resolver/                            the server's account store
//! tls/ca.pem, ca-key.pem, server.pem, server-key.pem
//! ```
//!
//! **Invariant:** seeds and private keys leave this module only into 0600 files or as the
//! `.creds` text handed to the device being issued; `Debug` shows public keys only.

pub mod devices;
pub mod files;
pub mod jwt;
pub mod perms;
pub mod tls;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetpipe_proto::SubjectTemplate;
use nkeys::KeyPair;
use serde::Serialize;

use crate::config::Config;
use devices::{DeviceInfo, Event, Registry};
use files::{private_dir, read_private, write_private, write_public};
use jwt::{AccountLimits, AccountNats, Claims, OperatorNats, UserNats};
pub use perms::Service;
use tls::TlsFiles;

/// What can go wrong with credentials; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// The request is refused as it stands (a device that already has credentials).
    #[error("{0}")]
    Refused(String),
    #[error(
        "no security material under {}: run `fleetpipe up --secure` once (it creates the \
         operator, accounts, CA and service credentials)", .0.display()
    )]
    Missing(PathBuf),
    /// The server did not take an account update.
    #[error("{0}")]
    Push(String),
}

impl SecurityError {
    fn io(path: &Path, source: std::io::Error) -> SecurityError {
        SecurityError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Checks a device id before it becomes part of a subject or a permission: 1 to 128 ASCII
/// letters, digits, `-` and `_` (what `fleetpipe_proto` accepts in a subject token), so no
/// `.`, `*`, `>` or whitespace.
pub fn check_device_id(id: &str) -> Result<(), SecurityError> {
    if fleetpipe_proto::is_valid_token(id) {
        Ok(())
    } else {
        Err(SecurityError::Invalid(format!(
            "invalid device id {id:?}: a device id is 1 to 128 ASCII letters, digits, '-' and '_'"
        )))
    }
}

/// The loaded keys of a data directory. `Debug` shows public keys only.
pub struct Secure {
    root: PathBuf,
    tls: TlsFiles,
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
    signing: KeyPair,
}

impl fmt::Debug for Secure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secure")
            .field("root", &self.root)
            .field("operator", &self.operator.public_key())
            .field("system_account", &self.system.public_key())
            .field("account", &self.account.public_key())
            .field("signing_key", &self.signing.public_key())
            .finish()
    }
}

/// Credentials just issued for a device.
#[derive(Serialize)]
pub struct IssuedDevice {
    pub id: String,
    pub public_key: String,
    pub issued: i64,
    /// The `.creds` file's text: the device's JWT and its nkey seed. A secret.
    #[serde(skip)]
    pub creds: String,
    /// The key these credentials replace (re-issued with `force`), now revoked.
    pub replaced: Option<String>,
}

impl fmt::Debug for IssuedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedDevice")
            .field("id", &self.id)
            .field("public_key", &self.public_key)
            .field("creds", &"<redacted>")
            .finish()
    }
}

const ACCOUNT_NAME: &str = "fleetpipe";

impl Secure {
    fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("security")
    }

    /// Whether `data_dir` holds security material.
    pub fn exists(data_dir: &Path) -> bool {
        Self::dir(data_dir).join("operator.nk").is_file()
    }

    /// Creates whatever is missing (keys, JWTs, CA, server certificate with
    /// `extra_names`, service credentials) and loads the rest. A second call keeps every
    /// key; it re-signs a service's JWT only when its permissions changed with `config`.
    pub fn init(
        data_dir: &Path,
        config: &Config,
        extra_names: &[String],
    ) -> Result<Secure, SecurityError> {
        let root = Self::dir(data_dir);
        private_dir(&root)?;
        private_dir(&root.join("creds"))?;
        private_dir(&root.join("resolver"))?;
        let key = |name: &str, new: fn() -> KeyPair| load_or_create_key(&root.join(name), new);
        let secure = Secure {
            operator: key("operator.nk", KeyPair::new_operator)?,
            system: key("system-account.nk", KeyPair::new_account)?,
            account: key("account.nk", KeyPair::new_account)?,
            signing: key("account-signing.nk", KeyPair::new_account)?,
            tls: TlsFiles::under(data_dir),
            root,
        };
        secure.tls.ensure(extra_names)?;
        secure.ensure_operator_and_system_jwts()?;
        let registry = Registry::under(&secure.root).lock()?;
        secure.ensure_account_jwt(&registry.revocations, false)?;
        drop(registry);
        for service in Service::ALL {
            secure.ensure_service_creds(service, config)?;
        }
        Ok(secure)
    }

    /// Loads the material `init` created, without creating anything.
    pub fn open(data_dir: &Path) -> Result<Secure, SecurityError> {
        let root = Self::dir(data_dir);
        if !Self::exists(data_dir) {
            return Err(SecurityError::Missing(root));
        }
        let key = |name: &str| load_key(&root.join(name));
        Ok(Secure {
            operator: key("operator.nk")?,
            system: key("system-account.nk")?,
            account: key("account.nk")?,
            signing: key("account-signing.nk")?,
            tls: TlsFiles::under(data_dir),
            root,
        })
    }

    /// The `fleetpipe` account's public key.
    pub fn account_public_key(&self) -> String {
        self.account.public_key()
    }

    /// The CA certificate clients verify the server with.
    pub fn ca_cert(&self) -> &Path {
        &self.tls.ca_cert
    }

    pub fn tls_files(&self) -> &TlsFiles {
        &self.tls
    }

    /// `<data-dir>/security/creds/<service>.creds`.
    pub fn creds_path(&self, service: Service) -> PathBuf {
        self.root
            .join("creds")
            .join(format!("{}.creds", service.name()))
    }

    fn account_jwt_path(&self) -> PathBuf {
        self.root.join("account.jwt")
    }

    /// The `fleetpipe` account's current JWT (with its revocations).
    pub fn account_jwt(&self) -> Result<String, SecurityError> {
        let path = self.account_jwt_path();
        std::fs::read_to_string(&path).map_err(|e| SecurityError::io(&path, e))
    }

    fn ensure_operator_and_system_jwts(&self) -> Result<(), SecurityError> {
        let op_path = self.root.join("operator.jwt");
        let wanted = OperatorNats::new(&self.system.public_key());
        let current = std::fs::read_to_string(&op_path)
            .ok()
            .and_then(|t| jwt::decode::<OperatorNats>(&t).ok());
        if !current.is_some_and(|c| c.nats == wanted && c.iss == self.operator.public_key()) {
            let mut claims = Claims::new(self.operator.public_key(), "fleetpipe", wanted);
            write_public(
                &op_path,
                jwt::encode(&mut claims, &self.operator)?.as_bytes(),
            )?;
        }
        let sys_path = self.root.join("system-account.jwt");
        let ok = std::fs::read_to_string(&sys_path)
            .ok()
            .and_then(|t| jwt::decode::<AccountNats>(&t).ok())
            .is_some_and(|c| c.iss == self.operator.public_key());
        if !ok {
            let nats = AccountNats::new(AccountLimits::unlimited(false), Vec::new());
            let mut claims = Claims::new(self.system.public_key(), "SYS", nats);
            write_public(
                &sys_path,
                jwt::encode(&mut claims, &self.operator)?.as_bytes(),
            )?;
        }
        Ok(())
    }

    /// Writes the account JWT when it is missing, not the operator's, or its revocations
    /// differ from the registry's (or `force`). Returns whether it wrote one.
    fn ensure_account_jwt(
        &self,
        revocations: &[(String, i64)],
        force: bool,
    ) -> Result<bool, SecurityError> {
        let path = self.account_jwt_path();
        let mut wanted = AccountNats::new(
            AccountLimits::unlimited(true),
            vec![self.signing.public_key()],
        );
        for (key, at) in revocations {
            let e = wanted.revocations.entry(key.clone()).or_insert(*at);
            *e = (*e).max(*at);
        }
        let current = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| jwt::decode::<AccountNats>(&t).ok());
        if !force
            && current.as_ref().is_some_and(|c| {
                c.nats == wanted
                    && c.iss == self.operator.public_key()
                    && c.sub == self.account.public_key()
            })
        {
            return Ok(false);
        }
        let mut claims = Claims::new(self.account.public_key(), ACCOUNT_NAME, wanted);
        // The server keeps an update only if it is not older, and takes two JWTs with the
        // same standard claims (hence the same jti) for one: every new one is a second
        // newer than the last.
        if let Some(c) = &current {
            claims.iat = claims.iat.max(c.iat + 1);
        }
        write_public(&path, jwt::encode(&mut claims, &self.operator)?.as_bytes())?;
        Ok(true)
    }

    fn ensure_service_creds(&self, service: Service, config: &Config) -> Result<(), SecurityError> {
        let path = self.creds_path(service);
        let (publish, subscribe) = perms::service_permissions(service, config);
        let (signer, issuer_account) = match service {
            Service::System => (&self.system, String::new()),
            _ => (&self.signing, self.account.public_key()),
        };
        let wanted = UserNats::new(publish, subscribe, &issuer_account);
        let existing = read_private(&path)
            .ok()
            .and_then(|text| jwt::parse_creds(&text).ok());
        let user = match &existing {
            Some((token, seed)) => {
                let user = KeyPair::from_seed(seed).ok();
                let current = jwt::decode::<UserNats>(token).ok();
                if let (Some(u), Some(c)) = (&user, &current) {
                    if c.nats == wanted && c.iss == signer.public_key() && c.sub == u.public_key() {
                        return Ok(());
                    }
                }
                user.unwrap_or_else(KeyPair::new_user)
            }
            None => KeyPair::new_user(),
        };
        let mut claims = Claims::new(user.public_key(), service.name(), wanted);
        let token = jwt::encode(&mut claims, signer)?;
        let seed = user
            .seed()
            .map_err(|e| SecurityError::Invalid(format!("user seed: {e}")))?;
        write_private(&path, jwt::format_creds(&token, &seed).as_bytes())
    }

    /// The lines of `nats-server.conf` that turn on JWT authentication and TLS on the
    /// client port.
    pub fn server_config(&self) -> Result<String, SecurityError> {
        let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| SecurityError::io(&p, e));
        let system_jwt = read(self.root.join("system-account.jwt"))?;
        let account_jwt = self.account_jwt()?;
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        Ok(format!(
            "operator: {operator}\n\
             system_account: {sys}\n\
             resolver: {{\n  type: full\n  dir: {dir}\n  allow_delete: false\n  interval: \"2m\"\n  timeout: \"5s\"\n}}\n\
             resolver_preload: {{\n  {sys}: {system_jwt:?}\n  {acc}: {account_jwt:?}\n}}\n\
             tls {{\n  cert_file: {cert}\n  key_file: {key}\n  timeout: 5\n}}\n",
            operator = q(&self.root.join("operator.jwt")),
            sys = self.system.public_key(),
            acc = self.account.public_key(),
            dir = q(&self.root.join("resolver")),
            cert = q(&self.tls.server_cert),
            key = q(&self.tls.server_key),
        ))
    }

    /// The device registry, in the order devices were first added.
    pub fn list_devices(&self) -> Result<Vec<DeviceInfo>, SecurityError> {
        Ok(Registry::under(&self.root).lock()?.list())
    }

    /// Issues credentials for each id: a new user key, its JWT signed by the account's
    /// signing key with [`perms::device_permissions`], recorded in the registry. An id
    /// that already has valid credentials is refused unless `force`, which issues new
    /// ones and revokes the old key (the account JWT changes: push it with
    /// [`Secure::push_account_jwt`]). Nothing is issued if any id is refused. One lock
    /// and one append for the whole batch.
    pub fn issue_devices(
        &self,
        template: &SubjectTemplate,
        ids: &[String],
        force: bool,
    ) -> Result<Vec<IssuedDevice>, SecurityError> {
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            check_device_id(id)?;
            if !seen.insert(id.as_str()) {
                return Err(SecurityError::Invalid(format!(
                    "device {id} is named twice"
                )));
            }
        }
        let mut registry = Registry::under(&self.root).lock()?;
        if !force {
            if let Some(d) = ids
                .iter()
                .filter_map(|id| registry.devices.get(id))
                .find(|d| d.revoked.is_none())
            {
                return Err(SecurityError::Refused(format!(
                    "device {} already has credentials (key {}, issued {}); \
                     `fleetpipe device add {} --force` issues new ones and revokes the old key",
                    d.id,
                    d.public_key,
                    fleetpipe_proto::Timestamp::from_micros(d.issued.saturating_mul(1_000_000))
                        .to_rfc3339(),
                    d.id
                )));
            }
        }
        let account = self.account.public_key();
        let mut events = Vec::with_capacity(ids.len());
        let mut issued = Vec::with_capacity(ids.len());
        let now = jwt::now_secs();
        for id in ids {
            let replaced = registry
                .devices
                .get(id)
                .filter(|d| d.revoked.is_none())
                .map(|d| d.public_key.clone());
            if let Some(old) = &replaced {
                events.push(Event::Revoke {
                    id: id.clone(),
                    key: old.clone(),
                    at: now,
                });
            }
            let user = KeyPair::new_user();
            let (publish, subscribe) = perms::device_permissions(template, id);
            let nats = UserNats::new(publish, subscribe, &account);
            let mut claims = Claims::new(user.public_key(), id.as_str(), nats);
            claims.iat = now;
            let token = jwt::encode(&mut claims, &self.signing)?;
            let seed = user
                .seed()
                .map_err(|e| SecurityError::Invalid(format!("user seed: {e}")))?;
            events.push(Event::Add {
                id: id.clone(),
                key: user.public_key(),
                at: now,
            });
            issued.push(IssuedDevice {
                id: id.clone(),
                public_key: user.public_key(),
                issued: now,
                creds: jwt::format_creds(&token, &seed),
                replaced,
            });
        }
        registry.append(events)?;
        if issued.iter().any(|d| d.replaced.is_some()) {
            self.ensure_account_jwt(&registry.revocations, true)?;
        }
        Ok(issued)
    }

    /// Revokes device `id`'s current credentials: records it, and re-signs the account JWT
    /// with its key in `revocations` (stored, so a restart keeps it). Push the account JWT
    /// to a running server with [`Secure::push_account_jwt`].
    pub fn revoke_device(&self, id: &str) -> Result<DeviceInfo, SecurityError> {
        check_device_id(id)?;
        let mut registry = Registry::under(&self.root).lock()?;
        let Some(device) = registry.devices.get(id).cloned() else {
            return Err(SecurityError::Refused(format!(
                "no device {id} in the registry (`fleetpipe device list` shows them)"
            )));
        };
        if device.revoked.is_some() {
            // Already revoked: make sure the account JWT says so, nothing more.
            self.ensure_account_jwt(&registry.revocations, false)?;
            return Ok(device);
        }
        registry.append(vec![Event::Revoke {
            id: id.to_string(),
            key: device.public_key.clone(),
            at: jwt::now_secs(),
        }])?;
        self.ensure_account_jwt(&registry.revocations, true)?;
        Ok(registry.devices.get(id).cloned().unwrap_or(device))
    }

    /// Connection options for `service`'s user: its credentials, the CA, TLS required,
    /// its inbox prefix.
    pub fn connect_options(
        &self,
        service: Service,
    ) -> Result<async_nats::ConnectOptions, SecurityError> {
        let text = read_private(&self.creds_path(service))?;
        let options = async_nats::ConnectOptions::with_credentials(&text)
            .map_err(|e| SecurityError::Invalid(format!("{} credentials: {e}", service.name())))?;
        Ok(options
            .add_root_certificates(self.tls.ca_cert.clone())
            .require_tls(true)
            .custom_inbox_prefix(service.inbox_prefix()))
    }

    /// `base` with the NATS settings of `service`'s user: its credentials, the CA, TLS
    /// required, its inbox prefix, and `ensure` only for the admin.
    pub fn service_config(&self, base: &Config, service: Service) -> Config {
        let mut config = base.clone();
        let nats = &mut config.nats;
        nats.credentials = self.creds_path(service).display().to_string();
        nats.nkey_seed_file.clear();
        nats.user.clear();
        nats.password_file.clear();
        nats.password = None;
        nats.tls.ca = self.tls.ca_cert.display().to_string();
        nats.tls.require = true;
        nats.inbox_prefix = match service {
            Service::Admin => String::new(),
            other => other.inbox_prefix(),
        };
        nats.ensure = service == Service::Admin;
        config
    }

    /// Sends the account JWT to the server at `url` as the system account's user
    /// (`$SYS.REQ.CLAIMS.UPDATE`); the server applies it at once: revoked users are
    /// disconnected.
    pub async fn push_account_jwt(&self, url: &str) -> Result<(), SecurityError> {
        let token = self.account_jwt()?;
        let options = self.connect_options(Service::System)?;
        let servers: Vec<&str> = url.split(',').map(str::trim).collect();
        let client = tokio::time::timeout(Duration::from_secs(10), options.connect(servers))
            .await
            .map_err(|_| SecurityError::Push(format!("cannot reach NATS at {url} within 10 s")))?
            .map_err(|e| SecurityError::Push(format!("cannot connect to NATS at {url}: {e}")))?;
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request("$SYS.REQ.CLAIMS.UPDATE", token.into()),
        )
        .await
        .map_err(|_| SecurityError::Push("the server did not answer the account update".into()))?
        .map_err(|e| SecurityError::Push(format!("account update: {e}")))?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
        if let Some(err) = answer.get("error") {
            return Err(SecurityError::Push(format!(
                "the server refused the account update: {err}"
            )));
        }
        let _ = client.flush().await;
        Ok(())
    }

    /// Revocations in the stored account JWT, for checks.
    pub fn revocations(&self) -> Result<BTreeMap<String, i64>, SecurityError> {
        Ok(jwt::decode::<AccountNats>(&self.account_jwt()?)?
            .nats
            .revocations)
    }
}

fn load_key(path: &Path) -> Result<KeyPair, SecurityError> {
    let seed = read_private(path)?;
    KeyPair::from_seed(seed.trim()).map_err(|e| {
        SecurityError::Invalid(format!(
            "{} does not hold an nkey seed ({e}); restore it from a backup",
            path.display()
        ))
    })
}

fn load_or_create_key(path: &Path, new: fn() -> KeyPair) -> Result<KeyPair, SecurityError> {
    if path.exists() {
        return load_key(path);
    }
    let key = new();
    let seed = key
        .seed()
        .map_err(|e| SecurityError::Invalid(format!("nkey seed: {e}")))?;
    write_private(path, seed.as_bytes())?;
    Ok(key)
}

#[cfg(test)]
mod tests;
