"""Qwen2 model, its config, reward heads and checkpoint IO."""
