//! The report as text for a terminal, as Markdown for the README, and the issue's targets
//! judged against it.

use std::fmt::Write;

use super::{Report, Target};

/// The issue's targets, each with our figure.
pub fn targets(r: &Report) -> Vec<Target> {
    let write_out = r.rows.iter().find(|row| row.operation == "write-out");
    let restore = r.rows.iter().find(|row| row.operation == "restore");
    let ratio = |interval: u64| r.throughput.iter().find(|p| p.interval_ms == Some(interval)).map(|p| p.ratio_to_none);
    let mut t = Vec::new();
    let mut add = |target: &str, goal: &str, ours: String, met: bool| {
        t.push(Target { target: target.into(), goal: goal.into(), ours, met })
    };
    if let Some(w) = write_out {
        add("write-out, paper's configuration", "at most 0.5 ms", format!("{:.2} ms", w.ours_ms), w.ours_ms <= 0.5);
        add(
            "its copy against memcpy + flush of the same bytes",
            "within 2x",
            format!("{:.1}x", w.copy_ratio_to_limit),
            w.copy_ratio_to_limit <= 2.0,
        );
    }
    match (&r.lazy, restore) {
        (Some(x), _) => add(
            "restore until the processes run",
            "at most 1 ms",
            format!("{:.2} ms (restore=lazy)", x.until_running_ms),
            x.until_running_ms <= 1.0,
        ),
        (None, Some(x)) => {
            add("restore until the processes run", "at most 1 ms", format!("{:.2} ms", x.ours_ms), x.ours_ms <= 1.0)
        }
        (None, None) => {}
    }
    let c = &r.crash_to_running;
    add("crash to running", "at most 20 ms", format!("{:.1} ms", c.total_ms), c.total_ms <= 20.0);
    for (interval, goal, most) in [(10, "at most 5 % of kv's throughput", 0.05), (1, "at most 20 %", 0.20)] {
        if let Some(ratio) = ratio(interval) {
            add(
                &format!("a write-out every {interval} ms"),
                goal,
                format!("{:.1} % lost", 100.0 * (1.0 - ratio)),
                1.0 - ratio <= most,
            );
        }
    }
    if let Some(sums) = &r.sums {
        add(
            "the content sums' cost to a write-out (its copy phase with them against sums=off)",
            "at most 10 %",
            format!(
                "{:+.1} % ({:.2} against {:.2} ms of a {:.2} ms write-out)",
                100.0 * sums.cost,
                sums.with_copy_ms,
                sums.without_copy_ms,
                sums.without_ms
            ),
            sums.cost <= 0.10,
        );
    }
    let extra = r.round_trip_ms - r.round_trip_write_out_ms;
    add(
        "checkpoint round trip above its write-out (in-process controller)",
        "at most 2 ms",
        format!("{extra:.2} ms ({:.2} against {:.2})", r.round_trip_ms, r.round_trip_write_out_ms),
        extra <= 2.0,
    );
    t
}

/// The table and the rest, as a terminal shows them.
pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", header(r));
    let _ = writeln!(
        s,
        "{:<16} {:>14} {:>11} {:>10} {:>14} {:>14}",
        "operation", "paper volatile", "paper NVM", "ours", "of paper NVM", "of the limit"
    );
    for row in &r.rows {
        let _ = writeln!(
            s,
            "{:<16} {:>11.1} ms {:>8.1} ms {:>7.2} ms {:>13.3}x {:>13.1}x",
            row.operation,
            row.paper_volatile_ms,
            row.paper_nvm_ms,
            row.ours_ms,
            row.ratio_to_paper_nvm,
            row.ratio_to_limit
        );
    }
    if !r.stores.is_empty() {
        let _ = writeln!(s, "\n{}", stores_header(r));
        let _ = writeln!(
            s,
            "{:<16} {:>14} {:>11} {:>10} {:>11} {:>14} {:>12}",
            "operation", "paper volatile", "paper NVM", "ours NVM", "ours disk", "of it disk I/O", "the rest"
        );
        for row in &r.stores {
            let _ = writeln!(
                s,
                "{:<16} {:>11.1} ms {:>8.1} ms {:>7.2} ms {:>8.2} ms {:>11.2} ms {:>9.2} ms",
                row.operation,
                row.paper_volatile_ms,
                row.paper_nvm_ms,
                row.nvm_ms,
                row.disk_ms,
                row.disk_io_ms,
                row.disk_rest_ms
            );
        }
    }
    let _ = writeln!(s, "\n{}", details(r));
    for t in &r.targets {
        let _ = writeln!(s, "{} {}: {} (goal {})", if t.met { "met   " } else { "missed" }, t.target, t.ours, t.goal);
    }
    for chart in &r.charts {
        let _ = writeln!(s, "wrote {chart}");
    }
    s
}

fn header(r: &Report) -> String {
    format!(
        "The paper's configuration: {} plates, {:.1} MB plated; medians, guest-measured{}.\n\
         Host: {} ({} CPUs, Linux {}{}, load average {}).",
        r.plates,
        r.plated_bytes as f64 / 1e6,
        if r.quick { " (quick run)" } else { "" },
        r.host.cpu,
        r.host.cpus,
        r.host.kernel,
        if r.host.pvm { ", KVM by PVM" } else { "" },
        r.host.load_average
    )
}

