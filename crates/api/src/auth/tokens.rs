//! Bearer tokens: their format, how they are stored, and the in-memory mirror requests are
//! checked against.
//!
//! A token is `fpt_<id>_<secret>`: `id` 16 lowercase hex digits (8 random bytes), `secret`
//! 43 base64url characters (32 random bytes from the operating system). The token KV bucket
//! (`fleetpipe_api_tokens`, shared by every API replica) holds one key per token, its id,
//! whose value is a [`TokenRecord`]: the name, the role, the creation time and the SHA-256
//! of the secret. The secret itself is printed once, when the token is created, and
//! stored nowhere. A plain hash is enough (no password hashing): the secret is 256 random
//! bits, so there is nothing to brute-force.
//!
//! Each API process mirrors the bucket in a [`TokenSet`] kept current by a KV watch
//! ([`watch`]), so a revocation (a purge of the key) reaches every replica within
//! milliseconds, and checking a request costs one SHA-256 and a map lookup.
//!
//! **Invariants:** a token string, a secret or a token's name is never logged; a token is
//! checked in the same way whether its id is known or not (an unknown id is compared
//! against a dummy hash), and the comparison is constant-time ([`digests_equal`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use base64::Engine as _;
use fleetpipe_proto::Timestamp;
use futures::StreamExt;
use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::Role;

/// What every token starts with (so secret scanners can recognise one).
pub const PREFIX: &str = "fpt_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// Characters of an id: two hex digits a byte.
const ID_LEN: usize = ID_BYTES * 2;
/// Characters of a secret: 32 bytes in base64url without padding.
const SECRET_LEN: usize = 43;
/// Longest token name accepted.
pub const MAX_NAME: usize = 64;

type Digest = [u8; 32];

/// A token as stored in the bucket, under its id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the secret.
    pub sha256: String,
    /// RFC 3339.
    pub created: String,
}

/// A token as shown to an administrator: never its secret nor its hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TokenInfo {
    /// The token's id: the part after `fpt_` and before the secret.
    #[schema(example = "3f9a0c1d2b4e5f60")]
    pub id: String,
    /// What the token is for (unique).
    #[schema(example = "grafana")]
    pub name: String,
    pub role: Role,
    /// When it was created (RFC 3339).
    #[schema(example = "2026-02-15T10:00:00Z")]
    pub created: String,
}

/// A token just created: the only time its secret exists outside its holder.
#[derive(Clone, Serialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// The bearer token, `fpt_<id>_<secret>`: shown this once, stored nowhere.
    #[schema(example = "fpt_3f9a0c1d2b4e5f60_Jq0…")]
    pub token: String,
}

impl fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedToken")
            .field("id", &self.info.id)
            .field("role", &self.info.role)
            .finish_non_exhaustive()
    }
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The name is empty, too long or has characters other than letters, digits, `-`, `_`,
    /// `.` and `@`.
    #[error("{0}")]
    InvalidName(String),
    /// Another token has this name.
    #[error("a token named {0:?} already exists; revoke it first or pick another name")]
    NameTaken(String),
    /// No token has this name or id.
    #[error("no token named or with id {0:?}")]
    NotFound(String),
    /// The broker failed or did not answer.
    #[error("token storage: {0}")]
    Broker(String),
    /// The operating system's random source failed.
    #[error("cannot draw random bytes for a token")]
    Random,
}

/// Checks a token name: 1 to 64 letters, digits, `-`, `_`, `.` or `@`.
pub fn check_name(name: &str) -> Result<(), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(TokenError::InvalidName(format!(
            "a token name is 1 to {MAX_NAME} letters, digits, '-', '_', '.' or '@'"
        )))
    }
}

/// Splits `fpt_<id>_<secret>` into id and secret; `None` for anything else.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let id = rest.get(..ID_LEN)?;
    let secret = rest.get(ID_LEN..)?.strip_prefix('_')?;
    let id_ok = id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let secret_ok = secret.len() == SECRET_LEN
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some((id, secret))
}

