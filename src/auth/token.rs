//! Tokens: their text form, their hashes, and their rows in `locus_tokens`.
//!
//! A token reads `locus_<id>_<secret>`: the id (32 hex digits) finds the row,
//! and the secret (32 random bytes, base64url) is checked against the
//! SHA-256 kept there. The secret is random, so a fast hash is enough: there
//! is nothing to guess from it. A client certificate may stand in for a
//! secret; its row keeps the SHA-256 of the certificate's DER encoding.

use std::collections::HashSet;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Principal, Role};

const PREFIX: &str = "locus_";

/// A token as the client holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: Uuid,
    pub secret: String,
}

impl Token {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self {
            id: Uuid::new_v4(),
            secret: URL_SAFE_NO_PAD.encode(bytes),
        }
    }

    /// Reads `locus_<id>_<secret>`; `None` when it is not of that shape.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        if id.len() != 32 || secret.is_empty() || secret.len() > 128 {
            return None;
        }
        Some(Self {
            id: Uuid::try_parse(id).ok()?,
            secret: secret.to_string(),
        })
    }

    pub fn secret_sha256(&self) -> [u8; 32] {
        sha256(self.secret.as_bytes())
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}_{}", self.id.simple(), self.secret)
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// What `locus token create` asks for.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub name: String,
    pub role: Role,
    pub app_source: Option<String>,
    pub devices: Vec<Uuid>,
    /// DER of a client certificate that authenticates as this token.
    pub client_cert: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("no token {0}")]
    NotFound(Uuid),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Stores a new token and returns it: the only time its secret is seen.
pub async fn create(conn: &mut PgConnection, new: &NewToken) -> Result<Token, TokenError> {
    match (new.role, &new.app_source) {
        (Role::Admin, Some(_)) => {
            return Err(TokenError::Invalid(
                "an admin token covers every app_source; give no --app-source".into(),
            ));
        }
        (Role::Admin, None) => {}
        (_, None) => {
            return Err(TokenError::Invalid(format!(
                "a {} token is bound to one app_source: give --app-source",
                new.role
            )));
        }
        (_, Some(a)) if a.is_empty() => {
            return Err(TokenError::Invalid("--app-source is empty".into()));
        }
        _ => {}
    }
    match (new.role, new.devices.is_empty()) {
        (Role::Device, true) => {
            return Err(TokenError::Invalid(
                "a device token writes for listed devices: give at least one --device".into(),
            ));
        }
        (Role::Device, false) | (_, true) => {}
        (_, false) => {
            return Err(TokenError::Invalid(
                "--device is for device tokens only".into(),
            ));
        }
    }
    let token = Token::generate();
    let cert = new.client_cert.as_deref().map(sha256);
    sqlx::query(
        "INSERT INTO locus_tokens (id, name, role, app_source, device_ids, secret_sha256, cert_sha256)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(token.id)
    .bind(&new.name)
    .bind(new.role.as_str())
    .bind(&new.app_source)
    .bind(&new.devices)
    .bind(token.secret_sha256().as_slice())
    .bind(cert.as_ref().map(|c| c.as_slice()))
    .execute(&mut *conn)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => TokenError::Invalid(
            "that client certificate already belongs to another token".into(),
        ),
        _ => TokenError::Database(e),
    })?;
    Ok(token)
}

/// A token as `locus token list` shows it: never its secret.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TokenInfo {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    pub app_source: Option<String>,
    pub device_ids: Vec<Uuid>,
    pub client_cert: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub async fn list(conn: &mut PgConnection, revoked: bool) -> Result<Vec<TokenInfo>, TokenError> {
    Ok(sqlx::query_as(
        "SELECT id, name, role, app_source, device_ids, cert_sha256 IS NOT NULL AS client_cert,
                created_at, revoked_at
         FROM locus_tokens WHERE $1 OR revoked_at IS NULL ORDER BY created_at, id",
    )
    .bind(revoked)
    .fetch_all(&mut *conn)
    .await?)
}

/// Marks a token revoked. Serving instances stop honouring it within
/// `--auth-refresh-interval`, on open streams too.
pub async fn revoke(conn: &mut PgConnection, id: Uuid) -> Result<(), TokenError> {
    let done = sqlx::query(
        "UPDATE locus_tokens SET revoked_at = coalesce(revoked_at, clock_timestamp()) WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(TokenError::NotFound(id));
    }
    Ok(())
}

/// A token row as the authenticator needs it.
#[derive(Debug)]
pub struct Stored {
    pub principal: Principal,
    pub secret_sha256: Option<Vec<u8>>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    name: String,
    role: String,
    app_source: Option<String>,
    device_ids: Vec<Uuid>,
    secret_sha256: Option<Vec<u8>>,
}

/// The token a credential names, unless it is unknown or revoked.
pub async fn lookup(
    conn: &mut PgConnection,
    credential: &super::Credential,
) -> Result<Option<Stored>, sqlx::Error> {
    const COLUMNS: &str = "id, name, role, app_source, device_ids, secret_sha256";
    let row: Option<Row> =
        match credential {
            super::Credential::Token(id) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM locus_tokens WHERE id = $1 AND revoked_at IS NULL"
                ))
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?
            }
            super::Credential::Cert(hash) => sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM locus_tokens WHERE cert_sha256 = $1 AND revoked_at IS NULL"
            ))
            .bind(hash.as_slice())
            .fetch_optional(&mut *conn)
            .await?,
        };
    Ok(row.and_then(|r| {
        let role = Role::from_str_opt(&r.role)?;
        Some(Stored {
            principal: Principal {
                token_id: Some(r.id),
                name: r.name,
                role,
                app_source: r.app_source,
                devices: r.device_ids.into_iter().collect::<HashSet<_>>(),
            },
            secret_sha256: r.secret_sha256,
        })
    }))
}

/// Tokens revoked after `since` (database time), and the database's time now.
pub async fn revoked_since(
    conn: &mut PgConnection,
    since: DateTime<Utc>,
) -> Result<(Vec<Uuid>, DateTime<Utc>), sqlx::Error> {
    sqlx::query_as(
        "SELECT array(SELECT id FROM locus_tokens WHERE revoked_at > $1), clock_timestamp()",
    )
    .bind(since)
    .fetch_one(&mut *conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_as_itself() {
        let t = Token::generate();
        let text = t.to_string();
        assert!(text.starts_with("locus_"));
        assert_eq!(Token::parse(&text), Some(t));
    }

    #[test]
    fn malformed_tokens_are_not_read() {
        let t = Token::generate();
        let good = t.to_string();
        for bad in [
            "",
            "locus_",
            "bearer",
            &good.replace("locus_", "lotus_"),
            &format!("locus_{}_", t.id.simple()),
            &format!("locus_{}", t.id.simple()),
            "locus_0123_abc",
            "locus_zz23456789abcdef0123456789abcdef_abc",
        ] {
            assert_eq!(Token::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn two_tokens_differ() {
        let (a, b) = (Token::generate(), Token::generate());
        assert_ne!(a.id, b.id);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.secret.len(), 43);
    }
}
