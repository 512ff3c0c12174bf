//! What a subscriber asks for: the points it is sent.

use std::collections::HashSet;

use uuid::Uuid;

use crate::location::LocationRef;

/// What a subscriber wants. Every filter that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub app_source: Option<String>,
    pub devices: Option<HashSet<Uuid>>,
    /// (min_lat, max_lat, min_lon, max_lon)
    pub bbox: Option<(f64, f64, f64, f64)>,
}

impl Filter {
    pub fn matches(&self, l: &LocationRef) -> bool {
        self.app_source.as_ref().is_none_or(|a| a == l.app_source)
            && self
                .devices
                .as_ref()
                .is_none_or(|d| d.contains(&l.device_id))
            && self.bbox.is_none_or(|(a, b, c, d)| {
                (a..=b).contains(&l.latitude) && (c..=d).contains(&l.longitude)
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A filter on a box alone.
    pub(crate) fn bbox(b: (f64, f64, f64, f64)) -> Filter {
        Filter {
            bbox: Some(b),
            ..Filter::default()
        }
    }
}
