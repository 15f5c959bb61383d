;; env.wat — writes the value of env var GREETING to stdout (no newline), or
;; "none" when it is unset.
;; Test purpose: per-task environment variables from the hub's task config
;; reach the guest through environ_get.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; layout: 0 iovec, 8 nwritten, 12 env count, 16 env buf size,
  ;;         32 "GREETING=", 48 "none", 65536.. environ pointers + strings
  (data (i32.const 32) "GREETING=")
  (data (i32.const 48) "none")

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

  ;; find env var whose "NAME=" prefix is [key, key+klen); returns (ptr, len)
  ;; of its value, or (0, 0) when unset
  (func $find_env (param $key i32) (param $klen i32) (result i32 i32)
    (local $count i32) (local $pages i32) (local $i i32) (local $s i32) (local $j i32)
    (if (call $environ_sizes_get (i32.const 12) (i32.const 16)) (then unreachable))
    (local.set $count (i32.load (i32.const 12)))
    ;; pages needed for 65536 + count*4 + bufsize
    (local.set $pages
      (i32.shr_u (i32.add (i32.add (i32.const 131071)
                                   (i32.shl (local.get $count) (i32.const 2)))
                          (i32.load (i32.const 16)))
                 (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
              (then unreachable))))
    (if (call $environ_get (i32.const 65536)
              (i32.add (i32.const 65536) (i32.shl (local.get $count) (i32.const 2))))
      (then unreachable))
    (block $notfound
      (loop $entry
        (br_if $notfound (i32.ge_u (local.get $i) (local.get $count)))
        (local.set $s (i32.load (i32.add (i32.const 65536) (i32.shl (local.get $i) (i32.const 2)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        ;; compare prefix (a NUL in the entry mismatches, so no overrun)
        (local.set $j (i32.const 0))
        (block $match
          (loop $cmp
            (br_if $match (i32.eq (local.get $j) (local.get $klen)))
            (br_if $entry (i32.ne (i32.load8_u (i32.add (local.get $s) (local.get $j)))
                                  (i32.load8_u (i32.add (local.get $key) (local.get $j)))))
            (local.set $j (i32.add (local.get $j) (i32.const 1)))
            (br $cmp)))
        ;; value = s+klen up to the NUL
        (local.set $s (i32.add (local.get $s) (local.get $klen)))
        (local.set $j (i32.const 0))
        (loop $len
          (if (i32.load8_u (i32.add (local.get $s) (local.get $j)))
            (then (local.set $j (i32.add (local.get $j) (i32.const 1)))
                  (br $len))))
        (return (local.get $s) (local.get $j))))
    (i32.const 0) (i32.const 0))

  (func (export "_start")
    (local $v i32) (local $vlen i32)
    (call $find_env (i32.const 32) (i32.const 9))
    (local.set $vlen)
    (local.set $v)
    (if (i32.eqz (local.get $v))
      (then (local.set $v (i32.const 48)) (local.set $vlen (i32.const 4))))
    (call $write_all (i32.const 1) (local.get $v) (local.get $vlen)))
)
