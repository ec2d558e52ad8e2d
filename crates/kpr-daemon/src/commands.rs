//! The whole command line as one clap definition, for `kube-proxy-rs completions SHELL` and
//! `kube-proxy-rs man`.
//!
//! The daemon's flags are the arguments of `kpr_config::Flags` (parsed pflag-style there), its
//! hidden compatibility flags left out; the subcommands `explain`, `verify` and `conntrack`
//! parse their own arguments by hand (in `debug::cli`, `debug::verify`, `debug::conntrack`) and
//! are declared here for completion and documentation only: `tests/install.rs` checks that
//! every flag of each usage text is declared here and that the scripts and pages name every
//! flag. Nothing here parses the daemon's command line.

use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::roff::{Roff, bold, roman};
use kpr_config::Flags;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The program's name.
pub const BIN: &str = "kube-proxy-rs";

/// The man pages' section: system administration commands and daemons, where kube-proxy's
/// kind of program belongs.
pub const MAN_SECTION: &str = "8";

/// Where the Debian package (scripts/build-deb.sh) puts the configuration its unit reads.
pub const PACKAGED_CONFIG: &str = "/etc/kube-proxy-rs/kube-proxy-config.yaml";

const LONG_ABOUT: &str =
    "A drop-in replacement for Kubernetes' kube-proxy (iptables and nftables modes).

