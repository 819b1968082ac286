//! Starting the service for a test, and what tests need to talk to it.
//!
//! Every app gets its own data directory and database: an SQLite file by default, or a fresh
//! database on the PostgreSQL server named by `SEIDRA_TEST_POSTGRES_URL`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use seidra::actors::RuntimeFactory;
use seidra::api::auth::{AuthKeys, Role};
use seidra::app::Application;
use seidra::devices;
use seidra::logging::LogFormat;
use seidra::settings::Settings;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running service and what a test needs to talk to it.
pub struct TestApp {
    pub base_url: String,
    pub ws_url: String,
    pub token: String,
    pub keys: AuthKeys,
    pub db: DatabaseConnection,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub runtime: seidra::actors::Runtime,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _temp: TempDir,
}

/// How to start a test app.
pub struct AppOptions {
    pub devices: Vec<String>,
    pub factory: Option<RuntimeFactory>,
    pub recent_size: usize,
    pub client_queue: usize,
    /// Seconds between the channel's pings.
    pub heartbeat_seconds: u64,
    /// Seconds a channel client's socket may take to accept one message.
    pub client_send_timeout_seconds: u64,
    pub max_pending_jobs: usize,
    /// A database to share with another app; a fresh one when unset.
    pub database_url: Option<String>,
    pub host_name: String,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            devices: vec!["cpu".to_owned()],
            factory: None,
            recent_size: 50,
            client_queue: 1024,
            heartbeat_seconds: 15,
            client_send_timeout_seconds: 5,
            max_pending_jobs: 10_000,
            database_url: None,
            host_name: "test-host".to_owned(),
        }
    }
}

/// Starts the service with the built-in model on one CPU device.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

/// Starts the service with the given devices and runtime factory.
pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        seidra::logging::init(LogFormat::Text);
    }
    let temp = tempfile::tempdir().expect("a temporary directory");
    let database_url = match options.database_url.clone() {
        Some(url) => Some(url),
        None => fresh_database().await,
    };
    spawn_in(temp, database_url, options).await
}

/// Starts the service in `temp`, on the database at `database_url` (SQLite in `temp` when
/// unset).
async fn spawn_in(temp: TempDir, database_url: Option<String>, options: AppOptions) -> TestApp {
    let settings = Settings {
        data_dir: temp.path().to_path_buf(),
        database_url: database_url.clone(),
        listen_host: "127.0.0.1".to_owned(),
        port: 0,
        devices: options.devices.join(","),
        host_name: Some(options.host_name),
        jwt_secret: Some("test-secret-for-integration-tests".to_owned().into()),
        recent_size: options.recent_size,
        client_queue: options.client_queue,
        heartbeat_seconds: options.heartbeat_seconds,
        client_send_timeout_seconds: options.client_send_timeout_seconds,
        max_batch: 256,
        weights: None,
        log_format: LogFormat::Text,
        migrate: true,
        metrics_address: None,
        retention_days: 0,
        max_pending_jobs: options.max_pending_jobs,
        telemetry_cache_size: 64,
        max_job_memory_mib: 8192,
    };
    let factory = options.factory.unwrap_or_else(|| devices::factory(None));
    let app = Application::build_with(&settings, options.devices, factory)
        .await
        .expect("the service starts");
    let address = app.address();
    let keys = app.keys();
    let db = app.db();
    let runtime = app.runtime();
    let (stop, stopped) = oneshot::channel();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let token = keys
        .mint("operator-1", Role::Operator, chrono::Duration::hours(1))
        .unwrap();
    TestApp {
        base_url: format!("http://{address}"),
        ws_url: format!("ws://{address}/api/system/ws"),
        token,
        keys,
        db,
        client: reqwest::Client::new(),
        data_dir: temp.path().to_path_buf(),
        database_url,
        runtime,
        stop: Some(stop),
        server: Some(server),
        _temp: temp,
    }
}

/// A fresh PostgreSQL database when `SEIDRA_TEST_POSTGRES_URL` is set, else `None` (SQLite).
pub async fn fresh_database() -> Option<String> {
    let server = std::env::var("SEIDRA_TEST_POSTGRES_URL").ok()?;
    let name = format!("seidra_test_{}", uuid::Uuid::new_v4().simple());
    let admin = Database::connect(format!("{server}/postgres"))
        .await
        .expect("the PostgreSQL server answers");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("a test database");
    Some(format!("{server}/{name}"))
}

