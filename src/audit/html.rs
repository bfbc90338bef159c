//! `audit --format html`: the report as one self-contained page. Charts are inline SVG written
//! here; the page has no script and its Content-Security-Policy lets it fetch nothing, so it
//! views offline and a name that slipped through escaping could not run.
//!
//! Every string that comes from records or training data (route, model, action, training set
//! names) is attacker-influenced and goes through [`esc`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::{BiasRow, LoopRow, RateRow, Report};

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}\
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}\
h3{font-size:15px;margin:20px 0 4px}\
table{border-collapse:collapse;margin:8px 0}th,td{padding:3px 8px;border:1px solid #ddd;text-align:right}\
th{background:#f3f3f3}td.l,th.l{text-align:left}\
td.direct{outline:2px solid #c0392b}td.hidden{outline:2px solid #e67e22}\
.legend span{margin-right:14px;white-space:nowrap}.legend i{display:inline-block;width:14px;height:3px;\
vertical-align:middle;margin-right:4px}.note{color:#666}svg{display:block}";

/// Line colours, by series index (actions of a route, then threshold and limit outcomes).
const PALETTE: [&str; 8] = [
    "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f", "#e377c2",
];
const BREACH: &str = "#d62728";

/// The report as an HTML page.
pub fn render_html(report: &Report) -> String {
    let mut out = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <title>sluicegate audit</title>\n<style>",
    );
    out.push_str(STYLE);
    out.push_str("</style></head><body>\n<h1>sluicegate audit</h1>\n");
    let _ = writeln!(
        out,
        "<p>{} predictions read; time buckets of {}.</p>",
        report.predictions_read,
        humantime::format_duration(std::time::Duration::from_millis(
            report.bucket_ms.max(0) as u64
        ))
    );
    rates_section(&mut out, report);
    loops_section(&mut out, &report.feedback_loops);
    bias_section(&mut out, &report.bias);
    out.push_str("</body></html>\n");
    out
}

/// A section's heading; when it has nothing to show, the note saying why, and `false`.
fn section(out: &mut String, title: &str, empty: bool, why_empty: &str) -> bool {
    let _ = writeln!(out, "<h2>{title}</h2>");
    if empty {
        let _ = writeln!(out, "<p class=\"note\">{why_empty}</p>");
    }
    !empty
}

/// Escapes text for HTML content and attribute values (and SVG inside HTML).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn rates_section(out: &mut String, report: &Report) {
    let title = "Action rates, thresholds and limits over time";
    if !section(
        out,
        title,
        report.action_rates.is_empty(),
        "No predictions read.",
    ) {
        return;
    }
    let mut by_route: BTreeMap<&str, Vec<&RateRow>> = BTreeMap::new();
    for row in &report.action_rates {
        by_route.entry(&row.route).or_default().push(row);
    }
    // One time axis for every route, so their charts line up.
    let first = report.action_rates.iter().map(|r| r.bucket_start_ms).min();
    let last = report.action_rates.iter().map(|r| r.bucket_start_ms).max();
    let span = (first.unwrap_or(0), last.unwrap_or(0));
    for (route, rows) in by_route {
        let decisions: u64 = rows.iter().map(|r| r.decisions).sum();
        let _ = writeln!(
            out,
            "<h3>Route {}</h3><p class=\"note\">{decisions} decisions in {} bucket{}.</p>",
            esc(route),
            rows.len(),
            if rows.len() == 1 { "" } else { "s" }
        );
        let breaches: Vec<i64> = rows
            .iter()
            .filter(|r| r.breaches_started > 0)
            .map(|r| r.bucket_start_ms)
            .collect();
        let actions: BTreeSet<&String> = rows.iter().flat_map(|r| r.action_counts.keys()).collect();
        let rates: Vec<Series> = actions
            .into_iter()
            .map(|a| Series {
                name: format!("{a} rate"),
                points: rows
                    .iter()
                    .filter(|r| r.decisions > 0)
                    .map(|r| (r.bucket_start_ms, r.actions.get(a).copied().unwrap_or(0.0)))
                    .collect(),
            })
            .collect();
        chart(
            out,
            "Action rate",
            span,
            Some((0.0, 1.0)),
            &rates,
            &breaches,
        );
        let threshold = Series {
            name: "mean threshold".into(),
            points: rows
                .iter()
                .filter_map(|r| Some((r.bucket_start_ms, r.mean_threshold?)))
                .collect(),
        };
        if !threshold.points.is_empty() {
            chart(out, "Threshold", span, None, &[threshold], &breaches);
        }
        let outcome = |name: &str, count: fn(&RateRow) -> u64| Series {
            name: name.into(),
            points: rows
                .iter()
                .map(|r| (r.bucket_start_ms, count(r) as f64))
                .collect(),
        };
        let limits = [
            outcome("flagged", |r| r.flagged),
            outcome("fallback", |r| r.fallback),
            outcome("rejected requests", |r| r.rejected_requests),
        ];
        chart(out, "Limit outcomes", span, None, &limits, &breaches);
    }
}

/// One line of a chart: (bucket start in ms, value) points.
struct Series {
    name: String,
    points: Vec<(i64, f64)>,
}

const W: f64 = 900.0;
const H: f64 = 150.0;
/// Plot area inside the SVG: left, right, top, bottom.
const PLOT: (f64, f64, f64, f64) = (60.0, 880.0, 10.0, 125.0);

/// A line chart over `span` (first and last bucket start); `y` fixes the value range, else it
/// is the data's (from 0 when all are positive). Breaches are red dashed verticals.
fn chart(
    out: &mut String,
    title: &str,
    span: (i64, i64),
    y: Option<(f64, f64)>,
    series: &[Series],
    breaches: &[i64],
) {
    let values = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = y.unwrap_or_else(|| {
        let lo = values().fold(0.0_f64, f64::min);
        let hi = values().fold(f64::NEG_INFINITY, f64::max);
        (lo, if hi > lo { hi } else { lo + 1.0 })
    });
    out.push_str("<div class=\"legend\">");
    let _ = write!(out, "<b>{}</b> ", esc(title));
    for (i, s) in series.iter().enumerate() {
        let _ = write!(
            out,
            "<span><i style=\"background:{}\"></i>{}</span>",
            PALETTE[i % PALETTE.len()],
            esc(&s.name)
        );
    }
    if !breaches.is_empty() {
        let _ = write!(
            out,
            "<span><i style=\"background:{BREACH}\"></i>limit breach started</span>"
        );
    }
    out.push_str("</div>\n");
    let (left, right, top, bottom) = PLOT;
    let x = |ms: i64| {
        if span.1 > span.0 {
            left + (right - left) * (ms - span.0) as f64 / (span.1 - span.0) as f64
        } else {
            (left + right) / 2.0
        }
    };
    let yv = |v: f64| bottom - (bottom - top) * ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">\
         <rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"#fafafa\" stroke=\"#bbb\"/>",
        esc(title),
        right - left,
        bottom - top
    );
    for v in [lo, (lo + hi) / 2.0, hi] {
        let _ = write!(
            out,
            "<text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            yv(v) + 4.0,
            number(v)
        );
    }
    let ends = if span.1 > span.0 {
        vec![(span.0, "start"), (span.1, "end")]
    } else {
        vec![(span.0, "middle")]
    };
    for (ms, anchor) in ends {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"{anchor}\">{}</text>",
            x(ms),
            H - 6.0,
            time(ms)
        );
    }
    for ms in breaches {
        let _ = write!(
            out,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"{BREACH}\" stroke-dasharray=\"4 3\"/>",
            x(*ms)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let coords: Vec<(f64, f64)> = s.points.iter().map(|&(ms, v)| (x(ms), yv(v))).collect();
        let line: Vec<String> = coords
            .iter()
            .map(|(cx, cy)| format!("{cx:.1},{cy:.1}"))
            .collect();
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            line.join(" ")
        );
        for (cx, cy) in coords {
            let _ = write!(
                out,
                "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"2.5\" fill=\"{color}\"/>"
            );
        }
    }
    out.push_str("</svg>\n");
}

