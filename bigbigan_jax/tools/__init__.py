"""Command-line tools beside the trainer: sampling, summaries, benchmarks, AOT compiles."""
