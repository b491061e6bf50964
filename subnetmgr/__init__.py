"""Subnet leases in etcd, in flannel's layout: config, acquisition, renewal, reservations, mirror.

Knows etcd and flannel's formats, and nothing of the kernel.
"""
