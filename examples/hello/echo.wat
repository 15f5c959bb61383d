;; echo: copies its input (stdin) to its output (stdout). The simplest task.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; 0..8: iovec {buf, len}; 8: bytes read/written; 1024..: a 64 KiB buffer
  (func (export "_start")
    (local $n i32) (local $off i32)
    (block $done
      (loop $read
        (i32.store (i32.const 0) (i32.const 1024))
        (i32.store (i32.const 4) (i32.const 65536))
        (br_if $done (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $off (i32.const 1024))
        ;; write until the whole chunk is out (writes may be short)
        (loop $write
          (i32.store (i32.const 0) (local.get $off))
          (i32.store (i32.const 4) (local.get $n))
          (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))
            (then unreachable))
          (local.set $off (i32.add (local.get $off) (i32.load (i32.const 8))))
          (local.set $n (i32.sub (local.get $n) (i32.load (i32.const 8))))
          (br_if $write (i32.gt_s (local.get $n) (i32.const 0))))
        (br $read)))))
