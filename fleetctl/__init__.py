"""fleetctl: the operator's CLI for a pagefleet fleet (replicas behind NGINX with TLS).

Modules: cli (commands), config (FleetConfig), state (the state dir), fleet (start/stop/rotation),
lifecycle (up, converge, down), health (the watcher), status, render, nginx, tls, probe,
backends/ (local, docker, swarm: one interface).
"""
