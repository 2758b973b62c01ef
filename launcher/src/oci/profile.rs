//! `ax oci profile`: the OCI `linux.seccomp` object that makes a container
//! runtime trap what `ax exec`'s filter traps and hand the notify fd to the
//! daemon's runtime socket (`listenerPath`).
//!
//! The rules come from [`ax_broker::rules::rules`], the table `ax exec`'s
//! filter is compiled from. With a base profile (podman's default, whose
//! default action is an errno), ax's rules replace the base's rules for the
//! same calls: an unconditional `SCMP_ACT_ALLOW` would shadow ax's
//! conditional traps in libseccomp, so for calls ax traps only under
//! conditions the base's allowance becomes a conditional one that always
//! holds (`arg0 >= 0`), which libseccomp evaluates after ax's conditions.

use ax_broker::rules::{rules, Action, Compare, Rule};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

/// The libseccomp name of this architecture, as OCI profiles spell it.
fn native_arch() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        "SCMP_ARCH_X86_64"
    } else if cfg!(target_arch = "aarch64") {
        "SCMP_ARCH_AARCH64"
    } else if cfg!(target_arch = "riscv64") {
        "SCMP_ARCH_RISCV64"
    } else if cfg!(target_arch = "s390x") {
        "SCMP_ARCH_S390X"
    } else if cfg!(target_arch = "powerpc64") {
        "SCMP_ARCH_PPC64LE"
    } else {
        "SCMP_ARCH_NATIVE"
    }
}

fn action_json(entry: &mut Map<String, Value>, action: Action) {
    match action {
        Action::Notify => {
            entry.insert("action".into(), json!("SCMP_ACT_NOTIFY"));
        }
        Action::Errno(e) => {
            entry.insert("action".into(), json!("SCMP_ACT_ERRNO"));
            entry.insert("errnoRet".into(), json!(e));
        }
    }
}

/// One OCI `syscalls` entry per rule; unconditional rules with the same
/// action share one.
fn syscall_entries(rules: &[Rule]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut plain: Vec<(Action, Vec<&str>)> = Vec::new();
    for r in rules {
        if r.args.is_empty() {
            match plain.iter_mut().find(|(a, _)| *a == r.action) {
                Some((_, names)) => names.push(r.syscall),
                None => plain.push((r.action, vec![r.syscall])),
            }
            continue;
        }
        let args: Vec<Value> = r
            .args
            .iter()
            .map(|a| match a.compare {
                // OCI: for SCMP_CMP_MASKED_EQ, `value` is the mask and
                // `valueTwo` what the masked argument must equal.
                Compare::MaskedEqual { mask, value } => json!({
                    "index": a.index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"
                }),
                Compare::NotEqual(v) => json!({
                    "index": a.index, "value": v, "valueTwo": 0, "op": "SCMP_CMP_NE"
                }),
            })
            .collect();
        let mut e = Map::new();
        e.insert("names".into(), json!([r.syscall]));
        action_json(&mut e, r.action);
        e.insert("args".into(), Value::Array(args));
        out.push(Value::Object(e));
    }
    let mut first: Vec<Value> = plain
        .into_iter()
        .map(|(action, names)| {
            let mut e = Map::new();
            e.insert("names".into(), json!(names));
            action_json(&mut e, action);
            Value::Object(e)
        })
        .collect();
    first.extend(out);
    first
}

/// The profile for a daemon whose runtime socket is `listener`, alone.
pub fn standalone(listener: &str) -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [native_arch()],
        "listenerPath": listener,
        "syscalls": syscall_entries(&rules()),
    })
}

