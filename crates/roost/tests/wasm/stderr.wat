;; stderr.wat — writes "line one\nline two\nline three\n" to stderr, "ok" to
;; stdout, and exits 0.
;; Test purpose: stderr lines are forwarded to the hub log (one entry per line)
;; while stdout stays the call's output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; layout: 0 iovec, 8 nwritten, 16 stderr text (29 bytes), 64 stdout text
  (data (i32.const 16) "line one\nline two\nline three\n")
  (data (i32.const 64) "ok")

  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (if (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
          (then unreachable))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more))))

  (func (export "_start")
    (call $write_all (i32.const 2) (i32.const 16) (i32.const 29))
    (call $write_all (i32.const 1) (i32.const 64) (i32.const 2)))
)
