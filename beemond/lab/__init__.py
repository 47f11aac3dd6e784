"""The lab side: ingest bundles into a data tree, and report on it. Imports only the bundle format,
crypto and archive helpers, never a device-side worker."""
