"""What happens to the model: load, prune, adapt, train, export, generate.

Never imports textual, zeroconf or sockets."""
