//! The HTTP side: routes, the normal behaviour of each endpoint, scripted replies, and a
//! listener that lets a handler close its own connection (for [`Reply::Drop`]).

use super::{Account, Call, Endpoint, FakeUpstream, Reply, State, Window, CLIENT_ID};
use axum::body::{to_bytes, Body};
use axum::extract::{connect_info, ConnectInfo, Query, Request, State as AxState};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// All fields optional so that a missing one gets the fake's own 400, not an extractor's.
#[derive(Deserialize, Default)]
struct RefreshForm {
    client_id: Option<String>,
    grant_type: Option<String>,
    refresh_token: Option<String>,
    scope: Option<String>,
}

impl FakeUpstream {
    /// The routes, for serving under another server. Prefer [`FakeUpstream::start`]: only its
    /// server can honour [`Reply::Drop`] and stop [`Reply::Hang`] on shutdown.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/oauth/token", post(|s, r| handle(s, Endpoint::Refresh, r)))
            .route(
                "/backend-api/wham/usage",
                get(|s, r| handle(s, Endpoint::Usage, r)),
            )
            .route(
                "/backend-api/codex/models",
                get(|s, r| handle(s, Endpoint::Models, r)),
            )
            .with_state(self.clone())
    }

    /// Binds 127.0.0.1:`port` (0 = any free port) and serves until the handle is dropped or
    /// shut down.
    pub async fn start(&self, port: u16) -> std::io::Result<RunningFake> {
        let inner = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).await?;
        let addr = inner.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let listener = FakeListener {
            inner,
            stopped: stopped.clone(),
        };
        let app = self.router().into_make_service_with_connect_info::<Conn>();
        let mut signal = stopped;
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = signal.wait_for(|s| *s).await;
            };
            // Graceful, so that pooled keep-alive connections are closed too: a client must
            // see the upstream go away, not keep talking to orphaned connection tasks.
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await;
        });
        Ok(RunningFake {
            base_url: format!("http://{addr}"),
            addr,
            stop,
            task: Some(task),
        })
    }
}

async fn handle(
    AxState(fake): AxState<FakeUpstream>,
    endpoint: Endpoint,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let conn = parts
        .extensions
        .get::<ConnectInfo<Conn>>()
        .map(|c| c.0.clone());
    let header = |name: &str| {
        let v = parts.headers.get(name)?.to_str().ok()?;
        Some(v.to_owned())
    };
    let form = match endpoint {
        Endpoint::Refresh => parse_refresh(&parts.headers, body).await,
        _ => Ok(RefreshForm::default()),
    };
    let mut call = Call {
        endpoint,
        email: None,
        bearer: header("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_owned())),
        refresh_token: form.as_ref().ok().and_then(|f| f.refresh_token.clone()),
        client_id: form.as_ref().ok().and_then(|f| f.client_id.clone()),
        grant_type: form.as_ref().ok().and_then(|f| f.grant_type.clone()),
        scope: form.as_ref().ok().and_then(|f| f.scope.clone()),
        authorization_scheme: header("authorization")
            .and_then(|v| v.split_once(' ').map(|(scheme, _)| scheme.to_owned())),
        accept: header("accept"),
        content_type: header("content-type"),
        account_id_header: header("chatgpt-account-id"),
        user_agent: header("user-agent"),
        query: parts.uri.query().map(str::to_owned),
        status: 0,
    };
    let (reply, latency, gate) = {
        let mut st = fake.lock();
        call.email = match endpoint {
            Endpoint::Refresh => call
                .refresh_token
                .as_ref()
                .and_then(|t| st.refresh.get(t).map(|v| v.0.clone())),
            _ => call
                .bearer
                .as_ref()
                .and_then(|t| st.access.get(t).map(|v| v.0.clone())),
        };
        let scripted = st.replies.iter().position(|s| {
            s.endpoint == endpoint
                && s.email
                    .as_ref()
                    .is_none_or(|e| Some(e) == call.email.as_ref())
        });
        let reply = match scripted {
            Some(i) => st.replies.remove(i).expect("index from position").reply,
            None if !st.outage.is_empty() => {
                let i = st.outage_next % st.outage.len();
                st.outage_next += 1;
                st.outage[i].clone()
            }
            None => match endpoint {
                Endpoint::Refresh => st.do_refresh(form),
                Endpoint::Usage => st.do_usage(call.bearer.as_deref()),
                Endpoint::Models => st.do_models(&call),
            },
        };
        call.status = reply.final_status();
        tracing::debug!(?call, "fake upstream call");
        st.calls.push(call);
        (reply, st.latency, st.gates.get(&endpoint).cloned())
    };
    fake.seen.send_modify(|c| c[endpoint.index()] += 1);
    if let Some(mut gate) = gate {
        // Err: the gate was dropped, which opens it too.
        let _ = gate.wait_for(|open| *open).await;
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    answer(reply, conn).await
}

async fn parse_refresh(headers: &HeaderMap, body: Body) -> Result<RefreshForm, String> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let bytes = to_bytes(body, 1 << 20).await.map_err(|e| e.to_string())?;
    if is_form {
        // A form body has the syntax of a query string, so axum's Query (serde_urlencoded)
        // decodes it; this spares the crate axum's "form" feature.
        let uri = format!("/?{}", String::from_utf8_lossy(&bytes));
        let uri: Uri = uri.parse().map_err(|_| "malformed form body".to_owned())?;
        return Query::try_from_uri(&uri)
            .map(|Query(form)| form)
            .map_err(|e| e.body_text());
    }
    // Anything else is read as JSON, whatever its content-type says.
    serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON body: {e}"))
}

/// `{"error": {...}}`: the envelope of the auth server's and the backend's coded errors.
fn coded(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"error": {"message": message, "type": "invalid_request_error", "param": null,
                         "code": code}}),
    )
}

