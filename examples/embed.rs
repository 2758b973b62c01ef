//! A minimal supervisor that embeds the ax broker without the daemon.
//!
//! It serves one "service" itself on a UNIX socket, maps the virtual address
//! 10.233.1.1:80 to it with its own [`Directory`], and runs a program under
//! ax's filter. The program believes it talks TCP to 10.233.1.1:80.
//!
//! ```text
//! cargo run --example embed                  # runs curl
//! cargo run --example embed -- python3 -c 'import urllib.request as u; print(u.urlopen("http://10.233.1.1/").read().decode())'
//! ```

use ax_broker::{launch, Broker, BrokerConfig, Directory, UnixEndpoint};
use ax_registry::{AppId, BindError, BindRequest, ResolveError};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

/// The one virtual service this supervisor offers.
const SERVICE: &str = "10.233.1.1:80";

/// Answers every connect to [`SERVICE`] with the supervisor's own socket,
/// refuses every other virtual address, and lets the child bind nothing.
#[derive(Debug)]
struct OneService {
    service: SocketAddr,
    socket: PathBuf,
}

impl Directory for OneService {
    fn is_virtual(&self, ip: IpAddr) -> bool {
        ip == self.service.ip()
    }
    fn app_vips(&self, _app: AppId) -> Vec<IpAddr> {
        vec!["10.233.1.2".parse().expect("static address")]
    }
    fn resolve(&self, _client: AppId, dst: SocketAddr) -> Result<Vec<UnixEndpoint>, ResolveError> {
        if dst == self.service {
            Ok(vec![UnixEndpoint::Path(self.socket.clone())])
        } else {
            Err(ResolveError::NoService(dst))
        }
    }
    fn bind(
        &self,
        _req: &BindRequest,
        _endpoint: &dyn Fn(u16) -> UnixEndpoint,
        _is_alive: &dyn Fn(&UnixEndpoint) -> bool,
    ) -> Result<u16, BindError> {
        Err(BindError::AddrNotAvailable)
    }
    fn release(&self, _endpoint: &UnixEndpoint) {}
    fn app_exited(&self, _app: AppId) {}
}

/// Serves a tiny HTTP response on each connection.
fn serve_http(listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut reader = BufReader::new(conn.try_clone().expect("clone connection"));
            let mut line = String::new();
            // Read the request head up to the blank line.
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line == "\r\n" || line == "\n" {
                    break;
                }
                line.clear();
            }
            let body = "hello from the supervisor\n";
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                body.len()
            );
        });
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("ax-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("service.sock");
    let listener = UnixListener::bind(&socket)?;
    std::thread::spawn(move || serve_http(listener));

    let directory = Arc::new(OneService {
        service: SERVICE.parse()?,
        socket: socket.clone(),
    });
    let broker = Broker::new(directory, BrokerConfig::default());

    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        args = vec!["curl".into(), "-s".into(), format!("http://{SERVICE}/")];
    }
    let filter = launch::compile_filter()?;
    let mut cmd = std::process::Command::new(&args[0]);
    cmd.args(&args[1..]);
    let mut sandboxed = launch::spawn(&mut cmd, &filter)?;
    let session = broker.serve(1, sandboxed.listener)?;
    let status = sandboxed.child.wait()?;
    session.join();
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(status.code().unwrap_or(1));
}
