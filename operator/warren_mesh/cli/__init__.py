"""Command line: ``warren-mesh agent | operator | status | demo | lab (up | status | exec | ping | down) | ...``.

main.py parses and dispatches (one line per command); each command group lives in a module of its own (agent,
admin, services, lab) and opens etcd one way (stores.py). Errors a user can cause (a bad flag, an unreadable key
file, a name taken by another node, etcd away when a one-shot command needs it) end in one line naming the fix
and a non-zero exit, never a traceback.
"""
