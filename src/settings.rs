//! Settings from the environment, exactly as SPEC.md section 2 lists them.
//! A value that does not parse stops startup with a message naming the variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The Codex CLI version sent as `client_version`; the upstream filters models by it.
pub const DEFAULT_CODEX_CLIENT_VERSION: &str = "0.63.0";

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub policy: Policy,
    /// `Authorization: Bearer <key>` required on `/token` when set.
    pub api_key: Option<String>,
    pub chatgpt_base_url: String,
    pub auth_base_url: String,
    pub codex_client_version: String,
    pub upstream_timeout: Duration,
    /// When set, `serve` writes a replayable scenario of every `/token` request here.
    pub record_dir: Option<PathBuf>,
}

/// The numbers the pure core decides with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// The 5-hour window counts as exhausted at or above this percent.
    pub exhausted_threshold: f64,
    /// Usage older than this is refreshed before it is trusted.
    pub usage_stale_seconds: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            exhausted_threshold: 95.0,
            usage_stale_seconds: 3600,
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?}: {problem}")]
pub struct SettingError {
    pub variable: &'static str,
    pub value: String,
    pub problem: String,
}

impl Settings {
    pub fn from_env() -> Result<Settings, SettingError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests need not touch the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingError> {
        let get = |variable: &'static str, default: &str| Var {
            variable,
            value: lookup(variable).unwrap_or_else(|| default.to_owned()),
        };
        let threshold = get("GIBBY_EXHAUSTED_USAGE_THRESHOLD", "95").parse::<f64>()?;
        if !(threshold > 0.0 && threshold <= 100.0) {
            return Err(get("GIBBY_EXHAUSTED_USAGE_THRESHOLD", "")
                .error("must be a percentage above 0 and at most 100"));
        }
        let stale = get("GIBBY_USAGE_STALE_SECONDS", "3600").parse::<i64>()?;
        if stale < 0 {
            return Err(get("GIBBY_USAGE_STALE_SECONDS", "").error("must not be negative"));
        }
        let timeout = get("GIBBY_UPSTREAM_TIMEOUT_SECONDS", "10").parse::<f64>()?;
        if !(timeout > 0.0 && timeout <= 600.0) {
            return Err(get("GIBBY_UPSTREAM_TIMEOUT_SECONDS", "")
                .error("must be a number of seconds above 0 and at most 600"));
        }
        let api_key = match lookup("GIBBY_API_KEY") {
            Some(key) if key.trim().is_empty() => {
                return Err(Var {
                    variable: "GIBBY_API_KEY",
                    value: key,
                }
                .error("is set but empty; unset it to serve without a key"))
            }
            // Header values carry visible ASCII only, and a key with a space or another
            // character could never be sent as it is: no request would ever match it. The
            // key is a secret, so the message shows only its length.
            Some(key) if !key.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(Var {
                    variable: "GIBBY_API_KEY",
                    value: format!("<{} characters, not shown>", key.chars().count()),
                }
                .error(
                    "may hold only visible ASCII characters (no spaces): a client could \
                     never send this key in an Authorization header",
                ))
            }
            other => other,
        };
        let record_dir = match lookup("GIBBY_RECORD_DIR") {
            Some(dir) if dir.trim().is_empty() => {
                return Err(Var {
                    variable: "GIBBY_RECORD_DIR",
                    value: dir,
                }
                .error("is set but empty; unset it to record nothing"))
            }
            other => other.map(PathBuf::from),
        };
        let data_dir = get("GIBBY_DATA_DIR", "./data").value;
        if data_dir.is_empty() {
            return Err(get("GIBBY_DATA_DIR", "").error("must not be empty"));
        }
        let version = get("GIBBY_CODEX_CLIENT_VERSION", DEFAULT_CODEX_CLIENT_VERSION);
        if version.value.is_empty()
            || !version
                .value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c))
        {
            return Err(version.error("must be a version such as 0.63.0"));
        }
        Ok(Settings {
            data_dir: PathBuf::from(data_dir),
            listen: get("GIBBY_LISTEN", "127.0.0.1:8080").parse()?,
            policy: Policy {
                exhausted_threshold: threshold,
                usage_stale_seconds: stale,
            },
            api_key,
            chatgpt_base_url: get("GIBBY_CHATGPT_BASE_URL", "https://chatgpt.com").base_url()?,
            auth_base_url: get("GIBBY_AUTH_BASE_URL", "https://auth.openai.com").base_url()?,
            codex_client_version: version.value,
            upstream_timeout: Duration::from_secs_f64(timeout),
            record_dir,
        })
    }
}

