//! The `roost` host imports: how a wasm task calls another task.
//!
//! ```text
//! (import "roost" "call" (func (param i32 i32 i32 i32) (result i64)))
//!     ;; call(task_ptr, task_len, input_ptr, input_len)
//!     ;; >= 0: the callee succeeded; the value is its output's length
//!     ;;  < 0: the call failed; -code (see `status_of`), and the result
//!     ;;       holds the error message
//! (import "roost" "result_read" (func (param i32 i32) (result i32)))
//!     ;; result_read(ptr, len): copies the next bytes of the last result
//!     ;; into memory, returns how many were copied (0 once all were read)
//! (import "roost" "publish" (func (param i32 i32 i32 i32) (result i32)))
//!     ;; publish(topic_ptr, topic_len, payload_ptr, payload_len)
//!     ;; 0: published (QoS 1) through the hub's MQTT broker
//!     ;; < 0: failed; the result holds why (-100 bad arguments or topic,
//!     ;;      -8 not granted by the task's allow.publish)
//! ```
//! The callee runs synchronously through the hub's communications manager,
//! exactly like an HTTP call, on the caller's reservation.

use crate::CallState;
use bytes::Bytes;
use roost_model::FailureCode;
use roost_runtime::CallContext;
use wasmtime::{Caller, Extern, Linker};

/// Bad pointers, lengths or a task name that is not UTF-8.
pub const STATUS_BAD_ARGUMENTS: i64 = -100;

pub(crate) struct HostState {
    context: Option<CallContext>,
    result: Bytes,
    read: usize,
}

impl HostState {
    pub(crate) fn new(context: Option<CallContext>) -> Self {
        Self {
            context,
            result: Bytes::new(),
            read: 0,
        }
    }
    fn set_result(&mut self, b: Bytes) {
        self.result = b;
        self.read = 0;
    }
}

/// The negative status a failed nested call returns to the guest.
pub fn status_of(code: FailureCode) -> i64 {
    -(match code {
        FailureCode::UnknownTask => 1,
        FailureCode::TaskError => 2,
        FailureCode::MemoryLimit => 3,
        FailureCode::Timeout => 4,
        FailureCode::Crashed => 5,
        FailureCode::CallDepth => 6,
        FailureCode::Unavailable => 7,
        FailureCode::Forbidden => 8,
    })
}

fn read_guest(caller: &mut Caller<'_, CallState>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return None;
    };
    if len < 0 || ptr < 0 || len as usize > crate::MAX_OUTPUT_BYTES {
        return None;
    }
    let mut buf = vec![0; len as usize];
    mem.read(&*caller, ptr as usize, &mut buf).ok()?;
    Some(buf)
}

pub(crate) fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        "roost",
        "call",
        |mut caller: Caller<'_, CallState>,
         (task_ptr, task_len, in_ptr, in_len): (i32, i32, i32, i32)| {
            Box::new(async move {
                let (Some(task), Some(input)) = (
                    read_guest(&mut caller, task_ptr, task_len),
                    read_guest(&mut caller, in_ptr, in_len),
                ) else {
                    caller.data_mut().host.set_result(Bytes::from_static(
                        b"bad arguments: pointers or lengths outside memory",
                    ));
                    return STATUS_BAD_ARGUMENTS;
                };
                let Ok(task) = String::from_utf8(task) else {
                    caller
                        .data_mut()
                        .host
                        .set_result(Bytes::from_static(b"bad arguments: task name is not UTF-8"));
                    return STATUS_BAD_ARGUMENTS;
                };
                let Some(ctx) = caller.data().host.context.clone() else {
                    caller
                        .data_mut()
                        .host
                        .set_result(Bytes::from_static(b"calls are not available here"));
                    return status_of(FailureCode::Unavailable);
                };
                match ctx.calls.call(&ctx, &task, Bytes::from(input)).await {
                    Ok(out) => {
                        let n = out.len() as i64;
                        caller.data_mut().host.set_result(out);
                        n
                    }
                    Err(f) => {
                        let status = status_of(f.code);
                        caller
                            .data_mut()
                            .host
                            .set_result(Bytes::from(f.message.into_bytes()));
                        status
                    }
                }
            })
        },
    )?;
    linker.func_wrap_async(
        "roost",
        "publish",
        |mut caller: Caller<'_, CallState>,
         (topic_ptr, topic_len, p_ptr, p_len): (i32, i32, i32, i32)| {
            Box::new(async move {
                let (Some(topic), Some(payload)) = (
                    read_guest(&mut caller, topic_ptr, topic_len),
                    read_guest(&mut caller, p_ptr, p_len),
                ) else {
                    caller.data_mut().host.set_result(Bytes::from_static(
                        b"bad arguments: pointers or lengths outside memory",
                    ));
                    return STATUS_BAD_ARGUMENTS as i32;
                };
                let Ok(topic) = String::from_utf8(topic) else {
                    caller
                        .data_mut()
                        .host
                        .set_result(Bytes::from_static(b"bad arguments: topic is not UTF-8"));
                    return STATUS_BAD_ARGUMENTS as i32;
                };
                let Some(ctx) = caller.data().host.context.clone() else {
                    caller
                        .data_mut()
                        .host
                        .set_result(Bytes::from_static(b"publishing is not available here"));
                    return status_of(FailureCode::Unavailable) as i32;
                };
                match ctx.calls.publish(&ctx, &topic, Bytes::from(payload)).await {
                    Ok(()) => 0,
                    Err(f) => {
                        let status = if f.code == FailureCode::TaskError {
                            STATUS_BAD_ARGUMENTS
                        } else {
                            status_of(f.code)
                        };
                        caller
                            .data_mut()
                            .host
                            .set_result(Bytes::from(f.message.into_bytes()));
                        status as i32
                    }
                }
            })
        },
    )?;
    linker.func_wrap(
        "roost",
        "result_read",
        |mut caller: Caller<'_, CallState>, ptr: i32, len: i32| -> i32 {
            let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
                return -1;
            };
            if ptr < 0 || len < 0 {
                return -1;
            }
            let h = &caller.data().host;
            let n = (len as usize).min(h.result.len() - h.read);
            let chunk = h.result.slice(h.read..h.read + n);
            if mem.write(&mut caller, ptr as usize, &chunk).is_err() {
                return -1;
            }
            caller.data_mut().host.read += n;
            n as i32
        },
    )?;
    Ok(())
}
