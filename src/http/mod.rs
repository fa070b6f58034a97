//! The HTTP face: `fn app(state) -> Router`, built apart from `main` so tests can drive it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use subtle::ConstantTimeEq;

use crate::core::{Others, Outcome, PassOver};
use crate::io::{Live, LiveError};

#[derive(Clone, Debug)]
pub struct AppState {
    pub live: Arc<Live>,
    /// When set, `/token` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// When set, every `/token` request is recorded here as a replayable scenario.
    pub record_dir: Option<std::path::PathBuf>,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        // Every method reaches `token`, which answers anything but GET with one 405.
        .route("/token", axum::routing::any(token))
        .layer(middleware::from_fn(refuse_browsers))
        .with_state(state)
}

/// No web page may fetch a token through the user's browser: browsers send `Origin` on
/// cross-site requests. A rebound page's same-origin fetch carries none; `token` refuses
/// that by its `Host` (see `host_is_not_a_name`).
async fn refuse_browsers(request: Request, next: Next) -> Response {
    if request.headers().contains_key(header::ORIGIN) {
        tracing::warn!(
            path = request.uri().path(),
            "refused a request from a web page (Origin header)"
        );
        return AppError::OriginRefused.into_response();
    }
    next.run(request).await
}

/// Whether `Host` names this machine in a way no DNS rebinding can forge: an IP address,
/// `localhost`, or no `Host` at all. A web page that rebinds its own name to 127.0.0.1 makes
/// the browser send that name, and no `Origin` on a same-origin `fetch`.
fn host_is_not_a_name(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        // `[::1]:8080`: an IPv6 literal.
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.eq_ignore_ascii_case("localhost.")
}

async fn token(
    State(state): State<AppState>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    // Only GET: a HEAD would run the whole request (upstream calls, writes) to send no
    // token, and nothing else means anything here.
    if method != axum::http::Method::GET {
        return Err(AppError::MethodNotAllowed);
    }
    if state.api_key.is_none() && !host_is_not_a_name(&headers) {
        tracing::warn!(
            host = ?headers.get(header::HOST),
            "refused /token for a host name: without GIBBY_API_KEY only requests addressed to an IP address or localhost are served (DNS rebinding)"
        );
        return Err(AppError::HostRefused);
    }
    if let Some(key) = &state.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            // The scheme is case-insensitive (RFC 9110 section 11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, key)| key.trim_start_matches(' '));
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            tracing::warn!(
                authorization = if given.is_empty() {
                    "missing"
                } else {
                    "wrong key"
                },
                "refused /token: unauthorized"
            );
            return Err(AppError::Unauthorized);
        }
    }
    // The request runs to its end in a task of its own, even when the client hangs up and
    // this handler is dropped: a refresh call in flight has already spent the old refresh
    // token upstream, and only the rest of the request stores the new one.
    let (live, record_dir) = (state.live.clone(), state.record_dir.clone());
    let request = async move {
        match &record_dir {
            Some(dir) => crate::io::record::token(&live, dir).await,
            None => live.token().await,
        }
    };
    let finished = match tokio::spawn(request).await {
        Ok(finished) => finished?,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: only when the runtime itself shuts down.
        Err(_) => return Err(AppError::Internal(LiveError::NoOutcome)),
    };
    for warning in &finished.warnings {
        tracing::warn!("{warning}");
    }
    match finished.outcome {
        Outcome::Token {
            answer,
            passed_over,
            others,
        } => {
            tracing::info!(
                account = answer.email(),
                passed_over = %describe(&passed_over),
                others = %describe_others(&others),
                upstream_calls = finished.upstream_calls,
                writes = finished.writes,
                "token served"
            );
            let mut response = Json(answer).into_response();
            no_store(&mut response);
            Ok(response)
        }
        Outcome::NoUsableAccount {
            passed_over,
            retry_after,
        } => {
            tracing::info!(
                passed_over = %describe(&passed_over),
                upstream_calls = finished.upstream_calls,
                writes = finished.writes,
                "no usable account"
            );
            Err(AppError::NoUsableAccount {
                passed_over,
                retry_after,
            })
        }
        Outcome::InvalidStateFile { detail } => {
            tracing::error!(%detail, "invalid state file");
            Err(AppError::InvalidStateFile(detail))
        }
    }
}

