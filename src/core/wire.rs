//! The upstream's success bodies, read into what gibby keeps. Pure: `now` is a parameter.

use serde::Deserialize;
use serde_json::{Number, Value};

use crate::model::{Claims, Secret, Usage, Window};

/// Windows up to this long are the short ("5-hour") kind; longer ones are the weekly kind.
const SHORT_WINDOW_MAX_SECONDS: i64 = 86_400;
/// When neither the token's `exp` nor `expires_in` says, a token is assumed to live this long.
const DEFAULT_TOKEN_LIFETIME: i64 = 8 * 86_400;
/// Refresh this long before the token ends at the most...
const MAX_SAFETY_MARGIN: i64 = 86_400;
/// ...but never sooner than this from now, so a short-lived token cannot cause a refresh storm.
const MIN_REFRESH_DELAY: i64 = 60;

/// Reads a 200 from the usage endpoint. `None` when the body does not parse.
pub fn usage_from_body(body: &str, now: i64) -> Option<Usage> {
    let json: Value = serde_json::from_str(body).ok()?;
    if !json.is_object() {
        return None;
    }
    let rate_limit = match json.get("rate_limit") {
        None | Some(Value::Null) => return Some(Usage::default()),
        Some(rl @ Value::Object(_)) => rl,
        Some(_) => return None,
    };
    let mut windows = Vec::new();
    for (slot, key) in ["primary_window", "secondary_window"]
        .into_iter()
        .enumerate()
    {
        match rate_limit.get(key) {
            None | Some(Value::Null) => {}
            Some(w) => windows.push((slot, read_window(w, now)?)),
        }
    }
    // Tell the windows apart by length, not by slot: some plans send their weekly
    // window in the primary slot. Without a length, the slot decides.
    let is_short = |(slot, (_, len)): &(usize, (Window, Option<i64>))| match len {
        Some(len) => *len <= SHORT_WINDOW_MAX_SECONDS,
        None => *slot == 0,
    };
    let mut usage = Usage::default();
    if windows.len() == 2 && is_short(&windows[0]) == is_short(&windows[1]) {
        // Two windows of one kind: the shorter one is the short window.
        windows.sort_by_key(|(slot, (_, len))| (len.unwrap_or(i64::MAX), *slot));
        usage.primary = Some(windows[0].1 .0.clone());
        usage.secondary = Some(windows[1].1 .0.clone());
        return Some(usage);
    }
    for w in windows {
        let short = is_short(&w);
        let (window, _) = w.1;
        if short {
            usage.primary = Some(window);
        } else {
            usage.secondary = Some(window);
        }
    }
    Some(usage)
}

fn read_window(w: &Value, now: i64) -> Option<(Window, Option<i64>)> {
    let secs = |key: &str| {
        w.get(key)
            .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f.round() as i64)))
    };
    let used_percent: Number = match w.get("used_percent")? {
        Value::Number(n) if n.as_f64().is_some_and(|p| p >= 0.0) => n.clone(),
        _ => return None,
    };
    // Saturating: an absurd upstream number must not overflow (a panic in debug builds).
    let reset_at =
        secs("reset_at").or_else(|| secs("reset_after_seconds").map(|s| now.saturating_add(s)))?;
    Some((
        Window {
            used_percent,
            reset_at,
        },
        secs("limit_window_seconds"),
    ))
}

/// What a successful refresh hands back, ready to store.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTokens {
    pub access_token: Secret,
    /// `None`: the upstream kept the old refresh token.
    pub refresh_token: Option<Secret>,
    pub token_refresh_at: i64,
}

#[derive(Deserialize)]
struct RefreshBody {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_in: Option<f64>,
}

/// Reads a 200 from the token endpoint. `None` when it carries no access token.
pub fn tokens_from_body(body: &str, now: i64) -> Option<NewTokens> {
    let body: RefreshBody = serde_json::from_str(body).ok()?;
    if body.access_token.is_empty() {
        return None;
    }
    let expires_in = body.expires_in.map(|s| s as i64);
    Some(NewTokens {
        token_refresh_at: next_refresh_at(&body.access_token, expires_in, now),
        access_token: Secret::new(body.access_token),
        refresh_token: body
            .refresh_token
            .filter(|t| !t.is_empty())
            .map(Secret::new),
    })
}

