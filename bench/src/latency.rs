//! One client, one request at a time: the latency a single interactive user sees, GET and SET,
//! against the unprotected VM and the FT pair in the same run. redis-benchmark's figures mix in
//! queueing behind 50 clients; here each request is alone on the wire, so the FT figure minus the
//! unprotected one is what output commit (wait for the checkpoint, then its acknowledgement) adds.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::resp::{encode, Conn, Reply};
use crate::svg::{latency_cdf, Series};

/// The key the requests use (one key: the measurement is the round trip, not the table).
const KEY: &[u8] = b"ftvm:bench:one-client";
/// The value SET writes: 32 bytes, a typical small value.
const VALUE: &[u8] = b"0123456789abcdef0123456789abcdef";
/// Requests sent before timing, so that the first connection's and the first key's costs stay out
/// of the figures.
const WARM_UP: usize = 20;
/// One request's reply may take this long before the run fails (a failover's worth, and more).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The timed requests of one target, in microseconds, in the order sent.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub set_us: Vec<f64>,
    pub get_us: Vec<f64>,
}

/// Sends `requests` SETs, then `requests` GETs, one at a time on one connection from namespace
/// `netns`, and times each from the write to the whole reply. Bounded by `limit` overall.
pub fn measure(netns: &str, requests: usize, limit: Duration) -> Result<Samples> {
    let start = Instant::now();
    let mut conn = Conn::connect_in_netns(netns, IO_TIMEOUT)?;
    let set = encode(&[b"SET", KEY, VALUE]);
    let get = encode(&[b"GET", KEY]);
    let check_set = |r: &Reply| matches!(r, Reply::Status(s) if s == "OK");
    let check_get = |r: &Reply| matches!(r, Reply::Bulk(Some(v)) if v == VALUE);
    for _ in 0..WARM_UP {
        expect(&mut conn, &set, "SET", &check_set)?;
        expect(&mut conn, &get, "GET", &check_get)?;
    }
    let mut timed = |req: &[u8], name: &str, ok: &dyn Fn(&Reply) -> bool| -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(requests);
        for i in 0..requests {
            if start.elapsed() > limit {
                bail!("{name}: only {i} of {requests} requests within {limit:?}");
            }
            let t = Instant::now();
            expect(&mut conn, req, name, ok)?;
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(out)
    };
    let set_us = timed(&set, "SET", &check_set)?;
    let get_us = timed(&get, "GET", &check_get)?;
    Ok(Samples { set_us, get_us })
}

/// One request and a check of its reply.
fn expect(conn: &mut Conn, req: &[u8], name: &str, ok: &dyn Fn(&Reply) -> bool) -> Result<()> {
    let reply = conn.request(req)?;
    if !ok(&reply) {
        bail!("{name}: unexpected reply {reply:?}");
    }
    Ok(())
}

/// The distribution of one command's latencies, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Summary {
    /// Of `samples` (nearest-rank percentiles; non-finite values ignored); `None` when empty.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        // To 0.1 µs: finer is below the clock's and the machine's noise, and reads badly.
        let r = |x: f64| (x * 10.0).round() / 10.0;
        let at = |q: f64| r(v[((v.len() as f64 * q) as usize).min(v.len() - 1)]);
        Some(Self {
            requests: v.len(),
            min_us: r(v[0]),
            mean_us: r(v.iter().sum::<f64>() / v.len() as f64),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: r(v[v.len() - 1]),
        })
    }
}

/// One target's GET and SET.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TargetLatency {
    pub set: Option<Summary>,
    pub get: Option<Summary>,
}

impl TargetLatency {
    pub fn of(s: &Samples) -> Self {
        Self { set: Summary::of(&s.set_us), get: Summary::of(&s.get_us) }
    }
}

/// FT minus unprotected for one command, in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Added {
    pub command: String,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// The one-client measurement of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OneClientReport {
    /// Timed requests per command and target (after a short warm-up).
    pub requests: usize,
    pub unprotected: Option<TargetLatency>,
    pub ft: Option<TargetLatency>,
    /// What FT adds, per command (present when both targets were measured).
    pub added: Vec<Added>,
    /// The CDF picture, relative to the results directory.
    pub svg: Option<String>,
}

