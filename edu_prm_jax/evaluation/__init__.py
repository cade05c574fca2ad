"""Evaluation: ProcessBench and best-of-N metrics, reports."""
