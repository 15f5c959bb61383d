;; sleep.wat — reads stdin as a decimal number of milliseconds (empty = 100),
;; sleeps that long with poll_oneoff on a relative CLOCK_MONOTONIC timer, then
;; writes "slept\n" to stdout.
;; Test purpose: a guest blocked in a host call (not spinning) must still be
;; cut off by the hub's timeout; short sleeps must succeed.
;; Non-digit bytes (whitespace, newline) are ignored.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; layout: 0 iovec, 8 nread/nwritten/nevents, 16 "slept\n",
  ;;         64 subscription (48 bytes), 128 event (32 bytes), 1024.. read buffer
  (data (i32.const 16) "slept\n")

  (func (export "_start")
    (local $ms i64) (local $digits i32) (local $n i32) (local $i i32) (local $c i32)
    ;; read stdin to EOF in 1 KiB chunks, accumulating decimal digits
    (block $eof
      (loop $chunk
        (i32.store (i32.const 0) (i32.const 1024))
        (i32.store (i32.const 4) (i32.const 1024))
        (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
          (then unreachable))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $n)))
        (local.set $i (i32.const 0))
        (block $end
          (loop $byte
            (br_if $end (i32.ge_u (local.get $i) (local.get $n)))
            (local.set $c (i32.sub (i32.load8_u (i32.add (i32.const 1024) (local.get $i)))
                                   (i32.const 48)))
            (if (i32.lt_u (local.get $c) (i32.const 10))
              (then
                (local.set $ms (i64.add (i64.mul (local.get $ms) (i64.const 10))
                                        (i64.extend_i32_u (local.get $c))))
                (local.set $digits (i32.const 1))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $byte)))
        (br $chunk)))
    (if (i32.eqz (local.get $digits)) (then (local.set $ms (i64.const 100))))

    ;; subscription: userdata=0, tag=0 (clock), clock id=1 (monotonic),
    ;; timeout=ms*1e6 ns, precision=0, flags=0 (relative)
    (i64.store (i32.const 64) (i64.const 0))
    (i64.store (i32.const 72) (i64.const 0))          ;; tag + padding
    (i64.store (i32.const 80) (i64.const 1))          ;; id (u32) + padding
    (i64.store (i32.const 88) (i64.mul (local.get $ms) (i64.const 1000000)))
    (i64.store (i32.const 96) (i64.const 0))          ;; precision
    (i64.store (i32.const 104) (i64.const 0))         ;; flags + padding
    (if (call $poll_oneoff (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 8))
      (then unreachable))
    ;; event.error (u16 at offset 8) must be 0
    (if (i32.load16_u (i32.const 136)) (then unreachable))

    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))
      (then unreachable)))
)
