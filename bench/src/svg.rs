//! A hand-written SVG of latency distributions (empirical CDFs on a logarithmic latency axis), so
//! that a results file comes with a picture without a plotting dependency. Output commit makes FT
//! latencies an order of magnitude above unprotected ones; a log axis keeps both readable.

use std::fmt::Write as _;

/// One curve: its label, colour and dash pattern, and the samples (µs) it is drawn from.
#[derive(Clone, Debug)]
pub struct Series<'a> {
    pub label: &'a str,
    /// An SVG colour (`#rrggbb`).
    pub color: &'a str,
    pub dashed: bool,
    pub samples_us: &'a [f64],
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 36.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
/// Points drawn per curve at most: a step per sample is invisible beyond this, and the file stays
/// small at any request count.
const MAX_POINTS: usize = 600;

/// XML-escapes text for element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A latency label: `50 µs`, `2 ms`, `1.5 s`.
fn format_us(us: f64) -> String {
    let trim = |x: f64| {
        let s = format!("{x:.1}");
        s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
    };
    if us >= 1e6 {
        format!("{} s", trim(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", trim(us / 1e3))
    } else {
        format!("{} µs", trim(us))
    }
}

/// The positive finite samples, sorted.
fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite() && *x > 0.0).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The CDF picture of `series`: x = latency (µs, log scale), y = fraction of requests at or below
/// it. `title` heads it (the bench name goes there). Samples that are not finite and positive are
/// left out; with none at all the axes are drawn with a "no data" note.
pub fn latency_cdf(title: &str, series: &[Series<'_>]) -> String {
    let data: Vec<Vec<f64>> = series.iter().map(|s| sorted(s.samples_us)).collect();
    let lo = data.iter().filter_map(|v| v.first()).copied().fold(f64::INFINITY, f64::min);
    let hi = data.iter().filter_map(|v| v.last()).copied().fold(0.0, f64::max);
    // Whole decades around the data (1 µs to 1 ms when there is none).
    let (d0, d1) = if lo.is_finite() && hi > 0.0 {
        let d0 = lo.log10().floor() as i32;
        (d0, (hi.log10().ceil() as i32).max(d0 + 1))
    } else {
        (0, 3)
    };
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x_of = |us: f64| LEFT + (us.log10() - f64::from(d0)) / f64::from(d1 - d0) * pw;
    let y_of = |frac: f64| TOP + (1.0 - frac) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Grid and ticks: each decade, with 2..9 as light lines; y every 0.1, labelled every 0.2.
    for d in d0..=d1 {
        let x = x_of(10f64.powi(d));
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#bbb"/>"##, TOP + ph);
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + ph + 18.0,
            escape(&format_us(10f64.powi(d)))
        );
        if d < d1 {
            for m in 2..10 {
                let x = x_of(f64::from(m) * 10f64.powi(d));
                let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/>"##, TOP + ph);
            }
        }
    }
    for i in 0..=10 {
        let frac = f64::from(i) / 10.0;
        let y = y_of(frac);
        let stroke = if i == 5 { "#999" } else { "#ddd" };
        let _ = writeln!(s, r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{stroke}"/>"#, LEFT + pw);
        if i % 2 == 0 {
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{frac:.1}</text>"#, LEFT - 6.0, y + 4.0);
        }
    }
    // p99, where tails show.
    let y99 = y_of(0.99);
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{y99:.1}" x2="{:.1}" y2="{y99:.1}" stroke="#999" stroke-dasharray="2,3"/>"##,
        LEFT + pw
    );
    let _ = writeln!(s, r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#666">p99</text>"##, LEFT + pw - 4.0, y99 - 3.0);
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency per request (µs, log scale)</text>"#,
        LEFT + pw / 2.0,
        HEIGHT - 16.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">fraction of requests</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    if data.iter().all(Vec::is_empty) {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#666">no data</text>"##,
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        );
    }
    // The curves: an empirical CDF drawn as steps through at most MAX_POINTS samples.
    for (ser, v) in series.iter().zip(&data) {
        if v.is_empty() {
            continue;
        }
        let n = v.len();
        let step = n.div_ceil(MAX_POINTS).max(1);
        let mut points = format!("{:.1},{:.1}", x_of(v[0]), y_of(0.0));
        let mut last_y = y_of(0.0);
        let mut push = |i: usize| {
            let (x, y) = (x_of(v[i]), y_of((i + 1) as f64 / n as f64));
            let _ = write!(points, " {x:.1},{last_y:.1} {x:.1},{y:.1}");
            last_y = y;
        };
        for i in (step - 1..n).step_by(step) {
            push(i);
        }
        if (n - 1) % step != step - 1 {
            push(n - 1);
        }
        let dash = if ser.dashed { r#" stroke-dasharray="6,4""# } else { "" };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.8"{dash} points="{points}"><title>{}</title></polyline>"#,
            escape(ser.color),
            escape(ser.label)
        );
    }
    // The legend, bottom right inside the plot: a CDF's curves leave that corner empty (they
    // are low only where the latency is small, on the left).
    let legend: Vec<String> =
        series.iter().zip(&data).map(|(ser, v)| format!("{} ({} requests)", ser.label, v.len())).collect();
    // About 7 px a character at 12 px sans-serif, after the 46 px of the line sample.
    let longest = legend.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let (lw, lh) = (56.0 + 7.0 * longest as f64, 10.0 + 18.0 * series.len() as f64);
    let (lx, ly) = (LEFT + pw - lw - 12.0, TOP + ph - lh - 12.0);
    let _ = writeln!(
        s,
        r##"<rect x="{lx}" y="{ly}" width="{lw}" height="{lh}" fill="white" fill-opacity="0.85" stroke="#999"/>"##
    );
    for (i, (ser, text)) in series.iter().zip(&legend).enumerate() {
        let y = ly + 16.0 + 18.0 * i as f64;
        let dash = if ser.dashed { r#" stroke-dasharray="6,4""# } else { "" };
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="1.8"{dash}/>"#,
            lx + 8.0,
            lx + 38.0,
            escape(ser.color)
        );
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, lx + 46.0, y + 4.0, escape(text));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that every element is closed in order (self-closed or with its end tag), that
    /// attribute values are quoted, and that `&` only starts an entity: enough to catch what a
    /// hand-written writer gets wrong, without an XML parser.
    fn well_formed(svg: &str) -> Result<(), String> {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            check_text(text)?;
            let close = rest[open..].find('>').ok_or("unclosed tag")? + open;
            let tag = &rest[open + 1..close];
            if let Some(name) = tag.strip_prefix('/') {
                let top = stack.pop().ok_or(format!("</{name}> without an opening tag"))?;
                if top != name.trim() {
                    return Err(format!("</{name}> closes <{top}>"));
                }
            } else {
                let self_closed = tag.ends_with('/');
                let body = tag.trim_end_matches('/');
                let name = body.split_whitespace().next().ok_or("empty tag")?;
                if !body.matches('"').count().is_multiple_of(2) {
                    return Err(format!("unbalanced quotes in <{tag}>"));
                }
                check_text(body)?;
                if !self_closed {
                    stack.push(name.to_string());
                }
            }
            rest = &rest[close + 1..];
        }
        check_text(rest)?;
        if let Some(top) = stack.pop() {
            return Err(format!("<{top}> not closed"));
        }
        if !svg.trim_start().starts_with("<svg") || !svg.trim_end().ends_with("</svg>") {
            return Err("not one <svg> element".into());
        }
        Ok(())
    }

    fn check_text(text: &str) -> Result<(), String> {
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..];
            if !["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].iter().any(|e| entity.starts_with(e)) {
                return Err(format!("bare & in {text:?}"));
            }
        }
        if text.contains('>') {
            return Err(format!("bare > in {text:?}"));
        }
        Ok(())
    }

    #[test]
    fn the_checker_catches_mistakes() {
        assert!(well_formed("<svg><g></g></svg>").is_ok());
        assert!(well_formed("<svg><g></svg>").is_err());
        assert!(well_formed("<svg><text>a & b</text></svg>").is_err());
        assert!(well_formed(r#"<svg><line x="1/></svg>"#).is_err());
    }

    #[test]
    fn draws_every_series_with_its_legend() {
        let ft: Vec<f64> = (0..5000).map(|i| 900.0 + f64::from(i % 700)).collect();
        let un: Vec<f64> = (0..5000).map(|i| 60.0 + f64::from(i % 50)).collect();
        let svg = latency_cdf(
            "bench <smoke> & co",
            &[
                Series { label: "SET FT", color: "#c0392b", dashed: false, samples_us: &ft },
                Series { label: "SET unprotected", color: "#c0392b", dashed: true, samples_us: &un },
            ],
        );
        well_formed(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        assert!(svg.contains("bench &lt;smoke&gt; &amp; co"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("SET FT (5000 requests)") && svg.contains("SET unprotected (5000 requests)"));
        assert!(svg.contains("fraction of requests") && svg.contains("latency per request"));
        // Decades from 10 µs to 10 ms around 60 µs..1.6 ms.
        assert!(svg.contains(">10 µs<") && svg.contains(">10 ms<"), "{svg}");
        // Each curve ends at fraction 1 (y = TOP) and is thinned to at most MAX_POINTS steps.
        for line in svg.lines().filter(|l| l.starts_with("<polyline")) {
            let points = line.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
            let pts: Vec<&str> = points.split(' ').collect();
            assert!(pts.len() <= 2 * MAX_POINTS + 3, "{} points", pts.len());
            assert!(pts.last().unwrap().ends_with(&format!(",{TOP:.1}")), "{}", pts.last().unwrap());
        }
    }

    #[test]
    fn sane_with_empty_and_odd_input() {
        let empty = latency_cdf("empty", &[]);
        well_formed(&empty).unwrap();
        assert!(empty.contains("no data"));
        let odd = [f64::NAN, -1.0, 0.0, f64::INFINITY];
        let svg = latency_cdf("odd", &[Series { label: "odd", color: "#000", dashed: false, samples_us: &odd }]);
        well_formed(&svg).unwrap();
        assert!(svg.contains("no data") && !svg.contains("<polyline") && !svg.contains("NaN"));
        let one = latency_cdf("one", &[Series { label: "one", color: "#000", dashed: false, samples_us: &[250.0] }]);
        well_formed(&one).unwrap();
        assert_eq!(one.matches("<polyline").count(), 1);
        assert!(!one.contains("NaN") && !one.contains("inf"));
    }

    #[test]
    fn latency_labels() {
        assert_eq!(format_us(1.0), "1 µs");
        assert_eq!(format_us(100.0), "100 µs");
        assert_eq!(format_us(1000.0), "1 ms");
        assert_eq!(format_us(1500.0), "1.5 ms");
        assert_eq!(format_us(1e7), "10 s");
    }
}
