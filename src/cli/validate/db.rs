//! The Postgres settings: the URL (only parameters the client understands, readable TLS
//! files, a TLS mode that exists) and a schema name that is safe to quote into DDL.

use super::super::env::Env;
use super::super::{ConfigError, DbArgs};
use crate::settings::{redact_url, DatabaseUrl, DbSettings};

pub fn database_url(arg: Option<String>, env: &dyn Env) -> Result<String, ConfigError> {
    let url = arg
        .filter(|u| !u.trim().is_empty())
        .or_else(|| env.var("DATABASE_URL").filter(|u| !u.trim().is_empty()))
        .ok_or_else(|| {
            ConfigError::new(
                "database_url",
                "no Postgres URL is set",
                "set KDEDUP_DATABASE_URL (or DATABASE_URL), e.g. postgres://kdedup@db:5432/app",
            )
        })?;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            "database_url",
            format!("{} is not a Postgres URL", redact_url(&url)),
            "use the form postgres://user:password@host:5432/database",
        ));
    }
    check_url_parameters(&url)?;
    Ok(url)
}

/// `%XX` sequences decoded (a URL query value); anything malformed is kept as written.
pub(super) fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL parameters kdedup's Postgres client understands (sqlx's names, which follow
/// libpq's for TLS).
pub(super) const URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Refuses URL parameters the Postgres client would ignore. An ignored `ssl_mode=require`
/// (a typo) would connect in plaintext without a word; an ignored parameter's value would
/// also be logged by the client. Only the name is quoted here, never the value.
pub(super) fn check_url_parameters(url: &str) -> Result<(), ConfigError> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(());
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(k, _)| k);
        let known =
            URL_PARAMETERS.contains(&name) || (name.starts_with("options[") && name.ends_with(']'));
        if !known {
            return Err(ConfigError::new(
                "database_url",
                format!("the URL parameter {name:?} is not one kdedup's Postgres client understands (it would be ignored)"),
                format!("remove it, or use one of {}", URL_PARAMETERS.join(", ")),
            ));
        }
        if matches!(
            name,
            "sslrootcert"
                | "ssl-root-cert"
                | "ssl-ca"
                | "sslcert"
                | "ssl-cert"
                | "sslkey"
                | "ssl-key"
        ) {
            let path = percent_decode(pair.split_once('=').map_or("", |(_, v)| v));
            if let Err(e) = std::fs::File::open(&path) {
                return Err(ConfigError::new(
                    "database_url",
                    format!("{name}={path:?} cannot be read: {e}"),
                    "mount the file (in Kubernetes: a ConfigMap or Secret volume) at that path, or correct the path",
                ));
            }
        }
        if matches!(name, "sslmode" | "ssl-mode") {
            let value = pair.split_once('=').map_or("", |(_, v)| v);
            const MODES: [&str; 6] = [
                "disable",
                "allow",
                "prefer",
                "require",
                "verify-ca",
                "verify-full",
            ];
            if !MODES.contains(&value) {
                return Err(ConfigError::new(
                    "database_url",
                    format!("sslmode={value:?} is not a TLS mode"),
                    format!("use one of {} (verify-full with sslrootcert=<CA file> checks the server's name)", MODES.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

/// A Postgres identifier kdedup will quote into DDL: lower-case, digits, underscores.
pub fn validate_schema(schema: &str) -> Result<String, ConfigError> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with("pg_");
    if ok {
        Ok(schema.to_string())
    } else {
        Err(ConfigError::new(
            "db_schema",
            format!("{schema:?} is not a usable schema name"),
            "use 1-63 characters of a-z, 0-9 and _, starting with a letter or _ (not pg_)",
        ))
    }
}

impl DbArgs {
    pub fn validate(self, env: &dyn Env) -> Result<DbSettings, ConfigError> {
        if self.db_max_connections == 0 {
            return Err(ConfigError::new(
                "db_max_connections",
                "must be at least 1",
                "set it to 2 or more (the relay holds one connection of its own)",
            ));
        }
        Ok(DbSettings {
            url: DatabaseUrl::new(database_url(self.database_url, env)?),
            schema: validate_schema(&self.db_schema)?,
            max_connections: self.db_max_connections,
        })
    }
}
