"""Imported first by the local workers' fork server: no garbage collection while it imports
the stack (see :mod:`flows.startup`; :mod:`flows._preload_end` comes last).
"""

from flows.startup import pause_collection

pause_collection()
