//! GetLatest's pages, as both transports ask for them: of listed devices
//! (in the order asked) or of an app_source's fleet (in device_id order),
//! each bounded in positions and in bytes, with a cursor to the next.

use uuid::Uuid;

use crate::{
    auth::Principal,
    query::{
        QueryError, QueryState, device_app_source, encoded, invalid, page_limit, parse_device_ids,
    },
};

/// A latest-positions request, as both transports carry it.
#[derive(Debug, Default)]
pub struct LatestRequest<'a> {
    pub device_ids: &'a [&'a str],
    /// With `device_ids`: the app_source they are of (for a caller of
    /// every app_source; else the caller's own). Alone: every device of it.
    pub app_source: &'a str,
    /// Most positions in the page; 0 for the default.
    pub limit: u32,
    /// The previous page's next cursor; empty for the first page.
    pub cursor: &'a str,
}

impl QueryState {
    /// One page of newest positions, `found` called with each, in order:
    /// of `device_ids` within an app_source (in the order asked; unknown
    /// devices left out), or of every device of `app_source` (in device_id
    /// order). With device ids, the app_source is the one asked, else the
    /// caller's (see [`device_app_source`]). Only what `caller` may read. A
    /// page ends at its limit or before its locations would pass
    /// `--max-latest-bytes`; the cursor for the next page is returned if
    /// there is one.
    pub fn latest_page(
        &self,
        caller: &Principal,
        req: &LatestRequest,
        mut found: impl FnMut(&encoded::SharedLocation),
    ) -> Result<Option<String>, QueryError> {
        caller.require_read()?;
        let most = self.limits.max_latest_page;
        let mut page = PageRoom {
            limit: self.latest_page_len(req)?,
            taken: 0,
            bytes_left: self.limits.max_latest_bytes,
        };
        let bad_cursor = || {
            invalid(format!(
                "cursor {:?} is not one this server gave for this request",
                req.cursor
            ))
        };
        if req.device_ids.len() > most as usize {
            return Err(invalid(format!("at most {most} device_ids")));
        }
        if !req.device_ids.is_empty() {
            let app = device_app_source(caller, req.app_source)?;
            let start = match req.cursor {
                "" => 0,
                c => c
                    .strip_prefix('i')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| (1..req.device_ids.len()).contains(n))
                    .ok_or_else(bad_cursor)?,
            };
            // Every id parsed first, then looked up in a loop of lookups
            // alone: each lookup is a cache miss in a map of thousands,
            // and a parse between two of them keeps the processor from
            // overlapping them (load-tests/RESULTS.md, "The handler is
            // not where the time goes").
            let devices: Vec<Uuid> = parse_device_ids(&req.device_ids[start..])?;
            let mut next = None;
            self.latest.of_devices(app, &devices, |i, l| {
                let fits = page.take(l);
                if fits {
                    found(l);
                } else {
                    next = Some(format!("i{}", start + i));
                }
                fits
            });
            return Ok(next);
        }
        if req.app_source.is_empty() {
            return Err(invalid("give device_ids or app_source"));
        }
        caller.require_app(req.app_source)?;
        let after = match req.cursor {
            "" => None,
            c => Some(
                c.strip_prefix('d')
                    .and_then(|d| Uuid::try_parse(d).ok())
                    .ok_or_else(bad_cursor)?,
            ),
        };
        let (mut last, mut more) = (None, false);
        self.latest.of_app_after(req.app_source, after, |l| {
            more = !page.take(l);
            if !more {
                found(l);
                last = Some(l.location.device_id);
            }
            !more
        });
        Ok(last.filter(|_| more).map(|d| format!("d{d}")))
    }

    /// The most positions a page for `req` holds: its limit, or by default
    /// every device asked, or `--latest-page` of an app's; a limit over
    /// `--max-latest-page` is refused.
    pub fn latest_page_len(&self, req: &LatestRequest) -> Result<usize, QueryError> {
        let most = self.limits.max_latest_page;
        Ok(match req.device_ids.len() {
            0 => page_limit(req.limit, self.limits.latest_page, most)? as usize,
            asked => (page_limit(req.limit, most, most)? as usize).min(asked),
        })
    }
}

/// A page of latest positions as it fills.
struct PageRoom {
    limit: usize,
    taken: usize,
    bytes_left: usize,
}

impl PageRoom {
    /// Whether `l` fits, and if so counts it in. The first always fits, so
    /// that every page moves on, however large one location is.
    fn take(&mut self, l: &encoded::SharedLocation) -> bool {
        let bytes = encoded::framed_len(l.encoded());
        if self.taken > 0 && (self.taken == self.limit || bytes > self.bytes_left) {
            return false;
        }
        self.taken += 1;
        self.bytes_left = self.bytes_left.saturating_sub(bytes);
        true
    }
}
