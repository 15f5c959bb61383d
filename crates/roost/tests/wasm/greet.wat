;; greet.wat — calls the task "echo" through roost.call with its own stdin as
;; input, then writes "hello, " + the callee's output to stdout.
;; On a failed call (negative result) it writes "call failed: <message>\n" to
;; stderr and exits 1.
;; Test purpose: task-to-task calls (roost.call + roost.result_read), including
;; passing a multi-MiB input through and streaming a large result back.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "roost" "call" (func $call (param i32 i32 i32 i32) (result i64)))
  (import "roost" "result_read" (func $result_read (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; layout: 0 iovec, 8 nread/nwritten, 16 "echo", 32 "hello, ",
  ;;         48 "call failed: ", 64 "\n", 65536.. stdin (grows), later reused
  ;;         as the 64 KiB result chunk buffer
  (data (i32.const 16) "echo")
  (data (i32.const 32) "hello, ")
  (data (i32.const 48) "call failed: ")
  (data (i32.const 64) "\n")

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

  ;; read all of stdin to 65536.., growing memory as needed; returns length
  (func $read_stdin (result i32)
    (local $p i32) (local $n i32)
    (local.set $p (i32.const 65536))
    (block $eof
      (loop $chunk
        ;; keep at least 64 KiB of room after $p
        (if (i32.gt_u (i32.add (i32.shr_u (local.get $p) (i32.const 16)) (i32.const 2))
                      (memory.size))
          (then (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1))
                  (then unreachable))))
        (i32.store (i32.const 0) (local.get $p))
        (i32.store (i32.const 4) (i32.const 65536))
        (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
          (then unreachable))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $n)))
        (local.set $p (i32.add (local.get $p) (local.get $n)))
        (br $chunk)))
    (i32.sub (local.get $p) (i32.const 65536)))

  ;; stream the last call's result to fd in 64 KiB chunks
  (func $copy_result (param $fd i32)
    (local $n i32)
    (block $done
      (loop $chunk
        (local.set $n (call $result_read (i32.const 65536) (i32.const 65536)))
        (br_if $done (i32.eqz (local.get $n)))
        (call $write_all (local.get $fd) (i32.const 65536) (local.get $n))
        (br $chunk))))

  (func (export "_start")
    (local $len i32)
    (local.set $len (call $read_stdin))
    (if (i64.lt_s (call $call (i32.const 16) (i32.const 4) (i32.const 65536) (local.get $len))
                  (i64.const 0))
      (then
        (call $write_all (i32.const 2) (i32.const 48) (i32.const 13))
        (call $copy_result (i32.const 2))
        (call $write_all (i32.const 2) (i32.const 64) (i32.const 1))
        (call $proc_exit (i32.const 1))))
    (call $write_all (i32.const 1) (i32.const 32) (i32.const 7))
    (call $copy_result (i32.const 1)))
)
