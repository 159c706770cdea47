//! NATS JWTs (the v2 format of `github.com/nats-io/jwt`) and `.creds` files.
//!
//! A token is `base64url(header).base64url(claims).base64url(signature)`, unpadded, the
//! header `{"typ":"JWT","alg":"ed25519-nkey"}`, the signature ed25519 by the nkey named in
//! `iss` over the first two parts. `jti` is the unpadded base32 of SHA-512/256 over the
//! JSON of the standard claims alone (`exp`, `iat`, `iss`, `name`, `sub` in the Go
//! library's field order, `jti` empty and so left out), as the Go library computes it.

use std::collections::BTreeMap;

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512_256};

use super::SecurityError;

/// The only header fleetpipe writes or accepts.
const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// Standard claims plus the NATS-specific part `N` under `nats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims<N> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    pub iat: i64,
    pub iss: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub sub: String,
    pub nats: N,
}

/// The standard claims in the Go library's field order, for the `jti` hash.
#[derive(Serialize)]
struct HashedPart<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    iat: i64,
    iss: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    sub: &'a str,
}

impl<N> Claims<N> {
    /// Claims about `sub`, issued now; `iss` and `jti` are set by [`encode`].
    pub fn new(sub: impl Into<String>, name: impl Into<String>, nats: N) -> Self {
        Claims {
            exp: None,
            jti: String::new(),
            iat: now_secs(),
            iss: String::new(),
            name: name.into(),
            sub: sub.into(),
            nats,
        }
    }

    fn hash(&self) -> String {
        let part = HashedPart {
            exp: self.exp,
            iat: self.iat,
            iss: &self.iss,
            name: &self.name,
            sub: &self.sub,
        };
        // Serialising a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&part).unwrap_or_default();
        BASE32_NOPAD.encode(&Sha512_256::digest(json))
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Signs `claims` with `signer`, setting `iss` and `jti`.
pub fn encode<N: Serialize>(
    claims: &mut Claims<N>,
    signer: &KeyPair,
) -> Result<String, SecurityError> {
    claims.iss = signer.public_key();
    claims.jti = claims.hash();
    let body = serde_json::to_vec(claims)
        .map_err(|e| SecurityError::Invalid(format!("cannot serialise claims: {e}")))?;
    let signing_input = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(HEADER.as_bytes()),
        BASE64URL_NOPAD.encode(&body)
    );
    let sig = signer
        .sign(signing_input.as_bytes())
        .map_err(|e| SecurityError::Invalid(format!("cannot sign a JWT: {e}")))?;
    Ok(format!("{signing_input}.{}", BASE64URL_NOPAD.encode(&sig)))
}

/// Decodes a token and checks its header, its signature by the key in `iss`, and its `jti`.
/// Whether that issuer is trusted is the caller's question.
pub fn decode<N: DeserializeOwned>(token: &str) -> Result<Claims<N>, SecurityError> {
    let bad = |why: &str| SecurityError::Invalid(format!("not a valid NATS JWT: {why}"));
    let mut parts = token.trim().split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("a JWT has three dot-separated parts"));
    };
    let header: serde_json::Value = BASE64URL_NOPAD
        .decode(h.as_bytes())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("the header is not base64url JSON"))?;
    let typ = header["typ"].as_str().unwrap_or_default();
    let alg = header["alg"].as_str().unwrap_or_default();
    if !typ.eq_ignore_ascii_case("jwt") || !alg.eq_ignore_ascii_case("ed25519-nkey") {
        return Err(bad(
            "the header is not {\"typ\":\"JWT\",\"alg\":\"ed25519-nkey\"}",
        ));
    }
    let body = BASE64URL_NOPAD
        .decode(c.as_bytes())
        .map_err(|_| bad("the claims are not base64url"))?;
    let claims: Claims<N> =
        serde_json::from_slice(&body).map_err(|e| bad(&format!("claims: {e}")))?;
    let sig = BASE64URL_NOPAD
        .decode(s.as_bytes())
        .map_err(|_| bad("the signature is not base64url"))?;
    let issuer =
        KeyPair::from_public_key(&claims.iss).map_err(|_| bad("iss is not an nkey public key"))?;
    let signing_input = &token.trim()[..h.len() + 1 + c.len()];
    issuer
        .verify(signing_input.as_bytes(), &sig)
        .map_err(|_| bad("the signature does not verify"))?;
    if claims.jti != claims.hash() {
        return Err(bad("jti does not match the claims"));
    }
    Ok(claims)
}