/// Whether a string is a token id (16 lowercase hex digits).
pub fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn sha256(secret: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Digest> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Compares two digests in time independent of where they differ.
pub fn digests_equal(a: &Digest, b: &Digest) -> bool {
    a.ct_eq(b).into()
}

fn random<const N: usize>() -> Result<[u8; N], TokenError> {
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| TokenError::Random)?;
    Ok(out)
}

/// A new token (id, full token string) and the record to store for it.
pub fn generate(name: &str, role: Role) -> Result<(CreatedToken, TokenRecord), TokenError> {
    check_name(name)?;
    let id = hex(&random::<ID_BYTES>()?);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random::<SECRET_BYTES>()?);
    let created = Timestamp::now().to_rfc3339();
    let record = TokenRecord {
        name: name.to_string(),
        role,
        sha256: hex(&sha256(&secret)),
        created: created.clone(),
    };
    let token = CreatedToken {
        token: format!("{PREFIX}{id}_{secret}"),
        info: TokenInfo {
            id,
            name: name.to_string(),
            role,
            created,
        },
    };
    Ok((token, record))
}

fn broker(e: impl fmt::Display) -> TokenError {
    TokenError::Broker(e.to_string())
}

/// How long one token operation may wait for the broker.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, TokenError>>,
) -> Result<T, TokenError> {
    tokio::time::timeout(BROKER_TIMEOUT, f)
        .await
        .map_err(|_| TokenError::Broker(format!("{what}: no answer within 5s")))?
}

/// Every token in the bucket, by name.
pub async fn list(bucket: &kv::Store) -> Result<Vec<TokenInfo>, TokenError> {
    timed("listing tokens", async {
        let mut keys = bucket.keys().await.map_err(broker)?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let id = key.map_err(broker)?;
            let Some(value) = bucket.get(&id).await.map_err(broker)? else {
                continue; // revoked meanwhile
            };
            if let Ok(r) = serde_json::from_slice::<TokenRecord>(&value) {
                out.push(info(&id, &r));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(out)
    })
    .await
}

fn info(id: &str, r: &TokenRecord) -> TokenInfo {
    TokenInfo {
        id: id.to_string(),
        name: r.name.clone(),
        role: r.role,
        created: r.created.clone(),
    }
}

/// Creates a token named `name` with `role` and stores its hash; the returned token is the
/// only copy of its secret. Refuses a name another token has.
pub async fn create(
    bucket: &kv::Store,
    name: &str,
    role: Role,
) -> Result<CreatedToken, TokenError> {
    check_name(name)?;
    if list(bucket).await?.iter().any(|t| t.name == name) {
        return Err(TokenError::NameTaken(name.to_string()));
    }
    let (token, record) = generate(name, role)?;
    let value = serde_json::to_vec(&record).map_err(broker)?;
    timed("storing the token", async {
        bucket
            .create(&token.info.id, value.into())
            .await
            .map_err(broker)
    })
    .await?;
    Ok(token)
}

/// Revokes the token with this id, or else the one with this name: its key is purged, so
/// every API replica forgets it at once.
pub async fn revoke(bucket: &kv::Store, name_or_id: &str) -> Result<TokenInfo, TokenError> {
    let all = list(bucket).await?;
    let found = all
        .iter()
        .find(|t| t.id == name_or_id)
        .or_else(|| all.iter().find(|t| t.name == name_or_id));
    purge(bucket, found, name_or_id).await
}

/// Revokes the token with this id (and never one merely named so).
pub async fn revoke_id(bucket: &kv::Store, id: &str) -> Result<TokenInfo, TokenError> {
    let all = list(bucket).await?;
    purge(bucket, all.iter().find(|t| t.id == id), id).await
}

async fn purge(
    bucket: &kv::Store,
    found: Option<&TokenInfo>,
    asked: &str,
) -> Result<TokenInfo, TokenError> {
    let found = found.ok_or_else(|| TokenError::NotFound(crate::params::truncate(asked)))?;
    timed("revoking the token", async {
        bucket.purge(&found.id).await.map_err(broker)
    })
    .await?;
    Ok(found.clone())
}

/// What a checked token grants.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub id: String,
    pub role: Role,
}

