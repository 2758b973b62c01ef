//! Connection policy: which app may connect to which.
//!
//! Apps carry labels (`ax exec --label KEY=VALUE`). An app without any
//! label is treated as if it had `zone=default`; these are its *effective*
//! labels (see [`effective_labels`]).
//!
//! Without a policy file, the **default rule** ("shared-label") applies: a
//! client may connect to a server when their effective labels share at
//! least one pair (same key and same value).
//!
//! A policy file (TOML, given to the daemon with `--policy FILE`) lists
//! explicit allow rules by label selector and port, and says what happens
//! when none of them matches:
//!
//! ```toml
//! # What happens when no rule matches: "shared-label" (the default rule;
//! # also what an absent `default` means), "deny", or "allow".
//! default = "deny"
//!
//! [[allow]]
//! name = "web-to-db"          # optional; otherwise the rule is called "allow[N]" (N = 0-based index)
//! from = { tier = "web" }     # label selector: the client must have ALL these labels; empty or absent = any app
//! to = { tier = "db" }        # the server must have all these labels; empty or absent = any app
//! ports = [5432, "8000-8099"] # optional; absent = any port. Items are a port number or a "LO-HI" range string
//!
//! [[allow]]                   # called "allow[1]"
//! from = { zone = "default" } # matches apps started without labels
//! to = { role = "dns" }
//! ports = [53]
//! ```
//!
//! Selectors match the effective labels, so `{ zone = "default" }` matches
//! an app without labels. A port item may also be a single port written as
//! a string (`"53"`). Unknown keys, invalid ports (0, above 65535, LO > HI,
//! anything that is not a port), an empty `ports` list (omit it to allow
//! any port) and an unknown `default` are errors, so that typos are caught
//! when the file is loaded rather than when a connection is refused.
//!
//! [`Policy::decide`] tries the allow rules in file order; the first whose
//! `from`, `to` and `ports` all match allows the connection. When none
//! matches, `default` decides.

use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// The label an app without labels is given for policy decisions.
const IMPLICIT_ZONE_KEY: &str = "zone";
/// The value of [`IMPLICIT_ZONE_KEY`] for an app without labels.
const IMPLICIT_ZONE_VALUE: &str = "default";

/// The spellings `default` accepts, in the order error messages list them.
const DEFAULT_RULE_NAMES: [&str; 3] = ["shared-label", "deny", "allow"];

/// A connection policy: allow rules tried in order, then a default.
///
/// [`Policy::default()`] is the default rule ("shared-label") with no allow
/// rules, which is what the daemon uses without `--policy`.
///
/// A policy file looks like this (the top of `policy.rs` documents every
/// key):
///
/// ```toml
/// default = "deny"            # or "shared-label" (when absent), or "allow"
///
/// [[allow]]
/// name = "web-to-db"          # optional; otherwise "allow[N]"
/// from = { tier = "web" }     # the client must have all these labels
/// to = { tier = "db" }        # the server must have all these labels
/// ports = [5432, "8000-8099"] # optional; absent = any port
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    fallback: DefaultRule,
    rules: Vec<AllowRule>,
}

/// What decides a connection that no allow rule matched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum DefaultRule {
    /// Allowed when the effective labels share a key=value pair.
    #[default]
    SharedLabel,
    /// Always refused.
    Deny,
    /// Always allowed.
    Allow,
}

/// One validated `[[allow]]` entry.
#[derive(Debug, Clone, PartialEq)]
struct AllowRule {
    name: String,
    from: BTreeMap<String, String>,
    to: BTreeMap<String, String>,
    /// `None`: any port.
    ports: Option<Vec<PortRange>>,
}

/// An inclusive range of ports; a single port has `low == high`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortRange {
    low: u16,
    high: u16,
}

impl PortRange {
    fn contains(self, port: u16) -> bool {
        self.low <= port && port <= self.high
    }
}

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may be made.
    pub allowed: bool,
    /// The rule that decided: an allow rule's name (`"web-to-db"`,
    /// `"allow[2]"`), or `"default: shared label KEY=VALUE"`,
    /// `"default: no shared label"`, `"default: deny"`, `"default: allow"`.
    pub rule: String,
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file could not be read.
    #[error("cannot read policy file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The policy text is not valid TOML or not a valid policy.
    #[error("invalid policy{}: {message}", describe_origin(path.as_deref()))]
    Parse {
        /// The file the text came from; `None` for [`Policy::from_toml`].
        path: Option<PathBuf>,
        /// What is wrong, naming the rule and line where known.
        message: String,
    },
}

