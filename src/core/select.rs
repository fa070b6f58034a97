//! The selection rule (SPEC.md section 4, step 5) as a plain function.

use super::stage::UsageChecked;
use crate::settings::Policy;

/// Among usable candidates (given in file order), the one with the highest primary
/// usage, the earliest in the file breaking ties: the fullest account is drained first,
/// so the emptier ones keep their quota for later.
pub fn fallback(candidates: &[&UsageChecked], policy: &Policy) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in candidates.iter().enumerate() {
        if c.usable(policy).is_err() {
            continue;
        }
        let pct = c.primary_percent();
        if best.is_none_or(|(_, top)| pct > top) {
            best = Some((i, pct));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::stage::Loaded;
    use crate::model::{Account, Secret, Usage, Window};

    const NOW: i64 = 1_000;

    fn checked(email: &str, primary: Option<i64>, weekly: i64, disabled: bool) -> UsageChecked {
        let window = |pct: i64| Window {
            used_percent: pct.into(),
            reset_at: NOW + 100,
        };
        let account = Account {
            email: email.into(),
            access_token: Secret::new("at"),
            refresh_token: Secret::new("rt"),
            token_refresh_at: None,
            usage: Some(Usage {
                primary: primary.map(window),
                secondary: Some(window(weekly)),
            }),
            usage_checked_at: Some(NOW),
            disabled,
        };
        Loaded::new(account)
            .check_usage(NOW, &Policy::default())
            .expect("fresh usage")
    }

    #[test]
    fn fallback_table() {
        type Row = (&'static str, Option<i64>, i64, bool);
        let cases: Vec<(Vec<Row>, Option<usize>)> = vec![
            (vec![], None),
            (
                vec![("a", Some(10), 0, false), ("b", Some(50), 0, false)],
                Some(1),
            ),
            // ties: the earlier in the file
            (
                vec![("a", Some(50), 0, false), ("b", Some(50), 0, false)],
                Some(0),
            ),
            // a missing 5-hour window counts as 0
            (
                vec![("a", None, 0, false), ("b", Some(0), 0, false)],
                Some(0),
            ),
            (
                vec![("a", None, 0, false), ("b", Some(1), 0, false)],
                Some(1),
            ),
            // at the threshold is exhausted; weekly at 100 is exhausted; disabled is out
            (
                vec![("a", Some(95), 0, false), ("b", Some(94), 0, false)],
                Some(1),
            ),
            (
                vec![("a", Some(90), 100, false), ("b", Some(10), 99, false)],
                Some(1),
            ),
            (
                vec![("a", Some(90), 0, true), ("b", Some(10), 0, false)],
                Some(1),
            ),
            (
                vec![("a", Some(99), 0, false), ("b", Some(96), 0, true)],
                None,
            ),
        ];
        for (rows, expected) in cases {
            let all: Vec<UsageChecked> = rows
                .iter()
                .map(|&(e, p, w, d)| checked(e, p, w, d))
                .collect();
            let refs: Vec<&UsageChecked> = all.iter().collect();
            assert_eq!(fallback(&refs, &Policy::default()), expected, "{rows:?}");
        }
    }
}
