"""The daemon's main process: supervision of the workers (orchestrator), their states and restart
policy (state), config reload (reload), the /metrics endpoint (metrics) and the status socket (status).

Never imports a worker implementation: workers are named through :mod:`beemond.registry`."""
