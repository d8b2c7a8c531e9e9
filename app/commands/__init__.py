"""One module per `hearth` sub-command: `register(subparsers)` adds it, `run(args)` runs it."""
