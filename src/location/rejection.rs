//! Why a point was not stored: a stable code for clients and dashboards,
//! and a message for people.

/// Why a point was rejected. [`Reason::code`] is stable: clients and
/// dashboards match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    TimeMissing,
    TimeInvalid,
    TimeInFuture,
    TimeTooOld,
    DeviceIdInvalid,
    UserIdInvalid,
    AppSourceEmpty,
    AppSourceTooLong,
    AppSourceInvalid,
    AppSourceNotAllowed,
    NotFinite,
    LatitudeOutOfRange,
    LongitudeOutOfRange,
    NullIsland,
    AccuracyNegative,
    SpeedNegative,
    SpeedTooHigh,
    HeadingOutOfRange,
    MetadataTooLarge,
    MetadataInvalid,
    MetadataNotObject,
    /// HTTP JSON: the point is not an object of the documented fields and types.
    PointMalformed,
    /// The caller's token does not cover this point's device or app_source.
    Forbidden,
    /// Valid as far as locus checks, but the database refused it (a
    /// constraint or a type's range locus does not know): found by writing
    /// its batch in parts, so that its neighbours are stored.
    RefusedByDatabase,
}

impl Reason {
    pub const ALL: [Reason; 24] = [
        Reason::TimeMissing,
        Reason::TimeInvalid,
        Reason::TimeInFuture,
        Reason::TimeTooOld,
        Reason::DeviceIdInvalid,
        Reason::UserIdInvalid,
        Reason::AppSourceEmpty,
        Reason::AppSourceTooLong,
        Reason::AppSourceInvalid,
        Reason::AppSourceNotAllowed,
        Reason::NotFinite,
        Reason::LatitudeOutOfRange,
        Reason::LongitudeOutOfRange,
        Reason::NullIsland,
        Reason::AccuracyNegative,
        Reason::SpeedNegative,
        Reason::SpeedTooHigh,
        Reason::HeadingOutOfRange,
        Reason::MetadataTooLarge,
        Reason::MetadataInvalid,
        Reason::MetadataNotObject,
        Reason::PointMalformed,
        Reason::Forbidden,
        Reason::RefusedByDatabase,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::TimeMissing => "time_missing",
            Reason::TimeInvalid => "time_invalid",
            Reason::TimeInFuture => "time_in_future",
            Reason::TimeTooOld => "time_too_old",
            Reason::DeviceIdInvalid => "device_id_invalid",
            Reason::UserIdInvalid => "user_id_invalid",
            Reason::AppSourceEmpty => "app_source_empty",
            Reason::AppSourceTooLong => "app_source_too_long",
            Reason::AppSourceInvalid => "app_source_invalid",
            Reason::AppSourceNotAllowed => "app_source_not_allowed",
            Reason::NotFinite => "number_not_finite",
            Reason::LatitudeOutOfRange => "latitude_out_of_range",
            Reason::LongitudeOutOfRange => "longitude_out_of_range",
            Reason::NullIsland => "null_island",
            Reason::AccuracyNegative => "accuracy_negative",
            Reason::SpeedNegative => "speed_negative",
            Reason::SpeedTooHigh => "speed_too_high",
            Reason::HeadingOutOfRange => "heading_out_of_range",
            Reason::MetadataTooLarge => "metadata_too_large",
            Reason::MetadataInvalid => "metadata_invalid",
            Reason::MetadataNotObject => "metadata_not_object",
            Reason::PointMalformed => "point_malformed",
            Reason::Forbidden => "forbidden",
            Reason::RefusedByDatabase => "refused_by_database",
        }
    }
}

/// A rejected point: its reason and a message for people.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
}

pub fn reject(reason: Reason, message: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn codes_are_unique() {
        let codes: HashSet<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Reason::ALL.len());
    }
}
