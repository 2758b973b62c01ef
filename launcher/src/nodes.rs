//! `ax get nodes`, and the cluster-wide `ax get apps|services`: every
//! node's apps and services, each shown with its node.

use crate::table::{self, render};
use ax_proto::NodeInfo;
use ax_registry::AppInfo;
use serde_json::{json, Value};

/// `ax get nodes -o json`: a list of objects.
pub fn nodes_json(nodes: &[NodeInfo]) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(nodes)? + "\n")
}

/// The `ax get nodes` table.
pub fn nodes_table(nodes: &[NodeInfo]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let names: Vec<String> = n
                .apps
                .iter()
                .flat_map(|a| a.names.iter().cloned())
                .collect();
            vec![
                if n.local {
                    format!("{} (this host)", n.name)
                } else {
                    n.name.clone()
                },
                n.address.to_string(),
                n.state.as_str().to_string(),
                format!(
                    "{}{}",
                    n.apps.len(),
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", names.join(","))
                    }
                ),
                n.services.len().to_string(),
            ]
        })
        .collect();
    render(&["NAME", "ADDRESS", "STATE", "APPS", "SERVICES"], &rows)
}

/// The name of the node that answered.
fn local_name(nodes: &[NodeInfo]) -> &str {
    nodes
        .iter()
        .find(|n| n.local)
        .map_or("", |n| n.name.as_str())
}

/// Every app of the cluster as JSON objects, each with its `"node"`.
pub fn apps_json(apps: &[AppInfo], nodes: &[NodeInfo]) -> anyhow::Result<String> {
    let here = local_name(nodes);
    let mut out: Vec<Value> = Vec::new();
    for a in apps {
        let mut v = serde_json::to_value(a)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("node".into(), json!(here));
        }
        out.push(v);
    }
    for n in nodes.iter().filter(|n| !n.local) {
        for a in &n.apps {
            let mut v = serde_json::to_value(a)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("node".into(), json!(n.name));
            }
            out.push(v);
        }
    }
    Ok(serde_json::to_string_pretty(&out)? + "\n")
}

/// The cluster-wide `ax get apps` table.
pub fn apps_table(apps: &[AppInfo], nodes: &[NodeInfo], now: u64) -> String {
    let here = local_name(nodes);
    let join = |v: Vec<String>| {
        if v.is_empty() {
            "<none>".to_string()
        } else {
            v.join(",")
        }
    };
    let mut rows: Vec<Vec<String>> = apps
        .iter()
        .map(|a| {
            vec![
                here.to_string(),
                a.id.to_string(),
                join(a.vips.iter().map(|v| v.to_string()).collect()),
                join(a.names.clone()),
                join(a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                table::format_age(now.saturating_sub(a.started_unix)),
                table::format_command(&a.command, 40),
            ]
        })
        .collect();
    for n in nodes.iter().filter(|n| !n.local) {
        for a in &n.apps {
            rows.push(vec![
                n.name.clone(),
                a.id.to_string(),
                join(a.vips.iter().map(|v| v.to_string()).collect()),
                join(a.names.clone()),
                join(a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                "-".into(),
                table::format_command(&a.command, 40),
            ]);
        }
    }
    render(
        &["NODE", "ID", "VIPS", "NAMES", "LABELS", "AGE", "COMMAND"],
        &rows,
    )
}
