//! Service identity tokens (issue 18), checked the way a service checks them without the API
//! server: the signature against the JWKS the operator publishes, then `iss`, `aud` and the
//! validity window. Shared by `tests/identity_real.rs` and `tests/node_e2e.rs`.

use base64::Engine as _;
use serde_json::Value;

/// The claims of a JWT, unverified (to compare `iat` of two tokens).
pub fn claims(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("a JWT has claims");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url claims");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// Verifies `token` the way a service does without the API server: RS256 signature by a key of
/// `jwks` (by `kid`), `iss`, `aud`, `exp` and `nbf`. The `sub` when valid.
pub fn verify_offline(
    token: &str,
    jwks: &Value,
    issuer: &str,
    audience: &str,
) -> Result<String, String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err("not a JWS in compact form".into());
    };
    let decode = |part: &str| -> Result<Value, String> {
        let bytes = b64.decode(part).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    };
    let header = decode(header)?;
    if header["alg"] != "RS256" {
        return Err(format!(
            "alg {} (this control plane signs with RSA)",
            header["alg"]
        ));
    }
    let key = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["kid"] == header["kid"])
        .ok_or("no key with the token's kid")?;
    let component = |name: &str| {
        b64.decode(key[name].as_str().unwrap_or_default())
            .map_err(|e| e.to_string())
    };
    ring::signature::RsaPublicKeyComponents {
        n: component("n")?,
        e: component("e")?,
    }
    .verify(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &token.as_bytes()[..header_and_claims_len(token)],
        &b64.decode(signature).map_err(|e| e.to_string())?,
    )
    .map_err(|_| "bad signature".to_string())?;
    let claims = decode(claims)?;
    if claims["iss"] != issuer {
        return Err(format!("iss {} is not {issuer:?}", claims["iss"]));
    }
    let audiences = match &claims["aud"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => vec![],
    };
    if !audiences.iter().any(|a| a == audience) {
        return Err(format!("aud {audiences:?} does not hold {audience:?}"));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (exp, nbf) = (claims["exp"].as_i64(), claims["nbf"].as_i64());
    if exp.is_none_or(|e| e <= now) || nbf.is_some_and(|n| n > now + 60) {
        return Err(format!(
            "not valid now (exp {exp:?}, nbf {nbf:?}, now {now})"
        ));
    }
    Ok(claims["sub"].as_str().unwrap_or_default().to_string())
}

/// Length of `<header>.<claims>`, the signed part of a compact JWS.
pub fn header_and_claims_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(0)
}

/// TokenReview of `token` for `audience` on the API server of `client`: `(username, pod name
/// the token is bound to, "" for a token bound to no pod)` when authenticated, else the API
/// server's error. An authenticated review must name the audience asked for.
pub async fn token_review(
    client: &kube::Client,
    token: &str,
    audience: &str,
) -> Result<(String, String), String> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let answer = kube::Api::<TokenReview>::all(client.clone())
        .create(
            &kube::api::PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: Some(vec![audience.to_string()]),
                },
                ..TokenReview::default()
            },
        )
        .await
        .expect("TokenReview");
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(status.error.unwrap_or_default());
    }
    assert_eq!(
        status.audiences.as_deref(),
        Some(&[audience.to_string()][..]),
        "an authenticated review names the audience asked for"
    );
    let user = status.user.unwrap_or_default();
    let pod = user
        .extra
        .as_ref()
        .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
        .and_then(|v| v.first().cloned())
        .unwrap_or_default();
    Ok((user.username.unwrap_or_default(), pod))
}

/// The API server's token signing keys as it serves them (`/openid/v1/jwks`), read by `client`.
pub async fn served_jwks(client: &kube::Client) -> Value {
    let text = client
        .request_text(
            http::Request::get("/openid/v1/jwks")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .expect("reading /openid/v1/jwks");
    serde_json::from_str(&text).expect("/openid/v1/jwks is JSON")
}
