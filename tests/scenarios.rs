//! Every scenario in `tests/scenarios/` replayed through the core, its trace snapshotted in
//! `snapshots/scenario_<file name>.snap`. Adding a case is adding a file.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};

use gibby::replay::{replay, Scenario};

fn scenario_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_scenario_replays_as_it_says() {
    let files = scenario_files();
    assert!(files.len() >= 20, "only {} scenarios", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let scenario = match Scenario::parse(&text) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{name}: does not parse: {e}"));
                continue;
            }
        };
        let report = replay(&scenario);
        if !report.ok() {
            failures.push(format!("{name}: {:?}\n{}", report.problems, report.trace));
        }
        let snapshot = std::panic::catch_unwind(|| {
            common::snapshots(|| {
                insta::with_settings!({
                    description => scenario.description.clone(),
                    omit_expression => true,
                }, {
                    insta::assert_snapshot!(format!("scenario_{name}"), report.trace);
                });
            })
        });
        if snapshot.is_err() {
            failures.push(format!("{name}: the trace differs from its snapshot"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A scenario that asks for more or other calls than the core makes does not replay.
#[test]
fn unexpected_calls_and_leftover_answers_are_problems() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios/active-first-steady-state.json");
    let mut scenario = Scenario::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let validate = scenario.upstream[0].clone();

    let mut other_token = scenario.clone();
    other_token.upstream[0].token = "at-someone-else".into();
    let report = replay(&other_token);
    assert!(!report.ok());
    assert!(
        report.problems[0].starts_with("unexpected call: validate a@example.com with at-a"),
        "{:?}",
        report.problems
    );

    scenario.upstream.push(validate);
    let report = replay(&scenario);
    assert_eq!(
        report.problems,
        ["1 upstream answer(s) never asked for: validate a@example.com"]
    );

    scenario.upstream.clear();
    let report = replay(&scenario);
    assert!(report.problems[0].contains("no upstream answer left"));
}
