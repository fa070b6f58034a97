//! The HTTP client for the three upstream calls. It sends and receives; it never judges
//! an answer (that is `core::verdict`).

use std::time::Duration;

use crate::core::{HttpReply, Reply};
use crate::model::Secret;
use crate::settings::Settings;

/// The Codex CLI's public OAuth client id.
pub const CODEX_CLIENT_ID: &str = "app_EMoamEEZ73f0CkXaXp7hrann";
const USER_AGENT: &str = concat!("gibby/", env!("CARGO_PKG_VERSION"));
/// Bodies larger than this are cut: no real answer comes near it.
const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct Upstream {
    client: reqwest::Client,
    /// The three endpoints, parsed once (validation with its `client_version`).
    usage_url: reqwest::Url,
    models_url: reqwest::Url,
    token_url: reqwest::Url,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Client(#[from] reqwest::Error),
    #[error("{url:?} is not a URL: {error}")]
    Url { url: String, error: String },
}

fn endpoint(base: &str, path: &str) -> Result<reqwest::Url, UpstreamError> {
    let url = format!("{base}{path}");
    reqwest::Url::parse(&url).map_err(|e| UpstreamError::Url {
        url,
        error: e.to_string(),
    })
}

impl Upstream {
    pub fn new(settings: &Settings) -> Result<Self, UpstreamError> {
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(settings.upstream_timeout)
            .connect_timeout(settings.upstream_timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut models_url = endpoint(&settings.chatgpt_base_url, "/backend-api/codex/models")?;
        models_url
            .query_pairs_mut()
            .append_pair("client_version", &settings.codex_client_version);
        Ok(Upstream {
            client,
            usage_url: endpoint(&settings.chatgpt_base_url, "/backend-api/wham/usage")?,
            models_url,
            token_url: endpoint(&settings.auth_base_url, "/oauth/token")?,
        })
    }

    pub async fn usage(&self, access_token: &Secret, account_id: Option<&str>) -> Reply {
        let request = self.client.get(self.usage_url.clone());
        self.send(self.authorized(request, access_token, account_id))
            .await
    }

    pub async fn validate(&self, access_token: &Secret, account_id: Option<&str>) -> Reply {
        let request = self.client.get(self.models_url.clone());
        self.send(self.authorized(request, access_token, account_id))
            .await
    }

    pub async fn refresh(&self, refresh_token: &Secret) -> Reply {
        let body = serde_json::json!({
            "client_id": CODEX_CLIENT_ID,
            "grant_type": "refresh_token",
            "refresh_token": refresh_token.expose(),
            "scope": "openid profile email",
        });
        let request = self
            .client
            .post(self.token_url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body);
        self.send(request).await
    }

    fn authorized(
        &self,
        request: reqwest::RequestBuilder,
        access_token: &Secret,
        account_id: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let request = request
            .bearer_auth(access_token.expose())
            .header(reqwest::header::ACCEPT, "application/json");
        match account_id {
            Some(id) => request.header("ChatGPT-Account-Id", id),
            None => request,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        match request.send().await {
            Ok(response) => reply_from(response).await,
            Err(e) => Reply::Transport(describe(&e)),
        }
    }
}

async fn reply_from(mut response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type");
    let challenge = header("cf-mitigated").is_some_and(|v| v.eq_ignore_ascii_case("challenge"));
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_BODY_BYTES {
                    body.truncate(MAX_BODY_BYTES);
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Reply::Transport(format!("status {status}, body cut off: {}", describe(&e)))
            }
        }
    }
    Reply::Http(HttpReply {
        status,
        content_type,
        challenge,
        body: String::from_utf8(body)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    })
}

/// A short description that names the failure but no URL parameters or headers.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "broken body"
    } else {
        "request failed"
    };
    match e.url() {
        Some(url) => format!("{kind} ({}{})", url.host_str().unwrap_or(""), url.path()),
        None => kind.to_owned(),
    }
}
