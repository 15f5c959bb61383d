;; recurse.wat — calls the task named by env var TARGET (default "recurse")
;; with input "x"; every instance does the same, so calls nest until the hub
;; refuses one. On a negative result it writes
;;   "depth error <code> <message>"      e.g. "depth error -6 call depth exceeded"
;; to stdout and exits 0; on success it copies the callee's output to stdout,
;; so the deepest instance's text bubbles up to the top-level caller.
;; Test purpose: the hub bounds call nesting depth (-6) and error text flows
;; back through result_read.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (import "roost" "call" (func $call (param i32 i32 i32 i32) (result i64)))
  (import "roost" "result_read" (func $result_read (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; layout: 0 iovec, 8 nwritten, 12 env count, 16 env buf size,
  ;;         32 "TARGET=", 48 "recurse", 64 "x", 80 "depth error ", 96 " ",
  ;;         128..160 digit buffer, 65536.. environ pointers + strings
  ;;         (after the call this area is reused as the result chunk buffer)
  (data (i32.const 32) "TARGET=")
  (data (i32.const 48) "recurse")
  (data (i32.const 64) "x")
  (data (i32.const 80) "depth error ")
  (data (i32.const 96) " ")

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

  (func $copy_result (param $fd i32)
    (local $n i32)
    (block $done
      (loop $chunk
        (local.set $n (call $result_read (i32.const 65536) (i32.const 65536)))
        (br_if $done (i32.eqz (local.get $n)))
        (call $write_all (local.get $fd) (i32.const 65536) (local.get $n))
        (br $chunk))))

  ;; write a signed i64 in decimal to fd
  (func $write_i64 (param $fd i32) (param $v i64)
    (local $p i32) (local $neg i32)
    (if (i64.lt_s (local.get $v) (i64.const 0))
      (then (local.set $neg (i32.const 1))
            (local.set $v (i64.sub (i64.const 0) (local.get $v)))))
    (local.set $p (i32.const 160))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $v) (i64.const 0))))
    (if (local.get $neg)
      (then (local.set $p (i32.sub (local.get $p) (i32.const 1)))
            (i32.store8 (local.get $p) (i32.const 45))))  ;; '-'
    (call $write_all (local.get $fd) (local.get $p) (i32.sub (i32.const 160) (local.get $p))))

  (func (export "_start")
    (local $name i32) (local $nlen i32) (local $r i64)
    (call $find_env (i32.const 32) (i32.const 7))
    (local.set $nlen)
    (local.set $name)
    (if (i32.eqz (local.get $name))
      (then (local.set $name (i32.const 48)) (local.set $nlen (i32.const 7))))
    (local.set $r (call $call (local.get $name) (local.get $nlen) (i32.const 64) (i32.const 1)))
    (if (i64.lt_s (local.get $r) (i64.const 0))
      (then
        (call $write_all (i32.const 1) (i32.const 80) (i32.const 12))
        (call $write_i64 (i32.const 1) (local.get $r))
        (call $write_all (i32.const 1) (i32.const 96) (i32.const 1))))
    (call $copy_result (i32.const 1)))
)
