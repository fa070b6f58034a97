//! `gibby demo`: the fake upstream in-process, a generated pool, and `gibby serve` on it.

use std::path::Path;

use crate::fake_upstream::{AccountSpec, FakeUpstream, Window};
use crate::io::live::unix_now;
use crate::io::store::atomic_write;
use crate::model::{Account, AccountsFile, Secret, Usage};
use crate::settings::Settings;

/// The domain of every demo account: a folder whose files hold any other account is not
/// the demo's, and the demo will not replace it.
const DEMO_DOMAIN: &str = "@demo.invalid";

/// Refuses a folder whose accounts.json or failed.json is not a demo pool: the demo
/// replaces both on every start, and `--data-dir` pointed at a real pool must not cost it.
fn refuse_foreign_pool(dir: &Path) -> Result<(), String> {
    use crate::core::{FileRead, StateFile};
    use crate::model::FailedFile;
    let store = crate::io::Store::new(dir);
    for file in [StateFile::Accounts, StateFile::Failed] {
        let path = dir.join(file.name());
        let text = match store.read(file) {
            FileRead::Missing => continue,
            FileRead::Text(text) => text,
            FileRead::Unreadable(e) => {
                return Err(format!("{}: {e}; the demo leaves it alone", path.display()))
            }
        };
        let emails: Result<Vec<String>, String> = match file {
            StateFile::Accounts => AccountsFile::parse(&text)
                .map(|f| f.accounts.into_iter().map(|a| a.email).collect())
                .map_err(|e| e.to_string()),
            StateFile::Failed => FailedFile::parse(&text)
                .map(|f| f.accounts.into_iter().map(|a| a.email).collect())
                .map_err(|e| e.to_string()),
        };
        let foreign = match emails {
            Ok(emails) => emails.into_iter().find(|e| !e.ends_with(DEMO_DOMAIN)),
            Err(e) => Some(format!("a file that does not parse ({e})")),
        };
        if let Some(what) = foreign {
            return Err(format!(
                "{} holds {what}, not a demo account: the demo replaces this folder's files \
                 on every start, so it refuses; pass another --data-dir",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Writes a pool of four demo accounts whose tokens the fake upstream knows:
/// the active one with fresh usage, one never checked, one due for a token refresh,
/// and one disabled.
pub fn write_pool(fake: &FakeUpstream, dir: &Path, now: i64) -> std::io::Result<AccountsFile> {
    crate::io::store::create_private_dir_all(dir)?;
    let mut accounts = Vec::new();
    for (i, name) in ["alice", "bob", "carol", "dave"].into_iter().enumerate() {
        let email = format!("{name}{DEMO_DOMAIN}");
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
        active_account: Some(format!("alice{DEMO_DOMAIN}")),
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
    refuse_foreign_pool(dir)?;
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
        // A wildcard address is where gibby listens, not one to ask.
        if settings.listen.ip().is_unspecified() {
            std::net::SocketAddr::from(([127, 0, 0, 1], settings.listen.port()))
        } else {
            settings.listen
        }
    );
    settings.data_dir = dir.to_path_buf();
    settings.chatgpt_base_url = running.base_url.clone();
    settings.auth_base_url = running.base_url.clone();
    crate::serve::run(settings).await
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // the test plays the operator editing files
mod tests {
    use super::*;

    #[test]
    fn the_demo_replaces_only_its_own_pool() {
        let dir = tempfile::tempdir().unwrap();
        // Empty folder, then its own pool: fine.
        assert_eq!(refuse_foreign_pool(dir.path()), Ok(()));
        write_pool(&FakeUpstream::new(), dir.path(), 1_800_000_000).unwrap();
        assert_eq!(refuse_foreign_pool(dir.path()), Ok(()));
        // A real account, in either file, or a file that does not parse: refused, untouched.
        let accounts = dir.path().join(crate::model::ACCOUNTS_FILE);
        let text = fs_err::read_to_string(&accounts).unwrap();
        let real = text.replacen("bob@demo.invalid", "bob@example.com", 1);
        fs_err::write(&accounts, &real).unwrap();
        let refused = refuse_foreign_pool(dir.path()).unwrap_err();
        assert!(refused.contains("bob@example.com"), "{refused}");
        assert!(refused.contains("accounts.json"), "{refused}");
        fs_err::write(&accounts, "{").unwrap();
        assert!(refuse_foreign_pool(dir.path())
            .unwrap_err()
            .contains("does not parse"));
        fs_err::write(&accounts, &text).unwrap();
        let failed = dir.path().join(crate::model::FAILED_FILE);
        fs_err::write(
            &failed,
            real.replace("\"active_account\": \"alice@demo.invalid\",\n", ""),
        )
        .unwrap();
        let refused = refuse_foreign_pool(dir.path()).unwrap_err();
        assert!(refused.contains("failed.json"), "{refused}");
    }
}
