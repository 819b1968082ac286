//! Start-up: opens the database, starts the runtime, binds the listener, and serves until
//! told to stop, then shuts down in order: the runtime first (no new jobs, running ones
//! finish, every row is committed and every job's end published), then the WebSocket clients,
//! each closed once it has every event, then the listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context;
use poem::http::{HeaderValue, StatusCode, header};
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::middleware::Tracing;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, EndpointExt, IntoResponse, Route, Server, get};
use sea_orm::DatabaseConnection;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::actors::supervisor::SupervisorMessage;
use crate::actors::{Runtime, RuntimeFactory, RuntimeSettings, RuntimeSupervisor};
use crate::api::allow::AllowedMethods;
use crate::api::auth::{AuthKeys, load_or_create_secret};
use crate::api::errors::{ErrorBody, to_json_error};
use crate::api::memo::Answers;
use crate::api::{AppState, metrics, openapi_service, websocket};
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::storage::{notify, retention};
use crate::{devices, storage};

/// How often the purge, the rollup check and the statistics refresh run.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(3600);

/// A started service, bound to its address, not yet serving.
pub struct Application {
    acceptor: NoDelay,
    address: SocketAddr,
    state: AppState,
    shutdown: watch::Sender<bool>,
    metrics_address: Option<String>,
    retention_days: u32,
    instance: uuid::Uuid,
    host: String,
    channel: websocket::ChannelSettings,
}

