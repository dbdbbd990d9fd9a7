//! `vmm report`: a quick run writes its JSON and its three SVG charts, and a saved report
//! renders as Markdown. Checks the fields and the files, never the figures.

mod common;

use std::time::Duration;

use common::{run, vmm, Scratch};
use serde_json::Value;

#[test]
fn a_quick_report_writes_json_and_charts() {
    let scratch = Scratch::new();
    let out = scratch.path("r");
    let done =
        run(&mut vmm(&["report", "--quick", "--json", "--out", out.to_str().unwrap()]), Duration::from_secs(120));
    assert_eq!(done.code(), Some(0), "{done:?}");
    let report: Value = serde_json::from_str(&done.stdout).expect("the report is JSON");
    let rows = report["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().map(|r| r["operation"].as_str().unwrap()).collect();
    assert_eq!(names, ["plate-ification", "write-out", "restore"]);
    for row in rows {
        for field in ["paper_volatile_ms", "paper_nvm_ms", "ours_ms", "ratio_to_paper_nvm", "ratio_to_limit"] {
            assert!(row[field].as_f64().is_some_and(|v| v > 0.0), "{field} of {row}");
        }
    }
    assert!(report["plates"].as_u64().is_some_and(|p| p > 400), "{report}");
    assert!(report["crash_to_running"]["total_ms"].as_f64().is_some_and(|v| v > 0.0), "{report}");
    assert_eq!(report["dirty_sweep"].as_array().map(Vec::len), Some(2));
    assert_eq!(report["throughput"].as_array().map(Vec::len), Some(2));
    assert!(report["targets"].as_array().is_some_and(|t| t.len() >= 5), "{report}");
    // The sums' cost: the same bytes copied with the sums and with `sums=off`, a pair of
    // boots of three write-outs each, and its target.
    let sums = &report["sums"];
    assert_eq!((sums["pairs"].as_u64(), sums["write_outs"].as_u64()), (Some(1), Some(3)), "{sums}");
    let copied = sums["with_copied_bytes"].as_u64().unwrap_or(0);
    assert!(copied > 4_000_000 && sums["without_copied_bytes"].as_u64() == Some(copied), "{sums}");
    for field in ["with_ms", "without_ms", "with_copy_ms", "without_copy_ms"] {
        assert!(sums[field].as_f64().is_some_and(|v| v > 0.0), "{field} of {sums}");
    }
    let targets = report["targets"].as_array().expect("targets");
    assert!(targets.iter().any(|t| t["target"].as_str().is_some_and(|n| n.contains("content sums"))), "{report}");
    // The restore both ways: the table's row is the eager one, which copies every plated
    // byte; the lazy one copies the kernel's plates only, and every page comes back after
    // (the paper's configuration idles between its rounds).
    let lazy = &report["lazy"];
    let plated = report["plated_bytes"].as_u64().unwrap_or(0);
    assert_eq!(rows[2]["copied_bytes"].as_u64(), Some(plated), "{}", rows[2]);
    let copied = lazy["copied_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(copied < plated / 10, "{lazy}");
    assert_eq!(lazy["tails"].as_u64(), lazy["n"].as_u64(), "every lazy restore's end seen: {lazy}");
    assert_eq!(lazy["brought_back_bytes"].as_u64().map(|b| b + copied), Some(plated), "{lazy}");
    let (until, back) = (lazy["until_running_ms"].as_f64().unwrap_or(0.0), lazy["every_page_back_ms"].as_f64());
    assert!(until > 0.0 && back.is_some_and(|b| b > until), "{lazy}");
    let charts = report["charts"].as_array().expect("charts");
    assert_eq!(charts.len(), 3);
    for name in ["table.svg", "write-out-vs-dirty-bytes.svg", "throughput-vs-interval.svg"] {
        let svg = std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{name}: {svg}");
        assert_eq!(svg.matches('<').count(), svg.matches('>').count(), "{name} is not balanced");
    }

    let saved = scratch.path("report.json");
    std::fs::write(&saved, &done.stdout).unwrap();
    let md = run(&mut vmm(&["report", "--from", saved.to_str().unwrap(), "--markdown"]), Duration::from_secs(20));
    assert_eq!(md.code(), Some(0), "{md:?}");
    assert!(md.stdout.contains("| operation | paper, volatile | paper, NVM | ours |"), "{}", md.stdout);
    assert!(md.stdout.contains("| target | goal | measured |"), "{}", md.stdout);
}

#[test]
fn a_report_that_is_not_one_is_refused() {
    let scratch = Scratch::new();
    let bad = scratch.path("bad.json");
    std::fs::write(&bad, "{\"rows\": 3}").unwrap();
    let done = run(&mut vmm(&["report", "--from", bad.to_str().unwrap()]), Duration::from_secs(20));
    assert_eq!(done.code(), Some(1), "{done:?}");
    assert!(done.stderr.contains("is not a report of `vmm report --json`"), "{}", done.stderr);
}
