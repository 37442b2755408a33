//! The `mailgate` binary: command line, logging, configuration, then [`mailgate::server::run`].
#![forbid(unsafe_code)]

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mailgate::commands;
use mailgate::config::{Config, ConfigError, Files, LogFormat, Problem};
use mailgate::server::{ConfigFile, Control, LogLevelHook};
use tokio::signal::unix::SignalKind;
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Exit code for a configuration that was refused (EX_USAGE from sysexits.h).
const EXIT_BAD_CONFIG: u8 = 64;
/// Exit code when the configuration was fine but the service could not start, or on a forced stop.
const EXIT_START_FAILED: u8 = 1;

/// IMAP/SMTP proxy that turns plain client logins into OAuth2 (XOAUTH2 / OAUTHBEARER) logins upstream.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// YAML configuration file (every command but `hash-password` needs one).
    #[arg(long, short, env = "MAILGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve,
    /// Validate the configuration: exit 0 if it is usable, else print every problem
    /// as `PATH: key.path: reason` and exit 64.
    Check {
        /// Print the effective configuration, secrets redacted.
        #[arg(long)]
        print: bool,
        /// Do not read the files and environment variables the configuration names (secrets,
        /// CA files, keys): for checking an example away from its production secrets.
        #[arg(long)]
        no_files: bool,
    },
    /// Get a refresh token for an OAuth2 account: prints a URL to open in a browser and waits
    /// for the provider's redirect (or, with --device, shows a code to enter elsewhere).
    Authorize {
        /// The account id in tokens.oauth2.accounts.
        #[arg(long)]
        account: String,
        /// Use the device flow (RFC 8628) instead of a browser redirect.
        #[arg(long)]
        device: bool,
    },
    /// List the OAuth2 accounts with their source, grant and state; no secret is printed.
    Accounts {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<AccountsAction>,
    },
    /// The servers of the listeners' pools (status, sessions, drains), and the operator's
    /// actions on them, through the running process's admin endpoint (`admin.backends`).
    Backends {
        /// JSON for scripts.
        #[arg(long, global = true)]
        json: bool,
        /// Trust this CA file for the admin endpoint's certificate (default: the certificates in
        /// admin.tls.cert_file).
        #[arg(long, global = true)]
        ca_file: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<BackendsAction>,
    },
    /// Work on the refresh-token store as a whole.
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// Print the configuration file's JSON Schema (draft 7), for editors and the Helm chart's
    /// values.schema.json; needs no --config.
    ConfigSchema,
    /// Get a token for ACCOUNT and log in upstream once through a listener's settings,
    /// printing every step (never the token), for setting up and for support tickets.
    TestLogin {
        account: String,
        /// The listener whose upstream to log in to.
        #[arg(long)]
        listener: String,
    },
    /// Print the argon2id hash of a password for `client_auth.accounts` (mode `static`).
    /// At a terminal it asks twice without echo; else it reads one line of standard input.
    /// Needs no configuration.
    HashPassword,
}

#[derive(Subcommand)]
enum AccountsAction {
    /// Seed the token store with an existing refresh token (from another tool).
    Import {
        #[arg(long)]
        account: String,
        /// A file holding the refresh token, or `-` for standard input.
        #[arg(long)]
        refresh_token_file: PathBuf,
        /// Store it without redeeming it once at the provider (the account then shows as not
        /// yet tried).
        #[arg(long)]
        no_check: bool,
    },
}

#[derive(Subcommand)]
enum BackendsAction {
    /// No new logins on SERVER; its sessions end after the grace.
    Drain {
        server: String,
        /// How long its sessions may go on, e.g. 30s (default 60s).
        #[arg(long)]
        grace: Option<String>,
    },
    /// Let SERVER take logins again.
    Undrain { server: String },
    /// End every session of ACCOUNT (its next login is routed afresh).
    Kick { account: String },
    /// Route ACCOUNT to SERVER from now on (kept in the pools' routes_file) and end its
    /// sessions elsewhere.
    Move { account: String, server: String },
}

