//! Signal models of one simulated electric vehicle.
//!
//! A vehicle drives around a closed route through a drive cycle of accelerate, cruise,
//! brake and stop phases. Speed is piecewise linear in time, so a step of any length is
//! integrated exactly: the simulator may sample a vehicle ten times a second or once an
//! hour (when a rate cap stretches the schedule) and the signals stay consistent.
//!
//! Physics runs on the simulator's nominal clock, never the wall clock, so a vehicle's
//! signals depend only on the seed, its index and the instants it is sampled at.

use std::sync::OnceLock;

use rand::rngs::SmallRng;
use rand::Rng;

/// Highest speed a vehicle reaches, km/h.
pub(crate) const MAX_SPEED_KMH: f64 = 130.0;
const MAX_SPEED: f64 = MAX_SPEED_KMH / 3.6;

/// Vehicle mass (kg), rolling resistance, air density (kg/m³), drag area Cd·A (m²),
/// wheel radius (m) and single-speed gear ratio: a mid-size electric car.
const MASS: f64 = 1900.0;
const ROLLING: f64 = 0.011;
const GRAVITY: f64 = 9.81;
const AIR_DENSITY: f64 = 1.2;
const DRAG_AREA: f64 = 0.6;
const WHEEL_RADIUS: f64 = 0.34;
const GEAR_RATIO: f64 = 9.0;
const MAX_TORQUE: f64 = 400.0;

/// Usable battery capacity, kWh.
const PACK_KWH: f64 = 60.0;
/// Below this state of charge (%) the next stop is a charging stop.
const LOW_SOC: f64 = 25.0;
/// A stopped vehicle starts charging after this many seconds (a plug-in, not a red light).
const CHARGE_AFTER: f64 = 60.0;
/// Charging speed in % per second: 2 %/min, a 72 kW fast charger on a 60 kWh pack.
const CHARGE_RATE: f64 = 2.0 / 60.0;

/// Most phase changes one `advance` walks through; a guard against a model bug looping
/// forever, far above what any real step needs (phases last seconds to minutes).
const MAX_PHASES_PER_STEP: u32 = 100_000;

/// Waypoints (latitude, longitude) of a closed loop: Paris' Boulevard Périphérique,
/// clockwise from Porte Maillot, about 35 km.
const WAYPOINTS: &[(f64, f64)] = &[
    (48.8780, 2.2830), // Porte Maillot
    (48.8890, 2.2990), // Porte de Champerret
    (48.8946, 2.3130), // Porte de Clichy
    (48.9010, 2.3300), // Porte de Saint-Ouen
    (48.8990, 2.3590), // Porte de la Chapelle
    (48.8970, 2.3860), // Porte de la Villette
    (48.8810, 2.4000), // Porte des Lilas
    (48.8640, 2.4090), // Porte de Bagnolet
    (48.8470, 2.4110), // Porte de Vincennes
    (48.8290, 2.3890), // Porte de Bercy
    (48.8190, 2.3600), // Porte d'Italie
    (48.8230, 2.3250), // Porte d'Orléans
    (48.8270, 2.3050), // Porte de Vanves
    (48.8330, 2.2780), // Porte de Sèvres
    (48.8480, 2.2570), // Porte d'Auteuil
    (48.8600, 2.2690), // Porte de la Muette
    (48.8710, 2.2750), // Porte Dauphine
];

/// Metres per degree of latitude, and of longitude at the equator.
const M_PER_DEG_LAT: f64 = 110_574.0;
const M_PER_DEG_LON: f64 = 111_320.0;

/// The route vehicles drive: a polyline with cumulative distances for fast lookup.
pub(crate) struct Route {
    points: Vec<(f64, f64)>,
    /// `cumulative[i]` is the distance from the first waypoint to waypoint `i`; the last
    /// entry closes the loop back to the first waypoint.
    cumulative: Vec<f64>,
    /// Metres per degree of longitude at the route's latitude.
    m_per_deg_lon: f64,
}

