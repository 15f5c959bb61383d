;; loop.wat — spins forever in a tight loop with no host calls.
;; Test purpose: the hub's timeout must interrupt pure guest code
;; (epoch/fuel interruption), not just code that is blocked in a host call.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $spin (br $spin)))
)