#[derive(Subcommand)]
enum StoreAction {
    /// Copy every refresh_token account's record between the file store and Redis.
    ///
    /// The configuration names both (tokens.oauth2.store.dir and tokens.shared.redis). Each
    /// account is moved under its lease on both stores; the output says per account: moved,
    /// already there, conflict, unreadable (never a token). The source is left in place.
    /// Exit 0 only if every account is at the destination (or has no record to move).
    Migrate {
        /// The destination.
        #[arg(long, value_enum)]
        to: StoreBackend,
        /// Replace a destination record that holds another refresh token (or does not decrypt).
        #[arg(long)]
        overwrite: bool,
        /// Say what would be done; take no lease and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum StoreBackend {
    /// Redis (tokens.shared.redis).
    Redis,
    /// The directory tokens.oauth2.store.dir.
    File,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::ConfigSchema = cli.command {
        return config_schema();
    }
    let Some(config) = cli.config else {
        if let Command::HashPassword = cli.command {
            return ExitCode::from(commands::hash_password());
        }
        eprintln!("mailgate: --config FILE (or MAILGATE_CONFIG) is required");
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    match cli.command {
        Command::Check { print, no_files } => check(&config, print, no_files),
        Command::Serve => serve(&config),
        Command::Authorize { account, device } => {
            run_command(&config, false, |config| async move {
                commands::authorize(&config, &account, device).await
            })
        }
        Command::Accounts { json, action: None } => {
            run_command(&config, false, |config| async move {
                commands::accounts(&config, json).await
            })
        }
        Command::Accounts {
            action:
                Some(AccountsAction::Import {
                    account,
                    refresh_token_file,
                    no_check,
                }),
            ..
        } => run_command(&config, false, |config| async move {
            commands::import(&config, &account, &refresh_token_file, !no_check).await
        }),
        Command::Store {
            action:
                StoreAction::Migrate {
                    to,
                    overwrite,
                    dry_run,
                },
        } => run_command(&config, false, |config| async move {
            let to = match to {
                StoreBackend::Redis => commands::store::Backend::Redis,
                StoreBackend::File => commands::store::Backend::File,
            };
            let choices = commands::store::Choices { overwrite, dry_run };
            commands::store::migrate(&config, to, choices).await
        }),
        Command::Backends {
            json,
            ca_file,
            action,
        } => run_command(&config, false, |config| async move {
            let request = backends_request(action);
            let options = commands::backends::Options {
                json,
                ca_file: ca_file.as_deref(),
            };
            commands::backends::run(&config, &request, &options).await
        }),
        Command::ConfigSchema => config_schema(),
        Command::TestLogin { account, listener } => {
            run_command(&config, true, |config| async move {
                commands::test_login(&config, &account, &listener).await
            })
        }
        // Needs no configuration, but one given (MAILGATE_CONFIG) does no harm.
        Command::HashPassword => ExitCode::from(commands::hash_password()),
    }
}

fn backends_request(action: Option<BackendsAction>) -> commands::backends::Request {
    use commands::backends::Request;
    match action {
        None => Request::Status,
        Some(BackendsAction::Drain { server, grace }) => Request::Drain { server, grace },
        Some(BackendsAction::Undrain { server }) => Request::Undrain { server },
        Some(BackendsAction::Kick { account }) => Request::Kick { account },
        Some(BackendsAction::Move { account, server }) => Request::Move { account, server },
    }
}

fn config_schema() -> ExitCode {
    match serde_json::to_string_pretty(&Config::json_schema()) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cannot print the schema: {error}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

/// Loads the configuration and runs a command on a runtime; `verbose` shows mailgate's own
/// debug events (the upstream dialogue) on standard output.
fn run_command<F, Fut>(path: &Path, verbose: bool, command: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = u8>,
{
    let config = match load(path) {
        Ok((config, _)) => config,
        Err(code) => return code,
    };
    let level = if verbose {
        "mailgate=debug"
    } else {
        "mailgate=warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(level))
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(false)
        .without_time()
        .init();
    mailgate::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    ExitCode::from(runtime.block_on(command(config)))
}

/// Reads and checks the file; every problem goes to stderr as `PATH: key: reason`.
fn load(path: &Path) -> Result<(Config, String), ExitCode> {
    load_with(path, Files::Read)
}

fn load_with(path: &Path, files: Files) -> Result<(Config, String), ExitCode> {
    let refused = |error: ConfigError| {
        eprintln!("{error}");
        ExitCode::from(EXIT_BAD_CONFIG)
    };
    let text = std::fs::read_to_string(path).map_err(|error| {
        refused(ConfigError {
            path: path.to_owned(),
            problems: vec![Problem {
                key: "(file)".to_owned(),
                reason: error.to_string(),
            }],
        })
    })?;
    let config = Config::from_text_with(path, &text, files).map_err(refused)?;
    Ok((config, text))
}

fn check(path: &Path, print: bool, no_files: bool) -> ExitCode {
    let files = if no_files { Files::Skip } else { Files::Read };
    let config = match load_with(path, files) {
        Ok((config, _)) => config,
        Err(code) => return code,
    };
    for warning in config.warnings(files, std::time::SystemTime::now()) {
        eprintln!(
            "{}: {}: warning: {}",
            path.display(),
            warning.key,
            warning.reason
        );
    }
    if print {
        match serde_saphyr::to_string(&config) {
            Ok(text) => print!("{text}"),
            Err(error) => {
                eprintln!("cannot print the configuration: {error}");
                return ExitCode::from(EXIT_START_FAILED);
            }
        }
    } else {
        println!(
            "{}: configuration is valid ({} listener{})",
            path.display(),
            config.listeners.len(),
            if config.listeners.len() == 1 { "" } else { "s" }
        );
    }
    ExitCode::SUCCESS
}

fn serve(path: &Path) -> ExitCode {
    let (config, text) = match load(path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let log_level = init_logging(&config);
    mailgate::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    let outcome = runtime.block_on(async {
        let (control, commands) = mpsc::channel(4);
        tokio::spawn(forward_signals(control));
        let file = ConfigFile {
            path: path.to_owned(),
            text,
        };
        mailgate::server::run(config, Some(file), commands, log_level).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Logs go to stderr too: one line is enough.
            tracing::error!(%error, "cannot start");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

/// Installs the subscriber; returns how to change the level later, unless `RUST_LOG` decides it.
fn init_logging(config: &Config) -> Option<LogLevelHook> {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_decides = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| level_filter(&config.log.level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colours only for a person at a terminal, never into files or journals.
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let output = match config.log.format {
        LogFormat::Json => output
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Text => output.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    let hook = move |level: &str| {
        let _ = handle.reload(level_filter(level));
    };
    (!env_decides).then(|| Box::new(hook) as LogLevelHook)
}

/// The filter for `log.level` (checked by config validation).
fn level_filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(level)
        .unwrap_or_else(|_| EnvFilter::new(mailgate::config::DEFAULT_LOG_LEVEL))
}

/// Turns signals into [`Control`]s: SIGHUP reloads; the first SIGTERM or SIGINT drains;
/// a second one exits at once.
async fn forward_signals(control: mpsc::Sender<Control>) {
    let mut hangup = unix_signal(SignalKind::hangup());
    let mut terminate = unix_signal(SignalKind::terminate());
    let mut interrupt = unix_signal(SignalKind::interrupt());
    let mut stopping = false;
    loop {
        let command = tokio::select! {
            _ = hangup.recv() => Control::Reload,
            _ = terminate.recv() => Control::Shutdown,
            _ = interrupt.recv() => Control::Shutdown,
        };
        if command == Control::Shutdown {
            if stopping {
                tracing::warn!("second stop signal: exiting now");
                std::process::exit(i32::from(EXIT_START_FAILED));
            }
            stopping = true;
        }
        if control.send(command).await.is_err() {
            return;
        }
    }
}

fn unix_signal(kind: SignalKind) -> tokio::signal::unix::Signal {
    tokio::signal::unix::signal(kind).expect("installing signal handlers at start-up")
}
