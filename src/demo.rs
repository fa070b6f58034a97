//! `gibby demo`: the fake upstream in-process, a generated pool, and `gibby serve` on it.

use std::path::Path;

use crate::fake_upstream::{AccountSpec, FakeUpstream, Window};
use crate::io::live::unix_now;
use crate::io::store::atomic_write;
use crate::model::{Account, AccountsFile, Secret, Usage};
use crate::settings::Settings;

/// Writes a pool of four demo accounts whose tokens the fake upstream knows:
/// the active one with fresh usage, one never checked, one due for a token refresh,
/// and one disabled.
pub fn write_pool(fake: &FakeUpstream, dir: &Path, now: i64) -> std::io::Result<AccountsFile> {
    fs_err::create_dir_all(dir)?;
    let mut accounts = Vec::new();
    for (i, name) in ["alice", "bob", "carol", "dave"].into_iter().enumerate() {
        let email = format!("{name}@demo.invalid");
        let issued = fake.add_account(AccountSpec {
            primary: Some(Window::five_hour(10 * (i as i64 + 1))),
            ..AccountSpec::new(&email)
        });
        let checked = i == 0;
        accounts.push(Account {
            email,
            access_token: Secret::new(issued.access_token),
            refresh_token: Secret::new(issued.refresh_token),
            token_refresh_at: Some(if name == "carol" {
                now - 1
            } else {
                issued.expires_at - 86_400
            }),
            usage: checked.then(|| Usage {
                primary: Some(crate::model::Window {
                    used_percent: 10.into(),
                    reset_at: now + 18_000,
                }),
                secondary: Some(crate::model::Window {
                    used_percent: 20.into(),
                    reset_at: now + 604_800,
                }),
            }),
            usage_checked_at: checked.then_some(now),
            disabled: name == "dave",
        });
    }
    let file = AccountsFile {
        active_account: Some("alice@demo.invalid".into()),
        accounts,
    };
    atomic_write(
        &dir.join(crate::model::ACCOUNTS_FILE),
        file.to_text().as_bytes(),
    )?;
    match fs_err::remove_file(dir.join(crate::model::FAILED_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(file)
}

pub async fn run(mut settings: Settings, dir: &Path) -> Result<(), String> {
    let fake = FakeUpstream::new();
    let running = fake
        .start(0)
        .await
        .map_err(|e| format!("cannot start the fake upstream: {e}"))?;
    write_pool(&fake, dir, unix_now())
        .map_err(|e| format!("cannot write the demo pool in {}: {e}", dir.display()))?;
    tracing::info!(
        fake_upstream = %running.base_url,
        data_dir = %dir.display(),
        "demo pool written; try: curl http://{}/token",
        settings.listen
    );
    settings.data_dir = dir.to_path_buf();
    settings.chatgpt_base_url = running.base_url.clone();
    settings.auth_base_url = running.base_url.clone();
    crate::serve::run(settings).await
}
