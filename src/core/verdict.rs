//! Upstream answer → success, invalid (the account is dead) or transient (try later).
//! SPEC.md section 5 "Verdicts", as one pure function with a table test beside it.

use serde_json::Value;

use super::effect::{HttpReply, Reply};

/// Which upstream call answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Refresh,
    Usage,
    Validation,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// A 2xx that is not HTML; the caller still parses the body.
    Success(&'a str),
    /// The upstream says the token or account is dead.
    Invalid(String),
    /// Anything else: the account is kept and passed over for this request.
    Transient(String),
}

/// Refresh errors that mean the refresh token will never work again.
const DEAD_REFRESH_CODES: &[&str] = &[
    "invalid_grant",
    "refresh_token_expired",
    "refresh_token_invalidated",
    "token_expired",
    "refresh_token_reused",
];

/// 402/403 codes that mean the account or workspace is gone.
const DEAD_ACCOUNT_CODES: &[&str] = &[
    "account_deactivated",
    "token_invalidated",
    "token_revoked",
    "deactivated_workspace",
    "invalid_workspace_selected",
    "app_session_terminated",
];

pub fn classify(call: Call, reply: &Reply) -> Verdict<'_> {
    let http = match reply {
        Reply::Transport(why) => return Verdict::Transient(format!("no answer: {why}")),
        Reply::Http(http) => http,
    };
    let status = http.status;
    if is_html(http) {
        return Verdict::Transient(format!("HTML answer with status {status}"));
    }
    if (200..300).contains(&status) {
        return Verdict::Success(&http.body);
    }
    let code = error_code(&http.body);
    let described = match &code {
        Some(code) => format!("status {status} ({code})"),
        None => format!("status {status}"),
    };
    let invalid = match (call, status) {
        (Call::Refresh, 400 | 401) => code
            .as_deref()
            .is_some_and(|c| DEAD_REFRESH_CODES.contains(&c)),
        (Call::Usage | Call::Validation, 401) => true,
        (Call::Usage | Call::Validation, 402 | 403) => code
            .as_deref()
            .is_some_and(|c| DEAD_ACCOUNT_CODES.contains(&c)),
        _ => false,
    };
    if invalid {
        Verdict::Invalid(described)
    } else {
        Verdict::Transient(described)
    }
}

/// A usage or validation rejection that may mean no more than "this token is old": a 401.
/// A 402/403 with a dead code names the account or workspace, which no refresh brings
/// back (DESIGN.md, "Decisions SPEC.md left open").
pub fn rejects_only_the_token(reply: &Reply) -> bool {
    matches!(reply, Reply::Http(http) if http.status == 401)
}

fn is_html(http: &HttpReply) -> bool {
    http.challenge
        || http
            .content_type
            .as_deref()
            .is_some_and(|t| t.to_ascii_lowercase().contains("html"))
        || http.body.trim_start().starts_with('<')
}

