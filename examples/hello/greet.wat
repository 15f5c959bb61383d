;; greet: calls the task "echo" with its own input through the hub's
;; `roost.call` import and answers "hello, " + what echo returned. Shows one
;; task calling another (intra-task communication).
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (import "roost" "call" (func $call (param i32 i32 i32 i32) (result i64)))
  (import "roost" "result_read" (func $result_read (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 64) "echo")
  (data (i32.const 80) "hello, ")
  (data (i32.const 96) "call failed: ")
  ;; 0..8 iovec; 8 count; 1024..33792 input (up to 32 KiB); 33792.. result
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (loop $more
      (if (i32.gt_s (local.get $len) (i32.const 0))
        (then
          (i32.store (i32.const 0) (local.get $ptr))
          (i32.store (i32.const 4) (local.get $len))
          (if (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
            (then unreachable))
          (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
          (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
          (br $more)))))
  (func $copy_result (param $fd i32)
    (local $n i32)
    (loop $more
      (local.set $n (call $result_read (i32.const 33792) (i32.const 32768)))
      (if (i32.gt_s (local.get $n) (i32.const 0))
        (then
          (call $write (local.get $fd) (i32.const 33792) (local.get $n))
          (br $more)))))
  (func (export "_start")
    (local $len i32) (local $status i64)
    ;; read the input (at most 32 KiB; enough for a greeting)
    (block $done
      (loop $read
        (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $len)))
        (i32.store (i32.const 4) (i32.sub (i32.const 32768) (local.get $len)))
        (br_if $done (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $len (i32.add (local.get $len) (i32.load (i32.const 8))))
        (br_if $done (i32.ge_u (local.get $len) (i32.const 32768)))
        (br $read)))
    (local.set $status (call $call (i32.const 64) (i32.const 4) (i32.const 1024) (local.get $len)))
    (if (i64.lt_s (local.get $status) (i64.const 0))
      (then
        (call $write (i32.const 2) (i32.const 96) (i32.const 13))
        (call $copy_result (i32.const 2))
        (call $exit (i32.const 1))))
    (call $write (i32.const 1) (i32.const 80) (i32.const 7))
    (call $copy_result (i32.const 1))))