impl Route {
    /// The one route every vehicle drives, built on first use.
    pub(crate) fn get() -> &'static Route {
        static ROUTE: OnceLock<Route> = OnceLock::new();
        ROUTE.get_or_init(|| Route::new(WAYPOINTS))
    }

    fn new(points: &[(f64, f64)]) -> Route {
        let mean_lat = points.iter().map(|p| p.0).sum::<f64>() / points.len() as f64;
        let m_per_deg_lon = M_PER_DEG_LON * mean_lat.to_radians().cos();
        let mut route = Route {
            points: points.to_vec(),
            cumulative: vec![0.0],
            m_per_deg_lon,
        };
        let mut total = 0.0;
        for i in 0..points.len() {
            total += route.metres(points[i], points[(i + 1) % points.len()]);
            route.cumulative.push(total);
        }
        route
    }

    /// Length of the loop in metres.
    pub(crate) fn length(&self) -> f64 {
        self.cumulative.last().copied().unwrap_or(0.0)
    }

    /// Equirectangular distance between two nearby points: exact enough within a city.
    fn metres(&self, a: (f64, f64), b: (f64, f64)) -> f64 {
        let dy = (b.0 - a.0) * M_PER_DEG_LAT;
        let dx = (b.1 - a.1) * self.m_per_deg_lon;
        dx.hypot(dy)
    }

    /// The point `distance` metres along the loop (wrapping around), as (lat, lon).
    pub(crate) fn position(&self, distance: f64) -> (f64, f64) {
        let d = distance.rem_euclid(self.length());
        let i = self
            .cumulative
            .partition_point(|&c| c <= d)
            .saturating_sub(1)
            .min(self.points.len() - 1);
        let (a, b) = (self.points[i], self.points[(i + 1) % self.points.len()]);
        let span = self.cumulative[i + 1] - self.cumulative[i];
        let f = if span > 0.0 {
            (d - self.cumulative[i]) / span
        } else {
            0.0
        };
        (a.0 + (b.0 - a.0) * f, a.1 + (b.1 - a.1) * f)
    }

    /// Shortest distance in metres from a point to the route.
    #[cfg(test)]
    pub(crate) fn distance_to(&self, p: (f64, f64)) -> f64 {
        let to_xy = |q: (f64, f64)| (q.1 * self.m_per_deg_lon, q.0 * M_PER_DEG_LAT);
        let (px, py) = to_xy(p);
        (0..self.points.len())
            .map(|i| {
                let (ax, ay) = to_xy(self.points[i]);
                let (bx, by) = to_xy(self.points[(i + 1) % self.points.len()]);
                let (dx, dy) = (bx - ax, by - ay);
                let len2 = dx * dx + dy * dy;
                let t = if len2 > 0.0 {
                    (((px - ax) * dx + (py - ay) * dy) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                (px - ax - t * dx).hypot(py - ay - t * dy)
            })
            .fold(f64::INFINITY, f64::min)
    }
}

/// Where a vehicle is in its drive cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Accelerate,
    Cruise,
    Brake,
    Stop,
}

/// One simulated vehicle: its drive-cycle state and its own random streams.
#[derive(Debug)]
pub(crate) struct Vehicle {
    /// Drives the drive-cycle decisions only, so how often the vehicle is sampled cannot
    /// change where it goes.
    rng: SmallRng,
    /// Sensor noise, a separate SplitMix64 stream for the same reason.
    noise: u64,
    /// Nominal time of the last update, seconds since the run started.
    t: f64,
    /// Metres along the route from its first waypoint.
    distance: f64,
    /// Half the fleet drives the loop the other way round.
    forward: bool,
    /// m/s.
    speed: f64,
    /// m/s², constant within a phase.
    accel: f64,
    /// m/s, the speed the current phase ends at; set exactly when it ends, so float
    /// error never leaves a vehicle creeping at 1e-15 m/s.
    target: f64,
    phase: Phase,
    /// Seconds until the phase ends.
    phase_left: f64,
    /// Seconds stopped so far in the current stop.
    stopped_for: f64,
    /// State of charge, %.
    soc: f64,
}

