"""Migrations added after ``0002_rollouts``, one module each (``mNNNN_<name>.py``: a Python
module name cannot start with a digit), each with its ``NAME`` and ``upgrade(conn)``.

:data:`fleet_server.db.engine.MIGRATIONS` lists them in order with the older ones, and
:func:`fleet_server.db.engine.migrate` applies each together with its bookkeeping row in one
transaction.
"""