/// One direction of a user's subject permissions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Permission {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl Permission {
    pub fn allow<I: IntoIterator<Item = S>, S: Into<String>>(subjects: I) -> Permission {
        Permission {
            allow: subjects.into_iter().map(Into::into).collect(),
            deny: Vec::new(),
        }
    }
}

/// The `nats` part of a user JWT.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserNats {
    #[serde(rename = "pub", default)]
    pub publish: Permission,
    #[serde(rename = "sub", default)]
    pub subscribe: Permission,
    /// Most subscriptions, bytes, payload size; -1 for no limit.
    pub subs: i64,
    pub data: i64,
    pub payload: i64,
    /// The account, when the user is signed by one of its signing keys.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub issuer_account: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u8,
}

impl UserNats {
    pub fn new(publish: Permission, subscribe: Permission, issuer_account: &str) -> UserNats {
        UserNats {
            publish,
            subscribe,
            subs: -1,
            data: -1,
            payload: -1,
            issuer_account: issuer_account.to_string(),
            kind: "user".into(),
            version: 2,
        }
    }
}

/// An account's limits; -1 for no limit. JetStream is on when the storage limits are
/// not 0.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountLimits {
    pub subs: i64,
    pub data: i64,
    pub payload: i64,
    pub imports: i64,
    pub exports: i64,
    pub wildcards: bool,
    pub conn: i64,
    pub leaf: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mem_storage: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_storage: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub streams: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub consumer: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl AccountLimits {
    /// No limits; JetStream unlimited when `jetstream`, off otherwise.
    pub fn unlimited(jetstream: bool) -> AccountLimits {
        let js = if jetstream { -1 } else { 0 };
        AccountLimits {
            subs: -1,
            data: -1,
            payload: -1,
            imports: -1,
            exports: -1,
            wildcards: true,
            conn: -1,
            leaf: -1,
            mem_storage: js,
            disk_storage: js,
            streams: js,
            consumer: js,
        }
    }
}

/// The `nats` part of an account JWT.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountNats {
    pub limits: AccountLimits,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<String>,
    /// User public key → Unix time: user JWTs issued at or before it are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revocations: BTreeMap<String, i64>,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u8,
}

impl AccountNats {
    pub fn new(limits: AccountLimits, signing_keys: Vec<String>) -> AccountNats {
        AccountNats {
            limits,
            signing_keys,
            revocations: BTreeMap::new(),
            kind: "account".into(),
            version: 2,
        }
    }
}

/// The `nats` part of an operator JWT.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OperatorNats {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_account: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u8,
}

impl OperatorNats {
    pub fn new(system_account: &str) -> OperatorNats {
        OperatorNats {
            system_account: system_account.to_string(),
            kind: "operator".into(),
            version: 2,
        }
    }
}

