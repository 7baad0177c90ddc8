//! The microbenchmark runs Ray's rows by name, in each mode, and reports
//! unsupported ones without a figure. (Timings are not checked: speed is
//! for benchmarks.)

use rustyray_cli::microbenchmark::{run_suite, Args, Mode, ModeChoice, ROWS};
use std::process::Command;

fn args(filter: &str) -> Args {
    Args {
        filter: Some(filter.to_owned()),
        json: true,
        trial_secs: 0.01,
        trials: 2,
        warmup_secs: 0.0,
        scale: false,
        stall_secs: 30.0,
        mode: ModeChoice::Threads,
    }
}

/// Runs the `rustyray` binary, which is its own worker process in the
/// processes mode, with tiny trials; returns its standard output.
fn rustyray_microbenchmark(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rustyray"))
        .args([
            "microbenchmark",
            "--trial-secs",
            "0.01",
            "--trials",
            "2",
            "--warmup-secs",
            "0",
        ])
        .args(extra)
        .env_remove("TESTS_TO_RUN")
        .output()
        .expect("run the rustyray binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rustyray microbenchmark {extra:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn rows_match_rays_names_and_order() {
    assert_eq!(ROWS.len(), 31);
    assert_eq!(ROWS[0], "single client get calls (Plasma Store)");
    assert_eq!(ROWS[21], "n:n async-actor calls async");
    assert_eq!(ROWS[22], "placement group create/removal");
}

#[test]
fn filtered_rows_run_and_report_figures() -> rustyray::Result<()> {
    for filter in [
        "1:1 async-actor calls with args",
        "single client tasks sync",
        "wait 1k refs",
    ] {
        let report = run_suite(&args(filter))?;
        assert_eq!(report.rows.len(), 1, "{filter}");
        let row = &report.rows[0];
        assert!(row.name.contains(filter));
        assert_eq!(row.mode, Mode::Threads);
        assert!(row.per_second.is_some_and(|r| r > 0.0), "{row:?}");
        assert!(row.not_supported.is_none());
    }
    Ok(())
}

#[test]
fn unsupported_rows_have_no_number() -> rustyray::Result<()> {
    let report = run_suite(&args("client: "))?;
    assert_eq!(report.rows.len(), 8);
    let pg = run_suite(&args("placement group"))?;
    for row in report.rows.iter().chain(&pg.rows) {
        assert!(row.per_second.is_none() && row.std_dev.is_none(), "{row:?}");
        assert!(row.not_supported.is_some());
    }
    let json = serde_json::to_string(&pg).expect("json");
    assert!(json.contains("\"per_second\":null"), "{json}");
    Ok(())
}

#[test]
fn task_rows_run_in_worker_processes() {
    // "single client tasks" selects three task rows: a batch, sync calls
    // and async batches.
    let stdout =
        rustyray_microbenchmark(&["--mode", "processes", "--json", "--filter", "single client tasks"]);
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(report["mode"], "processes");
    let rows = report["rows"].as_array().expect("rows");
    let names: Vec<_> = rows.iter().map(|r| r["name"].as_str().expect("name")).collect();
    assert_eq!(
        names,
        [
            "single client tasks and get batch",
            "single client tasks sync",
            "single client tasks async"
        ]
    );
    assert!(
        report["process_round_trip"].as_f64().is_some_and(|r| r > 0.0),
        "{report}"
    );
    for row in rows {
        assert_eq!(row["mode"], "processes", "{row}");
        assert!(row["per_second"].as_f64().is_some_and(|r| r > 0.0), "{row}");
        assert!(row["not_supported"].is_null(), "{row}");
    }
}

#[test]
fn both_modes_print_one_line_per_row_and_mode() {
    let stdout = rustyray_microbenchmark(&["--mode", "both", "--filter", "single client tasks sync"]);
    let lines: Vec<_> = stdout
        .lines()
        .filter(|l| l.contains(" per second ") && !l.contains("(reference)"))
        .collect();
    // The processes mode's sync rows come with their limit: a bare round
    // trip between two processes over the node's socket transport.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("process round trip") && l.contains("(reference)")),
        "{stdout}"
    );
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, mode) in lines.iter().zip(["[threads]", "[processes]"]) {
        let figure = line
            .strip_prefix("single client tasks sync per second ")
            .and_then(|rest| rest.strip_suffix(mode))
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let (mean, sd) = figure.trim().split_once(" +- ").expect("mean +- sd");
        assert!(mean.parse::<f64>().is_ok_and(|m| m > 0.0), "{line}");
        assert!(sd.parse::<f64>().is_ok(), "{line}");
    }
}
