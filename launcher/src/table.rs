//! kubectl-style tables: a header row, columns separated by two spaces, and
//! the helpers that turn apps and services into rows.

use ax_registry::{AppInfo, ServiceInfo};

/// Longest COMMAND shown, in characters.
const COMMAND_WIDTH: usize = 60;

/// Renders `rows` under `headers`, each column as wide as its widest cell,
/// separated by two spaces. Trailing spaces are trimmed.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            // Format widths count characters, as the widths above do.
            let w = widths.get(i).copied().unwrap_or(0);
            line.push_str(&format!("{cell:<w$}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// An age the way kubectl prints it: `45s`, `3m20s`, `15m`, `5h10m`, `30h`,
/// `3d4h`, `20d`, `2y30d`, `9y`.
pub fn format_age(secs: u64) -> String {
    let (m, h, d, y) = (60, 3600, 86_400, 365 * 86_400);
    if secs < 2 * m {
        format!("{secs}s")
    } else if secs < 10 * m {
        match secs % m {
            0 => format!("{}m", secs / m),
            s => format!("{}m{s}s", secs / m),
        }
    } else if secs < 3 * h {
        format!("{}m", secs / m)
    } else if secs < 8 * h {
        match (secs % h) / m {
            0 => format!("{}h", secs / h),
            mm => format!("{}h{mm}m", secs / h),
        }
    } else if secs < 48 * h {
        format!("{}h", secs / h)
    } else if secs < 8 * d {
        match (secs % d) / h {
            0 => format!("{}d", secs / d),
            hh => format!("{}d{hh}h", secs / d),
        }
    } else if secs < 2 * y {
        format!("{}d", secs / d)
    } else if secs < 8 * y {
        match (secs % y) / d {
            0 => format!("{}y", secs / y),
            dd => format!("{}y{dd}d", secs / y),
        }
    } else {
        format!("{}y", secs / y)
    }
}

/// Quotes one word for display the way a shell user would type it.
fn shell_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%^".contains(c) || !c.is_ascii());
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// The command line, quoted as a shell would need it, cut to `max`
/// characters with a trailing `…`.
pub fn format_command(command: &[String], max: usize) -> String {
    let line = command
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ");
    // Control characters would break the table.
    let line: String = line
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if line.chars().count() <= max {
        line
    } else {
        let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

fn or_none(s: String) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s
    }
}

/// The `ax get apps` table; `now` is the current time in seconds since the
/// Unix epoch.
pub fn apps_table(apps: &[AppInfo], now: u64) -> String {
    let rows: Vec<Vec<String>> = apps
        .iter()
        .map(|a| {
            vec![
                a.id.to_string(),
                if a.pid == 0 {
                    "-".into()
                } else {
                    a.pid.to_string()
                },
                or_none(
                    a.vips
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                or_none(a.names.join(",")),
                or_none(
                    a.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                format_age(now.saturating_sub(a.started_unix)),
                match &a.container {
                    // Whole: a container id (podman's are 64 characters)
                    // is what `podman`/`runc` commands take.
                    Some(c) => format!("{} container {}", c.runtime, c.id)
                        .chars()
                        .map(|ch| if ch.is_control() { '?' } else { ch })
                        .collect(),
                    None => format_command(&a.command, COMMAND_WIDTH),
                },
            ]
        })
        .collect();
    render(
        &["ID", "PID", "VIPS", "NAMES", "LABELS", "AGE", "COMMAND"],
        &rows,
    )
}

/// The `ax get exposures` table.
pub fn exposures_table(exposures: &[ax_proto::ExposureInfo]) -> String {
    let rows: Vec<Vec<String>> = exposures
        .iter()
        .map(|e| {
            vec![
                e.host.to_string(),
                e.service.to_string(),
                e.name.clone().unwrap_or_else(|| "<none>".into()),
                e.owner
                    .map(|a| format!("app {a}"))
                    .unwrap_or_else(|| "its VIP".into()),
            ]
        })
        .collect();
    render(&["HOST ADDRESS", "SERVICE", "NAME", "LASTS WHILE"], &rows)
}

/// The `ax get services` table: one row per backend; a service's further
/// backends leave its own columns blank. A declared service with no backend
/// yet gets one row per VIP, without a port.
pub fn services_table(services: &[ServiceInfo]) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in services {
        if s.backends.is_empty() {
            // A declared service no app serves yet: its VIP, no port.
            rows.push(vec![
                s.addr.ip().to_string(),
                or_none(s.names.join(",")),
                s.lb.to_string(),
                "-".into(),
                "<no backend yet>".into(),
                "-".into(),
            ]);
            continue;
        }
        for (i, b) in s.backends.iter().enumerate() {
            let service = if i == 0 {
                vec![
                    s.addr.to_string(),
                    or_none(s.names.join(",")),
                    s.lb.to_string(),
                ]
            } else {
                vec![String::new(); 3]
            };
            rows.push(
                service
                    .into_iter()
                    .chain([b.app.to_string(), b.endpoint.to_string()])
                    .chain([match s.host_loopback {
                        _ if i != 0 => String::new(),
                        Some(host) => host.to_string(),
                        None => "-".into(),
                    }])
                    .collect(),
            );
        }
    }
    render(
        &["ADDRESS", "NAMES", "LB", "APP", "LISTENER", "HOST LOOPBACK"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ax_registry::UnixEndpoint;
    use std::collections::BTreeMap;

    #[test]
    fn columns_align_with_two_spaces() {
        let t = render(
            &["ID", "NAME"],
            &[
                vec!["1".into(), "web".into()],
                vec!["100".into(), "db".into()],
            ],
        );
        assert_eq!(t, "ID   NAME\n1    web\n100  db\n");
        assert_eq!(render(&["A", "B"], &[]), "A  B\n");
        // Width counts characters, not bytes.
        let t = render(&["X", "Y"], &[vec!["é…".into(), "1".into()]]);
        assert_eq!(t, "X   Y\né…  1\n");
    }

    #[test]
    fn ages() {
        let cases = [
            (0, "0s"),
            (5, "5s"),
            (119, "119s"),
            (120, "2m"),
            (200, "3m20s"),
            (15 * 60 + 7, "15m"),
            (3 * 3600, "3h"),
            (5 * 3600 + 10 * 60, "5h10m"),
            (30 * 3600, "30h"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (20 * 86_400, "20d"),
            (2 * 365 * 86_400 + 30 * 86_400, "2y30d"),
            (9 * 365 * 86_400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(format_age(secs), want, "{secs}s");
        }
    }

    #[test]
    fn commands() {
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            format_command(&c(&["python3", "-m", "http.server"]), 60),
            "python3 -m http.server"
        );
        assert_eq!(
            format_command(&c(&["sh", "-c", "echo 'hi' $X"]), 60),
            r"sh -c 'echo '\''hi'\'' $X'"
        );
        assert_eq!(format_command(&c(&["a", ""]), 60), "a ''");
        let long = format_command(&c(&["x".repeat(100).as_str()]), 60);
        assert_eq!(long.chars().count(), 60);
        assert!(long.ends_with('…'));
        assert_eq!(format_command(&c(&["a\nb"]), 60), "'a?b'");
    }

    #[test]
    fn app_rows() {
        let app = AppInfo {
            id: 3,
            pid: 4242,
            uid: 1000,
            vips: vec!["10.233.0.2".parse().unwrap(), "fd00:a8::2".parse().unwrap()],
            names: vec!["web".into(), "www".into()],
            labels: BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]),
            command: vec!["python3".into(), "-m".into(), "http.server".into()],
            started_unix: 1000,
            lb: None,
            connect_wait: None,
            container: None,
            no_hosts_mount: false,
        };
        let bare = AppInfo {
            id: 12,
            pid: 0,
            vips: vec!["10.233.0.3".parse().unwrap()],
            names: vec![],
            labels: BTreeMap::new(),
            command: vec!["true".into()],
            started_unix: 1000,
            ..app.clone()
        };
        let t = apps_table(&[app, bare], 1005);
        let want = "\
ID  PID   VIPS                   NAMES    LABELS   AGE  COMMAND
3   4242  10.233.0.2,fd00:a8::2  web,www  a=1,b=2  5s   python3 -m http.server
12  -     10.233.0.3             <none>   <none>   5s   true
";
        assert_eq!(t, want);
    }

    #[test]
    fn container_rows_show_the_whole_id() {
        let id = "600f230c8177badb6b302450587e4530aba1f50691568d7d36a4b81ee694c27a";
        let app = AppInfo {
            id: 1,
            pid: 77,
            uid: 1000,
            vips: vec!["10.233.0.70".parse().unwrap()],
            names: vec!["pweb".into()],
            labels: BTreeMap::new(),
            command: vec!["runc".into(), "container".into(), id.into()],
            started_unix: 1000,
            lb: None,
            connect_wait: None,
            container: Some(ax_registry::ContainerRef {
                id: id.into(),
                runtime: "runc".into(),
            }),
            no_hosts_mount: false,
        };
        let t = apps_table(&[app], 1001);
        assert!(t.contains(&format!("runc container {id}\n")), "{t}");
    }

    #[test]
    fn service_rows() {
        let s = |addr: &str, app, endpoint| ServiceInfo {
            addr: addr.parse().unwrap(),
            names: vec![],
            lb: ax_registry::LbMode::RoundRobin,
            backends: vec![ax_registry::Backend { app, endpoint }],
            host_loopback: None,
        };
        let t = services_table(&[
            s(
                "10.233.0.2:8000",
                3,
                UnixEndpoint::Abstract(b"ax/1/10.233.0.2:8000".to_vec()),
            ),
            s(
                "[fd00:a8::2]:80",
                4,
                UnixEndpoint::Path("/tmp/x.sock".into()),
            ),
        ]);
        let want = "\
ADDRESS          NAMES   LB           APP  LISTENER               HOST LOOPBACK
10.233.0.2:8000  <none>  round-robin  3    @ax/1/10.233.0.2:8000  -
[fd00:a8::2]:80  <none>  round-robin  4    /tmp/x.sock            -
";
        assert_eq!(t, want);
        let mut shared = s("10.233.0.9:80", 5, UnixEndpoint::Abstract(b"a".to_vec()));
        shared.names = vec!["web".into()];
        shared.backends.push(ax_registry::Backend {
            app: 6,
            endpoint: UnixEndpoint::Abstract(b"b".to_vec()),
        });
        let t = services_table(&[shared]);
        let want = "\
ADDRESS        NAMES  LB           APP  LISTENER  HOST LOOPBACK
10.233.0.9:80  web    round-robin  5    @a        -
                                   6    @b
";
        assert_eq!(t, want);
        // A declared service with no backend yet: its VIP, no port.
        let mut declared = s("10.233.0.7:0", 0, UnixEndpoint::Abstract(Vec::new()));
        declared.names = vec!["db".into()];
        declared.backends.clear();
        let t = services_table(&[declared]);
        let want = "\
ADDRESS     NAMES  LB           APP  LISTENER          HOST LOOPBACK
10.233.0.7  db     round-robin  -    <no backend yet>  -
";
        assert_eq!(t, want);
    }
}
