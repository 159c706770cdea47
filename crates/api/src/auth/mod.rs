//! Who may call what: bearer tokens with roles, checked before any handler runs.
//!
//! Every route in [`crate::routes::table`] declares its [`Access`]; the router wraps each
//! route in [`require`] with that declaration, so a route cannot be added without one,
//! and a test walks the table to check every route under `/api/` refuses a request
//! without a token (401), with a bad one (401) and with too small a role (403).
//!
//! Roles are ordered, each granting what the ones below it grant: `read` (every read,
//! the live stream) ⊂ `operator` (device configuration, acknowledging alerts) ⊂ `admin`
//! (devices and tokens).
//!
//! A token comes in `Authorization: Bearer fpt_…`. The live stream also takes it as the
//! `access_token` query parameter, because a browser's `EventSource` cannot set headers;
//! the parameter is removed from the request before the handler (or anything that might
//! log the query) sees it, and no other route accepts it. The tokens themselves are in
//! [`tokens`].
//!
//! **Invariants:** a route's access is declared in the route table and nowhere else; 401
//! (with `WWW-Authenticate: Bearer`) for a missing or invalid token, 403 for a valid one
//! with too small a role, both as the API's JSON error; tokens are never logged.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_nats::jetstream::kv;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

pub mod tokens;

pub use tokens::{TokenSet, Verified};

/// What a token may do; each role grants what the ones before it grant.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every read, the live stream included.
    Read,
    /// Also device configuration and acknowledging alerts.
    Operator,
    /// Also devices and tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Read, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may use a route that needs `needed`.
    pub fn grants(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Role::Read),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "{:?} is not a role: read, operator or admin",
                crate::params::truncate(s)
            )),
        }
    }
}

/// What a route needs from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: probes and the dashboard's files (the page must load to ask for a token).
    Open,
    /// `/metrics`: a `read` token when `api.metrics_auth` (the default), else anyone.
    Metrics,
    /// A token with at least this role.
    Role(Role),
}

/// How this API instance authenticates; shared by every route.
#[derive(Clone)]
pub struct Auth {
    /// Whether tokens are checked at all (`api.auth` resolved).
    pub required: bool,
    /// Whether `/metrics` needs a token (when tokens are required).
    pub metrics_auth: bool,
    /// The tokens requests are checked against.
    pub tokens: Arc<TokenSet>,
    /// The token bucket, for the token routes; `None` when the process has no broker.
    pub bucket: Option<kv::Store>,
}

impl Auth {
    /// No authentication, no token storage: what tests of the read routes use.
    pub fn none() -> Self {
        Auth {
            required: false,
            metrics_auth: true,
            tokens: Arc::new(TokenSet::new()),
            bucket: None,
        }
    }

    /// Tokens required, checked against `tokens`.
    pub fn tokens(tokens: Arc<TokenSet>, bucket: Option<kv::Store>) -> Self {
        Auth {
            required: true,
            metrics_auth: true,
            tokens,
            bucket,
        }
    }

    /// The role a route with `access` needs here, if any.
    pub fn needed(&self, access: Access) -> Option<Role> {
        if !self.required {
            return None;
        }
        match access {
            Access::Open => None,
            Access::Metrics => self.metrics_auth.then_some(Role::Read),
            Access::Role(r) => Some(r),
        }
    }

    /// Checks a request's token (`bearer`, from the header or the live stream's query)
    /// for a route with `access`.
    pub fn check(&self, access: Access, bearer: Option<&str>) -> Result<(), ApiError> {
        let Some(needed) = self.needed(access) else {
            return Ok(());
        };
        if !self.tokens.is_ready() {
            return Err(ApiError::Unavailable(
                "the API tokens are still loading; try again shortly".into(),
            ));
        }
        let Some(token) = bearer else {
            return Err(ApiError::Unauthorized(
                "this route needs a bearer token (Authorization: Bearer fpt_…); an \
                 administrator creates one with `fleetpipe token add NAME --role read`"
                    .into(),
            ));
        };
        let Some(verified) = self.tokens.verify(token) else {
            return Err(ApiError::Unauthorized(
                "the bearer token is not valid: unknown, revoked or mistyped".into(),
            ));
        };
        if verified.role.grants(needed) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this route needs the {needed} role; the token has {}",
                verified.role
            )))
        }
    }
}

