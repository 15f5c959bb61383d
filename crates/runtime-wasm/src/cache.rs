//! Compiled modules, once per code hash.
//!
//! In memory, one `Module` per code hash is shared by every task and
//! instance that runs that code (MISSION row 12). On disk, the compiled
//! artifact is kept under the data dir so a restart does not recompile.
//! Loading a precompiled artifact trusts it completely, so the file name
//! carries everything it depends on: the code's SHA-256, the wasmtime
//! version, and the engine's compatibility hash (target, tunables, features).

use parking_lot::Mutex;
use roost_runtime::PrepareError;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::{Engine, Module};

pub struct ModuleCache {
    dir: PathBuf,
    engine_key: String,
    loaded: Mutex<HashMap<String, Module>>,
}

impl ModuleCache {
    pub fn new(dir: PathBuf, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut h = DefaultHasher::new();
        env!("CARGO_PKG_VERSION").hash(&mut h);
        wasmtime_version().hash(&mut h);
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self {
            dir,
            engine_key: format!("{:016x}", h.finish()),
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// The on-disk artifact for a code hash under this engine.
    pub fn artifact_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// Modules currently loaded (each shared by all tasks with that code).
    pub fn loaded_count(&self) -> usize {
        self.loaded.lock().len()
    }

    /// Drops in-memory modules no live task uses; the disk cache stays.
    pub fn retain(&self, keep: &dyn Fn(&str) -> bool) {
        self.loaded.lock().retain(|k, _| keep(k));
    }

    pub fn load_or_compile(
        &self,
        engine: &Engine,
        sha256: &str,
        code: &Path,
    ) -> Result<Module, PrepareError> {
        if let Some(m) = self.loaded.lock().get(sha256) {
            return Ok(m.clone());
        }
        let artifact = self.artifact_path(sha256);
        if artifact.exists() {
            // SAFETY: the artifact was written by `compile_and_store` below with
            // this exact engine configuration (the name encodes it) and is
            // only ever replaced atomically by rename, so it is a complete
            // output of `Module::serialize` from a compatible engine.
            match unsafe { Module::deserialize_file(engine, &artifact) } {
                Ok(m) => {
                    tracing::debug!(%sha256, "loaded compiled module from cache");
                    self.loaded.lock().insert(sha256.to_owned(), m.clone());
                    return Ok(m);
                }
                Err(e) => {
                    tracing::warn!(%sha256, error = %e, "cached module unusable; recompiling");
                    let _ = std::fs::remove_file(&artifact);
                }
            }
        }
        let m = self.compile_and_store(engine, sha256, code, &artifact)?;
        self.loaded.lock().insert(sha256.to_owned(), m.clone());
        Ok(m)
    }

    fn compile_and_store(
        &self,
        engine: &Engine,
        sha256: &str,
        code: &Path,
        artifact: &Path,
    ) -> Result<Module, PrepareError> {
        let bytes = std::fs::read(code)
            .map_err(|e| PrepareError(format!("cannot read {}: {e}", code.display())))?;
        let started = std::time::Instant::now();
        let module = Module::new(engine, &bytes).map_err(|e| {
            PrepareError(format!(
                "not a valid WebAssembly module: {}",
                first_line(&e.to_string())
            ))
        })?;
        tracing::info!(%sha256, ms = started.elapsed().as_millis() as u64, "compiled wasm module");
        match module.serialize() {
            Ok(bytes) => {
                let tmp = artifact.with_extension(format!("tmp{}", std::process::id()));
                let written = std::fs::write(&tmp, &bytes)
                    .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                    .and_then(|_| std::fs::rename(&tmp, artifact));
                if let Err(e) = written {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::warn!(error = %e, "cannot cache the compiled module; it will be compiled again after a restart");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot serialize the compiled module"),
        }
        Ok(module)
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_owned()
}

fn wasmtime_version() -> &'static str {
    // Bumped together with the wasmtime dependency; the engine compatibility
    // hash covers the rest.
    "48"
}
