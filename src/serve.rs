//! `gibby serve`: bind, serve until SIGTERM or ctrl-c, finish the requests in flight.

use std::sync::Arc;

use crate::http::{app, AppState};
use crate::io::{Live, Store, Upstream};
use crate::settings::Settings;

/// Builds the app state from the settings.
pub fn state(settings: &Settings) -> Result<AppState, String> {
    let upstream =
        Upstream::new(settings).map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    Ok(AppState {
        live: Arc::new(Live {
            // Long enough for another writer's refresh call, whatever the upstream timeout.
            store: Store::new(&settings.data_dir).with_lock_timeout(
                crate::io::store::DEFAULT_LOCK_TIMEOUT
                    .max(settings.upstream_timeout * 2 + std::time::Duration::from_secs(5)),
            ),
            upstream,
            policy: settings.policy,
            clock: crate::io::live::system_clock(),
            validations: Default::default(),
        }),
        api_key: settings.api_key.clone(),
        record_dir: settings.record_dir.clone(),
    })
}

pub async fn run(settings: Settings) -> Result<(), String> {
    if let Some(dir) = &settings.record_dir {
        // Found out now, not as a warning on every request.
        crate::io::store::create_private_dir_all(dir).map_err(|e| {
            format!(
                "GIBBY_RECORD_DIR={:?}: cannot create it: {e}",
                dir.display()
            )
        })?;
    }
    let state = state(&settings)?;
    let live = state.live.clone();
    warn_about_files(&settings.data_dir);
    // A gibby killed in the middle of a write leaves its temporary file: remove it now. A
    // data directory that cannot be locked shows up on the first write; nothing to do here.
    let _ = live.store.recover().await;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (GIBBY_LISTEN): {e}", settings.listen))?;
    let listen = listener.local_addr().unwrap_or(settings.listen);
    tracing::info!(
        %listen,
        data_dir = %settings.data_dir.display(),
        api_key = settings.api_key.is_some(),
        "gibby serving"
    );
    if exposed_without_key(listen, settings.api_key.is_some()) {
        tracing::warn!(
            %listen,
            "serving beyond this machine without GIBBY_API_KEY: anyone who can reach this \
             address can take tokens; set GIBBY_API_KEY"
        );
    }
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    finish_abandoned_requests(&live).await;
    Ok(())
}

/// A request whose client hung up goes on in its own task (it may hold rotated tokens not
/// yet stored) and keeps a handle on `live`. Wait for those before exiting, bounded by
/// what such a request can take.
async fn finish_abandoned_requests(live: &Arc<Live>) {
    const POLL: std::time::Duration = std::time::Duration::from_millis(20);
    const LIMIT: std::time::Duration = std::time::Duration::from_secs(120);
    for _ in 0..LIMIT.as_millis() / POLL.as_millis() {
        if Arc::strong_count(live) == 1 {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    tracing::warn!("exiting with requests still running after {LIMIT:?}");
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down after the requests in flight");
}

/// Startup warnings an operator should act on; none of them stops gibby.
fn warn_about_files(dir: &std::path::Path) {
    use crate::model::{ACCOUNTS_FILE, FAILED_FILE};
    for name in [ACCOUNTS_FILE, FAILED_FILE] {
        let path = dir.join(name);
        if let Some(mode) = crate::io::store::loose_mode(&path) {
            tracing::warn!(
                "{}: mode {mode:04o} lets other users read the tokens; run chmod 600 on it",
                path.display()
            );
        }
    }
    if !dir.join(ACCOUNTS_FILE).exists() {
        tracing::warn!(
            "{}: does not exist yet; /token answers 503 until it does (gibby import adds accounts)",
            dir.join(ACCOUNTS_FILE).display()
        );
    }
}

/// Whether others than this machine can reach `/token` and no key guards it.
fn exposed_without_key(listen: std::net::SocketAddr, has_key: bool) -> bool {
    !has_key && !listen.ip().is_loopback()
}

#[cfg(test)]
mod exposure_tests {
    use super::exposed_without_key;

    #[test]
    fn serving_beyond_loopback_without_a_key_is_flagged() {
        let at = |a: &str| a.parse().unwrap();
        assert!(exposed_without_key(at("0.0.0.0:8080"), false));
        assert!(exposed_without_key(at("192.0.2.7:8080"), false));
        assert!(exposed_without_key(at("[::]:8080"), false));
        assert!(!exposed_without_key(at("0.0.0.0:8080"), true));
        assert!(!exposed_without_key(at("127.0.0.1:8080"), false));
        assert!(!exposed_without_key(at("127.3.4.5:8080"), false));
        assert!(!exposed_without_key(at("[::1]:8080"), false));
    }
}
