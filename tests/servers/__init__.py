"""Real servers (nginx, Envoy, etcd, Nacos) started as local processes for the tests.

Each fixture binds loopback only, on ports picked by `free_port`, with its data in a temp dir.
"""
