"""The command line, on top of everything else: `fragile run|validate|query|report|submit|status|...`.

It is the only layer that may import every other one: `cluster/` (Ray, Tune, Jobs, the local cluster) uses
`jobs/` (spec, plan, protocol, task bodies, statistics, report), which uses `influence/` and `storage/`.
"""
