//! JWT-shaped tokens. Clients read the claims without checking the signature, so the fake only
//! has to get the segment layout and the base64url-no-pad encoding right.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

/// `header.payload.signature`, each segment base64url without padding. The signature is junk:
/// nothing may verify it, and the payload's `jti` already makes every token unique.
pub fn encode(payload: &Value) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT"});
    let [header, payload] = [&header, payload].map(|v| URL_SAFE_NO_PAD.encode(v.to_string()));
    format!(
        "{header}.{payload}.{}",
        URL_SAFE_NO_PAD.encode("fake-signature")
    )
}

/// The payload of a JWT-shaped token, or None when it is not one.
#[cfg(test)]
pub fn decode_payload(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}
