"""Imported last by the orchestrator's forkserver: freeze what the preloaded modules allocated.

The forkserver imports the modules most workers share (``Orchestrator`` chooses them from the config)
and then forks every worker from itself, so those pages start out shared. Two things unshare a page:
a write to an object's reference count, and the cyclic garbage collector, which writes into the header
of every tracked object it examines. ``gc.freeze()`` (Python 3.7+, gc docs: "freeze all the objects
tracked by gc - move them to a permanent generation and ignore them for all the future collections")
moves everything allocated so far out of the collector's reach in the forkserver and therefore in each
child, so a worker's collections leave the shared pages alone. The imports' freed memory then goes back
to the kernel (``malloc_trim``) before any child inherits it. Measured with bench/footprint.py.
"""

import gc

from beemond.ipc import trim_heap

gc.freeze()
trim_heap()
