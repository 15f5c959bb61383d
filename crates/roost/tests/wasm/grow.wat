;; grow.wat — grows memory by 16 pages (1 MiB) at a time forever; traps with
;; `unreachable` once memory.grow returns -1.
;; Test purpose: the hub's per-call memory limit must stop growth (grow fails
;; or the store limiter errors) and the call must fail as a memory-limit error.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $again
      (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1))
        (then unreachable))
      (br $again)))
)
