//! Reading and validating a policy file: every error in one pass, each with its key path
//! (`routes.spam.limits[0].max_fraction: must be in (0, 1]`), so an operator fixes them all
//! at once; a policy with any error is refused whole.
//!
//! Two passes: `structure` reads the YAML part by part into the typed policy, collecting
//! shape errors (unknown keys, wrong types) without stopping; `check` then runs the semantic
//! checks on every part that was read. A guardrail that is written but cannot take effect — a
//! redaction that matches no header, a limit on an action the route never takes — is an error
//! here, never a silent no-op: from the outside it would look like a guardrail in force.

use std::collections::HashSet;

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::policy::{
    AdaptiveThresholdSpec, ConsumersSpec, DecisionSpec, ExplorationSpec, LimitScope, LimitSpec,
    OnBreach, PolicySpec, Protocol, RouteMatch, RouteSpec, ScoreSpec, Tagging, TeeSpec,
    ThresholdSpec, WriteDecisions,
};

/// One problem in a policy, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// Key path, e.g. `routes.spam.limits[0].max_fraction`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every error found, in file order as far as the parser allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl std::fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

struct Errors(Vec<PolicyError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(PolicyError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Parses and validates policy text. `max_record_bytes` is the settings' largest record: the
/// body cap may not exceed it. An empty document (nothing, or only comments) is refused: it is
/// what a file truncated for rewriting looks like, and applying it would switch every guardrail
/// off. A policy that wants every default says `{}`.
pub fn parse(text: &str, max_record_bytes: u64) -> Result<PolicySpec, PolicyErrors> {
    let mut errors = Errors(Vec::new());
    let value: Value = match serde_yaml_ng::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            // Nothing below can be located without a parse tree: this one error is all there is.
            errors.add("", format!("not valid YAML: {e}"));
            return Err(PolicyErrors(errors.0));
        }
    };
    if value.is_null() {
        errors.add(
            "",
            "the policy is empty (write `{}` for the built-in defaults)",
        );
        return Err(PolicyErrors(errors.0));
    }
    // `check` runs even after shape errors, on what did parse, so one pass reports both kinds.
    let policy = structure(&value, &mut errors);
    check(&policy, max_record_bytes, &mut errors);
    if errors.0.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyErrors(errors.0))
    }
}

/// Reads a policy file.
pub fn load(path: &std::path::Path, max_record_bytes: u64) -> Result<PolicySpec, PolicyErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        PolicyErrors(vec![PolicyError {
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    parse(&text, max_record_bytes)
}

/// Deserializes one part, recording its error (with the full key path) instead of stopping.
fn part<T: DeserializeOwned>(value: &Value, path: &str, errors: &mut Errors) -> Option<T> {
    // Through JSON: serde_yaml_ng's Value takes enums only as YAML tags (`!binary`), while
    // the policy writes them as one-key maps (`binary: {…}`), as its text parser does.
    let json = match serde_json::to_value(value) {
        Ok(j) => j,
        Err(e) => {
            errors.add(path, format!("cannot be read: {e}"));
            return None;
        }
    };
    // serde_path_to_error names the key inside the part; joined to `path` it gives the full
    // key path the operator searches the file for (`[i]` glued on, `.key` dotted).
    match serde_path_to_error::deserialize::<_, T>(json) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let full = match (path.is_empty(), inner.as_str()) {
                (_, ".") | (_, "") => path.to_owned(),
                (true, inner) => inner.to_owned(),
                (false, inner) if inner.starts_with('[') => format!("{path}{inner}"),
                (false, inner) => format!("{path}.{inner}"),
            };
            errors.add(full, e.into_inner().to_string());
            None
        }
    }
}

