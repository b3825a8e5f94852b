//! Network namespaces for partition tests: a namespace of the test's own, joined to this host
//! by a veth pair with addresses that exist only on that pair, and a link a test can cut.
//!
//! A throwaway server started inside the namespace
//! ([`ClusterBuilder::in_namespace`](super::ClusterBuilder::in_namespace)) is reached from the
//! test over the veth pair. [`NetworkNamespace::cut`] sets the host's end of the pair down:
//! from then on no packet crosses in either direction, and neither kernel is told (no FIN, no
//! RST): a partition as the kernels see it, which keepalives and TCP user timeouts do notice,
//! unlike a proxy's blackhole (see `proxy.rs`).
//!
//! Creating namespaces needs `CAP_NET_ADMIN` (root) and the `ip` command; without them,
//! [`NetworkNamespace::create`] returns `None` after saying why on stderr, and the test skips.
//! The namespace and its link are deleted on drop, and by a watchdog process if the test
//! process dies first.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace with one veth link to this host.
pub struct NetworkNamespace {
    name: String,
    host_end: String,
    host_addr: Ipv4Addr,
    inside_addr: Ipv4Addr,
    watchdog: Option<Child>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetworkNamespace {
    /// Creates a namespace and its link, or says on stderr why it cannot (no rights, no `ip`)
    /// and returns `None`.
    pub fn create() -> Option<NetworkNamespace> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let mut last = String::new();
        for _ in 0..20 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let tag = format!("{:05x}", (rand::random::<u32>() ^ n) & 0xfffff);
            // A /30 of 10.0.0.0/8 picked at random: the test's own addresses.
            let net: u32 = rand::random::<u32>() & 0x00ff_fffc;
            let host_addr = Ipv4Addr::from(0x0a00_0000 | net | 1);
            let inside_addr = Ipv4Addr::from(0x0a00_0000 | net | 2);
            let name = format!("pglock-{tag}");
            let host_end = format!("pgh{tag}");
            let inside_end = format!("pgn{tag}");
            if let Err(error) = ip(&["netns", "add", &name]) {
                if error.contains("File exists") {
                    continue;
                }
                eprintln!("SKIPPED: cannot create a network namespace ({error}); partition tests need root (CAP_NET_ADMIN) and iproute2");
                return None;
            }
            let watchdog = spawn_watchdog(&name, &host_end);
            let made = NetworkNamespace {
                name: name.clone(),
                host_end: host_end.clone(),
                host_addr,
                inside_addr,
                watchdog: Some(watchdog),
            };
            let (host, inside) = (format!("{host_addr}/30"), format!("{inside_addr}/30"));
            let setup = ip(&[
                "link",
                "add",
                &host_end,
                "type",
                "veth",
                "peer",
                "name",
                &inside_end,
            ])
            .and_then(|()| ip(&["link", "set", &inside_end, "netns", &name]))
            .and_then(|()| ip(&["addr", "add", &host, "dev", &host_end]))
            .and_then(|()| ip(&["link", "set", &host_end, "up"]))
            .and_then(|()| ip(&["-n", &name, "addr", "add", &inside, "dev", &inside_end]))
            .and_then(|()| ip(&["-n", &name, "link", "set", &inside_end, "up"]))
            .and_then(|()| ip(&["-n", &name, "link", "set", "lo", "up"]));
            match setup {
                Ok(()) => return Some(made),
                // Dropping `made` deletes what was made.
                Err(error) => last = error,
            }
        }
        panic!("could not set up a network namespace: {last}");
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of the namespace's end of the link.
    pub fn inside_addr(&self) -> Ipv4Addr {
        self.inside_addr
    }

    /// The address of this host's end of the link.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// Cuts the link: no packet crosses any more, in either direction, and nobody is told.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_end, "down"]).expect("cut the link");
    }

    /// Restores the link.
    pub fn heal(&self) {
        ip(&["link", "set", &self.host_end, "up"]).expect("heal the link");
    }
}

/// `command` run inside the namespace `name` (`ip netns exec NAME …`), with its program,
/// arguments, environment and directory.
pub fn wrap(name: &str, command: &Command) -> Command {
    let mut wrapped = Command::new("ip");
    wrapped
        .args(["netns", "exec", name])
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped.stdin(Stdio::null());
    wrapped
}

impl Drop for NetworkNamespace {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it ours.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_end]);
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
    }
}

/// Waits for EOF on stdin (the test process closed it or died), then deletes the namespace and
/// the link. In its own process group, so that a signal to the test's group spares it.
fn spawn_watchdog(name: &str, host_end: &str) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(r#"read -r _ignored; ip netns del "$1" 2>/dev/null; ip link del "$2" 2>/dev/null; true"#)
        .arg("pglock-netns-watchdog")
        .arg(name)
        .arg(host_end)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn the namespace watchdog")
}
