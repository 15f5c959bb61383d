;; clock.wat — writes clock_time_get(CLOCK_REALTIME) nanoseconds to stdout as a
;; decimal number (no newline).
;; Test purpose: the wall clock is wired through to guests, so a test can
;; check the printed value is near the host's current time.
(module
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; layout: 0 iovec, 8 nwritten, 16 time (u64), 32..64 digit buffer (filled backwards)

  (func (export "_start")
    (local $t i64) (local $p i32)
    (if (call $clock_time_get (i32.const 0) (i64.const 1) (i32.const 16))
      (then unreachable))
    (local.set $t (i64.load (i32.const 16)))
    (local.set $p (i32.const 64))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $t) (i64.const 10)))))
      (local.set $t (i64.div_u (local.get $t) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $t) (i64.const 0))))
    (i32.store (i32.const 0) (local.get $p))
    (i32.store (i32.const 4) (i32.sub (i32.const 64) (local.get $p)))
    (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))
      (then unreachable)))
)