fn mapping<'a>(
    value: &'a Value,
    path: &str,
    allowed: &[&str],
    errors: &mut Errors,
) -> Option<&'a serde_yaml_ng::Mapping> {
    let Some(map) = value.as_mapping() else {
        errors.add(path, "expected a mapping");
        return None;
    };
    // Unknown keys are errors, not ignored: a typo (`mtach`, `max_fracton`) would otherwise
    // leave that setting at its default, and for a limit or a redaction that means off. The
    // mapping is still returned, so its known keys are checked too.
    for key in map.keys() {
        match key.as_str() {
            Some(k) if allowed.contains(&k) => {}
            Some(k) => errors.add(
                join(path, k),
                format!("unknown key (expected one of: {})", allowed.join(", ")),
            ),
            None => errors.add(path, "keys must be strings"),
        }
    }
    Some(map)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Builds the typed policy part by part, so that an error in one part does not hide the
/// others: a part that fails is reported and left at its default (a route is left out), and
/// the semantic checks still run on every part that parsed.
fn structure(value: &Value, errors: &mut Errors) -> PolicySpec {
    let mut policy = PolicySpec::default();
    let Some(map) = mapping(
        value,
        "",
        &["tee", "consumers", "routes", "tagging"],
        errors,
    ) else {
        return policy;
    };
    let get = |k: &str| map.get(Value::String(k.into()));
    if let Some(tee) = get("tee").and_then(|v| part::<TeeSpec>(v, "tee", errors)) {
        policy.tee = tee;
    }
    if let Some(c) = get("consumers").and_then(|v| part::<ConsumersSpec>(v, "consumers", errors)) {
        policy.consumers = c;
    }
    // `tagging:` left empty means no tagging, as does its absence, so a commented-out body
    // does not turn into an error.
    if let Some(v) = get("tagging").filter(|v| !v.is_null()) {
        policy.tagging = part::<Tagging>(v, "tagging", errors);
    }
    match get("routes") {
        None => {}
        Some(v) if v.is_null() => {}
        Some(v) => match v.as_mapping() {
            None => errors.add("routes", "expected a mapping of route name to route"),
            Some(m) => {
                for (name, route) in m {
                    match name.as_str() {
                        None => errors.add("routes", "route names must be strings"),
                        Some(name) => {
                            if let Some(r) = route_part(name, route, errors) {
                                policy.routes.insert(name.to_owned(), r);
                            }
                        }
                    }
                }
            }
        },
    }
    policy
}

fn route_part(name: &str, value: &Value, errors: &mut Errors) -> Option<RouteSpec> {
    let path = format!("routes.{name}");
    let keys = [
        "match",
        "protocol",
        "score",
        "decision",
        "limits",
        "write_decisions",
        "capture_bodies",
        "exploration",
        "tag_field",
        "shadow",
    ];
    let before = errors.0.len();
    let map = mapping(value, &path, &keys, errors)?;
    let get = |k: &str| map.get(Value::String(k.into()));
    let required = |k: &str, errors: &mut Errors| {
        let v = get(k);
        if v.is_none() {
            errors.add(join(&path, k), "required");
        }
        v
    };
    // The protocol is required, never guessed from the body: the same JSON can be read as more
    // than one protocol, and a guess that changes with the model's output changes decisions.
    let matcher = required("match", errors)
        .and_then(|v| part::<RouteMatch>(v, &join(&path, "match"), errors));
    let protocol = required("protocol", errors)
        .and_then(|v| part::<Protocol>(v, &join(&path, "protocol"), errors));
    let score = get("score").map(|v| part::<ScoreSpec>(v, &join(&path, "score"), errors));
    let decision =
        get("decision").map(|v| part::<DecisionSpec>(v, &join(&path, "decision"), errors));
    let mut limits = Vec::new();
    if let Some(v) = get("limits") {
        match v.as_sequence() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(l) = part::<LimitSpec>(item, &format!("{path}.limits[{i}]"), errors)
                    {
                        limits.push(l);
                    }
                }
            }
            None => errors.add(join(&path, "limits"), "expected a list"),
        }
    }
    let write_decisions = get("write_decisions")
        .map(|v| part::<WriteDecisions>(v, &join(&path, "write_decisions"), errors));
    let capture_bodies =
        get("capture_bodies").map(|v| part::<bool>(v, &join(&path, "capture_bodies"), errors));
    let exploration =
        get("exploration").map(|v| part::<ExplorationSpec>(v, &join(&path, "exploration"), errors));
    let tag_field = get("tag_field").map(|v| part::<String>(v, &join(&path, "tag_field"), errors));
    let shadow = get("shadow").map(|v| part::<bool>(v, &join(&path, "shadow"), errors));
    // A route with any error is left out whole: checking a half-read route would report
    // follow-on errors (e.g. a missing score) for parts that already failed.
    if errors.0.len() > before {
        return None;
    }
    Some(RouteSpec {
        matcher: matcher?,
        protocol: protocol?,
        score: score.flatten(),
        decision: decision.flatten(),
        limits,
        write_decisions: write_decisions.flatten(),
        capture_bodies: capture_bodies.flatten(),
        exploration: exploration.flatten(),
        tag_field: tag_field.flatten(),
        shadow: shadow.flatten().unwrap_or(false),
    })
}