/// The error code from any of the body shapes the upstream uses:
/// `{"error": {"code"}}`, `{"error": "<code>"}`, `{"detail": {"code"}}`.
/// `{"detail": "<message>"}` is a message, not a code.
pub fn error_code(body: &str) -> Option<String> {
    let json: Value = serde_json::from_str(body).ok()?;
    let code = match (json.get("error"), json.get("detail")) {
        (Some(Value::Object(e)), _) => e.get("code"),
        (Some(code @ Value::String(_)), _) => Some(code),
        (_, Some(Value::Object(d))) => d.get("code"),
        _ => None,
    };
    code.and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, body: &str) -> Reply {
        Reply::Http(HttpReply::json(status, body))
    }

    fn kind(v: Verdict) -> &'static str {
        match v {
            Verdict::Success(_) => "success",
            Verdict::Invalid(_) => "invalid",
            Verdict::Transient(_) => "transient",
        }
    }

    #[test]
    fn verdict_table() {
        use Call::*;
        let envelope = |code: &str| {
            format!(
                r#"{{"error": {{"message": "m", "type": "t", "param": null, "code": "{code}"}}}}"#
            )
        };
        let oauth = |code: &str| format!(r#"{{"error": "{code}", "error_description": "d"}}"#);
        let detail = |code: &str| format!(r#"{{"detail": {{"code": "{code}"}}}}"#);
        let message = r#"{"detail": "Could not parse your authentication token. Please try signing in again."}"#;
        let rows: Vec<(Call, u16, String, &str)> = vec![
            (Refresh, 200, r#"{"access_token": "a"}"#.into(), "success"),
            (Refresh, 401, envelope("refresh_token_reused"), "invalid"),
            (Refresh, 400, envelope("refresh_token_reused"), "invalid"),
            (
                Refresh,
                401,
                envelope("refresh_token_invalidated"),
                "invalid",
            ),
            (Refresh, 401, envelope("token_expired"), "invalid"),
            (Refresh, 401, envelope("refresh_token_expired"), "invalid"),
            (Refresh, 400, oauth("invalid_grant"), "invalid"),
            (Refresh, 401, "{}".into(), "transient"),
            (Refresh, 403, oauth("invalid_grant"), "transient"),
            (Refresh, 400, oauth("invalid_request"), "transient"),
            (Refresh, 500, envelope("token_expired"), "transient"),
            (Refresh, 429, "".into(), "transient"),
            (Usage, 401, message.into(), "invalid"),
            (Usage, 401, envelope("account_deactivated"), "invalid"),
            (Usage, 401, "not json".into(), "invalid"),
            (Usage, 402, detail("deactivated_workspace"), "invalid"),
            (Usage, 403, detail("invalid_workspace_selected"), "invalid"),
            (Usage, 403, envelope("token_revoked"), "invalid"),
            (Usage, 402, "{}".into(), "transient"),
            (Usage, 403, "".into(), "transient"),
            (Usage, 404, "{}".into(), "transient"),
            (Usage, 404, detail("account_deactivated"), "transient"),
            (Usage, 408, "".into(), "transient"),
            (Usage, 429, envelope("rate_limit_exceeded"), "transient"),
            (Usage, 500, "".into(), "transient"),
            (Usage, 503, message.into(), "transient"),
            (Usage, 200, "{}".into(), "success"),
            (Validation, 401, message.into(), "invalid"),
            (Validation, 403, oauth("token_invalidated"), "invalid"),
            (
                Validation,
                400,
                r#"{"detail": [{"msg": "Field required"}]}"#.into(),
                "transient",
            ),
            (Validation, 502, "".into(), "transient"),
            (Validation, 200, r#"{"models": []}"#.into(), "success"),
        ];
        for (call, status, body, expected) in rows {
            assert_eq!(
                kind(classify(call, &http(status, &body))),
                expected,
                "{call:?} {status} {body}"
            );
        }
    }

    #[test]
    fn html_and_transport_are_never_verdicts() {
        for call in [Call::Refresh, Call::Usage, Call::Validation] {
            let page = Reply::Http(HttpReply {
                status: 401,
                content_type: Some("text/html; charset=utf-8".into()),
                challenge: false,
                body: "<html>".into(),
            });
            assert_eq!(kind(classify(call, &page)), "transient");
            let challenge = Reply::Http(HttpReply {
                status: 403,
                content_type: None,
                challenge: true,
                body: r#"{"error": "invalid_grant"}"#.into(),
            });
            assert_eq!(kind(classify(call, &challenge)), "transient");
            let untyped_html = http(200, "  <!DOCTYPE html><html></html>");
            assert_eq!(kind(classify(call, &untyped_html)), "transient");
            let timeout = Reply::Transport("timed out".into());
            assert_eq!(kind(classify(call, &timeout)), "transient");
        }
    }

    #[test]
    fn error_code_reads_every_shape() {
        let cases = [
            (r#"{"error": {"code": "a"}}"#, Some("a")),
            (r#"{"error": "b", "error_description": "x"}"#, Some("b")),
            (r#"{"detail": {"code": "c"}}"#, Some("c")),
            (r#"{"detail": "a message"}"#, None),
            (r#"{"error": {"code": null, "message": "m"}}"#, None),
            ("<html>", None),
            ("", None),
        ];
        for (body, code) in cases {
            assert_eq!(error_code(body).as_deref(), code, "{body}");
        }
    }
}
