#![allow(clippy::disallowed_methods)]
use gibby::fake_upstream::{AccountSpec, FakeUpstream};
use gibby::model::*;
use std::time::Instant;
fn main() {
    let fake = FakeUpstream::new();
    for n in [10usize, 1000] {
        let accounts: Vec<Account> = (0..n)
            .map(|i| {
                let issued = fake.add_account(AccountSpec::new(&format!("u{i}@x")));
                Account {
                    email: format!("u{i}@x"),
                    access_token: Secret::new(issued.access_token),
                    refresh_token: Secret::new(issued.refresh_token),
                    token_refresh_at: Some(issued.expires_at - 86400),
                    usage: Some(Usage {
                        primary: Some(Window {
                            used_percent: 10.into(),
                            reset_at: 5,
                        }),
                        secondary: None,
                    }),
                    usage_checked_at: Some(1),
                    disabled: false,
                }
            })
            .collect();
        let file = AccountsFile {
            active_account: Some("u0@x".into()),
            accounts,
        };
        let text = file.to_text();
        println!("n={n} bytes={}", text.len());
        let t = Instant::now();
        for _ in 0..100 {
            let _ = AccountsFile::parse(&text).unwrap();
        }
        println!("  parse {:?}", t.elapsed() / 100);
        let t = Instant::now();
        for _ in 0..100 {
            let _: serde_json::Value = serde_json::from_str(&text).unwrap();
        }
        println!("  value only {:?}", t.elapsed() / 100);
        let parsed = AccountsFile::parse(&text).unwrap();
        let t = Instant::now();
        for _ in 0..100 {
            let _ = gibby::core::change::interrupted_moves(&parsed, &FailedFile::default());
        }
        println!("  moves {:?}", t.elapsed() / 100);
        let t = Instant::now();
        for _ in 0..100 {
            let _ = parsed.clone();
        }
        println!("  clone {:?}", t.elapsed() / 100);
    }
}