impl TestApp {
    /// Whether the test runs against PostgreSQL.
    pub fn on_postgres(&self) -> bool {
        self.database_url.is_some()
    }

    /// A token with the user role.
    pub fn user_token(&self, user: &str) -> String {
        self.keys
            .mint(user, Role::User, chrono::Duration::hours(1))
            .unwrap()
    }

    /// Submits a job with the operator token; answers its id.
    pub async fn submit(&self, body: Value) -> String {
        let response = self.submit_response(&body).await;
        assert_eq!(
            response.status(),
            202,
            "submit {body}: {}",
            response.text().await.unwrap()
        );
        let accepted: Value = response.json().await.unwrap();
        accepted["job_id"].as_str().unwrap().to_owned()
    }

    /// The raw answer to a job submitted with the operator token.
    pub async fn submit_response(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/api/jobs", self.base_url))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Reads a job with the operator token.
    pub async fn job(&self, id: &str) -> Value {
        let url = format!("{}/api/jobs/{id}", self.base_url);
        get_json(&self.client, &self.token, &url).await
    }

    /// Waits until a job has ended (its row is committed); answers the job.
    pub async fn wait_for_job(&self, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let job = self.job(id).await;
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} did not end: {job}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /api/system/telemetry/generation` with a query string, operator token.
    pub async fn telemetry(&self, query: &str) -> Value {
        let response = self.telemetry_response(query, Some(&self.token)).await;
        assert_eq!(response.status(), 200, "telemetry ?{query}");
        response.json().await.unwrap()
    }

    /// Asks, with the operator token, for job `id` to be cancelled; answers the status code.
    pub async fn cancel(&self, id: &str) -> u16 {
        self.client
            .post(format!("{}/api/jobs/{id}/cancel", self.base_url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The raw telemetry response with any token.
    pub async fn telemetry_response(&self, query: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(format!(
            "{}/api/system/telemetry/generation?{query}",
            self.base_url
        ));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// Stops the service the way SIGTERM would and starts it again with `options`, in the same
    /// data directory and on the same database (`options.database_url` is not read).
    pub async fn restart(mut self, options: AppOptions) -> TestApp {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        spawn_in(self._temp, self.database_url, options).await
    }

    /// Stops the service the way SIGTERM would, and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

/// An authorised GET answered with JSON.
pub async fn get_json(client: &reqwest::Client, token: &str, url: &str) -> Value {
    client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A small, fast image job.
pub fn small_image(seed: u64) -> Value {
    json!({"media_type": "image", "prompt": "a small test image", "width": 32, "height": 32, "steps": 3, "seed": seed})
}

/// A small, fast video job.
pub fn small_video(seed: u64) -> Value {
    json!({"media_type": "video", "prompt": "a small test video", "width": 32, "height": 32, "steps": 2, "frames": 3, "fps": 6, "seed": seed})
}

/// A TCP proxy in front of a server. Cut, it closes every connection it carries and drops new
/// ones as soon as they are accepted; restored, it forwards again.
pub struct CuttableProxy {
    /// Where clients connect.
    pub address: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    accepting: JoinHandle<()>,
}

struct ProxyState {
    open: bool,
    connections: Vec<JoinHandle<()>>,
}

impl CuttableProxy {
    /// Forwards connections to `server` (`host:port`).
    pub async fn start(server: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState {
            open: true,
            connections: Vec::new(),
        }));
        let shared = state.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                // Deciding and registering under one lock: a cut never misses a connection.
                let mut state = shared.lock().unwrap();
                if !state.open {
                    drop(client);
                    continue;
                }
                let server = server.clone();
                state.connections.push(tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(server).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        CuttableProxy {
            address,
            state,
            accepting,
        }
    }

    /// Stops accepting connections.
    pub fn stop(self) {
        self.accepting.abort();
    }
}

impl CuttableProxy {
    /// Closes every connection it carries and drops new ones.
    pub async fn cut(&mut self) {
        let connections = {
            let mut state = self.state.lock().unwrap();
            state.open = false;
            std::mem::take(&mut state.connections)
        };
        // Aborting a forwarding task drops both of its sockets, which closes them.
        for connection in connections {
            connection.abort();
            let _ = connection.await;
        }
    }

    /// Forwards new connections again.
    pub fn restore(&mut self) {
        self.state.lock().unwrap().open = true;
    }
}