kube-proxy-rs programs a node's nftables or iptables rules so that the ClusterIPs, NodePorts, \
LoadBalancer IPs and externalIPs of the cluster's Services reach their endpoints, as kube-proxy \
does, from the same KubeProxyConfiguration file (--config) or the same flags. With --config, \
the other flags are ignored (each one named in a warning) except --hostname-override and the \
logging flags. It watches the API server (--kubeconfig, --master, or the pod's service \
account), or reads objects from a directory (--manifests).";

const PROXY_FLAGS: &str =
    "Proxy flags (offline, with --manifests, --kubeconfig, --master or --in-cluster)";

/// `kube-proxy-rs` with every flag and subcommand. The hidden flags of `Flags` (ipvs's and
/// the deprecated ports, accepted for compatibility only) are left out: clap_complete would
/// offer them.
pub fn command() -> Command {
    let flags = Flags::command();
    let visible: Vec<Arg> = flags
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .cloned()
        .collect();
    Command::new(BIN)
        .about(flags.get_about().cloned().unwrap_or_default())
        .args(visible.iter().cloned())
        .disable_version_flag(true)
        .version(env!("CARGO_PKG_VERSION"))
        .long_about(LONG_ABOUT)
        .disable_help_subcommand(true)
        .subcommand(
            Command::new("sandbox")
                .about("Build a disposable world of network namespaces, run the proxy in it and show real traffic reaching every pod (root)")
                .disable_help_flag(true),
        )
        .subcommand(explain(visible))
        .subcommand(
            Command::new("verify")
                .about("Compare the rules in the kernel with what the running proxy committed (exit 1 with the difference)")
                .arg(server())
                .arg(output()),
        )
        .subcommand(
            Command::new("conntrack")
                .about("List the live conntrack flows of a Service, or of an address, and the endpoint each went to")
                .arg(value("service", "NAMESPACE/NAME", "The Service whose flows to list"))
                .arg(value("port", "NAME", "Only this port of the Service (with --service)"))
                .arg(value("to", "IP:PORT", "The flows to this address (instead of --service)"))
                .arg(proto())
                .arg(server())
                .arg(output()),
        )
        .subcommand(completions_command())
        .subcommand(man_command())
}

/// `kube-proxy-rs completions SHELL`: prints the completion script for SHELL.
pub fn completions(args: &[String]) -> ExitCode {
    let matches = match parse(completions_command(), "completions", args) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let Some(shell) = matches.get_one::<Shell>("shell").copied() else {
        return ExitCode::from(2);
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command(), BIN, &mut out);
    if shell == Shell::Bash {
        out = fix_bash(&String::from_utf8_lossy(&out)).into_bytes();
    }
    write_stdout(&out)
}

/// clap_complete's bash script spells a subcommand's state two ways when the program's name
/// has a hyphen: the loop that reads the words sets `kube__proxy__rs__subcmd__explain`, the
/// case arms expect `kube__subcmd__proxy__subcmd__rs__subcmd__explain`, so no subcommand's
/// flags would complete (clap-rs/clap#6421, open as of clap_complete 4.6.12). The arms are
/// spelled as the loop spells them; once clap fixes it this changes nothing.
fn fix_bash(script: &str) -> String {
    let wrong = format!("{}__subcmd__", BIN.replace('-', "__subcmd__"));
    let right = format!("{}__subcmd__", BIN.replace('-', "__"));
    script.replace(&wrong, &right)
}

/// `kube-proxy-rs man [--dir DIR]`: prints kube-proxy-rs(8), or writes every page into DIR.
pub fn man(args: &[String]) -> ExitCode {
    let matches = match parse(man_command(), "man", args) {
        Ok(m) => m,
        Err(code) => return code,
    };
    match matches.get_one::<PathBuf>("dir") {
        Some(dir) => match write_pages(dir) {
            Ok(paths) => {
                for p in paths {
                    println!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("man: writing the pages into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
        None => {
            let pages = pages();
            write_stdout(&pages[0].1)
        }
    }
}

/// Every man page as (file name, roff): kube-proxy-rs.8 first, then kube-proxy-rs-SUB.8 for
/// each subcommand.
pub fn pages() -> Vec<(String, Vec<u8>)> {
    let mut cmd = command();
    cmd.build();
    let mut pages = vec![page(&cmd, &top_sections())];
    for sub in cmd.get_subcommands() {
        let see_also = section("SEE ALSO", &[format!("{BIN}({MAN_SECTION})")]);
        pages.push(page(sub, &see_also));
    }
    pages
}

/// Writes [`pages`] into `dir`; returns the paths written.
pub fn write_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    pages()
        .into_iter()
        .map(|(name, roff)| {
            let path = dir.join(name);
            std::fs::write(&path, roff)?;
            Ok(path)
        })
        .collect()
}

fn explain(proxy_flags: Vec<Arg>) -> Command {
    let mut cmd = Command::new("explain")
        .about("Where a packet goes on this node, and why: asks the running proxy, or computes offline")
        .arg(value("to", "IP:PORT", "The packet's destination").required(true))
        .arg(value("from", "IP[:PORT]", "The packet's source (default: an outside client)"))
        .arg(proto())
        .arg(
            Arg::new("from-node")
                .long("from-node")
                .action(ArgAction::SetTrue)
                .help("The packet comes from the node itself"),
        )
        .arg(output())
        .arg(server())
        .arg(
            Arg::new("in-cluster")
                .long("in-cluster")
                .action(ArgAction::SetTrue)
                .help("Compute offline from the API server, with the pod's service account"),
        );
    for flag in proxy_flags {
        cmd = cmd.arg(flag.help_heading(PROXY_FLAGS));
    }
    cmd
}

fn completions_command() -> Command {
    Command::new("completions")
        .bin_name(format!("{BIN} completions"))
        .about("Print the shell completion script for SHELL")
        .arg(
            Arg::new("shell")
                .value_name("SHELL")
                .required(true)
                .value_parser(clap::value_parser!(Shell))
                .help("The shell to complete for"),
        )
}

fn man_command() -> Command {
    Command::new("man")
        .bin_name(format!("{BIN} man"))
        .about(format!(
            "Print the man page {BIN}({MAN_SECTION}), or write every page into --dir"
        ))
        .arg(
            Arg::new("dir")
                .long("dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Write kube-proxy-rs.8 and one page per subcommand into DIR"),
        )
}

fn value(long: &'static str, name: &'static str, help: &'static str) -> Arg {
    Arg::new(long).long(long).value_name(name).help(help)
}

fn server() -> Arg {
    value("server", "URL", "The running proxy's metrics address")
        .default_value("http://127.0.0.1:10249")
}

fn output() -> Arg {
    value("output", "FORMAT", "Output format")
        .short('o')
        .value_parser(["text", "json"])
}

fn proto() -> Arg {
    value("proto", "PROTO", "The packet's protocol").value_parser(["tcp", "udp", "sctp"])
}

/// Parses a subcommand's arguments; `Err` holds the exit code after clap printed the usage,
/// the error or the help.
fn parse(cmd: Command, name: &str, args: &[String]) -> Result<clap::ArgMatches, ExitCode> {
    let argv = std::iter::once(format!("{BIN} {name}")).chain(args.iter().cloned());
    cmd.try_get_matches_from(argv).map_err(|e| {
        let _ = e.print();
        ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
    })
}

fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{BIN}: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One page: clap_mangen's sections of `cmd`, then `extra` (already roff).
fn page(cmd: &Command, extra: &str) -> (String, Vec<u8>) {
    let man = clap_mangen::Man::new(cmd.clone())
        .section(MAN_SECTION)
        // No date, so a page is the same whenever it is generated; blank rather than empty,
        // which would drop the argument and shift the source into the date's place.
        .date(" ")
        .manual("kube-proxy-rs manual")
        .source(format!("{BIN} {}", env!("CARGO_PKG_VERSION")));
    let mut roff = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = man.render(&mut roff);
    roff.extend_from_slice(extra.as_bytes());
    (man.get_filename(), roff)
}

/// The top page's sections after clap_mangen's: files, exit status, see also.
fn top_sections() -> String {
    let mut roff = String::new();
    roff.push_str(&section(
        "FILES",
        &[
            format!(
                "{PACKAGED_CONFIG}: the configuration the Debian package's kube-proxy-rs.service reads (a KubeProxyConfiguration)."
            ),
            "/var/lib/kube-proxy/kubeconfig: the node's kubeconfig that configuration names (clientConnection.kubeconfig).".into(),
        ],
    ));
    roff.push_str(&section(
        "EXIT STATUS",
        &[
            "0 on success (--version, --write-config-to, --dry-run, --cleanup).".into(),
            "1 on an invalid configuration (nothing is programmed then), and, on purpose, when the --config file, the node's IPs or its podCIDRs change or its Node is deleted: the supervisor (systemd, the DaemonSet) starts it again with the new values, as kube-proxy does.".into(),
            "2 on a usage error of a subcommand.".into(),
        ],
    ));
    roff.push_str(&section(
        "SEE ALSO",
        &["kube-proxy-rs.service (systemctl status kube-proxy-rs), nft(8), iptables(8), conntrack(8); the README and docs/ of https://github.com/kube-proxy-rs/kube-proxy-rs".into()],
    ));
    roff
}

/// A man page section of plain paragraphs.
fn section(title: &str, paragraphs: &[String]) -> String {
    let mut roff = Roff::new();
    roff.control("SH", [title]);
    for (i, p) in paragraphs.iter().enumerate() {
        if i > 0 {
            roff.control("PP", []);
        }
        match p.split_once(": ") {
            Some((path, rest)) if path.starts_with('/') => {
                roff.text([bold(path), roman(format!(": {rest}"))])
            }
            _ => roff.text([roman(p.as_str())]),
        };
    }
    // Apostrophes handled as clap_mangen's pages do; its preamble is already at the top.
    let text = roff.render();
    let preamble = Roff::new().render();
    text.strip_prefix(preamble.as_str())
        .unwrap_or(&text)
        .to_owned()
}