/// `base` (an OCI seccomp object) with ax's rules merged in and its
/// `listenerPath` set to `listener`.
///
/// # Errors
/// The base is not a JSON object with a `syscalls` array, or already has
/// another `listenerPath` (one listener per container: ax cannot share it).
pub fn merged(base: Value, listener: &str) -> Result<Value, String> {
    let Value::Object(mut base) = base else {
        return Err("the base profile is not a JSON object".into());
    };
    match base.get("listenerPath") {
        None | Some(Value::Null) => {}
        Some(Value::String(p)) if p.is_empty() || p == listener => {}
        Some(other) => {
            return Err(format!(
                "the base profile already sends its notify fd to listenerPath {other}: a \
                 container has one seccomp agent, and ax cannot be combined with another"
            ))
        }
    }
    let default_allows = base
        .get("defaultAction")
        .and_then(Value::as_str)
        .is_some_and(|a| a == "SCMP_ACT_ALLOW" || a == "SCMP_ACT_LOG");
    let ours = rules();
    let unconditional: BTreeSet<&str> = ours
        .iter()
        .filter(|r| r.args.is_empty())
        .map(|r| r.syscall)
        .collect();
    let conditional: BTreeSet<&str> = ours
        .iter()
        .filter(|r| !r.args.is_empty())
        .map(|r| r.syscall)
        .filter(|s| !unconditional.contains(s))
        .collect();
    let entries = match base.remove("syscalls") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("the base profile's \"syscalls\" is not an array".into()),
    };
    let mut kept = Vec::with_capacity(entries.len());
    // Calls the base allowed outright that ax traps only under conditions:
    // still allowed when ax's conditions do not hold.
    let mut still_allowed: BTreeSet<&str> = BTreeSet::new();
    for entry in entries {
        let Value::Object(mut e) = entry else {
            return Err("a \"syscalls\" entry of the base profile is not an object".into());
        };
        let allows = e
            .get("action")
            .and_then(Value::as_str)
            .is_some_and(|a| a == "SCMP_ACT_ALLOW" || a == "SCMP_ACT_LOG");
        let has_args = e
            .get("args")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        let names: Vec<Value> = match e.get("names") {
            Some(Value::Array(n)) => n.clone(),
            _ => {
                kept.push(Value::Object(e));
                continue;
            }
        };
        let mut left = Vec::with_capacity(names.len());
        for n in names {
            let name = n.as_str().unwrap_or_default();
            if unconditional.contains(name) {
                // ax decides this call: the base's rule would shadow it.
                continue;
            }
            if let Some(&ours) = conditional.get(name) {
                if allows && !has_args {
                    if !default_allows {
                        still_allowed.insert(ours);
                    }
                    continue;
                }
            }
            left.push(n);
        }
        if !left.is_empty() {
            e.insert("names".into(), Value::Array(left));
            kept.push(Value::Object(e));
        }
    }
    kept.extend(syscall_entries(&ours));
    if !still_allowed.is_empty() {
        kept.push(json!({
            "names": still_allowed.into_iter().collect::<Vec<_>>(),
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0, "valueTwo": 0, "op": "SCMP_CMP_GE"}],
            "comment": "ax: allowed whenever ax's conditions above do not trap it",
        }));
    }
    base.insert("syscalls".into(), Value::Array(kept));
    base.insert("listenerPath".into(), json!(listener));
    if !base.contains_key("defaultAction") {
        base.insert("defaultAction".into(), json!("SCMP_ACT_ALLOW"));
    }
    Ok(Value::Object(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_with(profile: &Value, action: &str) -> Vec<String> {
        profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action)
            .flat_map(|e| e["names"].as_array().unwrap().clone())
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn standalone_traps_what_the_filter_traps() {
        let p = standalone("/run/ax/ax.sock.oci");
        assert_eq!(p["listenerPath"], "/run/ax/ax.sock.oci");
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        let notify = names_with(&p, "SCMP_ACT_NOTIFY");
        for n in ax_broker::rules::TRAPPED_SYSCALLS {
            assert!(notify.contains(&n.to_string()), "{n}");
        }
        let n_rules = rules().len();
        let n_entries: usize = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                if e.get("args").is_some() {
                    1
                } else {
                    e["names"].as_array().unwrap().len()
                }
            })
            .sum();
        assert_eq!(n_entries, n_rules);
        let uring = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["names"] == json!(["io_uring_setup"]))
            .unwrap();
        assert_eq!(uring["action"], "SCMP_ACT_ERRNO");
        assert_eq!(uring["errnoRet"], libc::ENOSYS);
        let sendto_addr = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["names"] == json!(["sendto"]) && e["args"][0]["index"] == 4)
            .unwrap();
        assert_eq!(sendto_addr["args"][0]["op"], "SCMP_CMP_NE");
    }

    #[test]
    fn merging_keeps_the_base_and_lets_ax_decide_its_calls() {
        let base = json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "archMap": [],
            "syscalls": [
                {"names": ["read", "bind", "setsockopt", "connect"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["accept"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["io_uring_setup"], "action": "SCMP_ACT_ALLOW"},
            ]
        });
        let p = merged(base, "/x/ax.sock.oci").unwrap();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(p["defaultErrnoRet"], 1);
        assert_eq!(p["listenerPath"], "/x/ax.sock.oci");
        let allowed = names_with(&p, "SCMP_ACT_ALLOW");
        assert!(allowed.contains(&"read".to_string()));
        assert!(allowed.contains(&"personality".to_string()));
        assert!(!allowed.contains(&"bind".to_string()));
        assert!(!allowed.contains(&"io_uring_setup".to_string()));
        // Still allowed, but only through the always-true condition.
        let sockopt: Vec<&Value> = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["action"] == "SCMP_ACT_ALLOW"
                    && e["names"]
                        .as_array()
                        .unwrap()
                        .contains(&json!("setsockopt"))
            })
            .collect();
        assert_eq!(sockopt.len(), 1);
        assert_eq!(sockopt[0]["args"][0]["op"], "SCMP_CMP_GE");
        assert!(names_with(&p, "SCMP_ACT_NOTIFY").contains(&"bind".to_string()));
    }

    #[test]
    fn merging_refuses_another_listener() {
        let base = json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/other.sock"});
        let e = merged(base, "/x/ax.sock.oci").unwrap_err();
        assert!(e.contains("/other.sock"), "{e}");
        assert!(merged(json!([1]), "/x").is_err());
    }
}
