"""Cluster mode on Ray Serve: one ingress (the same HTTP API), engine replicas, one shared adapter store.

``settings`` the flags; ``state`` the actor that carries evictions to replicas and their residency back;
``replica`` the engine deployment; ``router`` the adapter-affinity request router; ``remote`` the ingress's
view of the replicas (an engine and a residency for the HTTP routes); ``ingress`` the app; ``launch`` starts
it all; ``__main__`` is ``loramux-cluster``.
"""