impl Application {
    /// Builds the service from settings with the built-in model on the configured devices.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let device_names = devices::resolve(&settings.devices)?;
        Self::build_with(
            settings,
            device_names,
            devices::factory(settings.weights.clone()),
        )
        .await
    }

    /// Builds the service with a given runtime factory (tests pass instrumented devices).
    pub async fn build_with(
        settings: &Settings,
        device_names: Vec<String>,
        factory: RuntimeFactory,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.data_dir).with_context(|| {
            format!(
                "creating the data directory {}",
                settings.data_dir.display()
            )
        })?;
        let db = storage::connect(settings.database_url.as_deref(), &settings.data_dir)
            .await
            .context("opening the database")?;
        if settings.migrate {
            storage::migrate_up(&db)
                .await
                .context("applying migrations")?;
        }
        // Before serving, so that the first summaries already come from the rollup.
        storage::rollup::catch_up(&db).await;
        let secret = load_or_create_secret(settings.jwt_secret.as_ref(), &settings.data_dir)?;
        tracing::info!(devices = ?device_names, "devices");
        let metrics = Metrics::new();
        let instance = uuid::Uuid::new_v4();

        let runtime = RuntimeSupervisor::start(RuntimeSettings {
            db: db.clone(),
            devices: device_names,
            factory,
            output_dir: settings.output_dir(),
            host: settings.host(),
            recent_capacity: settings.recent_size,
            client_queue: settings.client_queue,
            max_batch: settings.max_batch,
            metrics: metrics.clone(),
            max_pending_jobs: settings.max_pending_jobs,
            instance,
        })
        .await?;

        let acceptor = NoDelay(
            TcpListener::bind(format!("{}:{}", settings.listen_host, settings.port))
                .into_acceptor()
                .await
                .with_context(|| format!("binding {}:{}", settings.listen_host, settings.port))?,
        );
        let address = acceptor
            .local_addr()
            .first()
            .and_then(|addr| addr.as_socket_addr().copied())
            .context("the listener has no address")?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        Ok(Application {
            acceptor,
            address,
            state: AppState {
                runtime,
                db,
                keys: AuthKeys::new(&secret)?,
                output_dir: settings.output_dir(),
                shutdown: shutdown_rx,
                metrics,
                answers: Arc::new(Answers::new(settings.telemetry_cache_size)),
                max_job_memory_mib: settings.max_job_memory_mib,
            },
            metrics_address: settings.metrics_address.clone(),
            retention_days: settings.retention_days,
            instance,
            host: settings.host(),
            channel: settings.channel(),
            shutdown,
        })
    }

    /// The address the service listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Token signing keys, for `seidra serve --demo` and tests.
    pub fn keys(&self) -> AuthKeys {
        self.state.keys.clone()
    }

    /// The database handle.
    pub fn db(&self) -> DatabaseConnection {
        self.state.db.clone()
    }

    /// The runtime's actors.
    pub fn runtime(&self) -> Runtime {
        self.state.runtime.clone()
    }

    /// Serves until `stop` resolves, then shuts down in order.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let public_url = format!("http://{}", self.address);
        let api = openapi_service(&public_url);
        let allowed = Arc::new(AllowedMethods::from_spec(&api.spec()));
        let docs = api.swagger_ui();
        let spec_json = api.spec_endpoint();
        let spec_yaml = api.spec_endpoint_yaml();
        tokio::spawn(retention::run_schedule(
            self.state.db.clone(),
            (self.retention_days > 0)
                .then(|| Duration::from_secs(u64::from(self.retention_days) * 86_400)),
            MAINTENANCE_PERIOD,
            self.state.shutdown.clone(),
        ));
        if self.state.db.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
            tokio::spawn(notify::relay_other_instances(
                self.state.db.clone(),
                self.instance,
                self.host.clone(),
                self.state.runtime.broadcast.clone(),
                self.state.shutdown.clone(),
            ));
        }
        let mut app = Route::new();
        match &self.metrics_address {
            Some(address) => self.serve_metrics_apart(address).await?,
            None => app = app.at("/metrics", get(metrics::protected)),
        }
        let app = app
            .nest("/", api.around(limit_body))
            .at(
                "/api/system/ws",
                get(websocket::system_channel).data(self.channel),
            )
            .at("/openapi.json", spec_json)
            .at("/openapi.yaml", spec_yaml)
            .nest("/docs", docs)
            .at("/health", get(health))
            .data(self.state.clone())
            .with(Tracing)
            .catch_all_error(to_json_error)
            .around(move |endpoint, request| {
                let allowed = Arc::clone(&allowed);
                async move {
                    let path = request.uri().path().to_owned();
                    let mut response = endpoint.call(request).await?;
                    if response.status() == StatusCode::METHOD_NOT_ALLOWED
                        && let Some(methods) = allowed.allow(&path)
                        && let Ok(value) = HeaderValue::from_str(methods)
                    {
                        response.headers_mut().insert(header::ALLOW, value);
                    }
                    Ok(response)
                }
            });

        tracing::info!(address = %public_url, "listening");
        let shutdown = self.shutdown;
        let supervisor = self.state.runtime.supervisor.clone();
        let broadcast = self.state.runtime.broadcast.clone();
        // Taken before the server serves anyone: every later receiver of the signal is held by
        // a channel client or a request in progress.
        let receivers_without_clients = shutdown.receiver_count();
        let signal = async move {
            // The supervisor stops by itself when the writer, the broadcast or the registry
            // is gone: the service then cannot record or announce anything, so it stops too.
            let runtime_gone = async {
                while supervisor.get_status() != ractor::ActorStatus::Stopped {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tracing::error!("the actor runtime stopped; shutting down");
            };
            tokio::select! {
                _ = stop => tracing::info!("shutting down"),
                _ = runtime_gone => {}
            }
            // Jobs end and their rows are committed and published while the channel's
            // clients are still there to receive them; then the clients are closed. Every
            // step of the supervisor's shutdown has its own bound, so this call has none: a
            // bound here, shorter than their sum, would close the clients in the middle.
            let _ = supervisor.call(SupervisorMessage::Shutdown, None).await;
            // The broadcast's stop closes each client with 1001 once it has sent the client
            // every event; the signal would close a client at once, maybe before its last
            // events, so it only closes those still there after the wait.
            if broadcast.get_status() == ractor::ActorStatus::Stopped {
                wait_for_clients(&shutdown, receivers_without_clients).await;
            }
            let _ = shutdown.send(true);
        };
        Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(app, signal, Some(Duration::from_secs(10)))
            .await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// How long a shutdown waits for the channel's clients to be sent their last events and closed.
const CLIENTS_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until the channel's clients are gone, each having dropped its receiver of the shutdown
/// signal, or `CLIENTS_CLOSE_TIMEOUT` has passed.
async fn wait_for_clients(shutdown: &watch::Sender<bool>, receivers_without_clients: usize) {
    let deadline = tokio::time::Instant::now() + CLIENTS_CLOSE_TIMEOUT;
    while shutdown.receiver_count() > receivers_without_clients {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                clients = shutdown.receiver_count() - receivers_without_clients,
                "channel clients still open after the shutdown's wait; closing them"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connection on which nothing is read or written for this long is closed (see [`Quiet`]):
/// a request whose headers never end cannot hold a connection forever. Channel clients get a
/// ping every `heartbeat_seconds` (at most 30), so a quiet channel stays open.
pub const IDLE_CONNECTION: Duration = Duration::from_secs(60);

/// The largest request body taken: a job's body is a few KiB at most.
const MAX_BODY_BYTES: u64 = 64 * 1024;

/// Refuses with 413 a body larger than `MAX_BODY_BYTES`, whether its `Content-Length` says so
/// or it turns out so while read (a chunked body), so that no request can fill the memory.
/// A GET's body is dropped unread instead: no GET route takes one, so it cannot fill the
/// memory, and a 413 there would be a status their documents do not list.
async fn limit_body<E: Endpoint>(
    endpoint: Arc<E>,
    mut request: poem::Request,
) -> poem::Result<poem::Response> {
    if request.method() == poem::http::Method::GET {
        request.set_body(poem::Body::empty());
        return Ok(endpoint.call(request).await?.into_response());
    }
    let too_large = |length: String| {
        Ok(ErrorBody::new(
            "payload_too_large",
            format!("the body has {length} bytes; at most {MAX_BODY_BYTES} are taken"),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
        .into_response())
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if let Some(length) = declared
        && length > MAX_BODY_BYTES
    {
        return too_large(length.to_string());
    }
    let mut body = Vec::new();
    request
        .take_body()
        .into_async_read()
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)
        .await
        .map_err(|error| {
            poem::Error::from_string(
                format!("the body could not be read: {error}"),
                StatusCode::BAD_REQUEST,
            )
        })?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return too_large(format!("more than {MAX_BODY_BYTES}"));
    }
    request.set_body(body);
    Ok(endpoint.call(request).await?.into_response())
}

impl Application {
    /// Serves `/metrics` without a token on its own address, for a Prometheus that scrapes a
    /// private interface.
    async fn serve_metrics_apart(&self, address: &str) -> anyhow::Result<()> {
        let acceptor = TcpListener::bind(address.to_owned())
            .into_acceptor()
            .await
            .with_context(|| format!("binding the metrics address {address}"))?;
        tracing::info!(address = %address, "serving /metrics");
        let routes = Route::new()
            .at("/metrics", get(metrics::open))
            .data(self.state.clone());
        let mut shutdown = self.state.shutdown.clone();
        tokio::spawn(
            Server::new_with_acceptor(acceptor).run_with_graceful_shutdown(
                routes,
                async move {
                    let _ = shutdown.changed().await;
                },
                Some(Duration::from_secs(1)),
            ),
        );
        Ok(())
    }
}

/// The listener's acceptor with Nagle's algorithm off on every connection. Channel messages are
/// small and sent one behind another; with Nagle on, the second waits for the client's delayed
/// ACK (up to 40 ms on Linux), which dominated the channel's delivery latency under load.
struct NoDelay(TcpAcceptor);

impl Acceptor for NoDelay {
    type Io = Quiet;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.0.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> std::io::Result<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        let (io, local, remote, scheme) = self.0.accept().await?;
        if let Err(error) = io.set_nodelay(true) {
            tracing::debug!(error = %error, "could not set TCP_NODELAY");
        }
        Ok((Quiet::new(io), local, remote, scheme))
    }
}

/// A connection that fails once nothing has been read from it or written to it for
/// `IDLE_CONNECTION`, so that the server drops it. poem's own idle timeout only asks hyper to
/// close the connection after the request in progress, which never ends when its headers
/// never do.
pub struct Quiet {
    io: tokio::net::TcpStream,
    last_active: tokio::time::Instant,
    /// Armed for `IDLE_CONNECTION` after some past activity; moved on only when it fires,
    /// so that a busy connection does not touch the timer on every read and write.
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Quiet {
    fn new(io: tokio::net::TcpStream) -> Self {
        Quiet {
            io,
            last_active: tokio::time::Instant::now(),
            deadline: Box::pin(tokio::time::sleep(IDLE_CONNECTION)),
        }
    }

    /// What a read or write that was polled becomes: ready counts as activity; pending stays
    /// pending, or fails once the connection has been quiet too long.
    fn track<T>(
        &mut self,
        polled: Poll<std::io::Result<T>>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.last_active = tokio::time::Instant::now();
            return polled;
        }
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let quiet_until = self.last_active + IDLE_CONNECTION;
            if quiet_until <= tokio::time::Instant::now() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection was quiet too long",
                )));
            }
            self.deadline.as_mut().reset(quiet_until);
        }
    }
}

impl tokio::io::AsyncRead for Quiet {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        this.track(polled, cx)
    }
}

impl tokio::io::AsyncWrite for Quiet {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.io).poll_write(cx, data);
        this.track(polled, cx)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[poem::handler]
fn health() -> &'static str {
    "ok"
}
