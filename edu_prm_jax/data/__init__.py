"""Data layer: validated JSONL records, dataset readers and TFDS array_record IO."""