/// The semantic checks: ranges, references between parts, and the whole file's consistency.
fn check(policy: &PolicySpec, max_record_bytes: u64, errors: &mut Errors) {
    let tee = &policy.tee;
    if !(0.0..=1.0).contains(&tee.sample_rate) {
        errors.add("tee.sample_rate", "must be in [0, 1]");
    }
    // A body cap above the largest record promises bodies the record can never hold.
    if tee.body_cap_bytes > max_record_bytes {
        errors.add(
            "tee.body_cap_bytes",
            format!("{} is above the largest record ({max_record_bytes} bytes, the settings' max_record)", tee.body_cap_bytes),
        );
    }
    // A redaction that can never match (not a header name, not a JSON pointer) would leave the
    // field it meant to hide in every record.
    for (i, h) in tee.redact_headers.iter().enumerate() {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            errors.add(
                format!("tee.redact_headers[{i}]"),
                format!("{h:?} is not a header name"),
            );
        }
    }
    for (key, pointers) in [
        ("redact_body", &tee.redact_body),
        ("hash_body", &tee.hash_body),
    ] {
        for (i, p) in pointers.iter().enumerate() {
            if !p.starts_with('/') {
                errors.add(
                    format!("tee.{key}[{i}]"),
                    format!("{p:?} is not a JSON pointer (it starts with '/')"),
                );
            }
        }
    }

    let c = &policy.consumers;
    if http::HeaderName::from_bytes(c.header.as_bytes()).is_err() {
        errors.add(
            "consumers.header",
            format!("{:?} is not a header name", c.header),
        );
    }
    // Declared consumers are compared with the caller's header: an empty entry or one listed
    // twice names no consumer and is an edit gone wrong.
    let mut seen = HashSet::new();
    for (i, d) in c.declared.iter().enumerate() {
        if d.is_empty() {
            errors.add(format!("consumers.declared[{i}]"), "empty");
        } else if !seen.insert(d) {
            errors.add(
                format!("consumers.declared[{i}]"),
                format!("{d:?} is listed twice"),
            );
        }
    }

    if let Some(t) = &policy.tagging {
        // `hs256` is the name the tag's own `alg` field uses, accepted as a synonym. Whether
        // the signing key exists is checked where the key directory is read, not here.
        if !matches!(t.algorithm.as_str(), "ed25519" | "hmac-sha256" | "hs256") {
            errors.add(
                "tagging.algorithm",
                format!("{:?}: use ed25519 or hmac-sha256", t.algorithm),
            );
        }
        if t.signing_key.is_empty() {
            errors.add("tagging.signing_key", "empty");
        }
    }
    for (name, route) in &policy.routes {
        check_route(name, route, errors);
    }
    // Two routes may never match the same request: which one decides would be a guess.
    let names: Vec<&String> = policy.routes.keys().collect();
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            let (ra, rb) = (&policy.routes[*a], &policy.routes[*b]);
            if let Some(example) = overlap(&ra.matcher, &rb.matcher) {
                errors.add(
                    format!("routes.{b}.match"),
                    format!("matches the same requests as routes.{a} (e.g. {example})"),
                );
            }
        }
    }
}

