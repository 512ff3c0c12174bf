//! What the database says exists: the facts setup plans from and doctor
//! reports. Read-only.

use sqlx::PgConnection;

use super::{SetupError, Tier};

/// The server and the objects locus owns, as found.
#[derive(Debug, Clone)]
pub struct Facts {
    pub tier: Tier,
    /// Installed timescaledb version, if any.
    pub installed: Option<String>,
    /// Version `CREATE EXTENSION` would install, if the server has it.
    pub available: Option<String>,
    pub preloaded: bool,
    /// `relkind` of each object, `None` where missing.
    pub events: Option<char>,
    pub hourly: Option<char>,
    pub pending: Option<char>,
    pub job_runs: Option<char>,
    pub tokens: Option<char>,
    pub trackers: Option<char>,
    pub notes: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    installed: Option<String>,
    available: Option<String>,
    preload: String,
    license: Option<String>,
    events: Option<String>,
    hourly: Option<String>,
    pending: Option<String>,
    job_runs: Option<String>,
    tokens: Option<String>,
    trackers: Option<String>,
}

pub async fn read(conn: &mut PgConnection) -> Result<Facts, SetupError> {
    let r: Row = sqlx::query_as(
        "SELECT
            (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS installed,
            (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb') AS available,
            current_setting('shared_preload_libraries') AS preload,
            current_setting('timescaledb.license', true) AS license,
            (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('location_events')) AS events,
            (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('location_hourly')) AS hourly,
            (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('locus_rollup_pending')) AS pending,
            (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('locus_job_runs')) AS job_runs,
            (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('locus_tokens')) AS tokens,
            (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('locus_trackers')) AS trackers",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(SetupError::sql("reading the catalog"))?;
    let kind = |k: Option<String>| k.and_then(|k| k.chars().next());
    let preloaded = r.preload.split(',').any(|l| l.trim() == "timescaledb");
    let mut notes = Vec::new();
    let tier = if r.installed.is_some() || (r.available.is_some() && preloaded) {
        if r.license.as_deref() == Some("apache") {
            notes.push(
                "TimescaleDB Apache edition: compression is not available on this tier; \
                 continuous aggregates and policies neither, so locus drops old chunks and keeps \
                 location_hourly itself"
                    .into(),
            );
            Tier::TimescaleApache
        } else {
            Tier::Timescale
        }
    } else {
        if r.available.is_some() {
            notes.push(
                "timescaledb is installed on the server but not in shared_preload_libraries; \
                 using plain PostgreSQL"
                    .into(),
            );
        }
        Tier::Postgres
    };
    Ok(Facts {
        tier,
        installed: r.installed,
        available: r.available,
        preloaded,
        events: kind(r.events),
        hourly: kind(r.hourly),
        pending: kind(r.pending),
        job_runs: kind(r.job_runs),
        tokens: kind(r.tokens),
        trackers: kind(r.trackers),
        notes,
    })
}

/// Columns of `table` with their SQL types, in order.
pub async fn columns(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Vec<(String, String)>, SetupError> {
    sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await
    .map_err(SetupError::sql(format!("reading the columns of {table}")))
}

/// Names of the indexes on `table`.
pub async fn indexes(conn: &mut PgConnection, table: &str) -> Result<Vec<String>, SetupError> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = to_regclass($1)",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await
    .map_err(SetupError::sql(format!("reading the indexes of {table}")))
}

/// `name` as an SQL identifier: always double-quoted, inner quotes doubled,
/// so that a name read from the catalog ("Archive2020", a name with a space
/// or a quote) names exactly that object when written into SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::quote_ident;

    #[test]
    fn identifiers_are_quoted_exactly() {
        assert_eq!(quote_ident("location_events"), "\"location_events\"");
        assert_eq!(quote_ident("Archive2020"), "\"Archive2020\"");
        assert_eq!(
            quote_ident("a\"b; DROP TABLE x"),
            "\"a\"\"b; DROP TABLE x\""
        );
    }
}
