"""What several commands share (builders, workdir paths); no command imports another command."""