fn check_route(name: &str, route: &RouteSpec, errors: &mut Errors) {
    let path = format!("routes.{name}");
    // The name is part of every key path (`routes.NAME.…`), metric label and tag: a `.` or a
    // space in it would make those ambiguous.
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        errors.add(&path, "route names use letters, digits, '-' and '_'");
    }
    // Exactly one matcher: with both, whether a request must match one or both would be a
    // guess. A model name is one path segment (`/v2/models/NAME/…`), so it holds no `/`.
    match (&route.matcher.path_prefix, &route.matcher.model) {
        (Some(_), Some(_)) | (None, None) => errors.add(
            format!("{path}.match"),
            "give exactly one of path_prefix or model",
        ),
        (Some(p), None) if !p.starts_with('/') => {
            errors.add(format!("{path}.match.path_prefix"), "must start with '/'")
        }
        (None, Some(m)) if m.is_empty() || m.contains('/') => {
            errors.add(format!("{path}.match.model"), "a model name, without '/'")
        }
        _ => {}
    }

    // Where the scores are depends on the declared protocol; a key of another protocol is
    // refused rather than ignored, since ignoring it would read the scores from elsewhere.
    if let Some(score) = &route.score {
        let sp = format!("{path}.score");
        match route.protocol {
            Protocol::V2 if score.output.is_none() => errors.add(
                format!("{sp}.output"),
                "required for protocol v2 (the output tensor's name)",
            ),
            Protocol::Json => match &score.pointer {
                None => errors.add(format!("{sp}.pointer"), "required for protocol json"),
                Some(p) if !p.starts_with('/') => {
                    errors.add(format!("{sp}.pointer"), "a JSON pointer starts with '/'")
                }
                // `*` stands for the batch's rows; two would make a row ambiguous.
                Some(p) if p.split('/').filter(|s| *s == "*").count() > 1 => errors.add(
                    format!("{sp}.pointer"),
                    "at most one '*' (the batch's rows)",
                ),
                _ => {}
            },
            _ => {}
        }
        if route.protocol != Protocol::Json && score.pointer.is_some() {
            errors.add(format!("{sp}.pointer"), "only for protocol json");
        }
        if route.protocol != Protocol::V2 && score.output.is_some() {
            errors.add(format!("{sp}.output"), "only for protocol v2");
        }
        // The adaptive threshold maps scores into the range (dividing by `hi − lo`): an empty
        // or infinite range has no mapping.
        let [lo, hi] = score.range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            errors.add(format!("{sp}.range"), "must be [low, high] with low < high");
        }
    }

    if let Some(x) = &route.exploration {
        // ε = 1 would ignore the model: every action drawn at random.
        if !(0.0..1.0).contains(&x.epsilon) {
            errors.add(format!("{path}.exploration.epsilon"), "must be in [0, 1)");
        }
        if route.decision.is_none() {
            errors.add(
                format!("{path}.exploration"),
                "exploration needs a decision to explore",
            );
        }
    }
    if let Some(f) = &route.tag_field {
        if !f.starts_with('/') || f.len() < 2 {
            errors.add(
                format!("{path}.tag_field"),
                "a JSON pointer to a field, e.g. /sluicegate_tag",
            );
        }
        if route.decision.is_none() {
            errors.add(
                format!("{path}.tag_field"),
                "only decided responses are tagged",
            );
        }
    }
    if route.shadow && route.decision.is_none() {
        errors.add(
            format!("{path}.shadow"),
            "shadow mode needs a decision to shadow",
        );
    }
    // Limits and written decisions of a route that decides nothing could never act: refused,
    // so the operator learns the route is not guarded, rather than believing it is.
    let Some(decision) = &route.decision else {
        if !route.limits.is_empty() {
            errors.add(format!("{path}.limits"), "limits need a decision to limit");
        }
        if route.write_decisions.is_some() {
            errors.add(
                format!("{path}.write_decisions"),
                "the route makes no decision",
            );
        }
        return;
    };
    if route.score.is_none() {
        errors.add(format!("{path}.score"), "required when the route decides");
    }
    // A missing score was reported above; the thresholds are still checked, against the
    // default range, so their errors come in the same pass.
    let range = route.score.as_ref().map_or([0.0, 1.0], |s| s.range);
    let dp = format!("{path}.decision");
    match decision {
        DecisionSpec::Binary {
            action,
            otherwise,
            threshold,
        } => {
            if action.is_empty() {
                errors.add(format!("{dp}.binary.action"), "empty");
            }
            // The same action both ways would decide nothing.
            if action == otherwise {
                errors.add(format!("{dp}.binary.otherwise"), "must differ from action");
            }
            check_threshold(threshold, &format!("{dp}.binary.threshold"), range, errors);
        }
        DecisionSpec::Multiclass {
            classes,
            default_action,
            thresholds,
        } => {
            if classes.len() < 2 {
                errors.add(format!("{dp}.multiclass.classes"), "at least two classes");
            }
            let mut seen = HashSet::new();
            for (i, c) in classes.iter().enumerate() {
                if !seen.insert(c) {
                    errors.add(
                        format!("{dp}.multiclass.classes[{i}]"),
                        format!("{c:?} is listed twice"),
                    );
                }
            }
            if default_action.is_empty() {
                errors.add(format!("{dp}.multiclass.default_action"), "empty");
            }
            for (class, t) in thresholds {
                let tp = format!("{dp}.multiclass.thresholds.{class}");
                if !classes.contains(class) {
                    errors.add(&tp, format!("{class:?} is not one of the classes"));
                }
                check_threshold(t, &tp, range, errors);
            }
            // Multi-class takes the argmax over every column; a single column is a binary route.
            if route.score.as_ref().is_some_and(|s| s.column.is_some()) {
                errors.add(
                    format!("{path}.score.column"),
                    "a multi-class route reads every column",
                );
            }
        }
    }
    if let (Some(w), Protocol::Json) = (&route.write_decisions, route.protocol) {
        match &w.pointer {
            Some(p) if p.starts_with('/') => {}
            _ => errors.add(
                format!("{path}.write_decisions.pointer"),
                "protocol json needs a JSON pointer to write the actions at",
            ),
        }
    } else if route
        .write_decisions
        .as_ref()
        .is_some_and(|w| w.pointer.is_some())
    {
        errors.add(
            format!("{path}.write_decisions.pointer"),
            "only for protocol json (v2 adds an output tensor, v1 a top-level object)",
        );
    }

    // Limits are the guardrails operators change live, so every way one could silently not
    // bind is refused: an action the route never takes (a typo), no bound, a zero window, a
    // fallback that is missing, impossible or itself limited (a breach must always have an
    // answer that is allowed).
    let actions = decision.actions();
    let limited: HashSet<&str> = route.limits.iter().map(|l| l.action.as_str()).collect();
    for (i, limit) in route.limits.iter().enumerate() {
        let lp = format!("{path}.limits[{i}]");
        if !actions.contains(&limit.action.as_str()) {
            errors.add(
                format!("{lp}.action"),
                format!(
                    "{:?} is not an action this route can take ({})",
                    limit.action,
                    actions.join(", ")
                ),
            );
        }
        if limit.max_fraction.is_none() && limit.max_count.is_none() {
            errors.add(&lp, "give max_fraction, max_count or both");
        }
        if let Some(f) = limit.max_fraction {
            if !(f > 0.0 && f <= 1.0) {
                errors.add(format!("{lp}.max_fraction"), "must be in (0, 1]");
            }
        }
        if limit.max_count == Some(0) {
            errors.add(
                format!("{lp}.max_count"),
                "must be at least 1 (to forbid an action, remove it from the decision)",
            );
        }
        if limit.window.is_zero() {
            errors.add(format!("{lp}.window"), "must be longer than 0s");
        }
        validate_fleet(limit, &lp, errors);
        match (limit.on_breach, &limit.fallback) {
            (OnBreach::Fallback, None) => errors.add(
                format!("{lp}.fallback"),
                "required with on_breach: fallback",
            ),
            (OnBreach::Fallback, Some(f)) => {
                if !actions.contains(&f.as_str()) {
                    errors.add(
                        format!("{lp}.fallback"),
                        format!(
                            "{f:?} is not an action this route can take ({})",
                            actions.join(", ")
                        ),
                    );
                } else if limited.contains(f.as_str()) {
                    errors.add(format!("{lp}.fallback"), format!("{f:?} is itself limited on this route; a fallback must always be allowed"));
                }
                if f == &limit.action {
                    errors.add(
                        format!("{lp}.fallback"),
                        "must differ from the limited action",
                    );
                }
            }
            (_, Some(_)) => errors.add(format!("{lp}.fallback"), "only with on_breach: fallback"),
            _ => {}
        }
    }
    // Two limits on one action over one window would count the same decisions twice; one limit
    // carries both `max_fraction` and `max_count`. (A reload also finds a limit's state by its
    // action and settings, which two such limits would share.)
    let mut seen = HashSet::new();
    for (i, l) in route.limits.iter().enumerate() {
        if !seen.insert((&l.action, l.window)) {
            errors.add(
                format!("{path}.limits[{i}]"),
                format!(
                    "a second limit on {:?} over the same window; merge them",
                    l.action
                ),
            );
        }
    }
}