fn invalid_request(description: &str) -> Reply {
    Reply::json(
        400,
        json!({"error": "invalid_request", "error_description": description}),
    )
}

impl State {
    fn do_refresh(&mut self, form: Result<RefreshForm, String>) -> Reply {
        let form = match form {
            Ok(f) => f,
            Err(e) => return invalid_request(&e),
        };
        if form.client_id.as_deref() != Some(CLIENT_ID) {
            return invalid_request("Unknown or missing client_id.");
        }
        if form.grant_type.as_deref() != Some("refresh_token") {
            return invalid_request("Unsupported or missing grant_type.");
        }
        let Some(rt) = form.refresh_token else {
            return invalid_request("Missing refresh_token.");
        };
        let Some((email, used)) = self.refresh.get(&rt).cloned() else {
            return coded(
                401,
                "token_expired",
                "Could not validate your refresh token. Please try signing in again.",
            );
        };
        if self.accounts[&email].revoked {
            return coded(
                401,
                "refresh_token_invalidated",
                "Your refresh token has been invalidated. Please try signing in again.",
            );
        }
        if used {
            self.reused += 1;
            return coded(
                401,
                "refresh_token_reused",
                "Your refresh token has already been used to generate a new access token. \
                 Please try signing in again.",
            );
        }
        self.refresh.insert(rt, (email.clone(), true));
        let t = self.issue(&email);
        Reply::json(
            200,
            json!({"access_token": t.access_token, "refresh_token": t.refresh_token,
                   "id_token": t.id_token, "expires_in": self.lifetime, "token_type": "Bearer"}),
        )
    }

    /// The backend's token check: Err carries the 401 to answer.
    fn check_access(&self, bearer: Option<&str>) -> Result<&Account, Reply> {
        let live = bearer
            .and_then(|t| self.access.get(t))
            .filter(|(_, exp)| self.now() < *exp);
        match live {
            Some((email, _)) => {
                let acct = &self.accounts[email];
                if acct.revoked {
                    return Err(coded(
                        401,
                        "account_deactivated",
                        "Your OpenAI account has been deactivated, please check your email for \
                         more information.",
                    ));
                }
                Ok(acct)
            }
            None => Err(Reply::json(
                401,
                json!({"detail": "Could not parse your authentication token. \
                                  Please try signing in again."}),
            )),
        }
    }

    fn do_usage(&self, bearer: Option<&str>) -> Reply {
        let acct = match self.check_access(bearer) {
            Ok(acct) => acct,
            Err(reply) => return reply,
        };
        let now = self.now();
        let window = |w: &Option<Window>| match w {
            None => Value::Null,
            Some(w) => json!({
                "used_percent": w.used_percent,
                "limit_window_seconds": w.limit_window_seconds,
                "reset_after_seconds": w.reset_after_seconds,
                "reset_at": now + w.reset_after_seconds,
            }),
        };
        let full = [&acct.primary, &acct.secondary]
            .into_iter()
            .flatten()
            .any(|w| w.used_percent.as_f64().is_some_and(|p| p >= 100.0));
        Reply::json(
            200,
            json!({
                "plan_type": acct.plan_type,
                "rate_limit": {
                    "allowed": !full,
                    "limit_reached": full,
                    "primary_window": window(&acct.primary),
                    "secondary_window": window(&acct.secondary),
                },
                "credits": {"has_credits": false, "unlimited": false, "balance": "0"},
                "additional_rate_limits": null,
            }),
        )
    }