fn describe(passed_over: &[PassOver]) -> String {
    if passed_over.is_empty() {
        return "none".into();
    }
    passed_over
        .iter()
        .map(|p| format!("{}: {}", p.email, p.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The accounts neither chosen nor passed over, for the log line: a count when they were
/// not looked at, else their emails (the first few of a long list).
fn describe_others(others: &Others) -> String {
    const NAMED: usize = 10;
    match others {
        Others::NotNeeded(0) => "none".into(),
        Others::RankedLower(emails) if emails.is_empty() => "none".into(),
        Others::NotNeeded(n) => format!("{n} not looked at: the active account was usable"),
        Others::RankedLower(emails) => {
            let mut text = emails[..emails.len().min(NAMED)].join(", ");
            if emails.len() > NAMED {
                text += &format!(" and {} more", emails.len() - NAMED);
            }
            format!("usable but ranked lower (5-hour usage, then file order): {text}")
        }
    }
}

fn no_store(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// Every failure of `/token` becomes one of these; none carries a token.
#[derive(Debug)]
pub enum AppError {
    /// Missing or wrong API key.
    Unauthorized,
    /// The request came from a browser page.
    OriginRefused,
    /// Without an API key, the request named this host by a DNS name (rebinding).
    HostRefused,
    /// `/token` answers only GET.
    MethodNotAllowed,
    /// Every account was passed over.
    NoUsableAccount {
        passed_over: Vec<PassOver>,
        retry_after: Option<i64>,
    },
    /// A state file cannot be read or parsed; nothing was written.
    InvalidStateFile(String),
    /// The data directory could not be locked, or the core ended without an answer.
    Internal(LiveError),
}

impl From<LiveError> for AppError {
    fn from(e: LiveError) -> Self {
        AppError::Internal(e)
    }
}

/// The JSON of every error answer: `error` first, then what explains it.
#[derive(serde::Serialize)]
struct ErrorBody {
    error: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accounts: Option<Vec<PassedOver>>,
}

#[derive(serde::Serialize)]
struct PassedOver {
    email: String,
    reason: String,
}

impl ErrorBody {
    fn new(error: &'static str, detail: impl Into<String>) -> Self {
        ErrorBody {
            error,
            detail: Some(detail.into()),
            accounts: None,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, body, retry_after) = match self {
            AppError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                ErrorBody::new(
                    "unauthorized",
                    "a valid Authorization: Bearer <GIBBY_API_KEY> header is required",
                ),
                None,
            ),
            AppError::OriginRefused => (
                StatusCode::FORBIDDEN,
                ErrorBody::new(
                    "origin_refused",
                    "requests from web pages (with an Origin header) are refused",
                ),
                None,
            ),
            AppError::HostRefused => (
                StatusCode::FORBIDDEN,
                ErrorBody::new(
                    "host_refused",
                    "without GIBBY_API_KEY, /token answers only requests addressed to an IP \
                     address or localhost (a host name could be a DNS rebinding attack)",
                ),
                None,
            ),
            AppError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorBody::new("method_not_allowed", "/token answers GET only"),
                None,
            ),
            AppError::NoUsableAccount {
                passed_over,
                retry_after,
            } => {
                let accounts = passed_over
                    .iter()
                    .map(|p| PassedOver {
                        email: p.email.clone(),
                        reason: p.reason.to_string(),
                    })
                    .collect();
                let body = ErrorBody {
                    error: "no_usable_account",
                    detail: None,
                    accounts: Some(accounts),
                };
                (StatusCode::SERVICE_UNAVAILABLE, body, retry_after)
            }
            AppError::InvalidStateFile(detail) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new("invalid_state_file", detail),
                None,
            ),
            AppError::Internal(e) => {
                tracing::error!("{e}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorBody::new("storage_unavailable", e.to_string()),
                    None,
                )
            }
        };
        let mut response = (status, Json(body)).into_response();
        no_store(&mut response);
        if status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