impl OneClientReport {
    /// The report of the targets measured.
    pub fn new(requests: usize, unprotected: Option<&Samples>, ft: Option<&Samples>) -> Self {
        let unprotected = unprotected.map(TargetLatency::of);
        let ft = ft.map(TargetLatency::of);
        let mut added = Vec::new();
        if let (Some(u), Some(f)) = (&unprotected, &ft) {
            for (command, u, f) in [("SET", &u.set, &f.set), ("GET", &u.get, &f.get)] {
                if let (Some(u), Some(f)) = (u, f) {
                    let d = |f: f64, u: f64| ((f - u) * 10.0).round() / 10.0;
                    added.push(Added {
                        command: command.into(),
                        p50_us: d(f.p50_us, u.p50_us),
                        p99_us: d(f.p99_us, u.p99_us),
                        max_us: d(f.max_us, u.max_us),
                    });
                }
            }
        }
        Self { requests, unprotected, ft, added, svg: None }
    }

    /// Lines for the printed summary.
    pub fn table(&self) -> String {
        let mut s = format!(
            "\none client, one request at a time ({} each)\n{:<16} {:>9} {:>9} {:>9}\n",
            self.requests, "", "p50 µs", "p99 µs", "max µs"
        );
        for (target, t) in [("unprotected", &self.unprotected), ("FT", &self.ft)] {
            let Some(t) = t else { continue };
            for (cmd, sum) in [("SET", &t.set), ("GET", &t.get)] {
                if let Some(m) = sum {
                    s += &format!(
                        "{:<16} {:>9.0} {:>9.0} {:>9.0}\n",
                        format!("{cmd} {target}"),
                        m.p50_us,
                        m.p99_us,
                        m.max_us
                    );
                }
            }
        }
        for a in &self.added {
            s += &format!("{:<16} {:>+9.0} {:>+9.0} {:>+9.0}\n", format!("{} FT added", a.command), a.p50_us, a.p99_us, a.max_us);
        }
        s
    }
}

/// The CDF picture of the samples measured (GET and SET, FT solid, unprotected dashed), headed
/// with the bench `name`.
pub fn cdf_svg(name: &str, unprotected: Option<&Samples>, ft: Option<&Samples>) -> String {
    const SET: &str = "#c0392b";
    const GET: &str = "#2471a3";
    let mut series = Vec::new();
    for (target, samples, dashed) in [("FT", ft, false), ("unprotected", unprotected, true)] {
        if let Some(s) = samples {
            series.push((format!("SET {target}"), SET, dashed, s.set_us.as_slice()));
            series.push((format!("GET {target}"), GET, dashed, s.get_us.as_slice()));
        }
    }
    let series: Vec<Series<'_>> = series
        .iter()
        .map(|(label, color, dashed, samples_us)| Series { label, color, dashed: *dashed, samples_us })
        .collect();
    latency_cdf(&format!("{name}: one client, one request at a time (latency CDF)"), &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_percentiles() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
        let v: Vec<f64> = (1..=1000).rev().map(f64::from).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!(s.requests, 1000);
        assert_eq!((s.min_us, s.max_us), (1.0, 1000.0));
        assert_eq!((s.p50_us, s.p90_us, s.p99_us, s.p999_us), (501.0, 901.0, 991.0, 1000.0));
        assert_eq!(s.mean_us, 500.5);
        assert_eq!(Summary::of(&[1.04, 2.06]).unwrap().max_us, 2.1);
        let one = Summary::of(&[7.0]).unwrap();
        assert_eq!((one.p50_us, one.p99_us, one.max_us), (7.0, 7.0, 7.0));
    }

    #[test]
    fn added_latency_is_ft_minus_unprotected() {
        let u = Samples { set_us: vec![100.0; 10], get_us: vec![80.0; 10] };
        let f = Samples { set_us: vec![1100.0; 10], get_us: vec![] };
        let r = OneClientReport::new(10, Some(&u), Some(&f));
        assert_eq!(r.added.len(), 1, "GET has no FT samples");
        assert_eq!((r.added[0].command.as_str(), r.added[0].p50_us), ("SET", 1000.0));
        assert!(r.table().contains("SET FT added"));
        let only = OneClientReport::new(10, Some(&u), None);
        assert!(only.added.is_empty());
        assert!(only.table().contains("GET unprotected"));
    }

    #[test]
    fn the_picture_holds_each_target_and_command() {
        let u = Samples { set_us: vec![100.0, 120.0], get_us: vec![80.0] };
        let f = Samples { set_us: vec![1100.0], get_us: vec![900.0, 950.0] };
        let svg = cdf_svg("smoke", Some(&u), Some(&f));
        for label in ["SET FT", "GET FT", "SET unprotected", "GET unprotected", "smoke: one client"] {
            assert!(svg.contains(label), "{label} missing");
        }
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(cdf_svg("none", None, None).contains("no data"));
    }
}
