//! What the binary puts together for the hub: its runtimes (wasm and
//! process) and its MQTT broker, built from their own settings and handed
//! to `roost-hub` as trait objects, so that the hub names neither a runtime
//! nor the broker.

use anyhow::{Context, Result};
use roost_broker::{Broker, BrokerConfig};
use roost_hub::{logs::LogBook, Hub, HubConfig, Parts};
use roost_runtime_process::{identity, pool::PoolPolicy, ProcessConfig, ProcessRuntime};
use roost_runtime_wasm::{WasmConfig, WasmRuntime};
use std::sync::{Arc, OnceLock};

/// The runtimes' own settings (the hub's are in [`HubConfig`]).
pub struct RuntimeOptions {
    /// How process tasks' worker pools are sized.
    pub pool_policy: PoolPolicy,
    /// Whether process tasks run under users of their own (needs root).
    pub task_identities: identity::Mode,
    /// Wasm instances that may exist at once (the pooling allocator's slots).
    pub instance_slots: u32,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            pool_policy: PoolPolicy::Demand,
            task_identities: identity::Mode::Off,
            instance_slots: 1000,
        }
    }
}

/// Builds the runtimes and the broker of the hub keeping its state in
/// `config.data_dir` and starts the hub with them. The broker comes back
/// too: the binary serves it on its MQTT listeners.
pub async fn start_hub(
    config: HubConfig,
    options: RuntimeOptions,
    broker: BrokerConfig,
    extra_metrics: Vec<roost_hub::MetricsRegistrar>,
) -> Result<(Hub, Broker)> {
    let data_dir = &config.data_dir;
    // The process runtime's hub id is derived from the data dir's canonical
    // path (it names the worker cgroups), so the dir must exist first.
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;
    let logs = Arc::new(LogBook::default());
    let wasm = WasmRuntime::new(WasmConfig {
        cache_dir: data_dir.join("cache"),
        instance_slots: options.instance_slots,
    })?;
    let mut process = ProcessConfig::new(data_dir, &config.region);
    process.pool_policy = options.pool_policy;
    process.task_identities = options.task_identities;
    let process = ProcessRuntime::new(process, logs.clone());
    // The hub makes its bus once its store is open (the broker restores its
    // sessions and retained messages from it); the binary keeps a handle.
    let built = Arc::new(OnceLock::new());
    let keep = built.clone();
    let parts = Parts {
        extra_metrics,
        runtimes: vec![Arc::new(wasm), Arc::new(process)],
        logs,
        bus: Box::new(move |state: roost_bus::BusState| {
            let b = Broker::with_persistence(broker, Some(state.persistence), state.restore);
            let _ = keep.set(b.clone());
            Arc::new(b)
        }),
    };
    let hub = Hub::start(config, parts).await?;
    let broker = built
        .get()
        .cloned()
        .context("the hub started without asking for its broker")?;
    Ok((hub, broker))
}
