//! A lab IN running in the test process, shared by the bootstrap library's integration tests.
#![allow(dead_code)] // each test file uses part of it

use std::net::SocketAddr;
use std::sync::Arc;

use m2mpki_bootstrap::config::ServerConfig;
use m2mpki_bootstrap::server::Server;
use m2mpki_ca::Home;
use m2mpki_hsm::{KeyRef, Keystore, Signer};
use m2mpki_test_pki::lab::{self, LabHsm, LabLayout, LabNode};

/// A lab (software keys) and its IN, serving on loopback until dropped.
pub struct Running {
    pub rt: tokio::runtime::Runtime,
    pub server: Arc<Server>,
    /// The TLS address, unless the tweak switched TLS off.
    pub tls: Option<SocketAddr>,
    /// The DTLS address, unless the tweak switched DTLS off.
    pub dtls: Option<SocketAddr>,
    /// The metrics address, when the tweak set `metrics_listen`.
    pub metrics: Option<SocketAddr>,
    /// The PSK association address (the lab configures one).
    pub psk: Option<SocketAddr>,
    pub layout: LabLayout,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Makes a lab and starts its IN on free loopback ports, after `tweak` edited the config.
    pub fn start(tweak: impl FnOnce(&mut ServerConfig)) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let layout = lab::init(&dir.path().join("lab"), LabHsm::None, 8443).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = lab::config_on_free_ports(&layout).unwrap();
        assert!(config.dtls.is_some(), "the lab serves DTLS");
        tweak(&mut config);
        let home = Home::open(&layout.home).unwrap();
        let server = Arc::new(Server::new(config, &home, &Keystore::default()).unwrap());
        let listeners = rt.block_on(server.bind()).unwrap();
        let tls = listeners.local_addr().ok();
        let dtls = listeners.dtls_addr().ok();
        let metrics = listeners.metrics_addr().ok();
        let psk = listeners.psk_addr().ok();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = server.clone();
        rt.spawn(async move {
            s.run(listeners, async {
                let _ = stopped.await;
            })
            .await
        });
        Running {
            rt,
            server,
            tls,
            dtls,
            metrics,
            psk,
            layout,
            stop: Some(stop),
            _dir: dir,
        }
    }

    pub fn node(&self, name: &str) -> &LabNode {
        self.layout.nodes.iter().find(|n| n.name == name).unwrap()
    }

    /// The lab node's key.
    pub fn key(&self, name: &str) -> Arc<dyn Signer> {
        Keystore::default()
            .open(&KeyRef::File(self.node(name).key.clone()))
            .unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