impl Vehicle {
    /// A vehicle spread along the route: vehicle `index` of `fleet` starts in its own
    /// slice of the loop, so the fleet covers the whole route from the first second.
    pub(crate) fn new(mut rng: SmallRng, index: usize, fleet: usize) -> Vehicle {
        let slice = Route::get().length() / fleet.max(1) as f64;
        let distance = slice * (index as f64 + rng.random::<f64>());
        let soc = rng.random_range(35.0..95.0);
        let noise = rng.random();
        let mut v = Vehicle {
            rng,
            noise,
            t: 0.0,
            distance,
            forward: index % 2 == 0,
            speed: 0.0,
            accel: 0.0,
            target: 0.0,
            phase: Phase::Stop,
            phase_left: 0.0,
            stopped_for: 0.0,
            soc,
        };
        // Start mid-cycle, not all at a standstill, so the first minute looks like traffic.
        if v.rng.random_bool(0.2) {
            v.phase_left = v.rng.random_range(1.0..30.0);
        } else {
            v.speed = v.rng.random_range(30.0..110.0) / 3.6;
            v.target = v.speed;
            v.phase = Phase::Cruise;
            v.phase_left = v.rng.random_range(1.0..60.0);
        }
        v
    }

    /// Moves the vehicle forward to nominal time `t` (seconds); earlier times are ignored.
    pub(crate) fn advance(&mut self, t: f64) {
        let mut dt = t - self.t;
        if dt <= 0.0 || !dt.is_finite() {
            return;
        }
        self.t = t;
        let mut phases = 0;
        while dt > 0.0 && phases < MAX_PHASES_PER_STEP {
            let step = dt.min(self.phase_left);
            self.integrate(step);
            dt -= step;
            self.phase_left -= step;
            if self.phase_left <= 1e-9 {
                self.next_phase();
                phases += 1;
            }
        }
    }

    /// Integrates one step within the current phase, where acceleration is constant.
    fn integrate(&mut self, step: f64) {
        let v0 = self.speed;
        let v1 = (v0 + self.accel * step).clamp(0.0, MAX_SPEED);
        let moved = 0.5 * (v0 + v1) * step;
        self.speed = v1;
        let signed = if self.forward { moved } else { -moved };
        self.distance = (self.distance + signed).rem_euclid(Route::get().length());

        // Consumption per km grows with the square of speed (air drag): 0.16 kWh/km at
        // 50 km/h, 0.37 kWh/km at 130 km/h. Integrated exactly over the step (speed is
        // linear in time), so a long step drains as much as many short ones.
        let cubed = step * (v0 + v1) * (v0 * v0 + v1 * v1) / 4.0;
        let kwh = (0.12 * moved + 0.000_015 * 3.6 * 3.6 * cubed) / 1000.0;
        self.soc -= kwh / PACK_KWH * 100.0;

        if self.phase == Phase::Stop {
            let charging_before = (self.stopped_for - CHARGE_AFTER).max(0.0);
            self.stopped_for += step;
            let charging_after = (self.stopped_for - CHARGE_AFTER).max(0.0);
            self.soc += (charging_after - charging_before) * CHARGE_RATE;
        }
        self.soc = self.soc.clamp(0.0, 100.0);
    }

    fn next_phase(&mut self) {
        self.speed = self.target;
        match self.phase {
            Phase::Accelerate => self.cruise(),
            Phase::Brake if self.target <= 0.0 => self.stop(),
            Phase::Brake => self.cruise(),
            Phase::Stop => {
                let target = self.rng.random_range(30.0..MAX_SPEED_KMH) / 3.6;
                self.accelerate_to(target);
            }
            Phase::Cruise => {
                let r: f64 = self.rng.random();
                let kmh = self.speed * 3.6;
                if self.soc < LOW_SOC || r >= 0.6 {
                    self.brake_to(0.0);
                } else if r < 0.3 && kmh < MAX_SPEED_KMH - 10.0 {
                    let target = self.rng.random_range(kmh + 5.0..MAX_SPEED_KMH) / 3.6;
                    self.accelerate_to(target);
                } else if kmh > 30.0 {
                    let target = self.rng.random_range(20.0..kmh - 5.0) / 3.6;
                    self.brake_to(target);
                } else {
                    self.cruise();
                }
            }
        }
    }

