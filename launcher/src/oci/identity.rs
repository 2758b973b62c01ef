//! A container's identity under ax, from its OCI annotations (`io.ax.ip`,
//! `io.ax.name`, `io.ax.labels`, `io.ax.lb`, `io.ax.connect-wait`,
//! `io.ax.expose`) and from the profile's `listenerMetadata`
//! (`io.ax.ip=…;io.ax.name=…`).

use crate::cli::{parse_duration, parse_expose, parse_label, parse_lb, parse_name, parse_vip};
use ax_registry::{AppSpec, ContainerRef};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

/// What a container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The app to register.
    pub spec: AppSpec,
    /// `io.ax.expose`: its ports reachable at host addresses, as with
    /// `ax exec --expose PORT:HOSTADDR:HOSTPORT`.
    pub exposes: Vec<(u16, SocketAddr)>,
}

/// The keys ax reads.
pub const KEYS: &[&str] = &[
    "io.ax.ip",
    "io.ax.name",
    "io.ax.labels",
    "io.ax.lb",
    "io.ax.connect-wait",
    "io.ax.expose",
];

/// Builds the app spec of container `container` from its `annotations`
/// and its `metadata` string. An annotation wins over the same key in the
/// metadata (runtimes that keep annotations get them from the container,
/// those that drop them from the profile). Any bad value, or an unknown
/// `io.ax.` key, refuses the container with a message naming the key.
pub fn spec(
    annotations: &HashMap<String, String>,
    metadata: &str,
    container: ContainerRef,
) -> Result<Identity, String> {
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    for pair in metadata.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!(
                "listenerMetadata: '{pair}' is not KEY=VALUE (expected e.g. io.ax.ip=10.233.0.10;io.ax.name=web)"
            ));
        };
        let k = k.trim();
        if !KEYS.contains(&k) {
            return Err(format!(
                "listenerMetadata: unknown key '{k}' (ax reads {})",
                KEYS.join(", ")
            ));
        }
        keys.insert(k.to_string(), v.trim().to_string());
    }
    for (k, v) in annotations {
        if KEYS.contains(&k.as_str()) {
            keys.insert(k.clone(), v.trim().to_string());
        } else if k.starts_with("io.ax.") {
            return Err(format!(
                "annotation {k}: unknown key (ax reads {})",
                KEYS.join(", ")
            ));
        }
    }
    let mut exposes = Vec::new();
    let mut spec = AppSpec {
        command: vec![
            container.runtime.clone(),
            "container".into(),
            container.id.clone(),
        ],
        container: Some(container),
        ..AppSpec::default()
    };
    let items = |v: &str| -> Vec<String> {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    for (key, value) in &keys {
        let bad = |why: String| format!("{key}={value}: {why}");
        match key.as_str() {
            "io.ax.ip" => {
                for s in items(value) {
                    let ip = parse_vip(&s).map_err(bad)?;
                    spec.request_ip(ip).map_err(|e| bad(e.to_string()))?;
                }
            }
            "io.ax.name" => {
                for s in items(value) {
                    spec.add_name(&parse_name(&s).map_err(bad)?);
                }
            }
            "io.ax.labels" => {
                for s in items(value) {
                    let (k, v) = parse_label(&s).map_err(bad)?;
                    spec.add_label(&k, &v).map_err(|e| bad(e.to_string()))?;
                }
            }
            "io.ax.lb" => spec.lb = Some(parse_lb(value).map_err(bad)?),
            "io.ax.connect-wait" => {
                let d = parse_duration(value).map_err(bad)?;
                ax_registry::check_connect_wait(Some(d)).map_err(|e| bad(e.to_string()))?;
                spec.connect_wait = Some(d);
            }
            "io.ax.expose" => {
                for s in items(value) {
                    exposes.push(parse_expose(&s).map_err(bad)?);
                }
            }
            _ => {}
        }
    }
    Ok(Identity { spec, exposes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn c() -> ContainerRef {
        ContainerRef {
            id: "web1".into(),
            runtime: "runc".into(),
        }
    }

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_give_the_identity() {
        let id = spec(
            &ann(&[
                ("io.ax.expose", "8000:127.0.0.1:18000,9000:19000"),
                ("io.ax.ip", "fd00:a8::7, 10.233.0.7"),
                ("io.ax.name", "web,www.ax"),
                ("io.ax.labels", "tier=front,team=a"),
                ("io.ax.lb", "random"),
                ("io.ax.connect-wait", "2s"),
                ("org.opencontainers.image.title", "ignored"),
            ]),
            "",
            c(),
        )
        .unwrap();
        assert_eq!(
            id.exposes,
            vec![
                (8000, "127.0.0.1:18000".parse().unwrap()),
                (9000, "127.0.0.1:19000".parse().unwrap())
            ]
        );
        let s = id.spec;
        assert_eq!(
            s.requested_ips,
            vec![
                "10.233.0.7".parse::<IpAddr>().unwrap(),
                "fd00:a8::7".parse().unwrap()
            ]
        );
        assert_eq!(s.names, vec!["web", "www"]);
        assert_eq!(s.labels.get("tier").map(String::as_str), Some("front"));
        assert_eq!(s.lb, Some(ax_registry::LbMode::Random));
        assert_eq!(s.connect_wait, Some(std::time::Duration::from_secs(2)));
        assert_eq!(s.command, vec!["runc", "container", "web1"]);
        assert_eq!(s.container, Some(c()));
    }

    #[test]
    fn metadata_fills_in_and_annotations_win() {
        let s = spec(
            &ann(&[("io.ax.name", "api")]),
            "io.ax.ip=10.233.0.8; io.ax.name=web",
            c(),
        )
        .unwrap()
        .spec;
        assert_eq!(
            s.requested_ips,
            vec!["10.233.0.8".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(s.names, vec!["api"]);
        let none = spec(&HashMap::new(), "", c()).unwrap().spec;
        assert!(none.requested_ips.is_empty() && none.names.is_empty());
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        for (k, v) in [
            ("io.ax.ip", "300.1.1.1"),
            ("io.ax.ip", "127.0.0.1"),
            ("io.ax.ip", "10.233.0.1,10.233.0.2"),
            ("io.ax.name", "no spaces"),
            ("io.ax.labels", "novalue"),
            ("io.ax.lb", "fastest"),
            ("io.ax.connect-wait", "soon"),
            ("io.ax.connect-wait", "100000h"),
            ("io.ax.typo", "x"),
            ("io.ax.expose", "8000"),
        ] {
            let e = spec(&ann(&[(k, v)]), "", c()).unwrap_err();
            assert!(e.contains(k), "{k}={v}: {e}");
        }
        assert!(spec(&HashMap::new(), "io.ax.ip", c()).is_err());
        assert!(spec(&HashMap::new(), "ip=10.233.0.1", c()).is_err());
    }
}