struct Var {
    variable: &'static str,
    value: String,
}

impl Var {
    fn error(self, problem: &str) -> SettingError {
        SettingError {
            variable: self.variable,
            value: self.value,
            problem: problem.to_owned(),
        }
    }

    fn parse<T: std::str::FromStr>(self) -> Result<T, SettingError>
    where
        T::Err: std::fmt::Display,
    {
        self.value.trim().parse::<T>().map_err(|e| {
            let problem = e.to_string();
            self.error(&problem)
        })
    }

    /// An `http(s)://host[:port][/path]` URL, kept without its trailing slash.
    fn base_url(self) -> Result<String, SettingError> {
        let v = self.value.trim();
        let rest = v
            .strip_prefix("https://")
            .or_else(|| v.strip_prefix("http://"));
        match rest {
            Some(host)
                if !host.is_empty() && !host.starts_with('/') && !v.contains(['?', '#', ' ']) =>
            {
                // The whole URL must parse too (a port over 65535, an empty host, a
                // user name): such a value would only fail later, on every call.
                match reqwest::Url::parse(v) {
                    Ok(url) if url.has_host() && url.username().is_empty() => {
                        Ok(v.trim_end_matches('/').to_owned())
                    }
                    Ok(_) => Err(self.error("must name a host, with no user name or password")),
                    Err(e) => Err(self.error(&format!("is not a URL: {e}"))),
                }
            }
            _ => Err(self.error("must be an http:// or https:// URL such as https://chatgpt.com")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Settings, SettingError> {
        Settings::from_lookup(|name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = with(&[]).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("./data"));
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.policy, Policy::default());
        assert_eq!(s.api_key, None);
        assert_eq!(s.chatgpt_base_url, "https://chatgpt.com");
        assert_eq!(s.auth_base_url, "https://auth.openai.com");
        assert_eq!(s.upstream_timeout, Duration::from_secs(10));
        assert_eq!(s.record_dir, None);
        let s = with(&[("GIBBY_RECORD_DIR", "/var/lib/gibby/record")]).unwrap();
        assert_eq!(s.record_dir, Some(PathBuf::from("/var/lib/gibby/record")));
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        let cases = [
            ("GIBBY_LISTEN", "localhost"),
            ("GIBBY_EXHAUSTED_USAGE_THRESHOLD", "ninety"),
            ("GIBBY_EXHAUSTED_USAGE_THRESHOLD", "0"),
            ("GIBBY_EXHAUSTED_USAGE_THRESHOLD", "101"),
            ("GIBBY_USAGE_STALE_SECONDS", "-1"),
            ("GIBBY_USAGE_STALE_SECONDS", "1h"),
            ("GIBBY_API_KEY", ""),
            ("GIBBY_API_KEY", "secret "),
            ("GIBBY_API_KEY", "ключ"),
            ("GIBBY_CHATGPT_BASE_URL", "chatgpt.com"),
            ("GIBBY_AUTH_BASE_URL", "ftp://x"),
            ("GIBBY_CHATGPT_BASE_URL", "http://127.0.0.1:99999"),
            ("GIBBY_CHATGPT_BASE_URL", "http://:80"),
            ("GIBBY_AUTH_BASE_URL", "http://a@b"),
            ("GIBBY_AUTH_BASE_URL", "https://user:pw@auth.example"),
            ("GIBBY_CODEX_CLIENT_VERSION", "1 2"),
            ("GIBBY_UPSTREAM_TIMEOUT_SECONDS", "0"),
            ("GIBBY_UPSTREAM_TIMEOUT_SECONDS", "ten"),
            ("GIBBY_DATA_DIR", ""),
            ("GIBBY_RECORD_DIR", ""),
            ("GIBBY_RECORD_DIR", "  "),
        ];
        for (variable, value) in cases {
            let err = with(&[(variable, value)]).unwrap_err();
            if variable == "GIBBY_API_KEY" && !value.trim().is_empty() {
                assert!(
                    !err.to_string().contains(value.trim()),
                    "the key is a secret: {err}"
                );
            }
            assert_eq!(err.variable, variable, "{value}");
            assert!(
                err.to_string().starts_with(&format!("{variable}=")),
                "{err}"
            );
        }
    }

    #[test]
    fn base_urls_lose_their_trailing_slash() {
        let s = with(&[("GIBBY_CHATGPT_BASE_URL", "http://127.0.0.1:9/")]).unwrap();
        assert_eq!(s.chatgpt_base_url, "http://127.0.0.1:9");
    }
}
