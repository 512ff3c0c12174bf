//! Simulated devices moving along plausible paths: heading, speed and
//! position change continuously, with stops.

use locus::proto::Location;
use uuid::Uuid;

/// A small, fast, seedable generator (splitmix64): runs repeat exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

#[derive(Debug, Clone)]
pub struct Device {
    pub device_id: Uuid,
    pub user_id: Uuid,
    pub app_source: String,
    lat: f64,
    lon: f64,
    heading: f64,
    speed: f64,
    stopped_for: u32,
    /// The device's clock: microseconds since the Unix epoch of its next fix.
    pub next_us: i64,
    interval_us: i64,
    rng: Rng,
}

impl Device {
    pub fn new(i: u64, seed: u64, app_source: &str, start_us: i64, interval_us: i64) -> Self {
        let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(i));
        let id = |r: &mut Rng| Uuid::from_u64_pair(r.next_u64(), r.next_u64());
        let device_id = id(&mut rng);
        let user_id = id(&mut rng);
        // Around Mexico City, within about 30 km.
        let lat = 19.43 + (rng.unit() - 0.5) * 0.5;
        let lon = -99.13 + (rng.unit() - 0.5) * 0.5;
        let heading = rng.unit() * 360.0;
        let speed = rng.unit() * 60.0;
        // Devices do not all report on the same microsecond.
        let offset = (rng.unit() * interval_us as f64) as i64;
        Device {
            device_id,
            user_id,
            app_source: app_source.to_string(),
            lat,
            lon,
            heading,
            speed,
            stopped_for: 0,
            next_us: start_us + offset,
            interval_us,
            rng,
        }
    }

    /// The next fix, and the device moves on.
    pub fn next_point(&mut self) -> Location {
        let dt = self.interval_us as f64 / 1e6;
        if self.stopped_for > 0 {
            self.stopped_for -= 1;
            self.speed = 0.0;
        } else if self.rng.chance(0.002) {
            self.stopped_for = 30 + (self.rng.unit() * 270.0) as u32; // a stop of 30 to 300 fixes
        } else {
            let target = 10.0 + self.rng.unit() * 110.0;
            self.speed =
                (self.speed + (target - self.speed) * 0.05 + (self.rng.unit() - 0.5) * 4.0)
                    .clamp(0.0, 120.0);
            self.heading = (self.heading + (self.rng.unit() - 0.5) * 10.0).rem_euclid(360.0);
            if self.heading >= 360.0 {
                // rem_euclid of a tiny negative number rounds up to 360.0.
                self.heading = 0.0;
            }
        }
        let meters = self.speed / 3.6 * dt;
        let rad = self.heading.to_radians();
        self.lat = (self.lat + meters * rad.cos() / 111_320.0).clamp(-89.0, 89.0);
        self.lon += meters * rad.sin() / (111_320.0 * self.lat.to_radians().cos());
        if self.lon > 180.0 {
            self.lon -= 360.0;
        } else if self.lon < -180.0 {
            self.lon += 360.0;
        }
        let t = self.next_us;
        self.next_us += self.interval_us;
        Location {
            time: Some(prost_types::Timestamp {
                seconds: t.div_euclid(1_000_000),
                nanos: (t.rem_euclid(1_000_000) * 1_000) as i32,
            }),
            device_id: self.device_id.to_string(),
            user_id: self.user_id.to_string(),
            app_source: self.app_source.clone(),
            latitude: self.lat,
            longitude: self.lon,
            accuracy: Some(3.0 + self.rng.unit() * 7.0),
            altitude: Some(2_240.0 + (self.rng.unit() - 0.5) * 4.0),
            speed: Some(self.speed),
            heading: Some(self.heading),
            metadata_json: if self.rng.chance(0.05) {
                format!(r#"{{"battery": {:.2}}}"#, 0.2 + self.rng.unit() * 0.8)
            } else {
                String::new()
            },
        }
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_continuous_and_valid() {
        let mut d = Device::new(7, 1, "mextrack", 1_780_000_000_000_000, 1_000_000);
        let mut prev = d.next_point();
        for _ in 0..10_000 {
            let p = d.next_point();
            let step = ((p.latitude - prev.latitude).powi(2)
                + (p.longitude - prev.longitude).powi(2))
            .sqrt();
            assert!(step < 0.001, "at most ~100 m in a second: {step}");
            assert!((0.0..360.0).contains(&p.heading.unwrap()));
            assert!((0.0..=120.0).contains(&p.speed.unwrap()));
            assert_eq!(p.time.unwrap().seconds - prev.time.unwrap().seconds, 1);
            prev = p;
        }
    }

    #[test]
    fn devices_stop_sometimes() {
        let mut d = Device::new(3, 2, "pshop", 0, 1_000_000);
        let stopped = (0..20_000)
            .filter(|_| d.next_point().speed == Some(0.0))
            .count();
        assert!(stopped > 100, "{stopped}");
    }
}
