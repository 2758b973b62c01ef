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

/// Key of the VIP block a node allocates from.
pub(crate) const BLOCK_KEY: &str = "vip-block";

/// Each VIP pool is cut into this many blocks; each node allocates from
/// one, so that two nodes never hand out the same VIP.
pub(crate) const BLOCKS: u128 = 256;

/// The block a node named `node` tries first (spread by a hash of its
/// name, so that nodes starting at once rarely collide).
pub(crate) fn first_block(node: &str) -> usize {
    // FNV-1a.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    usize::try_from(h % 256).unwrap_or(0)
}

/// Every other node, as this node last read them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// The other nodes, by name.
    pub nodes: Vec<NodeInfo>,
    /// The VIP block each other live node allocates from, by name.
    pub blocks: BTreeMap<String, usize>,
}

impl Table {
    /// The nodes not dead.
    pub fn live(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.iter().filter(|n| n.state != NodeState::Dead)
    }

    /// A node with a smaller name than `me` that also claims `block`.
    pub(crate) fn block_conflict(&self, me: &str, block: usize) -> Option<&str> {
        self.blocks
            .iter()
            .find(|(name, b)| **b == block && name.as_str() < me)
            .map(|(name, _)| name.as_str())
    }

    /// The first block after `from` that no other node claims.
    pub(crate) fn free_block(&self, from: usize) -> usize {
        let n = usize::try_from(BLOCKS).unwrap_or(256);
        (1..n)
            .map(|i| (from + i) % n)
            .find(|b| !self.blocks.values().any(|x| x == b))
            .unwrap_or(from)
    }
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
    let mut blocks = BTreeMap::new();
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
        if state != NodeState::Dead {
            if let Some(b) = ns.get(BLOCK_KEY).and_then(|v| v.parse().ok()) {
                blocks.insert(name.to_string(), b);
            }
        }
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
    Table { nodes, blocks }
}

/// Logs what changed between two readings of the table: nodes joining or
/// changing state, services appearing or withdrawn on other nodes.
pub(crate) fn log_changes(old: &Table, new: &Table) {
    for n in &new.nodes {
        let before = old.nodes.iter().find(|o| o.name == n.name);
        match before {
            None => {
                tracing::info!(node = %n.name, address = %n.address, state = n.state.as_str(), "node joined the cluster")
            }
            Some(o) if o.state != n.state => {
                tracing::info!(node = %n.name, from = o.state.as_str(), to = n.state.as_str(), "node state changed")
            }
            _ => {}
        }
        for s in &n.services {
            if !before.is_some_and(|o| o.services.iter().any(|x| x.addr == s.addr)) {
                tracing::info!(node = %n.name, service = %s.addr, "service on another node added");
            }
        }
        if let Some(o) = before {
            for s in &o.services {
                if !n.services.iter().any(|x| x.addr == s.addr) {
                    tracing::info!(node = %n.name, service = %s.addr, "service on another node withdrawn");
                }
            }
        }
    }
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