fn number(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// A bucket start as `YYYY-MM-DD HH:MM:SS` (UTC), with milliseconds when it has them.
fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    let text = if ms % 1000 == 0 {
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        humantime::format_rfc3339_millis(t).to_string()
    };
    text.replacen('T', " ", 1).trim_end_matches('Z').to_owned()
}

/// The feedback-loop matrix: training sets down, producers across, each cell the share of the
/// set's rows that producer made (shaded by it; direct loops outlined red, hidden orange).
fn loops_section(out: &mut String, rows: &[LoopRow]) {
    let why_empty = "No training sets given (<code>--training</code>).";
    if !section(out, "Feedback loops", rows.is_empty(), why_empty) {
        return;
    }
    out.push_str(
        "<p class=\"note\">Share of each training set's rows produced by a model (rows / total); \
         <span style=\"outline:2px solid #c0392b\">direct</span> loops are a model's own outputs, \
         <span style=\"outline:2px solid #e67e22\">hidden</span> ones another model's.</p>\n",
    );
    let producers: BTreeSet<&str> = rows.iter().map(|r| r.producer.as_str()).collect();
    let mut sets: BTreeMap<&str, Vec<&LoopRow>> = BTreeMap::new();
    for r in rows {
        sets.entry(&r.training_set).or_default().push(r);
    }
    out.push_str("<table><tr><th class=\"l\">training set</th>");
    for p in &producers {
        let _ = write!(out, "<th>{}</th>", esc(p));
    }
    out.push_str("<th>invalid tags</th></tr>\n");
    for (set, cells) in sets {
        let _ = write!(out, "<tr><td class=\"l\">{}</td>", esc(set));
        for p in &producers {
            match cells.iter().find(|c| c.producer == *p) {
                Some(c) => {
                    let class = match (c.producer.as_str(), c.direct) {
                        ("untagged", _) => "",
                        (_, true) => " class=\"direct\"",
                        (_, false) => " class=\"hidden\"",
                    };
                    let _ =
                        write!(
                        out,
                        "<td{class} style=\"background:rgba(214,39,40,{:.2})\">{:.1}% ({}/{})</td>",
                        if c.producer == "untagged" { 0.0 } else { c.fraction * 0.8 },
                        c.fraction * 100.0,
                        c.rows,
                        c.total_rows
                    );
                }
                None => out.push_str("<td>–</td>"),
            }
        }
        let invalid: u64 = cells.iter().map(|c| c.invalid_tags).sum();
        let _ = writeln!(out, "<td>{invalid}</td></tr>");
    }
    out.push_str("</table>\n");
}

