;; readfile.wat — opens "input.txt" in the first preopened directory (fd 3)
;; read-only and copies it to stdout. If path_open fails it writes
;; "no access\n" to stdout and exits 2.
;; Test purpose: the hub's per-task directory grants (preopens) work, and a
;; task without a grant cannot read files.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 2)
  ;; layout: 0 iovec, 8 nread/nwritten, 12 opened fd, 16 "input.txt",
  ;;         32 "no access\n", 65536.. 64 KiB chunk buffer
  (data (i32.const 16) "input.txt")
  (data (i32.const 32) "no access\n")

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
    (local $fd i32) (local $n i32)
    ;; dirfd 3, no lookup flags, no oflags, rights = fd_read (1<<1)
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 9)
                         (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0)
                         (i32.const 12))
      (then
        (call $write_all (i32.const 1) (i32.const 32) (i32.const 10))
        (call $proc_exit (i32.const 2))))
    (local.set $fd (i32.load (i32.const 12)))
    (block $eof
      (loop $chunk
        (i32.store (i32.const 0) (i32.const 65536))
        (i32.store (i32.const 4) (i32.const 65536))
        (if (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
          (then unreachable))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $n)))
        (call $write_all (i32.const 1) (i32.const 65536) (local.get $n))
        (br $chunk)))
    (drop (call $fd_close (local.get $fd))))
)