    fn do_models(&self, call: &Call) -> Reply {
        let has_version = call.query.as_deref().is_some_and(|q| {
            q.split('&').any(|kv| {
                kv.strip_prefix("client_version=")
                    .is_some_and(|v| !v.is_empty())
            })
        });
        if !has_version {
            return Reply::json(
                400,
                json!({"detail": [{"type": "missing", "loc": ["query", "client_version"],
                                   "msg": "Field required", "input": null}]}),
            );
        }
        if let Err(reply) = self.check_access(call.bearer.as_deref()) {
            return reply;
        }
        let model = |slug: &str, description: &str, priority: u32| {
            json!({"slug": slug, "display_name": slug, "description": description,
                   "default_reasoning_level": "medium",
                   "supported_reasoning_levels": ["low", "medium", "high"],
                   "visibility": "list", "supported_in_api": true, "priority": priority})
        };
        let body = json!({"models": [
            model("gpt-5-codex", "Optimized for coding tasks.", 1),
            model("gpt-5", "Broad world knowledge.", 2),
            model("codex-mini-latest", "Fast and cheap.", 3),
        ]});
        let mut reply = Reply::json(200, body);
        if let Reply::Status { headers, .. } = &mut reply {
            headers.push(("etag".into(), "W/\"fake-models-1\"".into()));
        }
        reply
    }
}

/// Turns a reply into the answer, waiting out delays; Hang and Drop end by killing the socket.
async fn answer(mut reply: Reply, conn: Option<Conn>) -> Response {
    loop {
        match reply {
            Reply::Delay(d, inner) => {
                tokio::time::sleep(d).await;
                reply = *inner;
            }
            Reply::Status {
                status,
                headers,
                body,
            } => {
                let mut resp = Response::new(Body::from(body));
                *resp.status_mut() =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                for (k, v) in headers {
                    if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                        resp.headers_mut().append(k, v);
                    }
                }
                return resp;
            }
            Reply::Hang => match &conn {
                // Hang until the server stops, then close the connection so that graceful
                // shutdown is not held up by it.
                Some(c) => {
                    let _ = c.stopped.clone().wait_for(|s| *s).await;
                    reply = Reply::Drop;
                }
                None => std::future::pending().await,
            },
            Reply::Drop => {
                if let Some(sock) = conn.as_ref().and_then(|c| c.sock.as_ref()) {
                    // Both directions: the client reads EOF before any response byte, and
                    // hyper's attempt to write the response below fails and ends the task.
                    let _ = sock.shutdown(Shutdown::Both);
                } else {
                    tracing::warn!("Reply::Drop outside FakeUpstream::start: answering 502");
                }
                let mut resp = Response::new(Body::empty());
                *resp.status_mut() = StatusCode::BAD_GATEWAY;
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        }
    }
}

/// What each request learns about its connection: a duplicate of the socket (so a handler can
/// shut it down under hyper's feet) and the server's stop flag.
#[derive(Clone, Debug)]
struct Conn {
    sock: Option<Arc<std::net::TcpStream>>,
    stopped: watch::Receiver<bool>,
}

struct FakeListener {
    inner: TcpListener,
    stopped: watch::Receiver<bool>,
}

impl Listener for FakeListener {
    type Io = TcpStream;
    type Addr = Conn;

    async fn accept(&mut self) -> (TcpStream, Conn) {
        loop {
            match self.inner.accept().await {
                Ok((io, _peer)) => {
                    // The duplicate fd lives in the connection's service, so it is closed
                    // when the connection ends.
                    let sock = io.as_fd().try_clone_to_owned().ok();
                    let conn = Conn {
                        sock: sock.map(|fd| Arc::new(std::net::TcpStream::from(fd))),
                        stopped: self.stopped.clone(),
                    };
                    return (io, conn);
                }
                // Out of fds and the like: wait a little instead of spinning.
                Err(e) => {
                    tracing::warn!("fake upstream accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Conn> {
        // Only the Addr type's shape matters here: axum reports it from Serve::local_addr.
        self.inner.local_addr()?;
        Ok(Conn {
            sock: None,
            stopped: self.stopped.clone(),
        })
    }
}

impl connect_info::Connected<IncomingStream<'_, FakeListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, FakeListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A served fake. Dropping it stops the server (in the background); [`RunningFake::shutdown`]
/// also waits until every connection is closed.
#[derive(Debug)]
pub struct RunningFake {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl RunningFake {
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningFake {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
