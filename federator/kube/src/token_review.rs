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

/// Any authenticated user (a person's token as `kubectl` holds it, a service account's): who
/// the API server says a token is, for its own audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

/// Who `token` is, for the API server's own audience (the token `kubectl` sends; a token made
/// for another audience, such as a pod's CA token, is refused).
pub async fn authenticate(client: kube::Client, token: &str) -> Result<User, ReviewError> {
    let api: Api<TokenReview> = Api::all(client);
    let req = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: None,
        },
        ..Default::default()
    };
    let answer = api
        .create(&PostParams::default(), &req)
        .await
        .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
    let Some(status) = answer.status else {
        return Err(ReviewError::Unavailable(
            "the answer carries no status".into(),
        ));
    };
    if status.authenticated != Some(true) {
        return Err(ReviewError::Refused(
            status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "the API server did not authenticate it".into()),
        ));
    }
    let u = status.user.unwrap_or_default();
    let username = u.username.filter(|n| !n.is_empty()).ok_or_else(|| {
        ReviewError::Refused("the API server authenticated it but names no user".into())
    })?;
    Ok(User {
        username,
        uid: u.uid,
        groups: u.groups.unwrap_or_default(),
        extra: u.extra.unwrap_or_default(),
    })
}

/// What a user asks to do, as RBAC names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl std::fmt::Display for Access<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        write!(
            f,
            "{} {}{group} {}/{}",
            self.verb, self.resource, self.namespace, self.name
        )
    }
}

/// Whether `user` may do `access`, as the API server's authorizers say (a
/// SubjectAccessReview, authorization.k8s.io/v1): `Refused` with the API server's reason when
/// not.
pub async fn may(
    client: kube::Client,
    user: &User,
    access: &Access<'_>,
) -> Result<(), ReviewError> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let api: Api<SubjectAccessReview> = Api::all(client);
    let req = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.username.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(access.verb.into()),
                group: Some(access.group.into()),
                resource: Some(access.resource.into()),
                namespace: Some(access.namespace.into()),
                name: Some(access.name.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = api
        .create(&PostParams::default(), &req)
        .await
        .map_err(|e| ReviewError::Unavailable(format!("SubjectAccessReview failed: {e}")))?;
    let status = answer.status.unwrap_or_default();
    if status.allowed && status.denied != Some(true) {
        return Ok(());
    }
    let why = status.reason.filter(|r| !r.is_empty());
    Err(ReviewError::Refused(format!(
        "{} may not {access}{}",
        user.username,
        why.map(|w| format!(" ({w})")).unwrap_or_default()
    )))
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
