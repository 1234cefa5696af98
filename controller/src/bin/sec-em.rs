//! `sec-em`: the Sec-EM controller of an ASMN tenant.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use asmn_controller::{config, pki};
use clap::{Parser, Subcommand};

/// Sec-EM, the security element manager of an ASMN tenant.
///
/// It attests VNF instances by their hash chains, introduces verified peers to each other,
/// and pushes Sec-catalogs and revocations. Start with `sec-em init` to make its CA,
/// certificates and configuration, then `sec-em serve`.
#[derive(Parser, Debug)]
#[command(name = "sec-em", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make the controller CA, the server certificate, the admin client certificate
    /// (for asmnctl) and sec-em.toml in DIR. Keys are written with mode 0600.
    Init {
        /// Directory for the keys, certificates and configuration.
        #[arg(long, default_value = "/etc/asmn")]
        dir: PathBuf,
        /// Names (DNS or IP) agents and operators use to reach Sec-EM; the first is the
        /// TLS server name. Repeat the flag for more.
        #[arg(long = "server-name", default_values_t = ["sec-em".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
        /// Where the QUIC endpoint will listen.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Where `sec-em serve` exports Prometheus metrics (HTTP).
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_addr: SocketAddr,
        /// Replace existing keys and configuration (agents pinning the old CA will be
        /// refused).
        #[arg(long)]
        force: bool,
    },
    /// Serve agents and operators over QUIC until SIGTERM or SIGINT.
    Serve {
        /// The configuration file.
        #[arg(long, default_value = "/etc/asmn/sec-em.toml")]
        config: PathBuf,
        /// Log format: text or json.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Read a configuration file and report the first problem, if any.
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = "/etc/asmn/sec-em.toml")]
        config: PathBuf,
    },
}

fn current_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Average Gregorian year; the certificate starts on January 1 of this year or the
    // one before, which is all that matters here.
    1970 + (secs / 31_556_952) as i32
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            dir,
            server_names,
            listen,
            metrics_addr,
            force,
        } => {
            let cfg_path = dir.join("sec-em.toml");
            if !force && cfg_path.exists() {
                anyhow::bail!(
                    "{} already exists; pass --force to replace the controller's keys and configuration",
                    cfg_path.display()
                );
            }
            let pki = pki::generate(&server_names, current_year() - 1)?;
            pki::write(&dir, &pki, force)?;
            let server_name = server_names.first().map_or("sec-em", String::as_str);
            let text = config::initial(listen, server_name, "sec-em.redb", metrics_addr);
            pki::write_file(&cfg_path, text.as_bytes(), true)?;
            config::Config::load(&cfg_path).context("the configuration just written")?;
            println!(
                "wrote the controller CA, certificates and keys to {}",
                dir.display()
            );
            println!("  ca.pem      the CA agents pin (it goes into every bootstrap bundle)");
            println!(
                "  server.pem  the server certificate for {}",
                server_names.join(", ")
            );
            println!(
                "  admin.pem   the admin client certificate for asmnctl (keys: *.key, mode 0600)"
            );
            println!(
                "  sec-em.toml the configuration; check it with: sec-em check-config --config {}",
                cfg_path.display()
            );
            Ok(())
        }
        Command::Serve { config, log_format } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            if log_format == "json" {
                tracing_subscriber::fmt()
                    .with_writer(std::io::stderr)
                    .json()
                    .with_env_filter(filter)
                    .init();
            } else {
                tracing_subscriber::fmt()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_env_filter(filter)
                    .init();
            }
            let cfg = config::Config::load(&config)?;
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async { asmn_controller::daemon::run(cfg, shutdown_signal()).await })?;
            Ok(())
        }
        Command::CheckConfig { config } => {
            let c = config::Config::load(&config)?;
            println!(
                "{}: valid (listen {}, store {:?}, overlay {}/{}, {})",
                config.display(),
                c.listen,
                c.store,
                c.overlay_net,
                c.overlay_prefix,
                c.dh_group
            );
            Ok(())
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sec-em: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