/// The standard `.creds` file: a user JWT and its nkey seed, as `nsc` writes them and
/// every NATS client reads them.
pub fn format_creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The JWT and the seed of a `.creds` file.
pub fn parse_creds(text: &str) -> Result<(String, String), SecurityError> {
    // The first two lines that are neither a `---` fence nor blank nor the notice.
    let mut blocks = Vec::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("---") && line.ends_with("---") {
            inside = !inside;
        } else if inside && !line.is_empty() {
            blocks.push(line.to_string());
        }
    }
    match <[String; 2]>::try_from(blocks) {
        Ok([jwt, seed]) if seed.starts_with("SU") => Ok((jwt, seed)),
        _ => Err(SecurityError::Invalid(
            "not a .creds file: expected a NATS USER JWT block and a USER NKEY SEED block".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_jwt_round_trips_and_verifies() {
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let nats = UserNats::new(
            Permission::allow(["vehicle.d1.>"]),
            Permission::allow(["_INBOX_d1.>"]),
            "",
        );
        let mut claims = Claims::new(user.public_key(), "d1", nats);
        let token = encode(&mut claims, &account).unwrap();
        let header = token.split('.').next().unwrap();
        assert_eq!(
            BASE64URL_NOPAD.decode(header.as_bytes()).unwrap(),
            HEADER.as_bytes()
        );
        assert!(!token.contains('='), "unpadded");
        let back: Claims<UserNats> = decode(&token).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.iss, account.public_key());
        assert_eq!(back.jti.len(), 52, "base32 of 32 bytes, unpadded");
        let json: serde_json::Value = serde_json::from_slice(
            &BASE64URL_NOPAD
                .decode(token.split('.').nth(1).unwrap().as_bytes())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(json["nats"]["type"], "user");
        assert_eq!(json["nats"]["version"], 2);
        assert_eq!(json["nats"]["pub"]["allow"][0], "vehicle.d1.>");
    }

    #[test]
    fn the_jti_matches_the_go_library() {
        // Claims as the Go library hashes them: {"iat":…,"iss":…,"name":…,"sub":…}.
        let mut claims = Claims::new("UABC", "n", ());
        claims.iat = 1_700_000_000;
        claims.iss = "AXYZ".into();
        let json = r#"{"iat":1700000000,"iss":"AXYZ","name":"n","sub":"UABC"}"#;
        assert_eq!(
            claims.hash(),
            BASE32_NOPAD.encode(&Sha512_256::digest(json.as_bytes()))
        );
    }

    #[test]
    fn tampering_is_detected() {
        let account = KeyPair::new_account();
        let mut claims = Claims::new(KeyPair::new_user().public_key(), "d1", 7u32);
        let token = encode(&mut claims, &account).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        // Other claims under the same signature.
        let mut other = claims.clone();
        other.nats = 8;
        let body = BASE64URL_NOPAD.encode(&serde_json::to_vec(&other).unwrap());
        let forged = format!("{}.{}.{}", parts[0], body, parts[2]);
        assert!(decode::<u32>(&forged).is_err());
        // A jti that does not match, properly signed.
        let mut wrong = claims.clone();
        wrong.jti = "X".into();
        let body = BASE64URL_NOPAD.encode(&serde_json::to_vec(&wrong).unwrap());
        let input = format!("{}.{}", parts[0], body);
        let sig = BASE64URL_NOPAD.encode(&account.sign(input.as_bytes()).unwrap());
        let err = decode::<u32>(&format!("{input}.{sig}")).unwrap_err();
        assert!(err.to_string().contains("jti"), "{err}");
        for junk in ["", "a.b", "a.b.c", "...", "a.b.c.d", "é.é.é"] {
            assert!(decode::<u32>(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn creds_files_round_trip() {
        let user = KeyPair::new_user();
        let seed = user.seed().unwrap();
        let text = format_creds("eyJhbGciOi.eyJqdGki.c2ln", &seed);
        assert!(text.starts_with("-----BEGIN NATS USER JWT-----\n"));
        assert!(text.contains("\n------END USER NKEY SEED------\n"));
        assert_eq!(
            parse_creds(&text).unwrap(),
            ("eyJhbGciOi.eyJqdGki.c2ln".to_string(), seed)
        );
        assert!(parse_creds("nothing here").is_err());
        assert!(parse_creds("-----BEGIN X-----\nabc\n------END X------\n").is_err());
    }
}
