"""Shared foundations of every room: where state lives, configuration, errors.

Nothing here imports torch, textual, zeroconf or sockets.
"""
