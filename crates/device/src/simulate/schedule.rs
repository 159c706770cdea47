//! Which device samples which sensor when.
//!
//! Time is cut into ticks of 100 ms (the greatest common divisor of the sensor periods).
//! Every device has its own phase within a tick, so the fleet's load is spread evenly, and
//! each sensor its own offset within its period, so sensors sample independently of one
//! another. A connection walks its devices sorted by phase, round after round: a sorted
//! schedule with O(1) work per device tick and no per-device task or timer.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::vehicle::{splitmix64, Vehicle};
use super::PayloadForm;

/// Length of one tick at natural rates.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// A group of readings sampled together, and the line-protocol measurement it becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Gps,
    Speed,
    Soc,
    Torque,
}

impl Family {
    pub(crate) const ALL: [Family; 4] = [Family::Gps, Family::Speed, Family::Soc, Family::Torque];

    /// Sampling period in ticks: GPS 1 Hz, speed 2 Hz, state of charge 0.2 Hz, torque 5 Hz.
    const fn every(self) -> u64 {
        match self {
            Family::Gps => 10,
            Family::Speed => 5,
            Family::Soc => 50,
            Family::Torque => 2,
        }
    }

    /// Readings per sample: a GPS fix is latitude and longitude.
    const fn readings(self) -> usize {
        match self {
            Family::Gps => 2,
            _ => 1,
        }
    }

    /// The line-protocol measurement name.
    pub(crate) const fn measurement(self) -> &'static str {
        match self {
            Family::Gps => "gps",
            Family::Speed => "speed",
            Family::Soc => "soc",
            Family::Torque => "torque",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Average messages one device publishes per tick, used to size the schedule for a rate
/// cap. Plain and JSON send one message per reading; line protocol one per device tick
/// that has anything due.
pub(crate) fn messages_per_tick(form: PayloadForm) -> f64 {
    match form {
        PayloadForm::Plain | PayloadForm::Json => Family::ALL
            .iter()
            .map(|f| f.readings() as f64 / f.every() as f64)
            .sum(),
        PayloadForm::LineProtocol => {
            1.0 - Family::ALL
                .iter()
                .map(|f| 1.0 - 1.0 / f.every() as f64)
                .product::<f64>()
        }
    }
}

/// One reading ready to publish.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    pub(crate) family: Family,
    /// The sensor name on the subject (`gps.lat`, `speed`).
    pub(crate) sensor: &'static str,
    /// The line-protocol field (`lat`, or `value` for single-reading families).
    pub(crate) field: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) value: f64,
}

/// At most this many readings per device tick: every family at once.
pub(crate) const MAX_SAMPLES: usize = 5;

/// One virtual device: its place in the schedule and its vehicle.
#[derive(Debug)]
pub(crate) struct Device {
    /// Index in the fleet; the device id is the prefix and this number.
    pub(crate) index: usize,
    /// When in each tick this device samples, as a fraction of the tick.
    pub(crate) phase: f64,
    /// Per family, the round offset within its period.
    offsets: [u8; 4],
    /// Messages sent so far, for `Nats-Msg-Id`.
    pub(crate) seq: u64,
    pub(crate) vehicle: Vehicle,
}

impl Device {
    /// Device `index` of a fleet of `fleet`, fully determined by `seed` and `index`.
    pub(crate) fn new(seed: u64, index: usize, fleet: usize) -> Device {
        let mut rng = SmallRng::seed_from_u64(splitmix64(seed ^ splitmix64(index as u64)));
        let phase = rng.random::<f64>();
        let offsets = Family::ALL.map(|f| rng.random_range(0..f.every()) as u8);
        Device {
            index,
            phase,
            offsets,
            seq: 0,
            vehicle: Vehicle::new(rng, index, fleet),
        }
    }

    /// Whether `family` samples in round `round`.
    pub(crate) fn is_due(&self, family: Family, round: u64) -> bool {
        (round + u64::from(self.offsets[family.index()])) % family.every() == 0
    }