struct Entry {
    digest: Digest,
    record: TokenRecord,
}

/// The tokens of the bucket, in memory: what requests are checked against.
pub struct TokenSet {
    /// By id. A std `RwLock` held for one lookup or one update, never across an await.
    tokens: RwLock<HashMap<String, Entry>>,
    ready: AtomicBool,
    /// What an unknown id is compared against, so that it costs what a known one does.
    dummy: Digest,
    /// Comparisons made (one per well-formed token checked); for tests.
    compared: AtomicU64,
}

impl Default for TokenSet {
    fn default() -> Self {
        TokenSet {
            tokens: RwLock::default(),
            ready: AtomicBool::new(false),
            dummy: random::<32>().unwrap_or([0x5a; 32]),
            compared: AtomicU64::new(0),
        }
    }
}

impl TokenSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set once the watch has replayed the bucket (or for a set filled by hand).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Comparisons made so far.
    pub fn compared(&self) -> u64 {
        self.compared.load(Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.tokens.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.tokens.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The id and role of `token` if it is a valid, unrevoked token. Any malformed string
    /// is refused at once (there is no secret to compare); a well-formed one is hashed and
    /// compared in constant time against its id's hash, or a dummy for an unknown id.
    pub fn verify(&self, token: &str) -> Option<Verified> {
        let (id, secret) = parse(token)?;
        let digest = sha256(secret);
        let tokens = self.read();
        let entry = tokens.get(id);
        let expected = entry.map_or(&self.dummy, |e| &e.digest);
        self.compared.fetch_add(1, Ordering::Relaxed);
        let equal = digests_equal(expected, &digest);
        match entry {
            Some(e) if equal => Some(Verified {
                id: id.to_string(),
                role: e.record.role,
            }),
            _ => None,
        }
    }

    /// Adds or replaces a token; a record whose hash does not parse is ignored (false).
    pub fn insert(&self, id: &str, record: TokenRecord) -> bool {
        let Some(digest) = unhex(&record.sha256) else {
            return false;
        };
        if !is_id(id) {
            return false;
        }
        self.write()
            .insert(id.to_string(), Entry { digest, record });
        true
    }

    pub fn remove(&self, id: &str) {
        self.write().remove(id);
    }

    /// Every token held, by name.
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut out: Vec<TokenInfo> = self
            .read()
            .iter()
            .map(|(id, e)| info(id, &e.record))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    fn replace_all(&self, entries: HashMap<String, Entry>) {
        *self.write() = entries;
    }
}

fn entry_of(id: &str, value: &[u8]) -> Option<Entry> {
    let record: TokenRecord = serde_json::from_slice(value).ok()?;
    let digest = unhex(&record.sha256)?;
    is_id(id).then_some(Entry { digest, record })
}

/// Keeps `set` equal to the token bucket until `shutdown`. Each (re-)watch replays the
/// bucket into a fresh map and swaps it in once replayed, so a token revoked while the
/// watch was down is forgotten too; then every change applies at once.
pub async fn watch(bucket: kv::Store, set: Arc<TokenSet>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let empty = matches!(bucket.status().await, Ok(s) if s.values() == 0);
        let mut entries = match bucket.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the token bucket; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Replaying into `fresh` until the last entry (delta 0); an empty bucket has none.
        let mut fresh: Option<HashMap<String, Entry>> = if empty {
            set.replace_all(HashMap::new());
            set.mark_ready();
            None
        } else {
            Some(HashMap::new())
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = entries.next() => next,
            };
            let entry = match next {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "token watch failed; re-watching");
                    break;
                }
                None => break,
            };
            let parsed = match entry.operation {
                kv::Operation::Put => entry_of(&entry.key, &entry.value),
                kv::Operation::Delete | kv::Operation::Purge => None,
            };
            if entry.operation == kv::Operation::Put && parsed.is_none() {
                tracing::debug!(id = %entry.key, "skipped a token entry that is not a token");
            }
            match (&mut fresh, parsed) {
                (Some(map), Some(e)) => {
                    map.insert(entry.key.clone(), e);
                }
                (Some(map), None) => {
                    map.remove(&entry.key);
                }
                (None, Some(e)) => {
                    set.write().insert(entry.key.clone(), e);
                }
                (None, None) => set.remove(&entry.key),
            }
            if entry.delta == 0 {
                if let Some(map) = fresh.take() {
                    set.replace_all(map);
                    set.mark_ready();
                    tracing::info!(tokens = set.len(), "api tokens loaded");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_verify() {
        let set = TokenSet::new();
        let (token, record) = generate("ci", Role::Operator).unwrap();
        assert!(token.token.starts_with("fpt_"));
        assert_eq!(token.token.len(), 4 + ID_LEN + 1 + SECRET_LEN);
        let (id, secret) = parse(&token.token).unwrap();
        assert_eq!(id, token.info.id);
        assert_eq!(record.sha256, hex(&sha256(secret)));
        assert!(
            !format!("{token:?}").contains(secret),
            "Debug hides the secret"
        );
        assert!(set.insert(id, record));
        let v = set.verify(&token.token).unwrap();
        assert_eq!((v.id.as_str(), v.role), (id, Role::Operator));
        // Two tokens never share an id or a secret.
        let (other, _) = generate("ci", Role::Read).unwrap();
        assert_ne!(parse(&other.token), parse(&token.token));
    }

    #[test]
    fn malformed_unknown_and_wrong_tokens_are_refused() {
        let set = TokenSet::new();
        let (token, record) = generate("a", Role::Admin).unwrap();
        set.insert(&token.info.id, record);
        let (id, secret) = parse(&token.token).unwrap();
        let mut wrong = secret.to_string();
        wrong.replace_range(..1, if secret.starts_with('A') { "B" } else { "A" });
        for bad in [
            "",
            "fpt_",
            "Bearer x",
            &token.token[1..],
            &format!("{}x", token.token),
            &format!("fpt_{}", &token.token[4..].to_uppercase()),
            &format!("fpt_{id}-{secret}"),
            &format!("fpt_{id}_{}", &secret[..42]),
            &format!("fpt_{id}_{}é", &secret[..41]),
        ] {
            assert_eq!(set.verify(bad), None, "{bad:?}");
        }
        // A wrong secret and an unknown id are both compared, the latter against the dummy.
        let before = set.compared();
        assert_eq!(set.verify(&format!("fpt_{id}_{wrong}")), None);
        assert_eq!(set.verify(&format!("fpt_0123456789abcdef_{secret}")), None);
        assert_eq!(set.compared(), before + 2);
        set.remove(id);
        assert_eq!(set.verify(&token.token), None, "revoked");
    }

    #[test]
    fn constant_time_comparison() {
        let a = sha256("one");
        assert!(digests_equal(&a, &a.clone()));
        for i in [0, 15, 31] {
            let mut b = a;
            b[i] ^= 1;
            assert!(!digests_equal(&a, &b), "differs at byte {i}");
        }
        assert!(!digests_equal(&a, &sha256("two")));
    }

    #[test]
    fn names() {
        for ok in ["grafana", "ci-bot_2", "alice@example.org", &"x".repeat(64)] {
            check_name(ok).unwrap();
        }
        for bad in ["", "a b", "a\nb", "ünï", &"x".repeat(65), "a/b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn records_with_bad_hashes_are_skipped() {
        let set = TokenSet::new();
        let record = TokenRecord {
            name: "x".into(),
            role: Role::Read,
            sha256: "zz".into(),
            created: String::new(),
        };
        assert!(!set.insert("0123456789abcdef", record.clone()));
        let good = TokenRecord {
            sha256: hex(&sha256("s")),
            ..record
        };
        assert!(!set.insert("not-an-id", good.clone()));
        assert!(set.insert("0123456789abcdef", good));
        assert_eq!(set.len(), 1);
    }
}