/// When a token just issued is next due for refresh: its end (the `exp` claim, else
/// `now + expires_in`, else `now + 8 days`) minus the smaller of 24 hours and half its
/// lifetime, and never less than a minute from now.
pub fn next_refresh_at(access_token: &str, expires_in: Option<i64>, now: i64) -> i64 {
    let ends = Claims::of(access_token)
        .exp
        .or(expires_in.map(|s| now.saturating_add(s)))
        .unwrap_or(now.saturating_add(DEFAULT_TOKEN_LIFETIME));
    // Saturating throughout: `exp` and `expires_in` come from the upstream.
    let margin = MAX_SAFETY_MARGIN.min(ends.saturating_sub(now).max(0) / 2);
    ends.saturating_sub(margin)
        .max(now.saturating_add(MIN_REFRESH_DELAY))
}

/// When a token imported from a Codex login (not just issued: it may be days old, or
/// already expired) is due: a day (at most half its lifetime, from `iat`) before its `exp`,
/// which may be in the past, so an expired token is refreshed on first use instead of
/// being rejected upstream as if it were dead. Without a readable `exp` its age is unknown,
/// so it is due now.
pub fn imported_refresh_at(access_token: &str, now: i64) -> i64 {
    let claims = Claims::of(access_token);
    let Some(ends) = claims.exp else {
        return now;
    };
    let lifetime = ends.saturating_sub(claims.iat.unwrap_or(now));
    ends.saturating_sub(MAX_SAFETY_MARGIN.min(lifetime.max(0) / 2))
}