    fn cruise(&mut self) {
        self.phase = Phase::Cruise;
        self.accel = 0.0;
        self.phase_left = self.rng.random_range(10.0..120.0);
    }

    fn accelerate_to(&mut self, target: f64) {
        let a = self.rng.random_range(1.0..3.0);
        self.phase = Phase::Accelerate;
        self.target = target;
        self.phase_left = ((target - self.speed) / a).max(1.0);
        self.accel = (target - self.speed) / self.phase_left;
    }

    fn brake_to(&mut self, target: f64) {
        let d = self.rng.random_range(1.5..4.0);
        self.phase = Phase::Brake;
        self.target = target;
        self.phase_left = ((self.speed - target) / d).max(1.0);
        self.accel = (target - self.speed) / self.phase_left;
    }

    fn stop(&mut self) {
        self.phase = Phase::Stop;
        self.speed = 0.0;
        self.target = 0.0;
        self.accel = 0.0;
        self.stopped_for = 0.0;
        self.phase_left = if self.soc < LOW_SOC {
            let goal = self.rng.random_range(80.0..95.0);
            CHARGE_AFTER + (goal - self.soc) / CHARGE_RATE
        } else {
            // Mostly red lights and traffic; a few stops are long enough to top up.
            self.rng.random_range(5.0..90.0)
        };
    }

    /// GPS fix as (lat, lon) in degrees, with a couple of metres of receiver noise,
    /// rounded to 6 decimals (about 0.1 m).
    pub(crate) fn gps(&mut self) -> (f64, f64) {
        let (lat, lon) = Route::get().position(self.distance);
        let noise = 2.0e-5;
        let lat = lat + self.noise(noise);
        let lon = lon + self.noise(noise);
        (round(lat, 1e6), round(lon, 1e6))
    }

    /// Speedometer reading in km/h, 0 to 130, with ±0.5 km/h of noise while moving.
    pub(crate) fn speed_kmh(&mut self) -> f64 {
        let kmh = self.speed * 3.6;
        let noisy = if kmh > 0.5 {
            kmh + self.noise(0.5)
        } else {
            kmh
        };
        round(noisy.clamp(0.0, MAX_SPEED_KMH), 10.0)
    }

    /// State of charge in %, 0 to 100.
    pub(crate) fn soc(&self) -> f64 {
        round(self.soc, 10.0)
    }

    /// Motor torque in Nm: what it takes to accelerate the car and overcome rolling and
    /// air resistance; negative while braking (regeneration); zero at a standstill.
    pub(crate) fn torque(&mut self) -> f64 {
        if self.speed <= 0.0 && self.accel <= 0.0 {
            return 0.0;
        }
        let v = self.speed;
        let force =
            MASS * self.accel + MASS * GRAVITY * ROLLING + 0.5 * AIR_DENSITY * DRAG_AREA * v * v;
        let torque = force * WHEEL_RADIUS / GEAR_RATIO + self.noise(2.0);
        round(torque.clamp(-MAX_TORQUE, MAX_TORQUE), 10.0)
    }
}

impl Vehicle {
    /// Uniform noise in `[-amplitude, amplitude)` from the vehicle's noise stream.
    fn noise(&mut self, amplitude: f64) -> f64 {
        self.noise = self.noise.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let unit = (splitmix64(self.noise) >> 11) as f64 / (1u64 << 53) as f64;
        (unit * 2.0 - 1.0) * amplitude
    }
}