fn check_threshold(t: &ThresholdSpec, path: &str, [lo, hi]: [f64; 2], errors: &mut Errors) {
    match t {
        ThresholdSpec::Fixed(v) => {
            if !v.is_finite() {
                errors.add(format!("{path}.fixed"), "must be a number");
            }
        }
        ThresholdSpec::Adaptive(a) => {
            check_adaptive(a, &format!("{path}.adaptive"), [lo, hi], errors)
        }
    }
}

fn check_adaptive(a: &AdaptiveThresholdSpec, path: &str, [lo, hi]: [f64; 2], errors: &mut Errors) {
    // A rate of 0 or 1 needs no estimator: it is a fixed threshold at the range's top or bottom.
    if !(a.target_rate > 0.0 && a.target_rate < 1.0) {
        errors.add(format!("{path}.target_rate"), "must be in (0, 1)");
    }
    if a.min > a.max {
        errors.add(
            format!("{path}.min"),
            format!("{} is above max ({})", a.min, a.max),
        );
    // `else`: with min above max, "initial outside [min, max]" would be a second report of the
    // same mistake.
    } else if !(a.min..=a.max).contains(&a.initial) {
        errors.add(
            format!("{path}.initial"),
            format!(
                "{} is outside [min, max] = [{}, {}]",
                a.initial, a.min, a.max
            ),
        );
    }
    // Scores are clamped into the range, so a bound outside it would always or never be met.
    for (key, v) in [("min", a.min), ("max", a.max), ("initial", a.initial)] {
        if !(v >= lo && v <= hi) {
            errors.add(
                format!("{path}.{key}"),
                format!("{v} is outside the score range [{lo}, {hi}]"),
            );
        }
    }
    // A step of 0 would pin the threshold at `initial` for good.
    if a.max_step.is_nan() || a.max_step <= 0.0 {
        errors.add(format!("{path}.max_step"), "must be above 0");
    }
    if a.window.is_zero() {
        errors.add(format!("{path}.window"), "must be longer than 0s");
    }
    // Updated less often than once a window, the threshold would lag whole windows behind.
    if a.update_interval.is_zero() || a.update_interval > a.window {
        errors.add(
            format!("{path}.update_interval"),
            "must be above 0s and at most the window",
        );
    }
    if a.min_samples == 0 {
        errors.add(format!("{path}.min_samples"), "must be at least 1");
    }
}

