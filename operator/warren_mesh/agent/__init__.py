"""The node agent: a pipeline (observe -> decide -> plan -> apply -> report) around the pure mesh logic of
``warren_mesh.mesh``, the registrar as the one writer of this node's keys, and background loops with a name each.
"""
