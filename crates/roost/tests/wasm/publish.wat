;; publish: publishes its input to the topic "out/published" through the
;; hub's `roost.publish` import, then answers "published". On failure it
;; writes the reason (from `roost.result_read`) to stderr and exits 1.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (import "roost" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (import "roost" "result_read" (func $result_read (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 64) "out/published")
  (data (i32.const 96) "published")
  ;; 0..8 iovec; 8 count; 1024.. input (up to 64 KiB)
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (local $len i32) (local $n i32)
    (block $done
      (loop $read
        (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $len)))
        (i32.store (i32.const 4) (i32.sub (i32.const 65536) (local.get $len)))
        (br_if $done (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $len (i32.add (local.get $len) (i32.load (i32.const 8))))
        (br_if $done (i32.ge_u (local.get $len) (i32.const 65536)))
        (br $read)))
    (if (i32.lt_s (call $publish (i32.const 64) (i32.const 13) (i32.const 1024) (local.get $len)) (i32.const 0))
      (then
        (local.set $n (call $result_read (i32.const 70000) (i32.const 4096)))
        (call $write (i32.const 2) (i32.const 70000) (local.get $n))
        (call $exit (i32.const 1))))
    (call $write (i32.const 1) (i32.const 96) (i32.const 9))))
