"""`edu-prm` subcommands: one module per command, each with `DESCRIPTION` and `run(config, workdir)`."""
