"""beemond's bottom layer: what every other part may import and which imports nothing of beemond's
above it.

- :mod:`beemond.core.clock`: UTC stamps that never go backwards (:class:`Clock`), clock synchronisation,
  :class:`Backoff`;
- :mod:`beemond.core.fsio`: crash-safe files (temporary name, fsync, rename, fsync the directory);
- :mod:`beemond.core.names`: sensor and host names, safe relative record paths, sandboxed Jinja2
  filename templates (Jinja2 is imported on first render);
- :mod:`beemond.core.journal`: logging to the systemd journal or a terminal;
- :mod:`beemond.core.notify`: ``sd_notify`` for ``Type=notify`` and the watchdog.
"""
