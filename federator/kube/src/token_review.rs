//! Who a service-account token belongs to, as the API server says: a `TokenReview`
//! (authentication.k8s.io/v1) with the audiences the agent accepts. The CA API uses it to
//! authenticate pods (and the injected `meshfed workload` containers) by their projected
//! service-account token, as istiod does.
//!
//! A token is accepted when the API server says it is authenticated, for at least one of our
//! audiences, and its user is a service account (`system:serviceaccount:<namespace>:<name>`).
//! An unreachable API server is a different answer from a refused token, so callers can tell
//! "try again" from "no".

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

/// The service account a token belongs to, and the pod it is bound to when it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
    /// `authentication.kubernetes.io/pod-name` of a bound token.
    pub pod: Option<String>,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The API server refused the token, or accepted it for something we do not accept.
    #[error("{0}")]
    Refused(String),
    /// The review could not be made (the API server is unreachable or refused the review).
    #[error("TokenReview failed: {0}")]
    Unavailable(String),
}

/// The prefix of a service account's user name.
const SA_PREFIX: &str = "system:serviceaccount:";

/// Reviews `token` for `audiences` (none: the API server's own audience).
pub async fn review(
    client: kube::Client,
    token: &str,
    audiences: &[String],
) -> Result<Reviewed, ReviewError> {
    let api: Api<TokenReview> = Api::all(client);
    let req = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
        },
        ..Default::default()
    };
    let answer = api
        .create(&PostParams::default(), &req)
        .await
        .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
    judge(&answer, audiences)
}

/// The verdict on a TokenReview's answer.
pub fn judge(answer: &TokenReview, audiences: &[String]) -> Result<Reviewed, ReviewError> {
    let Some(status) = &answer.status else {
        return Err(ReviewError::Unavailable(
            "the answer carries no status".into(),
        ));
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "the API server did not authenticate it".into());
        return Err(ReviewError::Refused(why));
    }
    if !audiences.is_empty() {
        let got = status.audiences.clone().unwrap_or_default();
        if !got.iter().any(|a| audiences.contains(a)) {
            return Err(ReviewError::Refused(format!(
                "it is not for audience {} (the API server says it is for {})",
                audiences.join(", "),
                if got.is_empty() {
                    "none of them".to_string()
                } else {
                    got.join(", ")
                }
            )));
        }
    }
    let user = status.user.as_ref();
    let name = user.and_then(|u| u.username.clone()).unwrap_or_default();
    let Some((namespace, sa)) = name
        .strip_prefix(SA_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
    else {
        return Err(ReviewError::Refused(format!(
            "it belongs to {:?}, not to a service account",
            name
        )));
    };
    let pod = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
        .and_then(|v| v.first().cloned());
    Ok(Reviewed {
        namespace: namespace.to_string(),
        service_account: sa.to_string(),
        pod,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn answer(v: serde_json::Value) -> TokenReview {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_bound_service_account_token_names_its_account_and_pod() {
        let a = answer(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": "t", "audiences": ["istio-ca"]},
            "status": {"authenticated": true, "audiences": ["istio-ca"],
                "user": {"username": "system:serviceaccount:shop:payment", "uid": "u1",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:shop"],
                    "extra": {"authentication.kubernetes.io/pod-name": ["payment-7d9f"]}}}
        }));
        let r = judge(&a, &["istio-ca".into()]).unwrap();
        assert_eq!(
            r,
            Reviewed {
                namespace: "shop".into(),
                service_account: "payment".into(),
                pod: Some("payment-7d9f".into())
            }
        );
    }

    #[test]
    fn refusals_say_why() {
        let cases = [
            (
                json!({"status": {"authenticated": false, "error": "token has expired"}}),
                "token has expired",
            ),
            (json!({"status": {}}), "did not authenticate"),
            (
                json!({"status": {"authenticated": true, "audiences": ["api"],
                    "user": {"username": "system:serviceaccount:shop:payment"}}}),
                "not for audience istio-ca (the API server says it is for api)",
            ),
            (
                json!({"status": {"authenticated": true, "audiences": ["istio-ca"],
                    "user": {"username": "alice@example.com"}}}),
                "not to a service account",
            ),
            (
                json!({"status": {"authenticated": true, "audiences": ["istio-ca"],
                    "user": {"username": "system:serviceaccount:shop"}}}),
                "not to a service account",
            ),
        ];
        for (v, want) in cases {
            let mut v = v;
            v["spec"] = json!({});
            let e = judge(&answer(v), &["istio-ca".into()]).unwrap_err();
            assert!(matches!(e, ReviewError::Refused(_)), "{e:?}");
            assert!(e.to_string().contains(want), "{e} / {want}");
        }
        let e = judge(&answer(json!({"spec": {}})), &[]).unwrap_err();
        assert!(matches!(e, ReviewError::Unavailable(_)), "{e:?}");
    }
}
