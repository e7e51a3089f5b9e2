//! Bearer-token authorization of mutations.
//!
//! [`Authorized`] is an extractor: every mutating handler takes it as its FIRST argument, and
//! axum runs extractors in argument order, so the token is checked before the watcher name is
//! looked up or the body is read. A refused request changes nothing and learns nothing about
//! the watchers.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::{AppState, StateError};

/// The configured token, kept only as its SHA-256 digest.
pub(crate) struct ApiToken {
    digest: [u8; 32],
}

impl ApiToken {
    pub(crate) fn new(token: String) -> Result<Self, StateError> {
        if token.trim().is_empty() {
            return Err(StateError::EmptyToken);
        }
        Ok(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Whether `presented` is the token.
    ///
    /// `==` on strings stops at the first differing byte, so its timing tells an attacker how
    /// much of a guess was right and lets the token be found byte by byte. `subtle`'s `ct_eq`
    /// looks at every byte whatever they hold. Comparing fixed-size SHA-256 digests rather
    /// than the raw strings also keeps the token's length from showing in the timing
    /// (`ct_eq` on slices of different lengths returns at once).
    fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// Proof that the request carried the configured bearer token.
#[derive(Debug, Clone, Copy)]
pub struct Authorized(());

impl FromRequestParts<AppState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(token) = state.token.as_deref() else {
            return Err(ApiError::MutationsDisabled);
        };
        let Some(header) = parts.headers.get(AUTHORIZATION) else {
            return Err(ApiError::Unauthorized("missing bearer token"));
        };
        let presented =
            header
                .to_str()
                .ok()
                .and_then(bearer_credentials)
                .ok_or(ApiError::Unauthorized(
                    "the Authorization header must be `Bearer <token>`",
                ))?;
        if token.matches(presented) {
            Ok(Self(()))
        } else {
            Err(ApiError::Unauthorized("invalid bearer token"))
        }
    }
}

/// The credentials of a `Bearer` Authorization header (the scheme is case-insensitive).
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(' ')?;
    let credentials = credentials.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_credentials() {
        assert_eq!(bearer_credentials("Bearer abc"), Some("abc"));
        assert_eq!(bearer_credentials("bearer  abc "), Some("abc"));
        assert_eq!(bearer_credentials("Basic abc"), None);
        assert_eq!(bearer_credentials("Bearer "), None);
        assert_eq!(bearer_credentials("Bearer"), None);
    }

    #[test]
    fn token_matches_only_itself() {
        let t = ApiToken::new("s3cret".into()).expect("valid token");
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cret "));
        assert!(!t.matches(""));
        assert!(ApiToken::new("  ".into()).is_err());
    }
}
