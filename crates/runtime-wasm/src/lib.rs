//! The WebAssembly runtime: WASI preview-1 command modules on wasmtime.
//!
//! Owns the engine (one per hub, pooling allocator, epoch interruption), the
//! compiled-module cache on disk, and per-call instances. Each call gets a
//! fresh store instantiated from a pre-linked [`InstancePre`], with the input
//! on stdin, the output taken from stdout, stderr sent to the hub's log, a
//! memory limiter and a deadline enforced both by epochs (a guest spinning in
//! a loop) and by the async timer (a guest sleeping or waiting in a host call).

mod cache;
mod host;

use async_trait::async_trait;
use bytes::Bytes;
use roost_model::{Access, Failure, FailureCode, RuntimeKind, TaskCode, TaskSpec};
use roost_runtime::{Instance, Invocation, PrepareError, PreparedTask, Runtime};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, OptLevel,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

pub use cache::ModuleCache;

/// How often the epoch advances. Guests yield to the executor once per tick
/// and are interrupted at the first tick past their deadline, so this is the
/// granularity of CPU time slicing and of timeouts for busy guests.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Largest output a call may write to stdout.
pub const MAX_OUTPUT_BYTES: usize = 16 << 20;
/// stderr kept per call for the log; beyond it lines are dropped.
const MAX_STDERR_BYTES: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// Where compiled modules are cached (keyed by code hash and engine).
    pub cache_dir: PathBuf,
    /// Instances that may exist at once (pooling allocator slots).
    pub instance_slots: u32,
}

/// State owned by one call's store.
pub(crate) struct CallState {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
    pub(crate) host: host::HostState,
}

/// Denies growth past the task's `memory_mb` and remembers that it did, so a
/// guest that aborts after a failed `memory.grow` is reported as
/// `memory_limit` rather than as a generic trap.
struct MemoryLimiter {
    max_bytes: usize,
    hit: Arc<AtomicBool>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }
    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

pub struct WasmRuntime {
    engine: Engine,
    linker: Linker<CallState>,
    cache: ModuleCache,
    _ticker: EpochTicker,
}