/// SplitMix64's output function: a good 64-bit mix of a counter.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn round(value: f64, scale: f64) -> f64 {
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn vehicle(seed: u64, index: usize) -> Vehicle {
        Vehicle::new(SmallRng::seed_from_u64(seed), index, 100)
    }

    /// Drives `v` for `seconds`, sampling every `step`, and hands each sample to `check`.
    fn drive(v: &mut Vehicle, seconds: f64, step: f64, mut check: impl FnMut(&mut Vehicle)) {
        let mut t = v.t;
        while t < seconds {
            t += step;
            v.advance(t);
            check(v);
        }
    }

    #[test]
    fn speed_stays_within_limits() {
        for seed in 0..20 {
            let mut v = vehicle(seed, seed as usize);
            let mut moving = 0;
            drive(&mut v, 6.0 * 3600.0, 0.5, |v| {
                let kmh = v.speed_kmh();
                assert!((0.0..=MAX_SPEED_KMH).contains(&kmh), "speed {kmh}");
                moving += usize::from(kmh > 0.0);
            });
            assert!(moving > 1000, "seed {seed}: the vehicle should drive");
        }
    }

    #[test]
    fn soc_stays_within_limits_and_recharges() {
        let mut v = vehicle(7, 3);
        v.soc = 30.0;
        let (mut lowest, mut highest_after_low) = (100.0_f64, 0.0_f64);
        drive(&mut v, 24.0 * 3600.0, 5.0, |v| {
            let soc = v.soc();
            assert!((0.0..=100.0).contains(&soc), "soc {soc}");
            lowest = lowest.min(soc);
            if lowest < LOW_SOC {
                highest_after_low = highest_after_low.max(soc);
            }
        });
        assert!(lowest < LOW_SOC, "a day of driving drains the battery");
        assert!(highest_after_low > 75.0, "a low battery gets charged");
    }

    #[test]
    fn gps_stays_near_the_route() {
        let route = Route::get();
        assert!((30_000.0..40_000.0).contains(&route.length()));
        for index in [0, 1, 50, 99] {
            let mut v = vehicle(42, index);
            let mut travelled = Vec::new();
            drive(&mut v, 2.0 * 3600.0, 1.0, |v| {
                let fix = v.gps();
                let off = route.distance_to(fix);
                assert!(off < 10.0, "{fix:?} is {off} m off the route");
                travelled.push(v.distance);
            });
            let first = travelled.first().copied().unwrap_or_default();
            assert!(
                travelled.iter().any(|d| (d - first).abs() > 1000.0),
                "vehicle {index} should move along the route"
            );
        }
    }

    #[test]
    fn torque_follows_acceleration() {
        let mut v = vehicle(3, 0);
        drive(&mut v, 3600.0, 0.2, |v| {
            let torque = v.torque();
            assert!((-MAX_TORQUE..=MAX_TORQUE).contains(&torque));
            match v.phase {
                Phase::Accelerate => assert!(torque > 20.0, "accelerating: {torque}"),
                Phase::Brake => assert!(torque < 0.0, "braking: {torque}"),
                Phase::Stop => assert_eq!(torque, 0.0),
                Phase::Cruise => assert!(torque.abs() < 60.0, "cruising: {torque}"),
            }
        });
    }

    #[test]
    fn same_seed_same_signals_whatever_the_sampling() {
        let mut a = vehicle(9, 5);
        let mut b = vehicle(9, 5);
        // One vehicle sampled often, the other once an hour: the state must agree.
        drive(&mut a, 3600.0, 0.1, |a| {
            a.gps();
            a.speed_kmh();
            a.torque();
        });
        b.advance(a.t);
        assert_eq!(a.phase, b.phase, "{a:?}\n{b:?}");
        assert!((a.speed - b.speed).abs() < 1e-6, "{a:?}\n{b:?}");
        assert!((a.distance - b.distance).abs() < 1e-3);
        assert!((a.soc - b.soc).abs() < 1e-6);
    }
}
