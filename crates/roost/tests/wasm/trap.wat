;; trap.wat — executes `unreachable` immediately.
;; Test purpose: a guest trap must fail the call (reported as crashed).
(module
  (memory (export "memory") 1)
  (func (export "_start")
    unreachable)
)