/// Predicted against observed rate per route, model version and action, with a bar for the
/// bias (right of centre: predicted more often than observed).
fn bias_section(out: &mut String, rows: &[BiasRow]) {
    let why_empty = "No labeled predictions (<code>--labels</code>).";
    if !section(out, "Prediction bias", rows.is_empty(), why_empty) {
        return;
    }
    out.push_str(
        "<table><tr><th class=\"l\">route</th><th class=\"l\">model version</th>\
         <th class=\"l\">action</th><th>labeled rows</th><th>predicted</th><th>observed</th>\
         <th>bias</th><th></th></tr>\n",
    );
    for r in rows {
        let (half, mid) = (60.0, 61.0);
        let len = (r.bias.clamp(-1.0, 1.0) * half).abs();
        let from = if r.bias < 0.0 { mid - len } else { mid };
        let _ = writeln!(
            out,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td>\
             <td>{:.4} ({})</td><td>{:.4} ({})</td><td>{:+.4}</td><td><svg width=\"122\" height=\"12\">\
             <line x1=\"{mid}\" x2=\"{mid}\" y1=\"0\" y2=\"12\" stroke=\"#888\"/>\
             <rect x=\"{from:.1}\" y=\"2\" width=\"{len:.1}\" height=\"8\" fill=\"{}\"/></svg></td></tr>",
            esc(&r.route),
            esc(&r.model_version),
            esc(&r.action),
            r.labeled_rows,
            r.predicted_rate,
            r.predicted_rows,
            r.observed_rate,
            r.observed_rows,
            r.bias,
            if r.bias < 0.0 { PALETTE[0] } else { BREACH }
        );
    }
    out.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVIL: &str = "<script>alert('x')</script>\"&";

    fn rate_row(start_ms: i64, breaches: u64) -> RateRow {
        RateRow {
            route: EVIL.into(),
            bucket: String::new(),
            bucket_start_ms: start_ms,
            decisions: 4,
            action_counts: BTreeMap::from([(EVIL.into(), 1), ("ham".into(), 3)]),
            actions: BTreeMap::from([(EVIL.into(), 0.25), ("ham".into(), 0.75)]),
            thresholds: 4,
            threshold_sum_nano: 2_000_000_000,
            mean_threshold: Some(0.5),
            flagged: 1,
            fallback: 0,
            rejected_requests: 2,
            breaches_started: breaches,
        }
    }

    #[test]
    fn every_name_is_escaped_and_each_route_gets_its_charts() {
        let report = Report {
            predictions_read: 8,
            bucket_ms: 3_600_000,
            feedback_loops: vec![LoopRow {
                training_set: EVIL.into(),
                producer: EVIL.into(),
                rows: 1,
                total_rows: 2,
                fraction: 0.5,
                direct: true,
                invalid_tags: 0,
            }],
            bias: vec![BiasRow {
                route: EVIL.into(),
                model_version: EVIL.into(),
                action: EVIL.into(),
                labeled_rows: 2,
                predicted_rows: 1,
                observed_rows: 2,
                predicted_rate: 0.5,
                observed_rate: 1.0,
                bias: -0.5,
            }],
            action_rates: vec![rate_row(0, 0), rate_row(3_600_000, 1)],
        };
        let page = render_html(&report);
        assert!(!page.contains(EVIL));
        assert!(!page.contains("<script"));
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;"));
        // Action rate, threshold and limit outcomes: three charts; the breach marked on each.
        assert_eq!(page.matches("<svg viewBox").count(), 3);
        assert_eq!(page.matches("stroke-dasharray").count(), 3);
        assert!(page.contains("time buckets of 1h"));
        assert!(page.contains("1970-01-01 01:00:00"));
        assert!(page.contains("class=\"direct\""));
    }

    #[test]
    fn bucket_times_show_milliseconds_only_when_they_have_them() {
        assert_eq!(time(3_600_000), "1970-01-01 01:00:00");
        assert_eq!(time(3_600_100), "1970-01-01 01:00:00.100");
    }

    #[test]
    fn an_empty_report_says_what_is_missing() {
        let page = render_html(&Report::default());
        for note in [
            "No predictions read",
            "No training sets",
            "No labeled predictions",
        ] {
            assert!(page.contains(note), "{note}");
        }
    }
}
