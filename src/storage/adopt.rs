//! Adopting a `location_events` that locus did not make (the seed's layout,
//! with DECIMAL coordinates, say): one explicit migration, in one
//! transaction, that keeps the old table and refuses when rows would be lost.

use sqlx::PgConnection;

use super::{SetupError, Step, catalog, plan::step};

/// The old table, renamed; the operator drops it once satisfied.
pub const KEPT_AS: &str = "location_events_pre_locus";

/// locus's columns ([`crate::location::COLUMNS`], with their types) and the
/// cast that brings an old column to each.
const COLUMNS: [(&str, &str, bool); 11] = [
    // (name, cast, required)
    ("time", "timestamptz", true),
    ("device_id", "uuid", true),
    ("user_id", "uuid", true),
    ("app_source", "text", true),
    ("latitude", "double precision", true),
    ("longitude", "double precision", true),
    ("accuracy", "real", false),
    ("altitude", "real", false),
    ("speed", "real", false),
    ("heading", "real", false),
    ("metadata", "jsonb", false),
];

/// Whether a plain `location_events` differs from locus's layout, or holds
/// rows, so that it must be migrated rather than converted in place.
pub async fn needs_migration(conn: &mut PgConnection) -> Result<bool, SetupError> {
    let found = catalog::columns(conn, "location_events").await?;
    let ours = COLUMNS
        .iter()
        .map(|(n, t, _)| (n.to_string(), t.to_string()))
        .collect::<Vec<_>>();
    let types_match = found.len() == ours.len()
        && found.iter().zip(&ours).all(|((n, t), (on, ot))| {
            n == on && (t == ot || (ot == "timestamptz" && t == "timestamp with time zone"))
        });
    Ok(!types_match || has_rows(conn, "location_events").await?)
}

async fn has_rows(conn: &mut PgConnection, table: &str) -> Result<bool, SetupError> {
    sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM {table})"))
        .fetch_one(&mut *conn)
        .await
        .map_err(SetupError::sql(format!("reading {table}")))
}

/// Checks that nothing would be lost, and returns the migration as one step;
/// `create` are the steps that make the new, empty `location_events`.
pub async fn migration(conn: &mut PgConnection, create: Vec<Step>) -> Result<Step, SetupError> {
    if !catalog::columns(conn, KEPT_AS).await?.is_empty() {
        return Err(SetupError::Refused(format!(
            "{KEPT_AS} exists from an earlier adoption; drop or rename it before adopting location_events again"
        )));
    }
    let found = catalog::columns(conn, "location_events").await?;
    let extra: Vec<&str> = found
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !COLUMNS.iter().any(|(c, _, _)| c == n))
        .collect();
    if !extra.is_empty() {
        return Err(SetupError::Refused(format!(
            "location_events has columns locus does not keep ({}); adopting it would lose them, so setup \
             will not touch it",
            extra.join(", ")
        )));
    }
    let missing: Vec<&str> = COLUMNS
        .iter()
        .filter(|(c, _, required)| *required && !found.iter().any(|(n, _)| n == c))
        .map(|(c, _, _)| *c)
        .collect();
    if !missing.is_empty() {
        return Err(SetupError::Refused(format!(
            "location_events lacks the required columns {}; setup will not touch it",
            missing.join(", ")
        )));
    }
    let (nulls, duplicates): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE time IS NULL OR device_id IS NULL OR user_id IS NULL OR app_source IS NULL
                                   OR latitude IS NULL OR longitude IS NULL),
                count(*) - count(DISTINCT (app_source, device_id, time))
         FROM location_events",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(SetupError::sql("checking location_events before adopting it"))?;
    if nulls > 0 {
        return Err(SetupError::Refused(format!(
            "{nulls} rows of location_events have NULL in a required column and would be lost; \
             fix or delete them, then run setup again"
        )));
    }
    if duplicates > 0 {
        return Err(SetupError::Refused(format!(
            "location_events holds {duplicates} rows that repeat an (app_source, device_id, time) and would be \
             merged by locus's unique key; find them with SELECT app_source, device_id, time, count(*) FROM \
             location_events GROUP BY 1, 2, 3 HAVING count(*) > 1, resolve them, then run setup again"
        )));
    }

    let old_indexes = catalog::indexes(conn, "location_events").await?;
    let mut sql = vec![format!("ALTER TABLE location_events RENAME TO {KEPT_AS}")];
    // Index names are per schema: free them for the new table.
    sql.extend(old_indexes.iter().map(|i| {
        format!(
            "ALTER INDEX {} RENAME TO {}",
            catalog::quote_ident(i),
            catalog::quote_ident(&pre_locus_name(i))
        )
    }));
    debug_assert!(
        create
            .first()
            .is_some_and(|s| s.sql.contains("CREATE TABLE location_events"))
    );
    sql.extend(create.into_iter().map(|s| s.sql));
    let (cols, casts): (Vec<&str>, Vec<String>) = COLUMNS
        .iter()
        .filter(|(c, _, _)| found.iter().any(|(n, _)| n == c))
        .map(|(c, cast, _)| (*c, format!("{c}::{cast}")))
        .unzip();
    sql.push(format!(
        "INSERT INTO location_events ({}) SELECT {} FROM {KEPT_AS}",
        cols.join(", "),
        casts.join(", ")
    ));
    sql.push(format!(
        "DO $$ BEGIN IF (SELECT count(*) FROM location_events) <> (SELECT count(*) FROM {KEPT_AS}) THEN \
         RAISE EXCEPTION 'adopting location_events would lose rows; nothing was changed'; END IF; END $$"
    ));
    Ok(step(
        format!(
            "adopt the existing location_events: keep it as {KEPT_AS}, copy its rows into the locus layout \
             (one transaction; fails if a row would be lost)"
        ),
        sql.join(";\n"),
    ))
}

/// `index` with `_pre_locus` added, cut to PostgreSQL's 63 bytes at a
/// character boundary (a name read from the catalog may hold any character).
fn pre_locus_name(index: &str) -> String {
    let mut name = format!("{index}_pre_locus");
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

#[cfg(test)]
mod tests {
    use super::{COLUMNS, pre_locus_name};

    /// The columns adopted are the point's, in its order.
    #[test]
    fn adopts_the_columns_of_a_location() {
        let names: Vec<&str> = COLUMNS.iter().map(|(name, _, _)| *name).collect();
        assert_eq!(names.join(", "), crate::location::COLUMNS);
    }

    #[test]
    fn kept_index_names_fit_and_cut_at_a_character() {
        assert_eq!(pre_locus_name("idx"), "idx_pre_locus");
        let long = "é".repeat(30); // 60 bytes
        let kept = pre_locus_name(&long);
        assert!(kept.len() <= 63, "{}", kept.len());
        assert!(kept.starts_with(&long[..60]));
    }
}
