//! `--namespace-selector`: a Kubernetes label selector in its string form (as `kubectl -l`
//! takes it) parsed into kube's `Selector`, which does the matching. kube-core builds
//! selectors from objects but does not parse the string form, so the grammar is here:
//! comma-separated requirements `key=value`, `key==value`, `key!=value`, `key`, `!key`,
//! `key in (a,b)`, `key notin (a,b)`. Errors name the requirement and the reason.

use kube_core::{Expression, Selector, SelectorExt};
use std::collections::BTreeMap;

/// A parsed namespace selector, with its text (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceSelector {
    pub text: String,
    selector: Selector,
}

impl NamespaceSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters (alphanumerics, `-`, `_`, `.`, beginning and ending alphanumeric).
fn check_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if name.is_empty() {
        return Err(format!("{k:?}: no name after the prefix"));
    }
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 || !p.split('.').all(meshfed_model::validate::is_dns_label)
        {
            return Err(format!("{k:?}: the prefix is not a DNS subdomain"));
        }
    }
    check_name(name).map_err(|e| format!("{k:?}: {e}"))
}

/// A label value, or a key's name part.
fn check_name(v: &str) -> Result<(), String> {
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && v.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
        && v.chars().last().is_none_or(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a label name (at most 63 letters, digits, '-', '_' or '.', beginning and ending with a letter or digit)"
        ))
    }
}

fn nonempty_key(k: &str, req: &str) -> Result<String, String> {
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("{req:?}: no key"));
    }
    check_key(k)?;
    Ok(k.to_string())
}

/// Splits on commas outside parentheses.
fn requirements(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("an unmatched ')'".into());
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("an unclosed '('".into());
    }
    out.push(&s[start..]);
    Ok(out)
}

fn values(list: &str, req: &str) -> Result<std::collections::BTreeSet<String>, String> {
    let inner = list
        .trim()
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or_else(|| format!("{req:?}: the values must be in parentheses, as in (a,b)"))?;
    let mut out = std::collections::BTreeSet::new();
    if inner.trim().is_empty() {
        return Err(format!("{req:?}: an empty set of values"));
    }
    for v in inner.split(',') {
        let v = v.trim();
        check_name(v).map_err(|e| format!("{req:?}: {e}"))?;
        out.insert(v.to_string());
    }
    Ok(out)
}

/// `key <op> (values)` with whitespace before the operator and optional whitespace after it
/// (`env in (a,b)`, `env in(a,b)`): the key and the parenthesised list.
fn set_op<'a>(r: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let Some(i) = r.find('(') else {
        // No list at all: still this operator (the values check says what is missing).
        let (k, rest) = r.split_once(&format!(" {op} "))?;
        return Some((k, rest));
    };
    let head = r[..i].trim_end();
    let key = head.strip_suffix(op)?;
    if !key.ends_with(char::is_whitespace) {
        return None;
    }
    Some((key, &r[i..]))
}

/// Parses a selector; the empty string selects every namespace.
pub fn parse(text: &str) -> Result<NamespaceSelector, String> {
    let mut selector = Selector::default();
    if !text.trim().is_empty() {
        for req in requirements(text)? {
            let r = req.trim();
            if r.is_empty() {
                return Err("an empty requirement (two commas, or a trailing one)".into());
            }
            let e = if let Some((k, v)) = r.split_once("!=") {
                let v = v.trim();
                check_name(v).map_err(|e| format!("{r:?}: {e}"))?;
                Expression::NotEqual(nonempty_key(k, r)?, v.to_string())
            } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                let v = v.trim();
                check_name(v).map_err(|e| format!("{r:?}: {e}"))?;
                Expression::Equal(nonempty_key(k, r)?, v.to_string())
            } else if let Some(k) = r.strip_prefix('!') {
                Expression::DoesNotExist(nonempty_key(k, r)?)
            } else if let Some((k, list)) = set_op(r, "notin") {
                Expression::NotIn(nonempty_key(k, r)?, values(list, r)?)
            } else if let Some((k, list)) = set_op(r, "in") {
                Expression::In(nonempty_key(k, r)?, values(list, r)?)
            } else {
                Expression::Exists(nonempty_key(r, r)?)
            };
            selector.extend(std::iter::once(e));
        }
    }
    Ok(NamespaceSelector {
        text: text.to_string(),
        selector,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_form_kubectl_takes() {
        let s = parse("meshfed.io/federate=true, env in (prod,staging), !legacy, team").unwrap();
        assert!(s.matches(&labels(&[
            ("meshfed.io/federate", "true"),
            ("env", "prod"),
            ("team", "pay")
        ])));
        assert!(!s.matches(&labels(&[("meshfed.io/federate", "true"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[
            ("meshfed.io/federate", "true"),
            ("env", "dev"),
            ("team", "pay")
        ])));
        assert!(!s.matches(&labels(&[
            ("meshfed.io/federate", "true"),
            ("env", "prod"),
            ("team", "pay"),
            ("legacy", "")
        ])));
        let t = parse("env in(prod),\tteam notin (x)").unwrap();
        assert!(t.matches(&labels(&[("env", "prod")])));
        assert!(!t.matches(&labels(&[("env", "prod"), ("team", "x")])));
        let n = parse("env notin (dev), tier!=batch, app==web").unwrap();
        assert!(n.matches(&labels(&[("app", "web")])));
        assert!(!n.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!n.matches(&labels(&[("app", "web"), ("tier", "batch")])));
        assert!(parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn bad_selectors_name_the_requirement() {
        for (text, want) in [
            ("env in prod", "parentheses"),
            ("env in (prod", "unclosed"),
            ("a=b,,c", "empty requirement"),
            ("=x", "no key"),
            ("Env=Prod Ok", "not a label name"),
            ("bad prefix!/x", "prefix"),
            ("k=-x", "not a label name"),
            ("env in ()", "empty set"),
            ("example.com/=x", "no name after the prefix"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
