//! The microbenchmark runs Ray's rows by name and reports unsupported ones
//! without a figure. (Timings are not checked: speed is for benchmarks.)

use rustyray_cli::microbenchmark::{run_suite, Args, ROWS};

fn args(filter: &str) -> Args {
    Args {
        filter: Some(filter.to_owned()),
        json: true,
        trial_secs: 0.01,
        trials: 2,
        warmup_secs: 0.0,
        scale: false,
        mode: "threads".to_owned(),
    }
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