/// The state of [`require`] for one route: the instance's [`Auth`] and what the route
/// declared.
#[derive(Clone)]
pub struct Guard {
    pub auth: Auth,
    pub access: Access,
    /// Whether the route takes the token as `?access_token=` (the live stream only).
    pub query_token: bool,
}

/// The query parameter the live stream takes a token in.
pub const QUERY_TOKEN: &str = "access_token";

/// Middleware: lets the request through when its token grants what the route declared;
/// otherwise answers 401 or 403 without running the handler.
pub async fn require(State(guard): State<Guard>, mut req: Request, next: Next) -> Response {
    let header = bearer(req.headers());
    let from_query = if guard.query_token {
        match take_query_token(req.uri()) {
            Ok((uri, token)) => {
                *req.uri_mut() = uri;
                token
            }
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };
    let token = match header {
        Bearer::Token(t) => Some(t),
        Bearer::Malformed => Some(String::new()),
        Bearer::Absent => from_query,
    };
    match guard.auth.check(guard.access, token.as_deref()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

enum Bearer {
    Absent,
    /// An `Authorization` header that is not `Bearer <token>`: refused as a bad token.
    Malformed,
    Token(String),
}

fn bearer(headers: &HeaderMap) -> Bearer {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Bearer::Absent;
    };
    let Ok(value) = value.to_str() else {
        return Bearer::Malformed;
    };
    match value.trim().split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Bearer::Token(token.trim().to_string())
        }
        _ => Bearer::Malformed,
    }
}

/// Removes every `access_token` from the query: the URI without them, and the token if
/// there was exactly one (several are a 400).
fn take_query_token(uri: &Uri) -> Result<(Uri, Option<String>), ApiError> {
    let Some(query) = uri.query() else {
        return Ok((uri.clone(), None));
    };
    let mut token = None;
    let mut count = 0;
    let mut rest = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == QUERY_TOKEN {
            count += 1;
            token = Some(v.into_owned());
        } else {
            rest.append_pair(&k, &v);
        }
    }
    if count == 0 {
        return Ok((uri.clone(), None));
    }
    if count > 1 {
        return Err(ApiError::bad(format!(
            "parameter {QUERY_TOKEN:?} is given more than once"
        )));
    }
    let rest = rest.finish();
    let path_and_query = if rest.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{rest}", uri.path())
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    let uri = Uri::from_parts(parts).map_err(|_| ApiError::bad("malformed request target"))?;
    Ok((uri, token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin.grants(Role::Operator) && Role::Admin.grants(Role::Read));
        assert!(Role::Operator.grants(Role::Read) && !Role::Operator.grants(Role::Admin));
        assert!(!Role::Read.grants(Role::Operator));
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn bearer_headers() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            bearer(&h)
        };
        assert!(matches!(bearer(&HeaderMap::new()), Bearer::Absent));
        assert!(matches!(with("Bearer abc"), Bearer::Token(t) if t == "abc"));
        assert!(matches!(with("bearer  abc "), Bearer::Token(t) if t == "abc"));
        assert!(matches!(with("Basic abc"), Bearer::Malformed));
        assert!(matches!(with("abc"), Bearer::Malformed));
    }

    #[test]
    fn query_tokens_are_taken_out() {
        let uri: Uri = "/api/v1/live?device=v1&access_token=fpt_x&sensor=a%2Cb"
            .parse()
            .unwrap();
        let (rest, token) = take_query_token(&uri).unwrap();
        assert_eq!(token.as_deref(), Some("fpt_x"));
        assert_eq!(rest.to_string(), "/api/v1/live?device=v1&sensor=a%2Cb");
        let uri: Uri = "/api/v1/live?access_token=t".parse().unwrap();
        assert_eq!(
            take_query_token(&uri).unwrap().0.to_string(),
            "/api/v1/live"
        );
        let uri: Uri = "/api/v1/live?device=x".parse().unwrap();
        assert_eq!(take_query_token(&uri).unwrap(), (uri.clone(), None));
        let uri: Uri = "/api/v1/live?access_token=a&access_token=b"
            .parse()
            .unwrap();
        assert!(take_query_token(&uri).is_err());
    }
}
