"""`make bench`: our gateway side by side with its peers, on the same load, in the same run.

Peers (direct, haproxy, the seed's Go gateway, asyncio streams/protocol, uvloop, reactor)
each forward to the same three C echo backends; a C load generator drives pingpong, bulk,
churn and idle workloads. The proxy is pinned to CPU 0, the load side to CPU 1, and every
figure is reported with the proxy's own CPU time so it holds even when the load side is
the bottleneck. See the README, "Performance".
"""