/// What the volatile-against-NVM table measured.
fn stores_header(r: &Report) -> String {
    format!(
        "The volatile plate function (save areas on the virtio disk, plate_store=disk) against the NVM one: \
         {} plates, {:.1} MB plated on the disk; the disk is a file on the host (its page cache, and \
         fdatasync at each flush); NVM has no storage I/O.",
        r.disk_plates,
        r.disk_plated_bytes as f64 / 1e6
    )
}

/// Crash to running, the sweep and the throughput, as lines.
fn details(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.crash_to_running;
    let _ = writeln!(
        s,
        "crash to running (host wall time, median of {}): {:.1} ms = VMM set-up {:.1} + kernel boot {:.1} + restore {:.1} + the rest {:.1}",
        c.n, c.total_ms, c.setup_ms, c.boot_ms, c.restore_ms, c.rest_ms
    );
    if let Some(x) = &r.lazy {
        let back = x.every_page_back_ms.map_or("not seen".into(), |ms| format!("{ms:.1} ms after its start"));
        let _ = writeln!(
            s,
            "lazy restore (restore=lazy, the default; median of {}, in turn with the table's eager ones): {:.2} ms \
             until the processes run ({:.2} MB copied), every page back {back} ({:.2} MB brought back at first \
             touches and when the CPU idled, copies {:.2} ms; seen in {})",
            x.n,
            x.until_running_ms,
            x.copied_bytes as f64 / 1e6,
            x.brought_back_bytes as f64 / 1e6,
            x.tail_copy_ms,
            x.tails
        );
    }
    if let Some(x) = &r.sums {
        let _ = writeln!(
            s,
            "write-out of 4 MiB dirtied with the content sums {:.2} ms (copy {:.2} ms, {:.2} MB), with sums=off \
             {:.2} ms (copy {:.2} ms, {:.2} MB): the copy {:+.1} % of the write-out, the whole {:+.1} % \
             ({} pairs of boots in turn, {} write-outs each side)",
            x.with_ms,
            x.with_copy_ms,
            x.with_copied_bytes as f64 / 1e6,
            x.without_ms,
            x.without_copy_ms,
            x.without_copied_bytes as f64 / 1e6,
            100.0 * x.cost,
            100.0 * x.total_cost,
            x.pairs,
            x.write_outs
        );
    }
    for p in &r.dirty_sweep {
        let _ = writeln!(
            s,
            "write-out, {:>6} KiB dirtied: {:.2} ms ({:.2} MB copied in {:.2} ms; memcpy + flush of them {:.2} ms)",
            p.dirty_bytes >> 10,
            p.write_out_ms,
            p.copied_bytes as f64 / 1e6,
            p.copy_ms,
            p.limit_memcpy_flush_ms
        );
    }
    for p in &r.throughput {
        let _ = writeln!(
            s,
            "kv, write-outs {}: {:.2} M ops/s ({:.3} of none, {} write-outs)",
            p.interval_ms.map_or("none".to_string(), |ms| format!("every {ms} ms")),
            p.ops_per_s / 1e6,
            p.ratio_to_none,
            p.write_outs
        );
    }
    s
}

/// The README's Performance section (`scripts/perf-section.sh`).
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}\n", header(r));
    let _ = writeln!(
        s,
        "| operation | paper, volatile | paper, NVM | ours | copied | copy + flush | memcpy + flush limit | ours / paper NVM | ours / limit |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        let _ = writeln!(
            s,
            "| {} | {:.1} ms | {:.1} ms | **{:.2} ms** | {:.2} MB | {:.2} ms | {:.2} ms | {:.3} | {:.1} |",
            row.operation,
            row.paper_volatile_ms,
            row.paper_nvm_ms,
            row.ours_ms,
            row.copied_bytes as f64 / 1e6,
            row.copy_ms,
            row.limit_memcpy_flush_ms,
            row.ratio_to_paper_nvm,
            row.ratio_to_limit
        );
    }
    if !r.stores.is_empty() {
        let _ = writeln!(s, "\n{}\n", stores_header(r));
        let _ = writeln!(
            s,
            "| operation | paper, volatile | paper, NVM | ours, NVM | ours, disk | of it storage I/O | the rest | copied to or from the disk |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for row in &r.stores {
            let _ = writeln!(
                s,
                "| {} | {:.1} ms | {:.1} ms | {:.2} ms | **{:.2} ms** | {:.2} ms | {:.2} ms | {:.2} MB |",
                row.operation,
                row.paper_volatile_ms,
                row.paper_nvm_ms,
                row.nvm_ms,
                row.disk_ms,
                row.disk_io_ms,
                row.disk_rest_ms,
                row.disk_copied_bytes as f64 / 1e6
            );
        }
    }
    let _ = writeln!(s, "\n```\n{}```\n", details(r));
    let _ = writeln!(s, "| target | goal | measured | |\n|---|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(s, "| {} | {} | {} | {} |", t.target, t.goal, t.ours, if t.met { "met" } else { "missed" });
    }
    s
}
