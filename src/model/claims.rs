//! What gibby reads from a token's JWT payload, without verifying the signature:
//! the token is only ever sent back to the issuer, which does verify it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

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
        // Typed, so that the claims gibby does not read are skipped rather than built.
        let payload: Payload = serde_json::from_slice(&bytes).ok()?;
        Some(Claims {
            exp: payload.exp.map(|s| s.0),
            iat: payload.iat.map(|s| s.0),
            email: payload.profile.and_then(|p| p.email).or(payload.email),
            account_id: payload.auth.and_then(|a| a.chatgpt_account_id),
        })
    }
}

/// The payload claims gibby reads. A claim of an unexpected type counts as absent.
#[derive(Deserialize)]
struct Payload {
    #[serde(default, deserialize_with = "loose")]
    exp: Option<Secs>,
    #[serde(default, deserialize_with = "loose")]
    iat: Option<Secs>,
    #[serde(default, deserialize_with = "loose")]
    email: Option<String>,
    #[serde(
        rename = "https://api.openai.com/auth",
        default,
        deserialize_with = "loose"
    )]
    auth: Option<AuthClaim>,
    #[serde(
        rename = "https://api.openai.com/profile",
        default,
        deserialize_with = "loose"
    )]
    profile: Option<ProfileClaim>,
}

#[derive(Deserialize)]
struct AuthClaim {
    #[serde(default, deserialize_with = "loose")]
    chatgpt_account_id: Option<String>,
}

#[derive(Deserialize)]
struct ProfileClaim {
    #[serde(default, deserialize_with = "loose")]
    email: Option<String>,
}

/// Unix seconds; some issuers write times as floats, and whole seconds are all gibby needs.
struct Secs(i64);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("unix seconds")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Secs, E> {
                Ok(Secs(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secs, E> {
                i64::try_from(v).map(Secs).map_err(E::custom)
            }
            fn visit_f64<E>(self, v: f64) -> Result<Secs, E> {
                Ok(Secs(v as i64))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A value of type `T`, or `None` when it has another type.
fn loose<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Loose<T> {
        Wanted(T),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Loose::<T>::deserialize(d)? {
        Loose::Wanted(v) => Some(v),
        Loose::Other(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const AUTH_CLAIM: &str = "https://api.openai.com/auth";
    const PROFILE_CLAIM: &str = "https://api.openai.com/profile";

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
    fn claims_of_another_type_are_absent_and_the_rest_still_read() {
        let token = jwt(&serde_json::json!({
            "exp": "soon", "iat": 7, "email": 3,
            AUTH_CLAIM: "not an object",
            PROFILE_CLAIM: {"email": ["x"]},
            "scp": ["openid", "email"], "nested": {"deep": [1, {"a": null}]}
        }));
        assert_eq!(
            Claims::of(&token),
            Claims {
                iat: Some(7),
                ..Claims::default()
            }
        );
    }

    #[test]
    fn opaque_or_broken_tokens_have_no_claims() {
        for token in ["opaque", "a.b.c", "a.!!!.c", "", "a.e30"] {
            assert_eq!(Claims::of(token), Claims::default(), "{token}");
        }
    }
}
