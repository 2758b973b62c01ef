//! The cluster's table: what each node publishes in its chitchat state
//! and what a node reads back from everyone else's.

use ax_proto::{NodeApp, NodeInfo, NodeService, NodeState};
use ax_registry::LocalRegistry;
use chitchat::{Chitchat, ChitchatId};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Key prefix of an app.
const APP: &str = "app:";
/// Key prefix of a service.
const SVC: &str = "svc:";

/// A node whose heartbeat has not moved for this long is suspect (the
/// failure detector declares it dead later, by phi accrual).
const SUSPECT_AFTER: Duration = Duration::from_millis(1500);

/// Every other node, as this node last read them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// The other nodes, by name.
    pub nodes: Vec<NodeInfo>,
}

/// This node's apps as published.
pub(crate) fn local_apps(registry: &LocalRegistry) -> Vec<NodeApp> {
    registry
        .apps()
        .into_iter()
        .map(|a| NodeApp {
            id: a.id,
            vips: a.vips,
            names: a.names,
            labels: a.labels,
            lb: a.lb,
            command: a.command,
        })
        .collect()
}

/// This node's services (with at least one backend) as published.
pub(crate) fn local_services(registry: &LocalRegistry) -> Vec<NodeService> {
    registry
        .services()
        .into_iter()
        .filter(|s| !s.backends.is_empty())
        .map(|s| {
            let mut apps: Vec<_> = s.backends.iter().map(|b| b.app).collect();
            apps.dedup();
            NodeService {
                addr: s.addr,
                names: s.names,
                lb: s.lb,
                apps,
            }
        })
        .collect()
}

/// The key-values this node publishes.
pub(crate) fn local_keys(registry: &LocalRegistry) -> HashMap<String, String> {
    let mut keys = HashMap::new();
    for app in local_apps(registry) {
        if let Ok(v) = serde_json::to_string(&app) {
            keys.insert(format!("{APP}{}", app.id), v);
        }
    }
    for svc in local_services(registry) {
        if let Ok(v) = serde_json::to_string(&svc) {
            keys.insert(format!("{SVC}{}", svc.addr), v);
        }
    }
    keys
}

/// When each node's heartbeat last moved.
#[derive(Debug, Default)]
pub(crate) struct Heartbeats {
    last: HashMap<ChitchatId, (u64, Instant)>,
}

/// Reads every other node from `cc`: for each node name, its newest
/// generation (a restarted daemon is a new generation).
pub(crate) fn read(cc: &Chitchat, beats: &mut Heartbeats, now: Instant) -> Table {
    let me = cc.self_chitchat_id();
    let live: Vec<&ChitchatId> = cc.live_nodes().collect();
    let mut newest: BTreeMap<&str, &ChitchatId> = BTreeMap::new();
    for id in cc.node_states().keys() {
        if id.node_id == me.node_id {
            continue;
        }
        let better = match newest.get(&*id.node_id) {
            None => true,
            Some(old) => {
                let (old_live, new_live) = (live.contains(old), live.contains(&id));
                (new_live && !old_live)
                    || (new_live == old_live && id.generation_id > old.generation_id)
            }
        };
        if better {
            newest.insert(&id.node_id, id);
        }
    }
    beats.last.retain(|id, _| cc.node_states().contains_key(id));
    let mut nodes = Vec::new();
    for (name, id) in newest {
        let Some(ns) = cc.node_state(id) else {
            continue;
        };
        let beat = u64::from(ns.heartbeat());
        let since = match beats.last.get(id) {
            Some((b, t)) if *b == beat => *t,
            _ => {
                beats.last.insert(id.clone(), (beat, now));
                now
            }
        };
        let state = if !live.contains(&id) {
            NodeState::Dead
        } else if now.duration_since(since) > SUSPECT_AFTER {
            NodeState::Suspect
        } else {
            NodeState::Alive
        };
        let (mut apps, mut services) = (Vec::new(), Vec::new());
        // A dead node's apps and services are withdrawn.
        if state != NodeState::Dead {
            for (k, v) in ns.key_values() {
                if k.starts_with(APP) {
                    if let Ok(app) = serde_json::from_str::<NodeApp>(v) {
                        apps.push(app);
                    }
                } else if k.starts_with(SVC) {
                    if let Ok(svc) = serde_json::from_str::<NodeService>(v) {
                        services.push(svc);
                    }
                }
            }
        }
        apps.sort_by_key(|a| a.id);
        services.sort_by_key(|s| s.addr);
        nodes.push(NodeInfo {
            name: name.to_string(),
            address: id.gossip_advertise_addr,
            state,
            local: false,
            apps,
            services,
        });
    }
    Table { nodes }
}

/// `node`'s service at `dst`, if it serves one there (a wildcard bind
/// serves every VIP of its apps).
pub(crate) fn service_at(node: &NodeInfo, dst: SocketAddr) -> Option<&NodeService> {
    node.services.iter().find(|s| s.addr == dst).or_else(|| {
        node.services.iter().find(|s| {
            s.addr.ip().is_unspecified()
                && s.addr.port() == dst.port()
                && s.apps.iter().any(|id| {
                    node.apps
                        .iter()
                        .any(|a| a.id == *id && a.vips.contains(&dst.ip()))
                })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ax_registry::LbMode;

    #[test]
    fn finds_exact_and_wildcard_services() {
        let node = NodeInfo {
            name: "b".into(),
            address: "192.0.2.2:7946".parse().unwrap(),
            state: NodeState::Alive,
            local: false,
            apps: vec![NodeApp {
                id: 1,
                vips: vec!["10.233.0.5".parse().unwrap()],
                names: vec!["web".into()],
                labels: BTreeMap::new(),
                lb: None,
                command: vec![],
            }],
            services: vec![
                NodeService {
                    addr: "10.233.0.5:80".parse().unwrap(),
                    names: vec!["web".into()],
                    lb: LbMode::RoundRobin,
                    apps: vec![1],
                },
                NodeService {
                    addr: "0.0.0.0:8080".parse().unwrap(),
                    names: vec![],
                    lb: LbMode::RoundRobin,
                    apps: vec![1],
                },
            ],
        };
        assert!(service_at(&node, "10.233.0.5:80".parse().unwrap()).is_some());
        assert!(service_at(&node, "10.233.0.5:8080".parse().unwrap()).is_some());
        assert!(service_at(&node, "10.233.0.6:8080".parse().unwrap()).is_none());
        assert!(service_at(&node, "10.233.0.5:81".parse().unwrap()).is_none());
    }
}