/// Advances the engine's epoch on a plain thread; stops when dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl WasmRuntime {
    pub fn new(config: WasmConfig) -> Result<Self, PrepareError> {
        let engine = Engine::new(&engine_config(config.instance_slots))
            .map_err(|e| PrepareError(format!("cannot start the wasm engine: {e}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut CallState| &mut s.wasi)
            .map_err(|e| PrepareError(format!("cannot link WASI: {e}")))?;
        host::add_to_linker(&mut linker)
            .map_err(|e| PrepareError(format!("cannot link the roost imports: {e}")))?;
        let cache = ModuleCache::new(config.cache_dir, &engine)
            .map_err(|e| PrepareError(format!("cannot open the module cache: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("roost-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| PrepareError(format!("cannot start the epoch thread: {e}")))?;
        }
        Ok(Self {
            engine,
            linker,
            cache,
            _ticker: EpochTicker { stop },
        })
    }

    pub fn cache(&self) -> &ModuleCache {
        &self.cache
    }

    /// Compiles (or loads from cache) and pre-links a module; exposed for
    /// benchmarks that measure instantiation on its own.
    pub fn prepare_wasm(&self, spec: &TaskSpec) -> Result<Arc<WasmTask>, PrepareError> {
        let TaskCode::Wasm { sha256, path } = &spec.code else {
            return Err(PrepareError("not a wasm task".into()));
        };
        let module = self.cache.load_or_compile(&self.engine, sha256, path)?;
        check_module(&module, spec)?;
        let pre = self.linker.instantiate_pre(&module).map_err(|e| {
            PrepareError(format!(
                "the module imports something the hub does not provide: {e}"
            ))
        })?;
        for r in &spec.resources {
            if !r.source.is_dir() {
                return Err(PrepareError(format!(
                    "resource source {} is not a folder: wasm tasks can be given folders only",
                    r.source.display()
                )));
            }
        }
        Ok(Arc::new(WasmTask {
            spec: spec.clone(),
            pre,
            engine: self.engine.clone(),
        }))
    }
}

fn engine_config(slots: u32) -> Config {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_core_instances(slots)
        .total_memories(slots)
        .total_tables(slots)
        .total_stacks(slots)
        .max_memory_size(roost_model::Limits::MAX_MEMORY_MB as usize * (1 << 20))
        // Keep a little of each slot resident so small guests do not fault
        // their first pages in on every call.
        .linear_memory_keep_resident(64 << 10)
        .table_keep_resident(16 << 10);
    let mut c = Config::new();
    c.epoch_interruption(true)
        .cranelift_opt_level(OptLevel::Speed)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .async_stack_size(1 << 20)
        .max_wasm_stack(512 << 10);
    c
}

fn check_module(module: &Module, spec: &TaskSpec) -> Result<(), PrepareError> {
    match module.get_export("_start") {
        Some(wasmtime::ExternType::Func(_)) => {}
        _ => return Err(PrepareError(
            "the module has no `_start` export: build it as a WASI command (a program with main)"
                .into(),
        )),
    }
    let limit = spec.limits.memory_mb as u64 * (1 << 20);
    for export in module
        .imports()
        .map(|i| i.ty())
        .chain(module.exports().map(|e| e.ty()))
    {
        if let wasmtime::ExternType::Memory(m) = export {
            let min = m.minimum().saturating_mul(m.page_size());
            if min > limit {
                return Err(PrepareError(format!(
                    "the module needs {} MiB of memory at start but memory_mb is {}",
                    min >> 20,
                    spec.limits.memory_mb
                )));
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Runtime for WasmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Wasm
    }
    async fn prepare(&self, spec: &TaskSpec) -> Result<Arc<dyn PreparedTask>, PrepareError> {
        Ok(self.prepare_wasm(spec)?)
    }

    /// Drops the in-memory modules no deployed task runs (the compiled
    /// artifacts on disk stay, for a later deployment of the same code).
    fn retain_only(&self, live: &[&TaskSpec]) {
        let live: std::collections::HashSet<&str> = live
            .iter()
            .filter_map(|s| match &s.code {
                TaskCode::Wasm { sha256, .. } => Some(sha256.as_str()),
                _ => None,
            })
            .collect();
        self.cache.retain(&|sha| live.contains(sha));
    }
}

/// A compiled, pre-linked wasm task.
pub struct WasmTask {
    spec: TaskSpec,
    pre: InstancePre<CallState>,
    engine: Engine,
}

#[async_trait]
impl PreparedTask for WasmTask {
    fn spec(&self) -> &TaskSpec {
        &self.spec
    }
    async fn instance(&self) -> Result<Box<dyn Instance>, Failure> {
        Ok(Box::new(WasmInstance {
            pre: self.pre.clone(),
            engine: self.engine.clone(),
            spec: self.spec.clone(),
        }))
    }
}

/// A call's instance; the store is created fresh in `invoke`, so calls share
/// nothing.
struct WasmInstance {
    pre: InstancePre<CallState>,
    engine: Engine,
    spec: TaskSpec,
}

impl WasmTask {
    /// Instantiates without running anything: what each call pays before the
    /// guest's `_start` (for the instantiation benchmark).
    pub async fn instantiate_only(&self) -> Result<(), Failure> {
        let (mut store, _, _, _) =
            new_store(&self.engine, &self.spec, Bytes::new(), Vec::new(), None)?;
        self.pre.instantiate_async(&mut store).await.map_err(|e| {
            Failure::new(FailureCode::Crashed, format!("instantiation failed: {e}"))
        })?;
        Ok(())
    }
}

type NewStore = (
    Store<CallState>,
    MemoryOutputPipe,
    MemoryOutputPipe,
    Arc<AtomicBool>,
);

fn new_store(
    engine: &Engine,
    spec: &TaskSpec,
    input: Bytes,
    extra_env: Vec<(String, String)>,
    context: Option<roost_runtime::CallContext>,
) -> Result<NewStore, Failure> {
    let stdout = MemoryOutputPipe::new(MAX_OUTPUT_BYTES);
    let stderr = MemoryOutputPipe::new(MAX_STDERR_BYTES);
    let mut b = WasiCtxBuilder::new();
    b.stdin(MemoryInputPipe::new(input))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .args(&[spec.name.as_str()]);
    for (k, v) in &spec.env {
        b.env(k, v);
    }
    for (k, v) in &extra_env {
        b.env(k, v);
    }
    for r in &spec.resources {
        let perms = match r.access {
            Access::Ro => FsPerms::ReadOnly,
            Access::Rw => FsPerms::ReadWrite,
        };
        b.preopened_dir(&r.source, &r.path, perms).map_err(|e| {
            Failure::new(
                FailureCode::Crashed,
                format!("cannot open resource {}: {e}", r.source.display()),
            )
        })?;
    }
    let hit = Arc::new(AtomicBool::new(false));
    let state = CallState {
        wasi: b.build_p1(),
        limiter: MemoryLimiter {
            max_bytes: spec.limits.memory_mb as usize * (1 << 20),
            hit: hit.clone(),
        },
        host: host::HostState::new(context),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    Ok((store, stdout, stderr, hit))
}

#[async_trait]
impl Instance for WasmInstance {
    async fn invoke(&mut self, inv: Invocation) -> Result<Bytes, Failure> {
        let context = inv.context.clone();
        let (mut store, stdout, stderr, memory_hit) = new_store(
            &self.engine,
            &self.spec,
            inv.input,
            inv.env,
            Some(inv.context),
        )?;
        let deadline = Instant::now() + inv.timeout;
        let timed_out = Arc::new(AtomicBool::new(false));
        {
            let timed_out = timed_out.clone();
            store.epoch_deadline_callback(move |_| {
                if Instant::now() >= deadline {
                    timed_out.store(true, Ordering::Relaxed);
                    Ok(UpdateDeadline::Interrupt)
                } else {
                    Ok(UpdateDeadline::YieldCustom(
                        1,
                        Box::pin(tokio::task::yield_now()),
                    ))
                }
            });
        }
        store.set_epoch_deadline(1);
        let pre = self.pre.clone();
        let run = async {
            let instance = pre.instantiate_async(&mut store).await?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await
        };
        let result = tokio::time::timeout(inv.timeout, run).await;
        drop(store);

        let err_lines = stderr.contents();
        if !err_lines.is_empty() {
            for line in String::from_utf8_lossy(&err_lines).lines() {
                context
                    .logs
                    .line(&self.spec.name, inv.call_id.as_str(), line);
            }
        }
        let outcome = match result {
            Err(_elapsed) => return Err(timeout_failure(&self.spec)),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => match e.downcast_ref::<I32Exit>() {
                Some(I32Exit(0)) => Ok(()),
                Some(I32Exit(n)) => Err((format!("the task exited with status {n}"), false)),
                None => {
                    let trap = e.downcast_ref::<Trap>().copied();
                    if timed_out.load(Ordering::Relaxed) || trap == Some(Trap::Interrupt) {
                        return Err(timeout_failure(&self.spec));
                    }
                    Err((format!("the task trapped: {}", root_cause(&e)), true))
                }
            },
        };
        match outcome {
            Ok(()) => Ok(stdout.contents()),
            Err((message, _trapped)) => {
                if memory_hit.load(Ordering::Relaxed) {
                    Err(Failure::new(
                        FailureCode::MemoryLimit,
                        format!(
                            "the task tried to grow its memory past memory_mb = {} ({message})",
                            self.spec.limits.memory_mb
                        ),
                    ))
                } else if stdout.contents().len() >= MAX_OUTPUT_BYTES {
                    Err(Failure::new(
                        FailureCode::TaskError,
                        format!(
                            "the task's output is larger than {} MiB",
                            MAX_OUTPUT_BYTES >> 20
                        ),
                    ))
                } else {
                    Err(Failure::new(FailureCode::TaskError, message))
                }
            }
        }
    }
}

fn timeout_failure(spec: &TaskSpec) -> Failure {
    Failure::new(
        FailureCode::Timeout,
        format!(
            "the task ran longer than timeout_ms = {}",
            spec.limits.timeout_ms
        ),
    )
}

fn root_cause(e: &wasmtime::Error) -> String {
    let mut s = e.to_string();
    if let Some(t) = e.downcast_ref::<Trap>() {
        s = t.to_string();
    }
    s
}
