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
