//! What gibby reads from a token's JWT payload, without verifying the signature:
//! the token is only ever sent back to the issuer, which does verify it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

const AUTH_CLAIM: &str = "https://api.openai.com/auth";
const PROFILE_CLAIM: &str = "https://api.openai.com/profile";

/// Claims of an access token or id_token. Every field is optional: tokens may be
/// opaque strings, or JWTs without these claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claims {
    pub exp: Option<i64>,
    pub iat: Option<i64>,
    pub email: Option<String>,
    pub account_id: Option<String>,
}

impl Claims {
    /// Reads the payload of a JWT; anything unreadable gives empty claims.
    pub fn of(token: &str) -> Claims {
        Self::try_of(token).unwrap_or_default()
    }

    fn try_of(token: &str) -> Option<Claims> {
        let mut parts = token.split('.');
        let (_header, payload) = (parts.next()?, parts.next()?);
        parts.next()?;
        let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
        let json: Value = serde_json::from_slice(&bytes).ok()?;
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        // Some issuers write times as floats; whole seconds are all gibby needs.
        let secs =
            |v: Option<&Value>| v.and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)));
        Some(Claims {
            exp: secs(json.get("exp")),
            iat: secs(json.get("iat")),
            email: text(json.get(PROFILE_CLAIM).and_then(|p| p.get("email")))
                .or_else(|| text(json.get("email"))),
            account_id: text(
                json.get(AUTH_CLAIM)
                    .and_then(|a| a.get("chatgpt_account_id")),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &Value) -> String {
        let enc = |v: &[u8]| URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            enc(br#"{"alg":"RS256"}"#),
            enc(payload.to_string().as_bytes())
        )
    }

    #[test]
    fn reads_the_real_claim_layout() {
        let token = jwt(&serde_json::json!({
            "exp": 1710864000, "iat": 1710000000,
            AUTH_CLAIM: {"chatgpt_account_id": "acc-1"},
            PROFILE_CLAIM: {"email": "a@example.com"}
        }));
        assert_eq!(
            Claims::of(&token),
            Claims {
                exp: Some(1710864000),
                iat: Some(1710000000),
                email: Some("a@example.com".into()),
                account_id: Some("acc-1".into()),
            }
        );
    }

    #[test]
    fn id_token_email_is_top_level() {
        let token = jwt(&serde_json::json!({"email": "b@example.com", "exp": 5.0}));
        let claims = Claims::of(&token);
        assert_eq!(claims.email.as_deref(), Some("b@example.com"));
        assert_eq!(claims.exp, Some(5));
    }

    #[test]
    fn opaque_or_broken_tokens_have_no_claims() {
        for token in ["opaque", "a.b.c", "a.!!!.c", "", "a.e30"] {
            assert_eq!(Claims::of(token), Claims::default(), "{token}");
        }
    }
}
