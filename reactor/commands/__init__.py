"""One module per `reactor` subcommand: ``add_arguments(parser)`` and ``run(args)``."""