/// A 200 from validation counts only with a `models` array.
pub fn models_listed(body: &str) -> bool {
    /// Only whether `models` is an array matters: its entries are skipped, not built.
    #[derive(serde::Deserialize)]
    struct Models {
        #[allow(dead_code)] // read only to check its type
        models: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_str::<Models>(body).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const NOW: i64 = 1_000_000;

    fn window(pct: &str, reset_at: i64) -> Window {
        Window {
            used_percent: serde_json::from_str(pct).unwrap(),
            reset_at,
        }
    }

    fn w(pct: &str, len: i64, reset_after: i64) -> String {
        format!(
            r#"{{"used_percent": {pct}, "limit_window_seconds": {len}, "reset_after_seconds": {reset_after}}}"#
        )
    }

    #[test]
    fn usage_windows_are_classified_by_length() {
        let body = |p: &str, s: &str| {
            format!(
                r#"{{"plan_type": "plus", "rate_limit": {{"primary_window": {p}, "secondary_window": {s}}}, "credits": null}}"#
            )
        };
        let cases = [
            (
                body(&w("10", 18000, 100), &w("76", 604800, 200)),
                Some(window("10", NOW + 100)),
                Some(window("76", NOW + 200)),
            ),
            // weekly window in the primary slot
            (
                body(&w("40.5", 604800, 300), "null"),
                None,
                Some(window("40.5", NOW + 300)),
            ),
            (body("null", "null"), None, None),
            // slots swapped
            (
                body(&w("76", 604800, 200), &w("10", 18000, 100)),
                Some(window("10", NOW + 100)),
                Some(window("76", NOW + 200)),
            ),
        ];
        for (text, primary, secondary) in cases {
            assert_eq!(
                usage_from_body(&text, NOW),
                Some(Usage { primary, secondary }),
                "{text}"
            );
        }
        assert_eq!(
            usage_from_body(r#"{"rate_limit": null}"#, NOW),
            Some(Usage::default())
        );
        assert_eq!(usage_from_body("{}", NOW), Some(Usage::default()));
    }

    #[test]
    fn reset_at_wins_over_reset_after() {
        let text = r#"{"rate_limit": {"primary_window": {"used_percent": 5, "limit_window_seconds": 18000, "reset_after_seconds": 9, "reset_at": 1777923843}}}"#;
        assert_eq!(
            usage_from_body(text, NOW).unwrap().primary,
            Some(window("5", 1777923843))
        );
    }

    #[test]
    fn broken_usage_bodies_do_not_parse() {
        for text in [
            "",
            "<html>",
            "[]",
            r#"{"rate_limit": 3}"#,
            r#"{"rate_limit": {"primary_window": {"used_percent": "x", "reset_at": 1}}}"#,
            r#"{"rate_limit": {"primary_window": {"used_percent": 1}}}"#,
        ] {
            assert_eq!(usage_from_body(text, NOW), None, "{text}");
        }
    }

    fn token_with_exp(exp: i64) -> String {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp": {exp}}}"#));
        format!("h.{payload}.s")
    }

    #[test]
    fn imported_token_schedule() {
        let day = 86_400;
        let token = |exp: i64, iat: i64| {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!(r#"{{"exp": {exp}, "iat": {iat}}}"#));
            format!("h.{payload}.s")
        };
        // A 10-day token issued 3 days ago: a day before it ends.
        assert_eq!(
            imported_refresh_at(&token(NOW + 7 * day, NOW - 3 * day), NOW),
            NOW + 6 * day
        );
        // Expired an hour ago: already due (no minute's grace as for a fresh token).
        let expired = imported_refresh_at(&token(NOW - 3600, NOW - 10 * day), NOW);
        assert!(expired <= NOW, "{expired}");
        // A 1-hour token: half its life before the end.
        assert_eq!(
            imported_refresh_at(&token(NOW + 600, NOW - 3000), NOW),
            NOW + 600 - 1800
        );
        // No exp: its age is unknown, so it is due now.
        assert_eq!(imported_refresh_at("opaque", NOW), NOW);
    }

    #[test]
    fn refresh_schedule() {
        let day = 86_400;
        // A 10-day token is refreshed a day before it ends.
        assert_eq!(
            next_refresh_at(&token_with_exp(NOW + 10 * day), Some(1), NOW),
            NOW + 9 * day
        );
        // Without exp: expires_in, else 8 days.
        assert_eq!(
            next_refresh_at("opaque", Some(10 * day), NOW),
            NOW + 9 * day
        );
        assert_eq!(next_refresh_at("opaque", None, NOW), NOW + 7 * day);
        // A 1-hour token is refreshed at half its life.
        assert_eq!(next_refresh_at("opaque", Some(3600), NOW), NOW + 1800);
        // Never sooner than a minute, even for a token that is (nearly) over.
        assert_eq!(next_refresh_at("opaque", Some(30), NOW), NOW + 60);
        assert_eq!(
            next_refresh_at(&token_with_exp(NOW - 5), None, NOW),
            NOW + 60
        );
    }

    #[test]
    fn refresh_body_variants() {
        let t = tokens_from_body(
            r#"{"access_token": "a", "refresh_token": "r", "id_token": "i", "expires_in": 3600}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(
            (
                t.access_token.expose(),
                t.refresh_token.as_ref().map(Secret::expose),
                t.token_refresh_at
            ),
            ("a", Some("r"), NOW + 1800)
        );
        let kept = tokens_from_body(r#"{"access_token": "a"}"#, NOW).unwrap();
        assert_eq!(kept.refresh_token, None);
        for text in ["{}", r#"{"access_token": ""}"#, "<html>", ""] {
            assert_eq!(tokens_from_body(text, NOW), None, "{text}");
        }
    }

    /// Upstream numbers at the ends of i64 saturate instead of overflowing (a panic in a
    /// debug build, a wrapped time in a release one).
    #[test]
    fn absurd_numbers_saturate() {
        let max = i64::MAX;
        let text = format!(
            r#"{{"rate_limit": {{"primary_window": {{"used_percent": 5, "limit_window_seconds": 18000, "reset_after_seconds": {max}}}}}}}"#
        );
        assert_eq!(
            usage_from_body(&text, NOW).unwrap().primary,
            Some(window("5", max))
        );
        let text = r#"{"rate_limit": {"primary_window": {"used_percent": 5, "limit_window_seconds": 18000, "reset_after_seconds": -9223372036854775808}}}"#;
        assert_eq!(
            usage_from_body(text, NOW).unwrap().primary,
            Some(window("5", NOW.saturating_add(i64::MIN)))
        );
        // A float far beyond i64 saturates as a cast does.
        let text = r#"{"rate_limit": {"primary_window": {"used_percent": 5, "reset_after_seconds": 1e300}}}"#;
        assert_eq!(
            usage_from_body(text, NOW).unwrap().primary,
            Some(window("5", max))
        );
        let body = format!(r#"{{"access_token": "opaque", "expires_in": {max}}}"#);
        let t = tokens_from_body(&body, NOW).unwrap();
        assert_eq!(t.token_refresh_at, max - 86_400);
        assert_eq!(
            tokens_from_body(r#"{"access_token": "opaque", "expires_in": 1e300}"#, NOW)
                .unwrap()
                .token_refresh_at,
            max - 86_400
        );
        assert_eq!(next_refresh_at("opaque", Some(max), max), max);
        assert_eq!(next_refresh_at("opaque", Some(i64::MIN), NOW), NOW + 60);
        assert_eq!(
            next_refresh_at(&token_with_exp(max), None, NOW),
            max - 86_400
        );
        assert_eq!(
            next_refresh_at(&token_with_exp(i64::MIN), None, NOW),
            NOW + 60
        );
        assert_eq!(
            imported_refresh_at(&token_with_exp(i64::MIN), NOW),
            i64::MIN
        );
        assert_eq!(imported_refresh_at(&token_with_exp(max), NOW), max - 86_400);
    }

    #[test]
    fn models_need_an_array() {
        assert!(models_listed(r#"{"models": []}"#));
        assert!(!models_listed(r#"{"models": null}"#));
        assert!(!models_listed("<html>"));
    }
}
