"""Upload of sealed bundles from the outbox: :mod:`.uploader` (the worker), :mod:`.transport` (what
every transport shares), one module per transport (:mod:`.ftp`, :mod:`.sftp`, :mod:`.s3`, :mod:`.local`,
named in :data:`beemond.registry.UPLOADS`) and :mod:`.backlog` (``beemond upload --backlog``).

Nothing is imported here, so that importing a transport does not import the others.
"""
