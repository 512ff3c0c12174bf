//! The point in SQL: the columns of `location_events`, and how a row of
//! them is read back into a [`ValidLocation`].

use uuid::Uuid;

use super::ValidLocation;

/// The columns of `location_events` in the order of [`LocationOf`]'s
/// fields, written once; `$metadata` is how the last one is named.
///
/// [`LocationOf`]: super::LocationOf
macro_rules! columns {
    ($metadata:literal) => {
        concat!(
            "time, device_id, user_id, app_source, latitude, longitude, ",
            "accuracy, altitude, speed, heading, ",
            $metadata
        )
    };
}

/// The columns that COPY and INSERT name, in the order
/// `pipeline::copy_encoder::encode_row` writes them.
pub const COLUMNS: &str = columns!("metadata");

/// The same columns for a SELECT on `location_events`, in the order
/// [`LocationReader`] reads them: `metadata` as the text of its JSON.
pub const SELECT_COLUMNS: &str = columns!("metadata::text AS metadata");

/// Reads rows of [`SELECT_COLUMNS`] into [`ValidLocation`]s, by
/// position (by name, each column of each row is a hash lookup: 95,000 of
/// them for a day's track). The columns' types are the statement's, the same
/// in every row: they are checked once, on the first row, and the cells are
/// then decoded without sqlx's check per cell, which cost a measurable share
/// of a day's track. `time` is read as the timestamptz it is (microseconds
/// on the wire): computing microseconds in SQL goes through `numeric`
/// (load-tests/RESULTS.md has the figures).
#[derive(Debug, Default)]
pub struct LocationReader {
    checked: bool,
}

impl LocationReader {
    pub fn read(&mut self, row: &sqlx::postgres::PgRow) -> Result<ValidLocation, sqlx::Error> {
        use chrono::{DateTime, Utc};
        use sqlx::Row;

        if !self.checked {
            check::<DateTime<Utc>>(row, 0)?;
            check::<Uuid>(row, 1)?;
            check::<Uuid>(row, 2)?;
            check::<String>(row, 3)?;
            check::<f64>(row, 4)?;
            check::<f64>(row, 5)?;
            for i in 6..10 {
                check::<Option<f32>>(row, i)?;
            }
            check::<Option<String>>(row, 10)?;
            self.checked = true;
        }
        let time: DateTime<Utc> = row.try_get_unchecked(0)?;
        Ok(ValidLocation {
            time_us: time.timestamp_micros(),
            device_id: row.try_get_unchecked(1)?,
            user_id: row.try_get_unchecked(2)?,
            app_source: row.try_get_unchecked(3)?,
            latitude: row.try_get_unchecked(4)?,
            longitude: row.try_get_unchecked(5)?,
            accuracy: row.try_get_unchecked(6)?,
            altitude: row.try_get_unchecked(7)?,
            speed: row.try_get_unchecked(8)?,
            heading: row.try_get_unchecked(9)?,
            metadata: row.try_get_unchecked(10)?,
        })
    }
}

/// Column `i` of `row` has a type that `T` decodes.
fn check<T: sqlx::Type<sqlx::Postgres>>(
    row: &sqlx::postgres::PgRow,
    i: usize,
) -> Result<(), sqlx::Error> {
    use sqlx::{Column, Row, TypeInfo};
    let ty = row.try_column(i)?.type_info();
    if T::compatible(ty) {
        Ok(())
    } else {
        Err(sqlx::Error::ColumnDecode {
            index: i.to_string(),
            source: format!(
                "location column {i} is {}, not {}",
                ty.name(),
                T::type_info().name()
            )
            .into(),
        })
    }
}
