//! `--svg FILE`: four bar charts as plain SVG text, no plotting crate, one
//! bar per system in each group (shape and payload size): delivered msg/s
//! (log scale: the shapes differ by orders of magnitude), latency
//! percentiles (p50, p90, p99, p99.9, log scale), server CPU per message
//! (log scale) and packets per message.

use std::fmt::Write;

use crate::report::{Figure, System};

const W: f64 = 960.0;
const CHART_H: f64 = 260.0;
const LEFT: f64 = 80.0;
const COLORS: [(System, &str); 5] = [
    (System::Ceiling, "#1f77b4"),
    (System::Nats, "#ff7f0e"),
    (System::Direct, "#2ca02c"),
    (System::E2e, "#9467bd"),
    (System::Fleet, "#8c564b"),
];

fn color(s: System) -> &'static str {
    COLORS
        .iter()
        .find(|(x, _)| *x == s)
        .map_or("#777", |(_, c)| c)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Groups {
    /// (label, bars: (system, value))
    groups: Vec<(String, Vec<(System, f64)>)>,
}

fn groups(figures: &[Figure], value: impl Fn(&Figure) -> Vec<(String, f64)>) -> Groups {
    let mut groups: Vec<(String, Vec<(System, f64)>)> = Vec::new();
    for f in figures {
        for (label, v) in value(f) {
            let label = format!("{} · {} B · {}", f.shape, f.payload_bytes, label);
            match groups.iter_mut().find(|(l, _)| *l == label) {
                Some((_, bars)) => bars.push((f.system, v)),
                None => groups.push((label, vec![(f.system, v)])),
            }
        }
    }
    Groups { groups }
}

fn chart(svg: &mut String, top: f64, title: &str, unit: &str, g: &Groups, log: bool) {
    let max = g
        .groups
        .iter()
        .flat_map(|(_, b)| b.iter().map(|(_, v)| *v))
        .fold(1.0f64, f64::max);
    let scale = |v: f64| {
        if log {
            (v.max(1.0).log10() / max.log10().max(1e-9)) * CHART_H
        } else {
            v / max * CHART_H
        }
    };
    let base = top + 30.0 + CHART_H;
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        top + 18.0,
        esc(title)
    );
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{base}" x2="{}" y2="{base}" stroke="#333"/>"##,
        W - 20.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="end">{} {}</text>"#,
        LEFT - 6.0,
        base - CHART_H + 4.0,
        fmt_num(max),
        esc(unit)
    );
    let n = g.groups.len().max(1) as f64;
    let slot = (W - LEFT - 20.0) / n;
    for (gi, (label, bars)) in g.groups.iter().enumerate() {
        let x0 = LEFT + gi as f64 * slot + slot * 0.1;
        let bw = slot * 0.8 / bars.len().max(1) as f64;
        for (bi, (sys, v)) in bars.iter().enumerate() {
            let h = scale(*v);
            let x = x0 + bi as f64 * bw;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{} {}: {} {}</title></rect>"#,
                base - h,
                bw * 0.9,
                color(*sys),
                sys.name(),
                esc(label),
                fmt_num(*v),
                esc(unit)
            );
            if bw > 28.0 {
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#,
                    x + bw * 0.45,
                    base - h - 3.0,
                    fmt_num(*v)
                );
            }
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
            x0 + slot * 0.4,
            base + 14.0,
            esc(label)
        );
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

pub fn render(figures: &[Figure]) -> String {
    let h = 4.0 * (CHART_H + 70.0) + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let tput = groups(figures, |f| vec![("msg/s".into(), f.messages_per_sec)]);
    chart(
        &mut svg,
        0.0,
        "Throughput (delivered msg/s, log scale)",
        "msg/s",
        &tput,
        true,
    );
    let lat = groups(figures, |f| {
        let p = &f.latency_us;
        vec![
            ("p50".into(), p.p50 as f64),
            ("p90".into(), p.p90 as f64),
            ("p99".into(), p.p99 as f64),
            ("p99.9".into(), p.p999 as f64),
        ]
    });
    chart(
        &mut svg,
        CHART_H + 70.0,
        "Latency percentiles (µs, log scale)",
        "µs",
        &lat,
        true,
    );
    let one = |value: fn(&Figure) -> Option<f64>, label: &'static str| {
        groups(figures, move |f| {
            value(f)
                .map(|v| (label.to_string(), v))
                .into_iter()
                .collect()
        })
    };
    chart(
        &mut svg,
        2.0 * (CHART_H + 70.0),
        "Server CPU per delivered message (µs, log scale)",
        "µs",
        &one(|f| f.server_cpu_us_per_msg, "server CPU"),
        true,
    );
    chart(
        &mut svg,
        3.0 * (CHART_H + 70.0),
        "Packets sent per delivered message (UDP datagrams / TCP segments)",
        "packets",
        &one(|f| f.packets_per_msg, "packets"),
        false,
    );
    let mut x = LEFT;
    let y = h - 14.0;
    for (sys, c) in COLORS {
        if figures.iter().any(|f| f.system == sys) {
            let _ = writeln!(
                svg,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{c}"/><text x="{}" y="{y}" font-size="12">{}</text>"#,
                y - 10.0,
                x + 16.0,
                sys.name()
            );
            x += 110.0;
        }
    }
    svg.push_str("</svg>\n");
    svg
}