/// The path prefixes a matcher takes.
fn prefixes(m: &RouteMatch) -> Vec<String> {
    match (&m.path_prefix, &m.model) {
        (Some(p), _) => vec![p.clone()],
        // Every path a model is served on; each ends in `:` or `/` so that model `a` does not
        // take `ab`'s requests.
        (None, Some(model)) => vec![
            format!("/v1/models/{model}:"),
            format!("/v1/models/{model}/"),
            format!("/v2/models/{model}/"),
        ],
        (None, None) => Vec::new(),
    }
}

/// A request path both matchers take, if any.
fn overlap(a: &RouteMatch, b: &RouteMatch) -> Option<String> {
    // Prefix matching: two prefixes meet exactly when one starts with the other, and then the
    // longer one is a path both take.
    for pa in prefixes(a) {
        for pb in prefixes(b) {
            if pa.starts_with(&pb) {
                return Some(pa);
            }
            if pb.starts_with(&pa) {
                return Some(pb);
            }
        }
    }
    None
}

/// A fleet limit caps a count (a fraction is already fleet-wide under an even load balancer),
/// and its replicas and lease fraction make sense.
fn validate_fleet(limit: &LimitSpec, lp: &str, errors: &mut Errors) {
    if limit.scope != LimitScope::Fleet {
        for (key, set) in [
            ("replicas", limit.replicas.is_some()),
            ("lease_fraction", limit.lease_fraction.is_some()),
        ] {
            if set {
                errors.add(format!("{lp}.{key}"), "only for scope: fleet");
            }
        }
        return;
    }
    if limit.max_count.is_none() {
        errors.add(format!("{lp}.scope"), "scope: fleet needs max_count");
    }
    if limit.replicas == Some(0) {
        errors.add(format!("{lp}.replicas"), "must be at least 1");
    }
    if let Some(f) = limit.lease_fraction {
        if !(f > 0.0 && f <= 1.0) {
            errors.add(format!("{lp}.lease_fraction"), "must be in (0, 1]");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 20;

    fn errors_of(text: &str) -> Vec<String> {
        match parse(text, MAX) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const GOOD: &str = r#"
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
      - {action: spam, max_fraction: 0.05, window: 1m, min_decisions: 100, on_breach: fallback, fallback: ham}
"#;

    #[test]
    fn a_good_policy_parses() {
        let p = parse(GOOD, MAX).unwrap();
        assert_eq!(p.routes["spam"].limits[0].fallback.as_deref(), Some("ham"));
        assert!(parse("{}", MAX).unwrap() == PolicySpec::default());
    }

    #[test]
    fn shadow_mode_is_read_and_needs_a_decision() {
        let shadowed = GOOD.replace("    limits:", "    shadow: true\n    limits:");
        assert!(parse(&shadowed, MAX).unwrap().routes["spam"].shadow);
        assert!(!parse(GOOD, MAX).unwrap().routes["spam"].shadow);
        let recording =
            "routes:\n  r:\n    match: {path_prefix: /}\n    protocol: json\n    shadow: true\n";
        assert_eq!(
            errors_of(recording),
            ["routes.r.shadow: shadow mode needs a decision to shadow"]
        );
        let not_bool = GOOD.replace("    limits:", "    shadow: maybe\n    limits:");
        assert!(errors_of(&not_bool)[0].starts_with("routes.spam.shadow"));
    }

    #[test]
    fn fleet_scope_needs_a_count_and_sane_settings() {
        let limit = "      - {action: spam, max_fraction: 0.05, window: 1m, min_decisions: 100, on_breach: fallback, fallback: ham}";
        let with = |extra: &str| GOOD.replace(limit, &limit.replace("}", &format!(", {extra}}}")));
        let p = parse(&with("max_count: 30, scope: fleet, replicas: 3"), MAX).unwrap();
        assert_eq!(p.routes["spam"].limits[0].scope, LimitScope::Fleet);
        assert_eq!(
            errors_of(&with("scope: fleet")),
            ["routes.spam.limits[0].scope: scope: fleet needs max_count"]
        );
        assert_eq!(
            errors_of(&with(
                "max_count: 3, scope: fleet, replicas: 0, lease_fraction: 2"
            )),
            [
                "routes.spam.limits[0].replicas: must be at least 1",
                "routes.spam.limits[0].lease_fraction: must be in (0, 1]"
            ]
        );
        assert_eq!(
            errors_of(&with("replicas: 3")),
            ["routes.spam.limits[0].replicas: only for scope: fleet"]
        );
        assert!(errors_of(&with("scope: galaxy"))[0].starts_with("routes.spam.limits[0]"));
    }

    #[test]
    fn an_empty_document_is_refused() {
        for text in ["", "\n", "# only a comment\n", "---\n", "~"] {
            let err = parse(text, MAX).unwrap_err().to_string();
            assert!(err.contains("empty"), "{text:?}: {err}");
        }
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let bad = r#"
tee: {sample_rate: 2, body_cap_bytes: 99999999}
consumers: {declared: [a, a]}
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
          adaptive: {target_rate: 0.02, window: 10m, initial: 0.9, min: 0.95, max: 0.9, max_step: 0.01}
    limits:
      - {action: spam, max_fraction: 1.5, window: 1m, on_breach: fallback, fallback: ham}
      - {action: eggs, max_count: 3, window: 1m, on_breach: flag}
      - {action: ham, max_count: 3, window: 1m, on_breach: flag, colour: red}
  spam2:
    match: {path_prefix: /v2/models/spam-filter/}
    protocol: v2
  typo:
    mtach: {model: x}
    protocol: v3
"#;
        let errs = errors_of(bad);
        let has = |needle: &str| errs.iter().any(|e| e.contains(needle));
        for needle in [
            "tee.sample_rate: must be in [0, 1]",
            "tee.body_cap_bytes",
            "consumers.declared[1]",
            "routes.spam.limits[2].colour",
            "routes.typo.mtach: unknown key",
            "routes.typo.match: required",
            "routes.typo.protocol",
        ] {
            assert!(has(needle), "missing {needle:?} in {errs:#?}");
        }
        assert!(errs.len() >= 7, "{errs:#?}");

        // With the structure fixed, the semantic errors all come at once.
        let semantic = bad
            .replace(", colour: red", "")
            .replace("mtach", "match")
            .replace("v3", "v1");
        let errs = errors_of(&semantic);
        let has = |needle: &str| errs.iter().any(|e| e.contains(needle));
        for needle in [
            "tee.sample_rate: must be in [0, 1]",
            "consumers.declared[1]",
            "routes.spam.decision.binary.threshold.adaptive.min: 0.95 is above max (0.9)",
            "routes.spam.limits[0].max_fraction: must be in (0, 1]",
            "routes.spam.limits[1].action: \"eggs\" is not an action this route can take",
            "routes.spam.limits[0].fallback: \"ham\" is itself limited",
            "routes.spam2.match: matches the same requests as routes.spam",
        ] {
            assert!(has(needle), "missing {needle:?} in {errs:#?}");
        }
    }

    #[test]
    fn overlapping_prefixes_and_models_are_caught() {
        let m = |p: Option<&str>, model: Option<&str>| RouteMatch {
            path_prefix: p.map(String::from),
            model: model.map(String::from),
        };
        assert!(overlap(&m(Some("/v2/"), None), &m(None, Some("x"))).is_some());
        assert!(overlap(&m(Some("/a/"), None), &m(Some("/b/"), None)).is_none());
        assert!(overlap(&m(None, Some("a")), &m(None, Some("ab"))).is_none());
    }

    #[test]
    fn yaml_syntax_errors_say_where() {
        let errs = errors_of("routes: [unclosed");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].contains("not valid YAML"), "{errs:?}");
    }
}
