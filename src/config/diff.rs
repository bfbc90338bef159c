//! `sluicegate diff A B`: what changes between two policies, by route and setting — not a
//! text diff — so a reviewer reads `routes.spam.…target_rate: 0.02 → 0.05`.

use serde_json::Value;

use super::policy::PolicySpec;

/// One changed setting.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Change {
    Added {
        path: String,
        value: Value,
    },
    Removed {
        path: String,
        value: Value,
    },
    Changed {
        path: String,
        from: Value,
        to: Value,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added { path, value } => write!(f, "+ {path}: {value}"),
            Change::Removed { path, value } => write!(f, "- {path}: {value}"),
            Change::Changed { path, from, to } => write!(f, "~ {path}: {from} → {to}"),
        }
    }
}

/// The changes from `a` to `b`, in key order.
pub(crate) fn diff(a: &PolicySpec, b: &PolicySpec) -> Vec<Change> {
    let a = serde_json::to_value(a).expect("policy serializes");
    let b = serde_json::to_value(b).expect("policy serializes");
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<Change>) {
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            for (k, va) in ma {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match mb.get(k) {
                    Some(vb) => walk(&p, va, vb, out),
                    None if !va.is_null() => out.push(Change::Removed {
                        path: p,
                        value: va.clone(),
                    }),
                    None => {}
                }
            }
            for (k, vb) in mb {
                if !ma.contains_key(k) && !vb.is_null() {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    out.push(Change::Added {
                        path: p,
                        value: vb.clone(),
                    });
                }
            }
        }
        // Lists of objects (limits) compare item by item; lists of scalars as a whole.
        (Value::Array(la), Value::Array(lb)) if la.iter().chain(lb).all(Value::is_object) => {
            for i in 0..la.len().max(lb.len()) {
                let p = format!("{path}[{i}]");
                match (la.get(i), lb.get(i)) {
                    (Some(x), Some(y)) => walk(&p, x, y, out),
                    (Some(x), None) => out.push(Change::Removed {
                        path: p,
                        value: x.clone(),
                    }),
                    (None, Some(y)) => out.push(Change::Added {
                        path: p,
                        value: y.clone(),
                    }),
                    (None, None) => {}
                }
            }
        }
        (Value::Null, b) if !b.is_null() => out.push(Change::Added {
            path: path.into(),
            value: b.clone(),
        }),
        (a, Value::Null) if !a.is_null() => out.push(Change::Removed {
            path: path.into(),
            value: a.clone(),
        }),
        (a, b) if a != b => out.push(Change::Changed {
            path: path.into(),
            from: a.clone(),
            to: b.clone(),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::parse;

    const A: &str = r#"
routes:
  spam:
    match: {model: spam-filter}
    protocol: v2
    score: {output: predict_proba, column: 1}
    decision:
      binary:
        action: spam
        otherwise: ham
        threshold:
          adaptive: {target_rate: 0.02, window: 10m, initial: 0.9, min: 0.5, max: 0.99, max_step: 0.01}
    limits:
      - {action: spam, max_fraction: 0.05, window: 1m, on_breach: flag}
"#;

    #[test]
    fn names_each_changed_setting() {
        let a = parse(A, 1 << 20).unwrap();
        let b = parse(
            &A.replace("target_rate: 0.02", "target_rate: 0.05")
                .replace("on_breach: flag", "on_breach: reject")
                .replace("routes:", "tee: {sample_rate: 0.5}\nroutes:"),
            1 << 20,
        )
        .unwrap();
        let lines: Vec<String> = diff(&a, &b).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            lines,
            vec![
                "~ tee.sample_rate: 1.0 → 0.5",
                "~ routes.spam.decision.binary.threshold.adaptive.target_rate: 0.02 → 0.05",
                "~ routes.spam.limits[0].on_breach: \"flag\" → \"reject\"",
            ]
        );
        assert!(diff(&a, &a).is_empty());
        let removed = diff(&a, &PolicySpec::default());
        assert!(matches!(&removed[0], Change::Removed { path, .. } if path == "routes.spam"));
    }
}