    /// Whether anything samples in round `round`; cheap, so idle ticks cost nothing more.
    pub(crate) fn any_due(&self, round: u64) -> bool {
        Family::ALL.iter().any(|&f| self.is_due(f, round))
    }

    /// Advances the vehicle to nominal time `t` and samples every family due in `round`
    /// into `out` (cleared first).
    pub(crate) fn sample(&mut self, round: u64, t: f64, out: &mut Vec<Sample>) {
        out.clear();
        self.vehicle.advance(t);
        for family in Family::ALL {
            if !self.is_due(family, round) {
                continue;
            }
            let one = |sensor, field, unit, value| Sample {
                family,
                sensor,
                field,
                unit,
                value,
            };
            match family {
                Family::Gps => {
                    let (lat, lon) = self.vehicle.gps();
                    out.push(one("gps.lat", "lat", "deg", lat));
                    out.push(one("gps.lon", "lon", "deg", lon));
                }
                Family::Speed => out.push(one("speed", "value", "km/h", self.vehicle.speed_kmh())),
                Family::Soc => out.push(one("soc", "value", "%", self.vehicle.soc())),
                Family::Torque => out.push(one("torque", "value", "Nm", self.vehicle.torque())),
            }
        }
    }
}

/// The devices connection `conn` of `connections` drives (every `connections`-th of the
/// fleet), sorted by phase: the order the connection walks them in each round.
pub(crate) fn share_of_fleet(
    seed: u64,
    fleet: usize,
    connections: usize,
    conn: usize,
) -> Vec<Device> {
    let mut devices: Vec<Device> = (conn..fleet)
        .step_by(connections.max(1))
        .map(|index| Device::new(seed, index, fleet))
        .collect();
    devices.sort_by(|a, b| a.phase.total_cmp(&b.phase));
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sensor_samples_at_its_own_rate() {
        let mut device = Device::new(1, 0, 10);
        let mut counts = std::collections::HashMap::new();
        let mut samples = Vec::new();
        // 50 rounds of 100 ms: 5 seconds.
        for round in 0..50 {
            device.sample(round, round as f64 * 0.1, &mut samples);
            for s in &samples {
                *counts.entry(s.sensor).or_insert(0) += 1;
            }
        }
        let expect = [
            ("torque", 25),
            ("speed", 10),
            ("gps.lat", 5),
            ("gps.lon", 5),
            ("soc", 1),
        ];
        for (sensor, n) in expect {
            assert_eq!(counts.get(sensor), Some(&n), "{sensor}");
        }
    }

    #[test]
    fn messages_per_tick_matches_the_rates() {
        // 9.2 messages per second per device: 5 torque, 2 speed, 2 GPS, 0.2 soc.
        assert!((messages_per_tick(PayloadForm::Plain) - 0.92).abs() < 1e-9);
        let lp = messages_per_tick(PayloadForm::LineProtocol);
        assert!((0.5..0.92).contains(&lp), "{lp}");
    }

    #[test]
    fn connections_share_the_fleet_in_phase_order() {
        let shares: Vec<Vec<Device>> = (0..3).map(|c| share_of_fleet(1, 10, 3, c)).collect();
        let mut indexes: Vec<usize> = shares.iter().flatten().map(|d| d.index).collect();
        indexes.sort_unstable();
        assert_eq!(indexes, (0..10).collect::<Vec<_>>());
        assert!(shares[1].iter().all(|d| d.index % 3 == 1));
        assert!(shares[0].windows(2).all(|w| w[0].phase <= w[1].phase));
    }

    #[test]
    fn devices_are_deterministic_per_seed() {
        let (a, b, c) = (
            Device::new(5, 3, 10),
            Device::new(5, 3, 10),
            Device::new(6, 3, 10),
        );
        assert_eq!((a.phase, a.offsets), (b.phase, b.offsets));
        assert_ne!(a.phase, c.phase);
    }
}
