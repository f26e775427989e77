"""fleetctl: the operator's CLI for a pagefleet fleet (replicas behind NGINX with TLS).

What each module owns is in ARCHITECTURE.md, section fleetctl: cli (commands), config
(FleetConfig), state (the state dir, update ownership), fleet (start/stop/rotation, the one NGINX
commit), lifecycle (up, converge, down), health (the watcher), rollout and backend_update (rolling
updates), probe, nginx, status, output, render, tls, procs, backends/ (local, docker, swarm).
"""