fn describe_origin(path: Option<&Path>) -> String {
    match path {
        Some(path) => format!(" file {}", path.display()),
        None => String::new(),
    }
}

/// Returns the labels policy decisions use for an app with `labels`: the
/// labels themselves, or `zone=default` when there are none.
pub fn effective_labels(labels: &BTreeMap<String, String>) -> Cow<'_, BTreeMap<String, String>> {
    // Made once: a connect of an unlabelled app decides on it.
    static IMPLICIT: std::sync::LazyLock<BTreeMap<String, String>> =
        std::sync::LazyLock::new(|| {
            BTreeMap::from([(
                IMPLICIT_ZONE_KEY.to_string(),
                IMPLICIT_ZONE_VALUE.to_string(),
            )])
        });
    if labels.is_empty() {
        Cow::Borrowed(&IMPLICIT)
    } else {
        Cow::Borrowed(labels)
    }
}

/// Whether `labels` has every key=value pair of `selector`.
fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// The policy file as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    default: Option<toml::Spanned<String>>,
    #[serde(default)]
    allow: Vec<AllowRuleFile>,
}

/// One `[[allow]]` entry as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowRuleFile {
    name: Option<String>,
    #[serde(default)]
    from: BTreeMap<String, String>,
    #[serde(default)]
    to: BTreeMap<String, String>,
    ports: Option<toml::Spanned<Vec<toml::Spanned<toml::Value>>>>,
}

/// Turns byte offsets into 1-based line numbers for error messages.
struct LineIndex<'a> {
    text: &'a str,
}

impl LineIndex<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&byte| byte == b'\n')
            .count()
            + 1
    }
}

impl Policy {
    /// Parses a policy from TOML text in the policy file format (see
    /// [`Policy`]).
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        Self::parse(text).map_err(|message| PolicyError::Parse {
            path: None,
            message,
        })
    }

    /// Reads and parses the policy file at `path`. Errors name the path.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PolicyError::Parse {
            path: Some(path.to_path_buf()),
            message,
        })
    }

    /// The number of allow rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Decides a connect from an app with `client` labels to an app with
    /// `server` labels on `port`.
    ///
    /// The first allow rule whose `from` matches the client's effective
    /// labels, whose `to` matches the server's and whose `ports` include
    /// `port` allows it; otherwise the policy's default decides.
    pub fn decide(
        &self,
        client: &BTreeMap<String, String>,
        server: &BTreeMap<String, String>,
        port: u16,
    ) -> Decision {
        let client = effective_labels(client);
        let server = effective_labels(server);
        let matching_rule = self.rules.iter().find(|rule| {
            selector_matches(&rule.from, &client)
                && selector_matches(&rule.to, &server)
                && rule
                    .ports
                    .as_ref()
                    .is_none_or(|ranges| ranges.iter().any(|range| range.contains(port)))
        });
        if let Some(rule) = matching_rule {
            return Decision {
                allowed: true,
                rule: rule.name.clone(),
            };
        }
        match self.fallback {
            DefaultRule::SharedLabel => {
                let shared = client
                    .iter()
                    .find(|(key, value)| server.get(key.as_str()) == Some(*value));
                match shared {
                    Some((key, value)) => Decision {
                        allowed: true,
                        rule: format!("default: shared label {key}={value}"),
                    },
                    None => Decision {
                        allowed: false,
                        rule: "default: no shared label".to_string(),
                    },
                }
            }
            DefaultRule::Deny => Decision {
                allowed: false,
                rule: "default: deny".to_string(),
            },
            DefaultRule::Allow => Decision {
                allowed: true,
                rule: "default: allow".to_string(),
            },
        }
    }

    /// Parses and validates `text`; the error is the message for
    /// [`PolicyError::Parse`].
    fn parse(text: &str) -> Result<Policy, String> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|err| err.to_string().trim_end().to_string())?;
        let lines = LineIndex { text };

        let fallback = match &file.default {
            None => DefaultRule::default(),
            Some(spanned) => parse_default_rule(spanned.get_ref()).ok_or_else(|| {
                format!(
                    "line {}: default = {:?} is not valid; expected one of {}",
                    lines.line_of(spanned.span().start),
                    spanned.get_ref(),
                    quoted_list(&DEFAULT_RULE_NAMES),
                )
            })?,
        };

        let rules = file
            .allow
            .into_iter()
            .enumerate()
            .map(|(index, rule)| validate_rule(index, rule, &lines))
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Policy { fallback, rules })
    }
}

fn parse_default_rule(text: &str) -> Option<DefaultRule> {
    match text {
        "shared-label" => Some(DefaultRule::SharedLabel),
        "deny" => Some(DefaultRule::Deny),
        "allow" => Some(DefaultRule::Allow),
        _ => None,
    }
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|item| format!("{item:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn validate_rule(
    index: usize,
    rule: AllowRuleFile,
    lines: &LineIndex<'_>,
) -> Result<AllowRule, String> {
    let name = rule.name.unwrap_or_else(|| format!("allow[{index}]"));
    let ports = match rule.ports {
        None => None,
        Some(list) => {
            if list.get_ref().is_empty() {
                return Err(format!(
                    "rule {name:?} (line {}): ports is empty; omit it to allow any port",
                    lines.line_of(list.span().start),
                ));
            }
            let ranges = list
                .get_ref()
                .iter()
                .map(|item| {
                    parse_port_item(item.get_ref()).map_err(|problem| {
                        format!(
                            "rule {name:?} (line {}): {problem}",
                            lines.line_of(item.span().start),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(ranges)
        }
    };
    Ok(AllowRule {
        name,
        from: rule.from,
        to: rule.to,
        ports,
    })
}

/// Parses one `ports` item: an integer or a `"LO-HI"` / `"PORT"` string.
/// The error describes the item and what is wrong with it.
fn parse_port_item(item: &toml::Value) -> Result<PortRange, String> {
    match item {
        toml::Value::Integer(number) => {
            let port = port_from_integer(*number)
                .map_err(|problem| format!("invalid port {number}: {problem}"))?;
            Ok(PortRange {
                low: port,
                high: port,
            })
        }
        toml::Value::String(text) => {
            parse_port_range(text).map_err(|problem| format!("invalid port {text:?}: {problem}"))
        }
        other => Err(format!(
            "invalid port item: expected a port number or a \"LO-HI\" range string, found a {}",
            other.type_str()
        )),
    }
}

fn port_from_integer(number: i64) -> Result<u16, String> {
    match u16::try_from(number) {
        Ok(0) | Err(_) => Err("ports are 1-65535".to_string()),
        Ok(port) => Ok(port),
    }
}

fn parse_port_text(text: &str) -> Result<u16, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || !trimmed.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(format!(
            "{trimmed:?} is not a port number (expected a port or \"LO-HI\")"
        ));
    }
    match trimmed.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{trimmed} is not a port (ports are 1-65535)")),
        Ok(port) => Ok(port),
    }
}

fn parse_port_range(text: &str) -> Result<PortRange, String> {
    match text.split_once('-') {
        None => {
            let port = parse_port_text(text)?;
            Ok(PortRange {
                low: port,
                high: port,
            })
        }
        Some((low, high)) => {
            let low = parse_port_text(low)?;
            let high = parse_port_text(high)?;
            if low > high {
                return Err(format!(
                    "range starts at {low}, after its end {high} (write \"LO-HI\" with LO <= HI)"
                ));
            }
            Ok(PortRange { low, high })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn unlabeled() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn parse_error(text: &str) -> String {
        match Policy::from_toml(text) {
            Ok(policy) => panic!("expected an error, got {policy:?}"),
            Err(err @ PolicyError::Parse { path: None, .. }) => err.to_string(),
            Err(other) => panic!("expected a Parse error without a path, got {other:?}"),
        }
    }

    fn decision(allowed: bool, rule: &str) -> Decision {
        Decision {
            allowed,
            rule: rule.to_string(),
        }
    }

    #[test]
    fn effective_labels_adds_default_zone_only_when_empty() {
        assert_eq!(
            *effective_labels(&unlabeled()),
            labels(&[("zone", "default")])
        );
        let app = labels(&[("tier", "web")]);
        assert!(matches!(effective_labels(&app), Cow::Borrowed(_)));
        assert_eq!(*effective_labels(&app), app);
    }

    #[test]
    fn default_rule_allows_shared_label() {
        let policy = Policy::default();
        let client = labels(&[("team", "a"), ("tier", "web")]);
        let server = labels(&[("team", "a"), ("tier", "db")]);
        assert_eq!(
            policy.decide(&client, &server, 80),
            decision(true, "default: shared label team=a")
        );
    }

    #[test]
    fn default_rule_reports_first_shared_pair_in_key_order() {
        let policy = Policy::default();
        let client = labels(&[("b", "2"), ("a", "1")]);
        let server = labels(&[("a", "1"), ("b", "2")]);
        assert_eq!(
            policy.decide(&client, &server, 80).rule,
            "default: shared label a=1"
        );
    }

    #[test]
    fn default_rule_denies_without_shared_label() {
        let policy = Policy::default();
        // Same key with a different value is not shared.
        let client = labels(&[("team", "a")]);
        let server = labels(&[("team", "b"), ("tier", "db")]);
        assert_eq!(
            policy.decide(&client, &server, 80),
            decision(false, "default: no shared label")
        );
    }

    #[test]
    fn default_rule_allows_two_unlabeled_apps() {
        assert_eq!(
            Policy::default().decide(&unlabeled(), &unlabeled(), 80),
            decision(true, "default: shared label zone=default")
        );
    }

    #[test]
    fn default_rule_treats_unlabeled_as_default_zone() {
        let policy = Policy::default();
        let zoned = labels(&[("zone", "default")]);
        assert!(policy.decide(&unlabeled(), &zoned, 80).allowed);
        assert!(policy.decide(&zoned, &unlabeled(), 80).allowed);
        let labeled = labels(&[("tier", "web")]);
        assert_eq!(
            policy.decide(&unlabeled(), &labeled, 80),
            decision(false, "default: no shared label")
        );
    }

    #[test]
    fn empty_text_is_the_default_policy() {
        let policy = Policy::from_toml("").unwrap();
        assert_eq!(policy, Policy::default());
        assert_eq!(policy.rule_count(), 0);
    }

    #[test]
    fn default_values_parse() {
        let unrelated = (labels(&[("a", "1")]), labels(&[("b", "2")]));
        let shared = Policy::from_toml(r#"default = "shared-label""#).unwrap();
        assert_eq!(shared, Policy::default());
        assert_eq!(
            Policy::from_toml(r#"default = "deny""#).unwrap().decide(
                &unlabeled(),
                &unlabeled(),
                80
            ),
            decision(false, "default: deny")
        );
        assert_eq!(
            Policy::from_toml(r#"default = "allow""#).unwrap().decide(
                &unrelated.0,
                &unrelated.1,
                80
            ),
            decision(true, "default: allow")
        );
    }

    #[test]
    fn documented_example_parses_and_decides() {
        let policy = Policy::from_toml(
            r#"
            default = "deny"

            [[allow]]
            name = "web-to-db"
            from = { tier = "web" }
            to = { tier = "db" }
            ports = [5432, "8000-8099"]

            [[allow]]
            from = { zone = "default" }
            to = { role = "dns" }
            ports = [53]
            "#,
        )
        .unwrap();
        assert_eq!(policy.rule_count(), 2);

        let web = labels(&[("tier", "web"), ("team", "a")]);
        let db = labels(&[("tier", "db")]);
        let dns = labels(&[("role", "dns")]);
        assert_eq!(policy.decide(&web, &db, 5432), decision(true, "web-to-db"));
        assert_eq!(policy.decide(&web, &db, 8000), decision(true, "web-to-db"));
        assert_eq!(policy.decide(&web, &db, 8099), decision(true, "web-to-db"));
        assert_eq!(
            policy.decide(&web, &db, 8100),
            decision(false, "default: deny")
        );
        assert_eq!(
            policy.decide(&web, &db, 7999),
            decision(false, "default: deny")
        );
        // Direction matters.
        assert_eq!(
            policy.decide(&db, &web, 5432),
            decision(false, "default: deny")
        );
        // The unnamed rule is "allow[1]", and `zone = "default"` matches unlabeled apps.
        assert_eq!(
            policy.decide(&unlabeled(), &dns, 53),
            decision(true, "allow[1]")
        );
        assert_eq!(
            policy.decide(&web, &dns, 53),
            decision(false, "default: deny")
        );
    }

    #[test]
    fn selector_needs_all_labels() {
        let policy = Policy::from_toml(
            r#"
            default = "deny"
            [[allow]]
            from = { tier = "web", team = "a" }
            "#,
        )
        .unwrap();
        let server = labels(&[("tier", "db")]);
        assert!(
            !policy
                .decide(&labels(&[("tier", "web")]), &server, 1)
                .allowed
        );
        assert!(
            !policy
                .decide(&labels(&[("tier", "web"), ("team", "b")]), &server, 1)
                .allowed
        );
        assert_eq!(
            policy.decide(
                &labels(&[("tier", "web"), ("team", "a"), ("x", "y")]),
                &server,
                1
            ),
            decision(true, "allow[0]")
        );
    }

    #[test]
    fn absent_and_empty_selectors_and_ports_match_anything() {
        let policy = Policy::from_toml(
            r#"
            default = "deny"
            [[allow]]
            name = "everything"
            from = {}
            "#,
        )
        .unwrap();
        for port in [1, 80, u16::MAX] {
            assert_eq!(
                policy.decide(&unlabeled(), &labels(&[("a", "b")]), port),
                decision(true, "everything")
            );
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let policy = Policy::from_toml(
            r#"
            [[allow]]
            name = "narrow"
            to = { tier = "db" }
            ports = [5432]

            [[allow]]
            name = "broad"
            to = { tier = "db" }

            [[allow]]
            name = "never-reached"
            "#,
        )
        .unwrap();
        assert_eq!(policy.rule_count(), 3);
        let db = labels(&[("tier", "db")]);
        assert_eq!(policy.decide(&unlabeled(), &db, 5432).rule, "narrow");
        assert_eq!(policy.decide(&unlabeled(), &db, 5433).rule, "broad");
        assert_eq!(
            policy.decide(&unlabeled(), &unlabeled(), 1).rule,
            "never-reached"
        );
    }

    #[test]
    fn allow_rules_come_before_the_default() {
        // The default would allow (shared label), but a rule matches first.
        let policy = Policy::from_toml(
            r#"
            [[allow]]
            name = "explicit"
            "#,
        )
        .unwrap();
        assert_eq!(
            policy.decide(&unlabeled(), &unlabeled(), 80),
            decision(true, "explicit")
        );
        // A rule that does not match leaves the shared-label default in charge.
        let policy = Policy::from_toml(
            r#"
            [[allow]]
            to = { tier = "db" }
            "#,
        )
        .unwrap();
        assert_eq!(
            policy.decide(&unlabeled(), &unlabeled(), 80),
            decision(true, "default: shared label zone=default")
        );
        assert_eq!(
            policy.decide(&unlabeled(), &labels(&[("tier", "web")]), 80),
            decision(false, "default: no shared label")
        );
    }

    #[test]
    fn port_items_and_ranges() {
        let policy = Policy::from_toml(
            r#"
            default = "deny"
            [[allow]]
            ports = [1, "53", "100-102", "65535-65535", " 7 - 8 "]
            "#,
        )
        .unwrap();
        let allowed = |port| policy.decide(&unlabeled(), &unlabeled(), port).allowed;
        for port in [1, 53, 100, 101, 102, 65535, 7, 8] {
            assert!(allowed(port), "port {port}");
        }
        for port in [2, 52, 54, 99, 103, 65534, 6, 9] {
            assert!(!allowed(port), "port {port}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let top = parse_error("defualt = \"deny\"\n");
        assert!(top.contains("defualt"), "{top}");
        let in_rule = parse_error("[[allow]]\nname = \"x\"\nport = [80]\n");
        assert!(in_rule.contains("port"), "{in_rule}");
        let table = parse_error("[allow]\nname = \"x\"\n");
        assert!(table.starts_with("invalid policy: "), "{table}");
    }

    #[test]
    fn non_string_label_values_are_errors() {
        let message = parse_error("[[allow]]\nfrom = { port = 80 }\n");
        assert!(message.contains("string"), "{message}");
    }

    #[test]
    fn bad_ports_are_errors_naming_the_rule() {
        let cases = [
            ("0", "invalid port 0: ports are 1-65535"),
            ("65536", "invalid port 65536: ports are 1-65535"),
            ("-1", "invalid port -1: ports are 1-65535"),
            ("\"0-10\"", "0 is not a port"),
            ("\"10-70000\"", "70000 is not a port"),
            (
                "\"9-8\"",
                "invalid port \"9-8\": range starts at 9, after its end 8",
            ),
            ("\"http\"", "\"http\" is not a port number"),
            ("\"1-2-3\"", "\"2-3\" is not a port number"),
            ("\"-5\"", "\"\" is not a port number"),
            ("\"+5\"", "\"+5\" is not a port number"),
            ("\"\"", "\"\" is not a port number"),
            ("1.5", "found a float"),
            ("true", "found a boolean"),
        ];
        for (item, expected) in cases {
            let named = parse_error(&format!(
                "[[allow]]\nname = \"web-to-db\"\nports = [80, {item}]\n"
            ));
            assert!(
                named.contains("rule \"web-to-db\" (line 3)"),
                "{item}: {named}"
            );
            assert!(named.contains(expected), "{item}: {named}");

            let unnamed = parse_error(&format!(
                "[[allow]]\n[[allow]]\n\nports = [\n  {item},\n]\n"
            ));
            assert!(
                unnamed.contains("rule \"allow[1]\" (line 5)"),
                "{item}: {unnamed}"
            );
        }
    }

    #[test]
    fn empty_ports_list_is_an_error() {
        let message = parse_error("[[allow]]\nname = \"x\"\nports = []\n");
        assert!(message.contains("rule \"x\""), "{message}");
        assert!(message.contains("ports is empty"), "{message}");
    }

    #[test]
    fn bad_default_is_an_error_listing_valid_values() {
        let message = parse_error("\ndefault = \"permit\"\n");
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("\"permit\""), "{message}");
        assert!(
            message.contains("\"shared-label\", \"deny\", \"allow\""),
            "{message}"
        );
        let wrong_type = parse_error("default = false\n");
        assert!(wrong_type.contains("default"), "{wrong_type}");
    }

    #[test]
    fn invalid_toml_is_an_error() {
        let message = parse_error("[[allow]\n");
        assert!(message.starts_with("invalid policy: "), "{message}");
    }

    #[test]
    fn load_reads_a_file() {
        let path = std::env::temp_dir().join(format!("ax-policy-test-{}.toml", std::process::id()));
        std::fs::write(&path, "default = \"deny\"\n[[allow]]\nname = \"r\"\n").unwrap();
        let loaded = Policy::load(&path);
        std::fs::write(&path, "default = \"nope\"\n").unwrap();
        let invalid = Policy::load(&path);
        let _ = std::fs::remove_file(&path);

        assert_eq!(loaded.unwrap().rule_count(), 1);
        match invalid {
            Err(err @ PolicyError::Parse { path: Some(_), .. }) => {
                let message = err.to_string();
                assert!(message.contains(&path.display().to_string()), "{message}");
            }
            other => panic!("expected a Parse error with a path, got {other:?}"),
        }
    }

    #[test]
    fn load_of_a_missing_file_is_a_read_error_naming_it() {
        let path = std::env::temp_dir().join("ax-policy-test-does-not-exist/policy.toml");
        match Policy::load(&path) {
            Err(err @ PolicyError::Read { .. }) => {
                let message = err.to_string();
                assert!(message.contains(&path.display().to_string()), "{message}");
            }
            other => panic!("expected a Read error, got {other:?}"),
        }
    }
}
